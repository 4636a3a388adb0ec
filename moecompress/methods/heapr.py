"""HEAPr (Li et al., arXiv 2509.22299): Hessian-based atomic-expert pruning in output space."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moecompress.calibration.collectors import ChannelGrads, Collector, SharedChannelGrads  # noqa: F401
from moecompress.compress.moe import moe_layers
from moecompress.errors import UserError
from moecompress.methods._channels import SHARED, Key, check_channel_target, make_plan, round_widths, select_channels
from moecompress.methods.base import ChannelPlan, Method, MethodConfig, Pass, register


class HeaprConfig(MethodConfig):
    """HEAPr, arXiv 2509.22299 (ICLR 2026). Atomic expert = one intermediate channel j of a routed expert i (its
    gate row, up row and down column). Score (OBS with an output-space Fisher, the expert's H×H curvature
    G_i = mean_{T_i} g gᵀ, g = ∂L/∂E_i(x)):

        s_ij = ½ · mean_{T_i}[a_j²] · w_down,jᵀ G_i w_down,j = ½ · mean_{T_i}[a_j²] · mean_{T_i}[(∂L/∂a_j)²]

    computed in the factorised (right-hand) form from **one** forward + backward (collector `channel_grads`): two
    length-I accumulators per expert, no H×H matrix and no second forward pass (the equality with the literal
    H×H form is tested to 1e-10 in float64). T_i = the valid (non-padding) calibration tokens routed to i; L =
    next-token cross-entropy summed over valid tokens (`loss_reduction`). The atoms of all MoE layers are ranked
    **globally** (the default scope of this method; `--scope layer` ranks per layer) and the lowest `--ratio`
    fraction of routed-expert channels is removed; each expert keeps its surviving channels in their original
    order, so widths differ per expert and may reach 0. **Width 0**: the expert stays in the router (paper
    semantics: router, top-k, attention unchanged) and outputs 0 (GPT-OSS: its down bias only).

    Options:
    * `score_form`: `product_of_means` (the paper, default) or `per_token` — ½·mean[a_j²·(∂L/∂a_j)²], the per-token
      diagonal Fisher/Taylor score (not the paper's; offered as in the method notes).
    * `token_reduction`: `mean` (the paper: means over |T_i|, usage frequency does not enter the score) or `sum`
      (G_i a sum: the score times |T_i|, frequency-aware like CAMERA / EASY-EP).
    * `loss_reduction`: `sum` (default; gradient scales comparable across batches of different valid-token
      counts) or `mean` (per-batch mean, HF's loss).
    * `include_shared`: also score and prune the shared experts' channels (g = ∂L/∂(shared output), over every
      valid token) in the same ranking. Default off, as in the paper (only modules under `.experts` are scored).
      Dense FFN layers (DeepSeek's `first_k_dense_replace`) are never touched.
    * `min_width_per_expert`: keep at least this many (best) channels in every expert (default 0: the paper lets
      a global ranking empty experts).
    * `round_to`: round every kept width up to a multiple of N by re-adding that expert's best dropped channels
      (capped at the full width; width 0 stays 0). If every width ends equal the checkpoint is stock HF.

    Never-routed experts (|T_i| = 0) score 0 on every channel, so they are pruned first (and warned about);
    experts routed fewer than 16 tokens are warned about as noisy.

    **Memory.** The score needs a backward through the whole model, so HEAPr runs with the model held in memory
    (`--onload memory`; larger than one device: `--device-map auto --max-memory … --offload-folder DIR`, each
    decoder layer onloaded for its forward and again for its recomputation). `activation_checkpointing` (default
    on) keeps only each decoder layer's input per batch (layers × batch × seq × hidden values) and recomputes one
    layer at a time in the backward; what stays is the routed intermediate activations a (Σ over MoE layers of
    batch × seq × top_k × I values), held by the statistic until the backward reaches their layer, plus the weights.

    Deviations: the ½ factor is kept (the reference code drops it; ranking unchanged); the score is computed in
    the factorised form rather than by materialising G_i (mathematically identical, tested); calibration data
    defaults to the toolkit's (the paper: 128 × 2048 WikiText-2 tokens, batch 8); the `per_token`, `sum`,
    `include_shared`, `min_width_per_expert` and `round_to` options are extensions, off by default.
    """

    score_form: Literal["product_of_means", "per_token"] = "product_of_means"
    token_reduction: Literal["mean", "sum"] = "mean"
    loss_reduction: Literal["sum", "mean"] = "sum"
    include_shared: bool = False
    min_width_per_expert: int = Field(0, ge=0, description="channels every expert keeps at least")
    activation_checkpointing: bool = Field(True, description="recompute each decoder layer in the backward "
                                           "instead of keeping its activations (same scores, less memory)")
    round_to: int | None = Field(None, ge=1, description="round kept widths up to a multiple of this")


@register
class Heapr(Method):
    name = "heapr"
    kind = "channel-pruning"
    paper = "arXiv 2509.22299"
    summary = "atomic (channel) pruning by an output-space Fisher/OBS score, ranked globally; variable widths"
    Config = HeaprConfig
    default_scope = "global"

    def collectors(self):
        c = [ChannelGrads(loss_reduction=self.config.loss_reduction)]
        if self.config.include_shared:
            c.append(SharedChannelGrads(loss_reduction=self.config.loss_reduction))
        return c

    def passes(self, target):
        return [Pass("backward", self.collectors(), checkpoint=self.config.activation_checkpointing,
                     label="heapr (forward + backward)")]

    def channel_scores(self, model, stats: dict[str, Collector]) -> dict[Key, torch.Tensor]:
        """s_ij per (layer, expert) (and (layer, "shared") with include_shared), float64."""
        grads = stats["channel_grads"]
        cfg = self.config
        scores: dict[Key, torch.Tensor] = {}
        for layer in moe_layers(model):
            i = layer.layer_idx
            if f"{i}.count" not in grads.state:
                raise UserError(f"channel_grads has no statistics for MoE layer {i}; recalibrate (--no-cache)")
            counts = grads.counts(i)
            for e in range(layer.num_experts):
                s = grads.heapr_score(i, e, cfg.score_form).double()
                if cfg.token_reduction == "sum":
                    s = s * float(counts[e])
                scores[(i, e)] = s
            if cfg.include_shared and layer.shared_mlp is not None:
                shared = stats.get("shared_channel_grads")
                if shared is None or f"{i}.sum_a2" not in shared.state:
                    raise UserError(f"heapr include_shared needs shared_channel_grads statistics for layer {i}")
                scores[(i, SHARED)] = shared.score(i, cfg.score_form, cfg.token_reduction)
        return scores

    def select(self, model, scores: dict[Key, torch.Tensor], ratio: float, scope: str) -> ChannelPlan:
        """The plan keeping the best (1 − ratio) of the channels in `scores` (ratio 0 keeps everything)."""
        kept = select_channels(scores, ratio, scope, self.config.min_width_per_expert)
        kept = round_widths(kept, scores, self.config.round_to)
        extra = {"scope": scope, "score_form": self.config.score_form,
                 "token_reduction": self.config.token_reduction, "round_to": self.config.round_to}
        return make_plan(model, kept, ratio, self.name, extra)

    def plan(self, model, stats, target):
        ratio = check_channel_target(target, self.name)
        return self.select(model, self.channel_scores(model, stats), ratio, target.scope)
