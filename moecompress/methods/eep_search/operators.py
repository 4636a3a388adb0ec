"""EEP's genetic operators (arXiv 2407.00945, Alg. 1), on [G, E', E] float32 tensors, drawing from a numpy Generator.

Every draw comes from the generator passed in, so a step's candidate is a pure function of (seed, step, population):
that is what makes a killed search resume exactly and a data-parallel search equal a serial one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moecompress.methods.eep_search.space import SearchSpace, one_hot_picks


@dataclass(frozen=True)
class Probabilities:
    group: float = 0.25  # each layer group is changed with this probability (at least one is)
    row: float = 0.15  # phase 1: each row of a changed group is reassigned with this probability
    crossover: float = 0.3  # phase 2: crossover instead of a single parent
    from_a: float = 0.6  # crossover: a row (changed group) / a whole group (unchanged group) comes from parent A
    entry: float = 0.25  # phase 2: each entry of a changed group gets Gaussian noise with this probability
    sigma: float = 0.065  # phase 2: the noise's standard deviation
    renorm: float = 0.1  # phase 2: the changed groups' rows are renormalised to sum 1 with this probability


def changed_groups(n_groups: int, p: float, rng: np.random.Generator) -> np.ndarray:
    changed = rng.random(n_groups) < p
    if not changed.any():
        changed[rng.integers(n_groups)] = True
    return changed


# ----- phase 1 ------------------------------------------------------------------------------------------------
def random_selection(space: SearchSpace, rng: np.random.Generator) -> list[list[int]]:
    """One uniformly random routable selection per layer group (equal count per routing group when group-limited)."""
    picks = []
    for _ in range(space.n_groups):
        if space.routing_groups == 1:
            sel = rng.choice(space.n_experts, size=space.n_kept, replace=False).tolist()
        else:
            c, per = space.n_kept // space.routing_groups, space.per_routing_group
            sel = [g * per + int(e) for g in range(space.routing_groups)
                   for e in rng.choice(per, size=c, replace=False)]
        picks.append(sorted(int(e) for e in sel))
    return picks


def mutate_selection(space: SearchSpace, parent: list[list[int]], p: Probabilities,
                     rng: np.random.Generator) -> list[list[int]]:
    """Discrete mutation: in each changed group each row is reassigned with p.row to an expert the group does not
    select (so rows stay distinct); for group-limited routers to one of the same routing group (so every routing
    group keeps its count). Rows are returned in ascending order (row order of a tied one-hot pair is immaterial)."""
    out = [list(sel) for sel in parent]
    for g in np.flatnonzero(changed_groups(space.n_groups, p.group, rng)):
        sel = out[g]
        for j in range(len(sel)):
            if rng.random() < p.row:
                pool = [e for e in range(space.n_experts)
                        if e not in sel and space.routing_group(e) == space.routing_group(sel[j])]
                if pool:
                    sel[j] = int(pool[rng.integers(len(pool))])
        out[g] = sorted(sel)
    return out


def sample_parent(fitness: np.ndarray, window: float, rank: int, rng: np.random.Generator) -> int:
    """Uniform among candidates with F ≥ F_best − window; if fewer than `rank` qualify, among the top `rank`."""
    order = np.argsort(-fitness, kind="stable")
    eligible = np.flatnonzero(fitness >= fitness.max() - window)
    if len(eligible) < rank:
        eligible = order[:rank]
    return int(eligible[rng.integers(len(eligible))])


def sample_two(fitness: np.ndarray, window: float, rank: int, rng: np.random.Generator) -> tuple[int, int]:
    """Two distinct parents (when possible) from the crossover window."""
    order = np.argsort(-fitness, kind="stable")
    eligible = set(np.flatnonzero(fitness >= fitness.max() - window).tolist()) | set(order[:rank].tolist())
    eligible = sorted(eligible)
    if len(eligible) == 1:
        return eligible[0], eligible[0]
    a, b = rng.choice(len(eligible), size=2, replace=False)
    return int(eligible[a]), int(eligible[b])


# ----- phase 2 ------------------------------------------------------------------------------------------------
def mutate_continuous(space: SearchSpace, a: tuple[torch.Tensor, torch.Tensor],
                      b: tuple[torch.Tensor, torch.Tensor] | None, p: Probabilities,
                      rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crossover (if `b` is given) then Gaussian mutation, then (w.p. p.renorm) row renormalisation.

    Crossover takes row j of *both* matrices from the same parent (slot j is merged by W_EM[j] and routed by
    W_RM[j]). When W_RM is not searched it stays one-hot: only W_EM gets noise, rows are kept sorted by their
    routed expert, and a crossed-over group that would not route (repeated or unbalanced experts) is taken whole
    from parent A."""
    merge, route = a[0].clone(), a[1].clone()
    changed = changed_groups(space.n_groups, p.group, rng)
    if b is not None:
        for g in range(space.n_groups):
            if changed[g]:
                rows = torch.from_numpy(rng.random(space.n_kept) >= p.from_a)  # True: row from B
                merge[g][rows], route[g][rows] = b[0][g][rows], b[1][g][rows]
                if not space.route_search:
                    merge[g], route[g] = _sorted_rows(merge[g], route[g])
                    picks = one_hot_picks(route[g])
                    if picks is None or not space.routable(g, picks):
                        merge[g], route[g] = a[0][g].clone(), a[1][g].clone()
            elif rng.random() >= p.from_a:
                merge[g], route[g] = b[0][g].clone(), b[1][g].clone()
    shape = (space.n_kept, space.n_experts)
    for g in np.flatnonzero(changed):
        merge[g] += _noise(shape, p, rng)
        if space.route_search:
            route[g] += _noise(shape, p, rng)
    if rng.random() < p.renorm:
        for g in np.flatnonzero(changed):
            merge[g] = _renormalise(merge[g])
            if space.route_search:
                route[g] = _renormalise(route[g])
    return merge, route


def _noise(shape: tuple[int, int], p: Probabilities, rng: np.random.Generator) -> torch.Tensor:
    mask = rng.random(shape) < p.entry
    return torch.from_numpy((p.sigma * rng.standard_normal(shape) * mask).astype(np.float32))


def _renormalise(matrix: torch.Tensor) -> torch.Tensor:
    total = matrix.sum(dim=1, keepdim=True)
    ok = total.abs() > 1e-6  # a row summing to ~0 (negative entries) is left as it is
    return torch.where(ok, matrix / torch.where(ok, total, torch.ones_like(total)), matrix)


def _sorted_rows(merge: torch.Tensor, route: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.argsort(route.argmax(dim=1), stable=True)
    return merge[order], route[order]
