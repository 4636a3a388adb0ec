"""Random baseline: keep a seeded uniformly random set of experts (EEP reports mean ± std over ~30 seeds)."""

from __future__ import annotations

import torch

from moecompress.compress.moe import moe_layers
from moecompress.methods.base import ExpertPlan, Method, MethodConfig, register, select_experts


class RandomConfig(MethodConfig):
    """Uniformly random scores per expert from `seed`; selection then follows the same rules as every scored
    method (per layer, or `--scope global` with each layer keeping at least top_k; equal per group for
    group-limited routers). No data needed."""

    seed: int = 0


@register
class Random(Method):
    name = "random"
    kind = "expert-pruning"
    paper = "baseline (EEP, arXiv 2407.00945, §4)"
    summary = "keep a seeded random set of experts"
    Config = RandomConfig

    def plan(self, model, stats, target):
        generator = torch.Generator().manual_seed(self.config.seed)
        scores = {l.layer_idx: torch.rand(l.num_experts, generator=generator) for l in moe_layers(model)}
        return ExpertPlan(keep=select_experts(model, scores, target))
