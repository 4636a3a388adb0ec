"""CAMERA-P (Xu et al., arXiv 2508.02322): micro-expert energy pruning, layer by layer."""

from __future__ import annotations

import logging

import torch
from pydantic import Field

from moecompress.calibration.collectors import ChannelStats, Collector
from moecompress.compress.experts import dense_weight
from moecompress.compress.moe import MoELayer, moe_layers
from moecompress.compress.surgery import keep_channels, sync_config
from moecompress.errors import UserError
from moecompress.methods._channels import SHARED, Key, check_channel_target, make_plan, round_widths, select_channels
from moecompress.methods.base import ChannelPlan, Method, MethodConfig, register

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

    **Sequential** (`sequential=true`, default, the paper): one layer-by-layer pass (the sequential engine,
    `run_sequential`, with a per-layer callback): each MoE layer's statistics are gathered on the outputs of the
    *already pruned* previous layers, the layer is pruned, and its pruned outputs are propagated. The pass prunes
    each layer only temporarily (the previous layer is restored when the next is pruned, so memory holds at most
    one extra sliced layer) and `plan()` leaves the model as it found it; `apply_plan` then slices. The
    statistics of this pass are not cached (they depend on the pruning). `sequential=false` scores every layer
    from one full forward pass of the unpruned model (collector `channels`, cacheable).

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
        self.facts: dict = {}

    def collectors(self):
        return [] if self.config.sequential else [ChannelStats(shared=self.config.include_shared)]

    def _select_layer(self, energy: dict[Key, torch.Tensor], ratio: float) -> dict[Key, list[int]]:
        kept = select_channels(energy, ratio, "layer")
        return round_widths(kept, energy, self.config.round_to)

    def plan(self, model, stats, target):
        ratio = check_channel_target(target, self.name)
        if target.scope != "layer":
            raise UserError("camera_p prunes the same fraction in every layer (the paper); use --scope layer")
        return self.select(model, stats, ratio)

    def select(self, model, stats: dict[str, Collector], ratio: float) -> ChannelPlan:
        """The plan at `ratio` (0 keeps everything): from `stats["channels"]`, or a sequential pass."""
        cfg = self.config
        kept: dict[Key, list[int]] = {}
        self.scores = {}
        if cfg.sequential:
            kept = self._sequential(model, ratio)
        else:
            for layer in moe_layers(model):
                energy = layer_energy(layer, stats["channels"], cfg.alpha, cfg.include_shared)
                self.scores.update(energy)
                kept.update(self._select_layer(energy, ratio))
        extra = {"alpha": cfg.alpha, "sequential": cfg.sequential, "round_to": cfg.round_to,
                 "layer_ratio_counts_shared": cfg.include_shared, **self.facts}
        return make_plan(model, kept, ratio, self.name, extra)

    # ----- the sequential pass ----------------------------------------------------------------------------------
    def _calibration(self, model):
        from moecompress.calibration.data import build_calibration

        ctx = self.context
        if ctx.calibration is None or ctx.tokenizer is None:
            raise UserError("camera_p (sequential) needs calibration data and a tokenizer; run it through "
                            "`moecompress prune` / a recipe, or set method.context")
        return build_calibration(ctx.tokenizer, ctx.calibration, model=model)

    def _sequential(self, model, ratio: float) -> dict[Key, list[int]]:
        from moecompress.calibration.engine import run_sequential

        cfg = self.config
        calib = self._calibration(model)
        kept: dict[Key, list[int]] = {}
        undo: list = []  # how to restore the layer pruned last (one at a time)

        def restore() -> None:
            while undo:
                undo.pop()()

        def callback(idx, decoder_layer, moe, collected) -> None:
            restore()
            if moe is None:
                return
            channels = collected["channels"]
            energy = layer_energy(moe, channels, cfg.alpha, cfg.include_shared)
            self.scores.update(energy)
            layer_kept = self._select_layer(energy, ratio)
            kept.update(layer_kept)
            channels.drop_layer(idx)
            # prune this layer for real (sliced) so its recomputed outputs feed the next layer; undo at the next
            experts = moe.block.experts
            undo.append(lambda block=moe.block, experts=experts: setattr(block, "experts", experts))
            mlp = moe.shared_mlp
            if mlp is not None:
                saved = {n: getattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}
                width = getattr(mlp, "intermediate_size", None)

                def undo_shared(mlp=mlp, saved=saved, width=width):
                    for n, m in saved.items():
                        setattr(mlp, n, m)
                    if width is not None:
                        mlp.intermediate_size = width

                undo.append(undo_shared)
            routed = {e: c for (l, e), c in layer_kept.items() if e != SHARED}
            shared = {idx: layer_kept[(idx, SHARED)]} if (idx, SHARED) in layer_kept else None
            keep_channels(model, {idx: routed}, shared)

        batch_size = getattr(self.context.calibration, "batch_size", 8)
        try:
            facts = run_sequential(model, calib, [ChannelStats(shared=cfg.include_shared)], batch_size=batch_size,
                                   callback=callback, description="camera_p (layer-wise)")
        finally:
            restore()
            sync_config(model)
        self.facts = {"calibration": {k: facts[k] for k in ("engine", "tokens", "seconds", "sequences")
                                      if k in facts}}
        return kept
