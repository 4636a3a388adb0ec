"""EEP — Efficient Expert Pruning (arXiv 2407.00945): a gradient-free, task-specific genetic search over which
experts each layer group keeps (phase 1) and how kept experts absorb the dropped ones and the router is remapped
(phase 2), scored by an lm-eval task metric on a training split. The machinery lives in `eep_search/`."""

from __future__ import annotations

import logging
from pathlib import Path

from pydantic import Field, model_validator

from moecompress.compress.moe import moe_layers
from moecompress.errors import UserError
from moecompress.methods.base import ExpertPlan, Method, MethodConfig, register
from moecompress.methods.eep_search.operators import Probabilities
from moecompress.methods.eep_search.population import Population
from moecompress.methods.eep_search.search import Fitness, SearchResult, Settings, search
from moecompress.methods.eep_search.space import SearchSpace, to_plan

log = logging.getLogger("moecompress")


class EEPConfig(MethodConfig):
    """EEP, E. Liu et al., "Efficient Expert Pruning for Sparse Mixture-of-Experts Language Models" (arXiv
    2407.00945; algorithm as in the later version's Alg. 1).

    Phase 1 (`population` random routable selections, then `prune_steps` mutations) searches the E' experts each of
    `groups` contiguous depth groups keeps; phase 2 (`merge_steps`) searches real-valued W_EM (expert merging,
    θ'_j = Σ_i W_EM[j,i] θ_i for gate, up and down) and W_RM (router mapping p' = W_RM·softmax(W_G x), top-k,
    renormalised). The fitness is `metric` of lm-eval `task` on its `split` (first `fitness_limit` documents), in
    points (×100); the `final_top` best are re-scored on `final_split` (of `final_task`, default `task`) and the
    best there is returned. `top_k` lowers the number of active experts (with `--keep E`: phase 2 only, from the
    identity). `merge_steps: 0` is prune-only (a stock checkpoint).

    Deviations from the paper:
    * Fitness is an lm-eval metric (log-likelihood multiple choice by default), not generation + template matching.
    * Defaults: population 30 and the parent windows (3.0 points / top `parents_rank`=6; 1.0 point for crossover)
      are the reference code's; 40 + 160 iterations and every probability are the paper's. Phase 2's single
      parent (no crossover) uses phase 1's window; the population is every candidate of both phases.
    * A mutation that reproduces an already evaluated candidate is redrawn (up to 64 times; fitness is
      deterministic, so re-evaluating it would only bias parent sampling); initial candidates are distinct.
    * Row renormalisation (p=0.1) applies to the changed groups' rows; rows summing to ~0 are left unchanged.
    * Routers other than Mixtral-style renormalising softmax (Qwen2-MoE/OLMoE without norm_topk_prob, DeepSeek,
      Phi-MoE, GPT-OSS) keep W_RM one-hot (sliced router rows) and search W_EM only; crossover then keeps rows
      routable (a group that would not route is taken whole from parent A). This is not in the paper.
    * Group-limited routers (DeepSeek-V2/V3, not in the paper): every selection keeps the same count from each
      routing group, and mutation reassigns a row within its routing group (so `surgery.check_routable` holds).
    * Steps run in rounds of `batch` candidates bred from the population of earlier rounds (batch=1, the default
      under one process, is the paper's steady state); under `accelerate launch` a round's candidates are
      evaluated data-parallel, and `batch` defaults to the number of processes.
    * Shared experts are outside the search space (as in the paper's Qwen runs).
    """

    task: str | None = Field(None, description="lm-eval task (or group, scored as the mean) searched on")
    metric: str = Field("acc,none", description="lm-eval metric key, e.g. acc,none or acc_norm,none")
    split: str = Field("train", description="split of `task` scored as fitness")
    fitness_limit: int | None = Field(64, ge=1, description="documents per task per fitness evaluation")
    final_task: str | None = Field(None, description="task re-scoring the finalists (default: task)")
    final_split: str | None = Field("validation", description="held-out split for the final choice; null: none")
    final_limit: int | None = Field(None, ge=1, description="documents per task in re-scoring (default: all)")
    final_top: int = Field(20, ge=0, description="finalists re-scored on the held-out split")
    groups: int = Field(4, ge=0, description="contiguous depth groups sharing one candidate; 0: one per layer")
    population: int = Field(30, ge=1, description="initial random candidates")
    prune_steps: int = Field(40, ge=0, description="phase-1 (selection) mutations")
    merge_steps: int = Field(160, ge=0, description="phase-2 (merging) steps; 0: prune-only")
    top_k: int | None = Field(None, ge=1, description="lower the active experts per token")
    route_search: bool | None = Field(None, description="search a real-valued W_RM (default: where the router "
                                                        "allows it: renormalising softmax)")
    parent_window: float = Field(3.0, ge=0)
    merge_window: float = Field(1.0, ge=0)
    parents_rank: int = Field(6, ge=1)
    p_group: float = Field(0.25, gt=0, le=1)
    p_row: float = Field(0.15, ge=0, le=1)
    p_crossover: float = Field(0.3, ge=0, le=1)
    p_from_a: float = Field(0.6, ge=0, le=1)
    p_entry: float = Field(0.25, ge=0, le=1)
    sigma: float = Field(0.065, ge=0)
    p_renorm: float = Field(0.1, ge=0, le=1)
    seed: int = 0
    state_dir: str | None = Field(None, description="persist the population here after every evaluation; resume")
    batch: int | None = Field(None, ge=1, description="candidates per round (default: number of processes)")
    eval_batch_size: int = Field(16, ge=1, description="lm-eval batch size")
    num_fewshot: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _needs_task(self) -> "EEPConfig":
        if self.task is None:
            raise ValueError("EEP is task-specific: set task (an lm-eval task, e.g. task=reference_mc)")
        return self


@register
class EEP(Method):
    name = "eep"
    kind = "expert-pruning"
    paper = "arXiv 2407.00945"
    summary = "evolutionary search for kept experts, then expert merging and router remapping, on a task metric"
    Config = EEPConfig
    needs_tokenizer = True
    needs_weights_to_plan = True  # the fitness evaluates the whole model

    def __init__(self, config: EEPConfig | None = None, fitness: Fitness | None = None,
                 final_fitness: Fitness | None = None):
        """`fitness` / `final_fitness` replace the lm-eval ones (any callable model → float, higher is better)."""
        super().__init__(config)
        self.fitness, self.final_fitness = fitness, final_fitness
        self.result: SearchResult | None = None

    def plan(self, model, stats, target) -> ExpertPlan:
        c: EEPConfig = self.config
        layers = moe_layers(model)
        n_kept = target.kept_per_layer(layers[0])
        if target.scope != "layer":
            raise UserError("EEP keeps the same count in every layer; use --scope layer")
        space = SearchSpace.build(model, n_kept, c.groups, c.top_k, c.route_search)
        if not space.route_search and c.merge_steps:
            log.info("EEP: %s routing cannot take a real-valued router map; phase 2 searches W_EM only "
                     "(router rows sliced)", space.family)
        fitness, final = self.fitness, self.final_fitness
        if fitness is None:
            from moecompress.methods.eep_search.fitness import LmEvalFitness

            tok = self.context.tokenizer
            fitness = LmEvalFitness(tok, c.task, c.metric, c.split, c.fitness_limit, c.eval_batch_size, c.num_fewshot)
            if c.final_split is not None and c.final_top > 0:
                final = LmEvalFitness(tok, c.final_task or c.task, c.metric, c.final_split, c.final_limit,
                                      c.eval_batch_size, c.num_fewshot,
                                      manager=fitness.manager if c.final_task in (None, c.task) else None)
        settings = Settings(population=c.population, prune_steps=c.prune_steps, merge_steps=c.merge_steps,
                            parent_window=c.parent_window, merge_window=c.merge_window, parents_rank=c.parents_rank,
                            final_top=c.final_top, batch=c.batch or self.context.world_size,
                            p=Probabilities(c.p_group, c.p_row, c.p_crossover, c.p_from_a, c.p_entry, c.sigma,
                                            c.p_renorm))
        fingerprint = {"model": _model_fingerprint(model), "space": space.fingerprint(),
                       "options": c.model_dump(exclude={"state_dir", "final_top", "eval_batch_size"}),
                       "batch": settings.batch}
        population = Population(fingerprint, c.seed, Path(c.state_dir).expanduser() if c.state_dir else None)
        self.result = search(model, space, fitness, settings, population, final)
        best = self.result.best
        log.info("EEP: best candidate step %d (phase %d), training fitness %.2f%s", best.step, best.phase,
                 best.fitness, "" if best.final is None else f", held-out {best.final:.2f}")
        return to_plan(space, best.merge, best.route)


def _model_fingerprint(model) -> str:
    """A cheap identity of the model being searched: config + a hash of the MoE routers (resume safety)."""
    import hashlib

    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for layer in moe_layers(model):
        h.update(layer.router.weight.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
