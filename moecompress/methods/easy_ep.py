"""EASY-EP (Dong et al., arXiv 2504.06792): few-shot domain-specific expert pruning."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from moecompress.calibration.collectors import EasyEPScore
from moecompress.errors import UserError
from moecompress.methods.base import ExpertPlan, Method, MethodConfig, Pass, register, select_experts


class EasyEPConfig(MethodConfig):
    """I_l(i) = Σ_samples Σ_t g_{i,t}·‖e_{i,t}‖₂ · max(0, 1 − cos(h_t, h_t + Σ_routed g·e)) over demonstrations
    (prompt + the model's own answer: calibration source `demos:PROMPTS.jsonl`); keep the top M per layer.

    * `domains`: several calibration sources (e.g. `demos:math.jsonl`, `demos:code.jsonl`) → mixed-domain
      pruning: each domain's score vector is normalised to sum 1 per layer, then the domains are summed. Empty:
      the recipe's calibration source is the one domain.
    * `deploy`: `physical` slices the experts and router rows (stock checkpoint; for group-limited routers the top
      M/n_group per group — a deviation from the paper, which keeps a uniform top-M; pitfalls §5 option 2);
      `masked` keeps the paper's uniform top-M and the full router with pruned experts excluded before top-k and
      group selection (native checkpoint, `MaskedRouter`); `no_reroute` routes exactly as the full model and
      pruned experts contribute nothing, stored as the kept experts plus the full router that maps pruned
      selections to weight 0 (native checkpoint).
    * `hidden`: h is the residual stream entering the MoE sub-block (paper), or the normed block input.
    Demonstrations are answered greedily (the paper does not state its generation settings)."""

    domains: list[str] = Field(default_factory=list, description="calibration sources, one per domain")
    deploy: Literal["physical", "masked", "no_reroute"] = "physical"
    hidden: Literal["residual", "block_input"] = "residual"


@register
class EasyEP(Method):
    name = "easy_ep"
    kind = "expert-pruning"
    paper = "arXiv 2504.06792"
    summary = "domain pruning from a few self-answered demonstrations: gate × output norm × hidden-state change"
    Config = EasyEPConfig
    needs_tokenizer = True

    def collectors(self):
        return [] if self.config.domains else [EasyEPScore(self.config.hidden)]

    def passes(self, target):
        """One forward pass over the recipe's calibration source, or one per domain (`domains`)."""
        if not self.config.domains:
            return super().passes(target)
        return [Pass("forward", [EasyEPScore(self.config.hidden)], source=source, label=f"easy_ep domain {source}")
                for source in self.config.domains]

    def plan(self, model, stats, target):
        if self.config.domains:
            scores = self._mixed_scores(stats)
        else:
            ep = stats["easy_ep"]
            scores = {i: ep.score(i) for i in ep.layers()}
        keep = select_experts(model, scores, target, grouped=self.config.deploy == "physical")
        routing = {"physical": "sliced", "masked": "masked", "no_reroute": "no_reroute"}[self.config.deploy]
        return ExpertPlan(keep=keep, scores={i: s.tolist() for i, s in scores.items()}, routing=routing)

    def _mixed_scores(self, stats) -> dict[int, torch.Tensor]:
        """Each domain's score normalised to sum 1 per layer, then summed over the domains."""
        total: dict[int, torch.Tensor] = {}
        for source in self.config.domains:
            key = f"easy_ep@{source}"
            if key not in stats:
                raise UserError(f"easy_ep: no statistics for domain {source}; run it through the runner "
                                f"(moecompress prune / a recipe)")
            ep = stats[key]
            for i in ep.layers():
                score = ep.score(i)
                normalised = score / score.sum() if score.sum() > 0 else score
                total[i] = total.get(i, torch.zeros_like(score)) + normalised
        return total
