"""CAMERA-P (Xu et al., arXiv 2508.02322): micro-expert energy pruning, layer by layer."""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from moecompress.calibration.collectors import ChannelStats, Collector
from moecompress.compress.experts import dense_weight
from moecompress.compress.moe import MoELayer, moe_layers
from moecompress.compress.surgery import keep_channels
from moecompress.errors import UserError
from moecompress.methods._channels import (
    SHARED,
    Key,
    channel_costs,
    check_channel_target,
    make_plan,
    round_widths,
    select_channels,
)
from moecompress.methods.base import ChannelPlan, Method, MethodConfig, Pass, register

log = logging.getLogger("moecompress")


class CameraPConfig(MethodConfig):
    """CAMERA-P, arXiv 2508.02322 (AAAI 2026). Micro-expert = one intermediate channel k of one expert (gate row,
    up row, down column); shared-expert channels are micro-experts too. Energy, per the reference code:

        E_ik = ‖w_down,i,k‖² · [ (1 − α) · Σ_t φ_ik(x_t)² + α · max_t φ_ik(x_t)² ]

    with φ_ik(x) = g_i(x) · a_ik(x), g_i the routing weight the model applies (its own router: top-k,
    renormalisation and routed_scaling_factor from the config; 0 when i is not selected), 1 for a DeepSeek shared
    expert and sigmoid(shared_expert_gate·x) for a Qwen2-MoE one. Σ and max run over the valid (non-padding)
    calibration tokens — a **sum**, so usage frequency counts. All micro-experts of a layer (routed + shared) are
    ranked **jointly** and the lowest `--ratio` fraction of them is removed, the same fraction in every layer, so
    experts and the shared expert end with different widths (a routed expert may reach width 0: it stays routable
    and outputs 0 — GPT-OSS: its down bias only). `--ratio` counts the layer's micro-experts including the shared
    expert's, as in the paper; the plan's facts also report the routed-channel and total-parameter fractions.

    **Sequential** (`sequential=true`, default, the paper): one layer-by-layer pass run by the runner after
    `plan()` (which only fixes the ratio): each MoE layer's statistics are gathered on the outputs of the *already
    pruned* previous layers, the layer is pruned for real in the pass's layer hook, and its pruned outputs are
    propagated; the kept channels are recorded layer by layer into the plan (`finish`). The statistics of this
    pass are not cached (they depend on the pruning). `sequential=false` scores every layer from one full forward
    pass of the unpruned model (collector `channels`, cacheable; its plan reads `down_proj`, so it needs the model
    in memory).

    Options: `alpha` (default 0.9, the reference code's run script; its CLI default is 1.0 = pure max);
    `include_shared` (default true, the paper; false leaves shared experts whole and ranks routed channels only);
    `round_to` (round every kept width up to a multiple of N by re-adding that expert's best dropped channels,
    capped at the full width — the paper's Ascend variant rounds to 64; if every width ends equal the checkpoint
    is stock HF).

    Deviations: pruned channels are sliced away (the reference code zeros them; identical outputs); routing is
    the model's own router for every family (the reference code hard-codes per-family branches with known bugs:
    Qwen2 shared-expert chunks, Qwen3 top-8, DeepSeek renormalisation); only `--scope layer` (the paper's) is
    offered; calibration data defaults to the toolkit's (the paper: 128 × 2048 WikiText-2 tokens, seed 1234).
    Never-routed experts have energy 0 on every channel, so they are pruned first."""

    alpha: float = Field(0.9, ge=0.0, le=1.0, description="weight of the max term (1 = pure max)")
    sequential: bool = Field(True, description="layer-by-layer statistics on the progressively pruned model")
    include_shared: bool = Field(True, description="rank the shared experts' channels jointly (paper)")
    round_to: int | None = Field(None, ge=1, description="round kept widths up to a multiple of this")


def layer_energy(layer: MoELayer, stats: ChannelStats, alpha: float, include_shared: bool) -> dict[Key, torch.Tensor]:
    """CAMERA energies of every micro-expert of one MoE layer, from `channels` statistics of that layer."""
    i = layer.layer_idx
    out: dict[Key, torch.Tensor] = {}
    for e in range(layer.num_experts):
        down = layer.expert_weights(e).down.detach().double()
        norm2 = (down * down).sum(0)
        if f"{i}.sum_ga2" in stats.state:
            s, m = stats.sum_ga2(i, e), stats.max_ga(i, e)
        else:  # the layer saw no token at all
            s = m = torch.zeros_like(norm2)
        out[(i, e)] = norm2 * ((1 - alpha) * s + alpha * m * m)
    mlp = layer.shared_mlp
    if include_shared and mlp is not None:
        s, m = stats.shared_sum_ga2(i), stats.shared_max_ga(i)
        if s is None:
            raise UserError(f"layer {i}: no shared-expert statistics (collector channels with shared=True)")
        down = dense_weight(mlp.down_proj).detach().double()
        out[(i, SHARED)] = (down * down).sum(0) * ((1 - alpha) * s + alpha * m * m)
    return out


@register
class CameraP(Method):
    name = "camera_p"
    kind = "channel-pruning"
    paper = "arXiv 2508.02322"
    summary = "micro-expert (channel) energy pruning per layer, shared experts included, layer by layer"
    Config = CameraPConfig
    needs_tokenizer = True

    def __init__(self, config=None):
        super().__init__(config)
        self.scores: dict[Key, torch.Tensor] = {}  # the energies of the last plan (tests, reports)
        self._kept: dict[Key, list[int]] = {}
        self._costs = None
        self._ratio = 0.0

    @property
    def needs_weights_to_plan(self) -> bool:  # the one-pass variant ranks energies that read down_proj
        return not self.config.sequential

    def collectors(self):
        return [] if self.config.sequential else [ChannelStats(shared=self.config.include_shared)]

    def passes(self, target):
        if not self.config.sequential:
            return super().passes(target)
        return [Pass("sequential", [ChannelStats(shared=self.config.include_shared)], on_layer=self._prune_layer,
                     changes_model=True, after_plan=True, label="camera_p (layer-wise)")]

    def _select_layer(self, energy: dict[Key, torch.Tensor], ratio: float) -> dict[Key, list[int]]:
        kept = select_channels(energy, ratio, "layer")
        return round_widths(kept, energy, self.config.round_to)

    def _extra(self) -> dict:
        cfg = self.config
        return {"alpha": cfg.alpha, "sequential": cfg.sequential, "round_to": cfg.round_to,
                "layer_ratio_counts_shared": cfg.include_shared}

    def plan(self, model, stats, target):
        ratio = check_channel_target(target, self.name)
        if target.scope != "layer":
            raise UserError("camera_p prunes the same fraction in every layer (the paper); use --scope layer")
        if self.config.sequential:  # decided layer by layer during the pass that follows (`_prune_layer`)
            self._costs, self._ratio, self._kept, self.scores = channel_costs(model), ratio, {}, {}
            return ChannelPlan(channels={}, facts={"target_ratio": ratio, **self._extra()})
        return self.select(model, stats, ratio)

    def select(self, model, stats: dict[str, Collector], ratio: float) -> ChannelPlan:
        """The one-pass plan at `ratio` (0 keeps everything) from `stats["channels"]` of the unpruned model."""
        cfg = self.config
        kept: dict[Key, list[int]] = {}
        self.scores = {}
        for layer in moe_layers(model):
            energy = layer_energy(layer, stats["channels"], cfg.alpha, cfg.include_shared)
            self.scores.update(energy)
            kept.update(self._select_layer(energy, ratio))
        return make_plan(model, kept, ratio, self.name, self._extra())

    # ----- the sequential pass ----------------------------------------------------------------------------------
    def _prune_layer(self, step) -> None:
        """Rank this layer's micro-experts on statistics gathered on the outputs of the already pruned layers, and
        prune it for real: its recomputed outputs feed the next layer."""
        if step.moe is None:
            return
        idx, cfg = step.index, self.config
        channels = step.stats["channels"]
        energy = layer_energy(step.moe, channels, cfg.alpha, cfg.include_shared)
        self.scores.update(energy)
        layer_kept = self._select_layer(energy, self._ratio)
        self._kept.update(layer_kept)
        channels.drop_layer(idx)
        routed = {e: c for (l, e), c in layer_kept.items() if e != SHARED}
        shared = {idx: layer_kept[(idx, SHARED)]} if (idx, SHARED) in layer_kept else None
        keep_channels(step.model, {idx: routed}, shared)

    def apply_layer(self, model, plan, stats, index):
        if not self.config.sequential:  # the sequential pass pruned each layer already
            super().apply_layer(model, plan, stats, index)

    def finish(self, model, plan):
        if not self.config.sequential:
            return plan
        return make_plan(self._costs, self._kept, self._ratio, self.name, self._extra())
