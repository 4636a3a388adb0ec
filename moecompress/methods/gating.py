"""Gating-score baseline (EASY-EP's wording) and soft activation (EEP's / SEER-MoE's "soft count")."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moecompress.calibration.collectors import RoutingCounts
from moecompress.methods.base import ExpertPlan, Method, MethodConfig, layer_scores, register, select_experts


class GatingConfig(MethodConfig):
    """`signal=weight` (default): Score_i = Σ_{t∈T_i} g_{t,i}, the final routing weight summed over the tokens
    routed to i (EASY-EP's "gating score" baseline, arXiv 2504.06792). `signal=prob`: Score_i = Σ_t p_{t,i}, the
    router probability summed over *all* tokens (EEP's "soft activation", arXiv 2407.00945; for DeepSeek-V3 the
    sigmoid score). g is the weight the model really applies (after `norm_topk_prob` / `routed_scaling_factor`);
    the manifest records which signal was used. No deviation."""

    signal: Literal["weight", "prob"] = Field("weight", description="weight: Σ routed g; prob: Σ p over all tokens")


@register
class Gating(Method):
    name = "gating"
    kind = "expert-pruning"
    paper = "arXiv 2504.06792 (baseline)"
    summary = "keep the experts with the largest summed routing weight (or soft activation)"
    Config = GatingConfig

    def collectors(self):
        return [RoutingCounts()]

    def plan(self, model, stats, target):
        key = "weight_sum" if self.config.signal == "weight" else "prob_sum"
        scores = layer_scores(stats["routing"], key)
        return ExpertPlan(keep=select_experts(model, scores, target), scores={i: s.tolist() for i, s in scores.items()})
