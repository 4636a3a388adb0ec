"""Frequency baseline ("hard count", SEER-MoE, arXiv 2404.05089): keep the experts routed the most tokens."""

from __future__ import annotations

from moecompress.calibration.collectors import RoutingCounts
from moecompress.methods.base import ExpertPlan, Method, MethodConfig, layer_scores, register, select_experts


class FrequencyConfig(MethodConfig):
    """Score_i = |T_i|, the number of calibration tokens routed to expert i (padding excluded).

    No deviation from the baseline as described in the EEP and EASY-EP papers. With `--scope global` counts are
    compared across layers directly (every layer routes the same tokens × top_k, so counts are commensurate)."""


@register
class Frequency(Method):
    name = "frequency"
    kind = "expert-pruning"
    paper = "arXiv 2404.05089"
    summary = "keep the experts that calibration routes the most tokens to"
    Config = FrequencyConfig

    def collectors(self):
        return [RoutingCounts()]

    def plan(self, model, stats, target):
        scores = layer_scores(stats["routing"], "count")
        keep = select_experts(model, scores, target)
        return ExpertPlan(keep=keep, scores={i: s.tolist() for i, s in scores.items()})

