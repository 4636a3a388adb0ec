"""The search space: contiguous layer groups sharing one (W_EM, W_RM) pair, what a routable selection is, and the
conversion of a candidate into the `ExpertPlan` that both the search (evaluation) and the export apply.

A candidate is two float32 tensors `merge` (W_EM) and `route` (W_RM), each [G, E', E]. Phase-1 candidates are
tied one-hot selections (`merge == route`, rows one-hot over distinct experts, in ascending expert order).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from moecompress.compress.families import uses_groups
from moecompress.compress.moe import MoELayer, moe_layers
from moecompress.compress.surgery import check_routable, one_hot_picks
from moecompress.errors import UserError
from moecompress.methods.base import ExpertPlan

log = logging.getLogger("moecompress")


@dataclass
class SearchSpace:
    groups: list[list[int]]  # MoE layer indices of each contiguous depth group
    n_experts: int  # E
    n_kept: int  # E'
    top_k: int | None  # the reduced top-k, or None to keep each layer's
    route_search: bool  # W_RM may be real-valued (MappedRouter); else it stays one-hot (sliced router)
    routing_groups: int  # n_group of a group-limited router (experts in contiguous routing groups), else 1
    family: str
    layers: dict[int, MoELayer]

    @classmethod
    def build(cls, model: nn.Module, n_kept: int, groups: int, top_k: int | None,
              route_search: bool | None = None) -> "SearchSpace":
        layers = moe_layers(model)
        counts = {l.num_experts for l in layers}
        if len(counts) != 1:
            raise UserError(f"EEP needs the same expert count in every MoE layer, got {sorted(counts)}")
        n_experts = counts.pop()
        if not 1 <= n_kept <= n_experts:
            raise UserError(f"EEP: cannot keep {n_kept} of {n_experts} experts")
        spec, config = layers[0].spec, model.config
        n_groups = len(layers) if groups == 0 else min(groups, len(layers))
        if groups > len(layers):
            log.info("EEP: %d layer groups requested, the model has %d MoE layers; using one group per layer",
                     groups, len(layers))
        bounds = torch.linspace(0, len(layers), n_groups + 1).round().long().tolist()
        layer_groups = [[l.layer_idx for l in layers[a:b]] for a, b in zip(bounds, bounds[1:])]
        if any(len(set(l.widths())) != 1 for l in layers):
            raise UserError("EEP merges whole experts; every expert of a layer must have one width")
        routing_groups = (config.n_group or 1) if uses_groups(spec, config) else 1
        mappable = spec.routing == "softmax_topk" and spec.norm_topk_prob(config)
        if route_search is None:
            route_search = mappable
        elif route_search and not mappable:
            raise UserError(f"a real-valued router map needs a renormalising softmax router (Mixtral, Qwen3/OLMoE with "
                            f"norm_topk_prob); {spec.name} keeps W_RM one-hot: set route_search=false")
        space = cls(layer_groups, n_experts, n_kept, top_k, route_search, routing_groups, spec.model_type,
                    {l.layer_idx: l for l in layers})
        if routing_groups > 1 and n_kept % routing_groups:
            raise UserError(f"{spec.name} routes within {routing_groups} expert groups: the kept count must be a "
                            f"multiple of {routing_groups} (equal per group), got {n_kept}")
        space.check([list(range(n_kept)) if routing_groups == 1 else space._first_per_group()] * len(layer_groups))
        return space

    # ----- selections -------------------------------------------------------------------------------------------
    @property
    def n_groups(self) -> int:
        return len(self.groups)

    @property
    def per_routing_group(self) -> int:
        return self.n_experts // self.routing_groups

    def routing_group(self, expert: int) -> int:
        return expert // self.per_routing_group

    def _first_per_group(self) -> list[int]:
        c = self.n_kept // self.routing_groups
        return [g * self.per_routing_group + i for g in range(self.routing_groups) for i in range(c)]

    def check(self, picks: list[list[int]]) -> None:
        """Raise UserError if a per-group selection (or one-hot W_RM rows) cannot route in some layer."""
        for group, sel in zip(self.groups, picks):
            for idx in group:
                check_routable(self.layers[idx], sel, self.top_k)

    def routable(self, g: int, sel: list[int]) -> bool:
        try:
            self.check_group(g, sel)
            return True
        except UserError:
            return False

    def check_group(self, g: int, sel: list[int]) -> None:
        for idx in self.groups[g]:
            check_routable(self.layers[idx], sel, self.top_k)
        if self.routing_groups > 1 and list(sel) != sorted(sel):
            raise UserError("group-limited routing needs ascending kept experts")

    def one_hot(self, picks: list[list[int]]) -> torch.Tensor:
        out = torch.zeros(self.n_groups, self.n_kept, self.n_experts)
        for g, sel in enumerate(picks):
            out[g, torch.arange(self.n_kept), torch.tensor(sel)] = 1.0
        return out

    def fingerprint(self) -> dict:
        return {"groups": self.groups, "n_experts": self.n_experts, "n_kept": self.n_kept, "top_k": self.top_k,
                "route_search": self.route_search, "routing_groups": self.routing_groups, "family": self.family}


# ----- candidates ---------------------------------------------------------------------------------------------
def selection(merge: torch.Tensor, route: torch.Tensor) -> list[list[int]] | None:
    """The per-group kept experts if the candidate is a pure selection (tied one-hot matrices), else None."""
    if not torch.equal(merge, route):
        return None
    picks = [one_hot_picks(m) for m in merge]
    return None if any(p is None for p in picks) else picks


def candidate_key(merge: torch.Tensor, route: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(merge.contiguous().numpy().tobytes())
    h.update(route.contiguous().numpy().tobytes())
    return h.hexdigest()[:24]


def to_plan(space: SearchSpace, merge: torch.Tensor, route: torch.Tensor) -> ExpertPlan:
    """The ExpertPlan of a candidate: a pure selection → `keep` (stock checkpoint); otherwise per-layer `merge` and
    `router_map` (native checkpoint with a MappedRouter where W_RM is real-valued). `keep` of a merged plan lists
    each merged slot's dominant source expert (what `--dry-run` prints)."""
    picks = selection(merge, route)
    if picks is not None:
        keep = {idx: sorted(sel) for g, group in enumerate(space.groups) for idx in group for sel in [picks[g]]}
        return ExpertPlan(keep=keep, top_k=space.top_k)
    keep, merges, maps = {}, {}, {}
    for g, group in enumerate(space.groups):
        dominant = merge[g].abs().argmax(dim=1).tolist()
        for idx in group:
            keep[idx] = dominant
            merges[idx] = merge[g].tolist()
            maps[idx] = route[g].tolist()
    return ExpertPlan(keep=keep, merge=merges, router_map=maps, top_k=space.top_k)
