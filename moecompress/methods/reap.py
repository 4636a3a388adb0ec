"""REAP baseline (Lasby et al., arXiv 2510.13999): router-weighted expert activation pruning."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moecompress.calibration.collectors import ReapSaliency
from moecompress.methods.base import ExpertPlan, Method, MethodConfig, register, select_experts


class ReapConfig(MethodConfig):
    """S_e = (1/|T_e|) Σ_{x∈T_e} g_e(x)·‖f_e(x)‖₂ over calibration tokens with real routing (never-routed experts
    score 0). `criterion=ean` ranks by Σ‖f_e‖ instead (the EAN ablation of the same repository).

    `renormalize=True` turns on top-k renormalisation (`norm_topk_prob`) in the pruned model, REAP's
    `renormalize_router_weights` (its README reports a 1.9 % mean drop vs 2.6 % without). Deviation: g in the
    score is the weight the *unpruned* model applies (renormalised only if the model renormalises), while REAP
    computes the score with renormalised weights when that option is on; for renormalising routers (Mixtral,
    Qwen3 with norm_topk_prob, DeepSeek-V3) the two are identical."""

    criterion: Literal["reap", "ean"] = "reap"
    renormalize: bool = Field(False, description="switch norm_topk_prob on after pruning (families with the flag)")


@register
class Reap(Method):
    name = "reap"
    kind = "expert-pruning"
    paper = "arXiv 2510.13999"
    summary = "keep the experts with the largest mean router-weighted output norm"
    Config = ReapConfig

    def collectors(self):
        return [ReapSaliency()]

    def plan(self, model, stats, target):
        reap = stats["reap"]
        score = reap.saliency if self.config.criterion == "reap" else reap.ean
        scores = {i: score(i) for i in reap.layers()}
        return ExpertPlan(keep=select_experts(model, scores, target), scores={i: s.tolist() for i, s in scores.items()},
                          renormalize=self.config.renormalize or None)
