"""NAEE layer-wise expert pruning (Lu et al., ACL 2024, arXiv 2402.14800)."""

from __future__ import annotations

import copy
import itertools
import math
import random as _random

import torch
import torch.nn.functional as F
from pydantic import Field

from moecompress.calibration.collectors import BlockIO
from moecompress.compress.families import uses_groups
from moecompress.compress.moe import MoELayer, moe_layers
from moecompress.compress.surgery import slice_router
from moecompress.methods.base import ExpertPlan, LayerStep, Method, MethodConfig, Pass, Target, register


class NaeeConfig(MethodConfig):
    """Per MoE layer, keep the expert subset S (|S| = E') minimising ‖F(X) − F_S(X)‖_F on cached block inputs X,
    where F_S is the block with only S kept — routed exactly as the pruned model will route (the family's sliced
    router: for softmax routers softmax over the kept logits, top-k, renormalised as the family does; shared
    experts included in both outputs).

    All C(E, E') subsets are scored when there are at most `max_subsets`; otherwise `samples` subsets are drawn
    uniformly (seeded per layer), as EEP's reproduction did for large E. Group-limited routers only consider subsets with
    the same count per group (the surgery rule). Deviation: the paper's Mixtral code enumerates with its own
    routing; here any family is routed by its own (sliced) router. Layer-wise (not progressive) variant."""

    max_subsets: int = Field(3000, ge=1, description="enumerate all subsets up to this many")
    samples: int = Field(2000, ge=1, description="subsets drawn when enumeration is too large")
    max_tokens: int = Field(1024, ge=16, description="block inputs sampled per layer")
    seed: int = 0


@register
class Naee(Method):
    name = "naee"
    kind = "expert-pruning"
    paper = "arXiv 2402.14800"
    summary = "per layer, the expert subset that best reconstructs the block output (enumerated or sampled)"
    Config = NaeeConfig

    def __init__(self, config=None):
        super().__init__(config)
        self._chosen: dict[int, tuple[list[int], float]] = {}
        self._target: Target | None = None

    def collectors(self):
        return [BlockIO(max_tokens=self.config.max_tokens, seed=self.config.seed)]

    def passes(self, target):
        """The subset search needs each layer's expert weights: it runs in the layer hook of a layer-wise pass,
        once the layer's block samples are complete (the block samples themselves are cacheable)."""
        self._target, self._chosen = target, {}
        return [Pass("sequential", self.collectors(), on_layer=self._choose, label="naee subsets")]

    def _choose(self, step) -> None:
        if step.moe is None:
            return
        block_io, layer = step.stats["block_io"], step.moe
        rng = _random.Random(f"{self.config.seed}:{layer.layer_idx}")
        self._chosen[layer.layer_idx] = self._best_subset(
            layer, block_io.inputs(layer.layer_idx), block_io.outputs(layer.layer_idx),
            self._target.kept_per_layer(layer), rng)

    def plan(self, model, stats, target):
        if not self._chosen:  # called directly on a model in memory: search every layer now
            self._target = target
            for layer in moe_layers(model):
                self._choose(LayerStep(layer.layer_idx, None, layer, stats, None, model))
        keep = {i: best for i, (best, _) in sorted(self._chosen.items())}
        errors = {i: [err] for i, (_, err) in sorted(self._chosen.items())}
        return ExpertPlan(keep=keep, scores=errors)

    def _best_subset(self, layer: MoELayer, x, y, kept: int, rng) -> tuple[list[int], float]:
        with torch.no_grad():
            dtype = layer.router_weight.dtype
            x = x.to(dtype)
            outputs = torch.stack([_expert_output(layer, e, x) for e in range(layer.num_experts)])  # [E, n, H]
            shared = layer.shared_forward(x)
            best, best_err = None, math.inf
            for subset in self._subsets(layer, kept, rng):
                _, weights, index = slice_router(copy.deepcopy(layer.router), subset)(x)
                chosen = outputs[torch.tensor(subset)[index], torch.arange(len(x))[:, None]]  # [n, k, H]
                out = (chosen * weights[..., None].to(chosen.dtype)).sum(dim=1)
                if shared is not None:
                    out = out + shared
                err = float(torch.linalg.norm(out.double() - y.double()))
                if err < best_err:
                    best, best_err = list(subset), err
        return sorted(best), best_err

    def _subsets(self, layer: MoELayer, kept: int, rng):
        n = layer.num_experts
        groups = [list(range(n))]
        per_group = kept
        if uses_groups(layer.spec, layer.config):
            n_group = layer.config.n_group or 1
            size = n // n_group
            groups = [list(range(g * size, (g + 1) * size)) for g in range(n_group)]
            per_group = max(1, round(kept / n_group))
        total = math.comb(len(groups[0]), per_group) ** len(groups)
        if total <= self.config.max_subsets:
            for parts in itertools.product(*(itertools.combinations(g, per_group) for g in groups)):
                yield [e for part in parts for e in part]
            return
        seen = set()
        while len(seen) < self.config.samples:
            subset = tuple(sorted(e for g in groups for e in rng.sample(g, per_group)))
            if subset not in seen:
                seen.add(subset)
                yield list(subset)


def _expert_output(layer: MoELayer, e: int, x: torch.Tensor) -> torch.Tensor:
    w = layer.expert_weights(e)
    return F.linear(layer.expert_intermediate(w, x), w.down, w.down_bias)
