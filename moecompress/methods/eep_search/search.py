"""The two-phase EEP search loop (arXiv 2407.00945, Alg. 1): resumable, optionally data-parallel.

Schedule (step = one evaluated candidate):
  [0, n_init)                       initial population: distinct random routable selections (phase 1)
  [n_init, n_init+prune_steps)      phase 1: parent from the F_best − window / top-rank pool, discrete mutation
  [.., .. + merge_steps)            phase 2: crossover (p) + Gaussian mutation + row renormalisation (p)
then the `final_top` best distinct candidates are re-scored by `final_fitness` (a held-out split) and the best
there is returned (ties: training fitness, then earlier step).

Steps run in rounds of `batch` candidates bred from the population of all earlier rounds; the candidates of a
round are evaluated by the processes of an `accelerate launch` (process i takes every world-th candidate) and the
results gathered with `accelerate.utils.gather_object`. With batch = 1 this is the paper's steady-state loop. Every
process computes the same proposals (they are pure functions of seed, step and population), only the main process
writes the state directory. The result depends on (seed, batch), not on the number of processes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from moecompress.methods.eep_search.apply import Snapshot, applied
from moecompress.methods.eep_search.operators import (Probabilities, mutate_continuous, mutate_selection,
                                                      random_selection, sample_parent, sample_two)
from moecompress.methods.eep_search.population import Entry, Population
from moecompress.methods.eep_search.space import SearchSpace, candidate_key, selection, to_plan

log = logging.getLogger("moecompress")

Fitness = Callable[[nn.Module], float]


@dataclass(frozen=True)
class Settings:
    population: int = 30
    prune_steps: int = 40
    merge_steps: int = 160
    parent_window: float = 3.0
    merge_window: float = 1.0
    parents_rank: int = 6
    final_top: int = 20
    batch: int = 1
    retries: int = 64  # redraws of a mutation that reproduces an evaluated candidate
    p: Probabilities = field(default_factory=Probabilities)


@dataclass
class SearchResult:
    best: Entry
    population: Population
    evaluated: int  # fitness evaluations run by this process in this call (resumed steps excluded)
    eval_seconds: list[float]
    restore_seconds: list[float]


@dataclass
class _Segment:
    phase: int
    kind: str  # init | prune | merge
    start: int
    length: int


def schedule(space: SearchSpace, s: Settings) -> list[_Segment]:
    distinct = distinct_selections(space)
    n_init = min(s.population, distinct)
    prune = s.prune_steps if distinct > 1 else 0  # keep == E: one selection (identity) → phase 2 only
    return [_Segment(1, "init", 0, n_init), _Segment(1, "prune", n_init, prune),
            _Segment(2, "merge", n_init + prune, s.merge_steps)]


def distinct_selections(space: SearchSpace) -> int:
    per = math.comb(space.per_routing_group, space.n_kept // space.routing_groups) ** space.routing_groups
    return per ** space.n_groups


# ----- proposals ----------------------------------------------------------------------------------------------
def propose(space: SearchSpace, s: Settings, seg: _Segment, step: int, pool: list[Entry], taken: set[str],
            rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The candidate of `step` (merge, route, parent steps), a pure function of its inputs."""
    if seg.kind == "init":
        for _ in range(100_000):
            m = space.one_hot(random_selection(space, rng))
            if candidate_key(m, m) not in taken:
                return m, m.clone(), []
        raise RuntimeError("could not draw a new initial candidate")  # n_init ≤ distinct selections
    distinct = _distinct(pool)
    fitness = np.array([e.fitness for e in distinct])
    for attempt in range(s.retries + 1):
        if seg.kind == "prune":
            i = sample_parent(fitness, s.parent_window, s.parents_rank, rng)
            parent = distinct[i]
            picks = mutate_selection(space, selection(parent.merge, parent.route), s.p, rng)
            merge = space.one_hot(picks)
            route, parents = merge.clone(), [parent.step]
        elif rng.random() < s.p.crossover:
            i, j = sample_two(fitness, s.merge_window, s.parents_rank, rng)
            a, b = distinct[i], distinct[j]
            merge, route = mutate_continuous(space, (a.merge, a.route), (b.merge, b.route), s.p, rng)
            parents = [a.step, b.step]
        else:
            i = sample_parent(fitness, s.parent_window, s.parents_rank, rng)
            a = distinct[i]
            merge, route = mutate_continuous(space, (a.merge, a.route), None, s.p, rng)
            parents = [a.step]
        if candidate_key(merge, route) not in taken:
            break
    return merge, route, parents


def _distinct(pool: list[Entry]) -> list[Entry]:
    seen, out = set(), []
    for e in pool:
        if e.key not in seen:
            seen.add(e.key)
            out.append(e)
    return out


# ----- the loop -----------------------------------------------------------------------------------------------
def search(model: nn.Module, space: SearchSpace, fitness: Fitness, settings: Settings, population: Population,
           final_fitness: Fitness | None = None, distributed: bool | None = None,
           progress: bool = True) -> SearchResult:
    state = _process_state(distributed)
    rank, world = (state.process_index, state.num_processes) if state else (0, 1)
    population.writer = population.writer and rank == 0
    snapshot = Snapshot(model)
    evals, restores = [], []

    def score(fn: Fitness, merge: torch.Tensor, route: torch.Tensor) -> float:
        t = time.perf_counter()
        with applied(snapshot, to_plan(space, merge, route)) as m:
            value = float(fn(m))
            t_restore = time.perf_counter()
        restores.append(time.perf_counter() - t_restore)
        evals.append(time.perf_counter() - t)
        return value

    segments = schedule(space, settings)
    total = sum(seg.length for seg in segments)
    bar = _Progress(total, enabled=progress and rank == 0)
    bar.advance(len([s for s in population.entries if s < total]))
    try:
        for seg in segments:
            for round_start in range(seg.start, seg.start + seg.length, settings.batch):
                steps = range(round_start, min(round_start + settings.batch, seg.start + seg.length))
                if all(t in population.entries for t in steps):
                    continue
                pool = population.before(round_start)
                taken = population.keys(pool)
                proposals = {}
                for t in steps:
                    merge, route, parents = propose(space, settings, seg, t, pool, taken, population.rng(t))
                    key = candidate_key(merge, route)
                    taken.add(key)
                    proposals[t] = (merge, route, parents, key)
                todo = [t for t in steps if t not in population.entries]
                known = {e.key: e.fitness for e in population.entries.values()}
                fresh = [t for t in todo if proposals[t][3] not in known]
                results = {t: known[proposals[t][3]] for t in todo if proposals[t][3] in known}
                mine = fresh[rank::world]
                for t in mine:
                    merge, route, parents, key = proposals[t]
                    results[t] = score(fitness, merge, route)
                    if world == 1:
                        population.add(Entry(t, seg.phase, merge, route, results[t], key, parents))
                        bar.advance(1)
                if world > 1:
                    results.update(_gather({t: results[t] for t in mine}))
                for t in todo:
                    if t not in population.entries:
                        merge, route, parents, key = proposals[t]
                        population.add(Entry(t, seg.phase, merge, route, results[t], key, parents))
                        bar.advance(1)
                best = max(population.entries.values(), key=lambda e: e.fitness)
                log.debug("EEP step %d: best %.2f (step %d)", steps[-1], best.fitness, best.step)
        best = _final(population, settings, final_fitness, score, rank, world)
    finally:
        bar.close()
        snapshot.restore()
    return SearchResult(best, population, len(evals), evals, restores)


def _final(population: Population, s: Settings, final_fitness: Fitness | None, score, rank: int,
           world: int) -> Entry:
    ranked = population.ranked()
    if final_fitness is None or s.final_top <= 0:
        return ranked[0]
    top = ranked[: s.final_top]
    todo = [e for e in top if e.final is None]
    mine = todo[rank::world]
    results = {e.step: score(final_fitness, e.merge, e.route) for e in mine}
    if world > 1:
        results.update(_gather(results))
    for e in todo:
        population.set_final(e.step, results[e.step])
    return max(top, key=lambda e: (e.final, e.fitness, -e.step))


def _process_state(distributed: bool | None):
    if distributed is False:
        return None
    from moecompress.runtime import partial_state

    state = partial_state()
    return state if state.num_processes > 1 else None


def _gather(results: dict[int, float]) -> dict[int, float]:
    from accelerate.utils import gather_object

    return {int(t): float(f) for t, f in gather_object(list(results.items()))}


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.progress = None
        if enabled and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(TextColumn("EEP search"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=Console(stderr=True), transient=True)
            self.task = self.progress.add_task("eep", total=total)
            self.progress.start()

    def advance(self, n: int) -> None:
        if self.progress is not None and n:
            self.progress.advance(self.task, n)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
