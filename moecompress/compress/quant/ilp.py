"""PMQ bit allocation (MC / MC-MoE, Huang et al., arXiv 2410.06270; pmq.md step 3).

For layer ℓ, expert i and candidate width b, the cost is

    c_{ℓ,i,b} = φ_{ℓ,i}^α · w_{ℓ,i}^β · ε_{ℓ,i,b}^γ

(φ = routing frequency, w = summed routing weight, ε = output error with only that expert
quantized to b bits). Choose one width per expert (binary x_{ℓ,i,b}, Σ_b x = 1) minimising
Σ c·x subject to

* budget: Σ_i p_i·b·x_{i,b} ≤ avg_bits·Σ_i p_i — per layer (``per_layer=True``, the paper's
  form) or once over all layers (``per_layer=False``, the "global ILP" extension).
  p_i = parameter counts (``param_counts``); by default all 1, which is exactly pmq.md's
  Σ b·x ≤ budget with budget = n·avg_bits. We use "≤" as the reference code does (the
  paper writes "= n·k̄");
* optionally ≥ 1 expert per layer at the top width (``require_top``) and ≥ 1 at the
  "middle" width (``require_middle``), defined as the **second-highest** candidate (2 for
  {1, 2, 3}, pmq.md's Σ x_{i,3} ≥ 1 and Σ x_{i,2} ≥ 1);
* optionally no expert below ``min_bits`` (pitfall "rare experts").

Defaults (α, β, γ) = (1, 1.5, 1) as in the toolkit default (pmq.md); φ and w are normalised
to sum to 1 per layer like the reference code (``normalize=True``); the reference's ×1000
factor does not change the argmin and is not applied.

Solvers:

* ``"cbc"``: the ILP above through PuLP/CBC (``msg=False``).
* ``"dp"``: exact dynamic programme (multiple-choice knapsack) for integer weights
  p·b (the default unit weights are): per layer a DP over (bits used, top used?,
  middle used?) gives the layer's exact cost-vs-bits curve, then layers are combined by
  min-plus convolution over the global budget. Same optimum as the ILP (tests compare
  both against brute force); much faster than CBC on 48 × 128 × 4 instances.
* ``"auto"`` (default): "dp" when the weights are integers and the DP table is small,
  else "cbc".

Infeasible budgets raise :class:`~moecompress.errors.UserError` before solving.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from moecompress.errors import UserError

__all__ = ["BitAllocation", "pmq_costs", "allocate_bits", "solve_allocation"]

_INF = float("inf")


@dataclass
class BitAllocation:
    bits: torch.Tensor  # int64 [L, E] (or [E] when the inputs were single-layer)
    objective: float  # Σ c·x of the chosen widths (in the cost units passed to the solver)
    avg_bits: float  # parameter-weighted average width achieved (over all layers)
    solver: str
    seconds: float


def pmq_costs(
    freq: torch.Tensor,
    weight: torch.Tensor,
    error: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 1.5,
    gamma: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """c = φ^α · w^β · ε^γ, shapes φ, w [L, E] and ε [L, E, W] → [L, E, W] (float64)."""
    phi, w, eps = freq.double(), weight.double(), error.double()
    if (phi < 0).any() or (w < 0).any() or (eps < 0).any() or not all(torch.isfinite(t).all() for t in (phi, w, eps)):
        raise UserError("PMQ statistics must be finite and non-negative (frequency, routing weight, error): recompute them")
    if normalize:
        phi = phi / phi.sum(-1, keepdim=True).clamp(min=1e-300)
        w = w / w.sum(-1, keepdim=True).clamp(min=1e-300)
    return (phi**alpha * w**beta).unsqueeze(-1) * eps**gamma


def allocate_bits(
    freq: torch.Tensor,
    weight: torch.Tensor,
    error: torch.Tensor,
    widths: Sequence[int] = (1, 2, 3),
    avg_bits: float = 2.5,
    *,
    alpha: float = 1.0,
    beta: float = 1.5,
    gamma: float = 1.0,
    normalize: bool = True,
    param_counts: Optional[torch.Tensor] = None,
    per_layer: bool = True,
    require_top: bool = True,
    require_middle: bool = True,
    min_bits: Optional[int] = None,
    solver: str = "auto",
) -> BitAllocation:
    """PMQ: per-expert widths from statistics φ [E] or [L, E], w (same), ε [E, W] or [L, E, W]."""
    single = error.dim() == 2
    if single:
        freq, weight, error = freq.unsqueeze(0), weight.unsqueeze(0), error.unsqueeze(0)
        if param_counts is not None:
            param_counts = param_counts.unsqueeze(0)
    if error.dim() != 3 or freq.shape != error.shape[:2] or weight.shape != error.shape[:2]:
        raise UserError(
            f"PMQ statistics shapes disagree: freq {tuple(freq.shape)}, weight {tuple(weight.shape)}, "
            f"error {tuple(error.shape)}; expected [L, E], [L, E], [L, E, n_widths]"
        )
    costs = pmq_costs(freq, weight, error, alpha, beta, gamma, normalize)
    res = solve_allocation(costs, widths, avg_bits, param_counts=param_counts, per_layer=per_layer,
                           require_top=require_top, require_middle=require_middle,
                           min_bits=min_bits, solver=solver)
    if single:
        res.bits = res.bits[0]
    return res


def solve_allocation(
    costs: torch.Tensor,
    widths: Sequence[int],
    avg_bits: float,
    *,
    param_counts: Optional[torch.Tensor] = None,
    per_layer: bool = True,
    require_top: bool = True,
    require_middle: bool = True,
    min_bits: Optional[int] = None,
    solver: str = "auto",
) -> BitAllocation:
    """Choose one width per expert minimising Σ costs[ℓ, i, k]·x under the budget (see module doc)."""
    widths = [int(b) for b in widths]
    if not isinstance(avg_bits, (int, float)) or not 0 < avg_bits < float("inf"):
        raise UserError(f"avg_bits={avg_bits!r} must be a positive number of bits per weight (e.g. 2.5)")
    if costs.dim() != 3 or costs.shape[2] != len(widths) or len(widths) == 0:
        raise UserError(f"costs must be [L, E, {len(widths)}] (one column per candidate width), got {tuple(costs.shape)}")
    if len(set(widths)) != len(widths) or any(b < 1 for b in widths):
        raise UserError(f"candidate widths {widths} must be distinct positive integers")
    if not torch.isfinite(costs).all():
        raise UserError("PMQ costs contain NaN/inf: check the statistics")
    L, E, W = costs.shape
    order = sorted(range(W), key=lambda k: widths[k])
    top_k = order[-1]
    mid_k = order[-2] if W >= 2 else None
    if require_middle and mid_k is None:
        raise UserError("require_middle needs at least two candidate widths: add one or pass require_middle=False")
    required = ([top_k] if require_top else []) + ([mid_k] if require_middle else [])
    allowed = torch.ones(W, dtype=torch.bool)
    if min_bits is not None:
        allowed = torch.tensor([b >= min_bits for b in widths])
        if not allowed.any():
            raise UserError(f"min_bits={min_bits} excludes every candidate width {widths}: lower it")
    if param_counts is None:
        p = torch.ones(L, E, dtype=torch.float64)
    else:
        p = param_counts.to(torch.float64).reshape(L, E)
        if (p < 0).any():
            raise UserError("param_counts must be non-negative")
    if any(not allowed[k] for k in required) or (len(required) == 2 and E < 2) or (required and E < 1):
        raise UserError(f"the top/middle-width constraints cannot hold with {E} experts and min_bits={min_bits}: relax require_top/require_middle")

    _check_feasible(p, widths, allowed, required, avg_bits, per_layer)
    t0 = time.perf_counter()
    kind = solver
    if solver == "auto":
        kind = "dp" if _dp_units(p, widths, avg_bits, per_layer) is not None else "cbc"
    if kind == "dp":
        units = _dp_units(p, widths, avg_bits, per_layer)
        if units is None:
            raise UserError("solver='dp' needs integer parameter-count × width weights and a small table: use solver='cbc'")
        # many small tensor ops: intra-op threads only add overhead (and stall badly on busy hosts)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            choice = _solve_dp(costs, widths, allowed, required, per_layer, *units)
        finally:
            torch.set_num_threads(threads)
    elif kind == "cbc":
        choice = _solve_cbc(costs, widths, allowed, required, p, avg_bits, per_layer)
    else:
        raise UserError(f"unknown solver {solver!r}: use 'auto', 'dp' or 'cbc'")
    seconds = time.perf_counter() - t0
    wt = torch.tensor(widths, dtype=torch.int64)
    bits = wt[choice]
    obj = float(costs.gather(2, choice.unsqueeze(-1)).sum())
    avg = float((p * bits).sum() / p.sum().clamp(min=1e-300))
    return BitAllocation(bits=bits, objective=obj, avg_bits=avg, solver=kind, seconds=seconds)


# ---------------------------------------------------------------------------- feasibility
def _check_feasible(p, widths, allowed, required, avg_bits, per_layer):
    """Smallest achievable budget: every expert at its smallest allowed width, except that the
    required widths go to the experts for which raising costs the least (the smallest p)."""
    w_min = min(b for b, a in zip(widths, allowed.tolist()) if a)
    need_per_layer = []
    for pl in p:
        base = float((pl * w_min).sum())
        extra = sorted(pl.tolist())[: len(required)]
        raises = sorted((widths[k] - w_min for k in required), reverse=True)
        need_per_layer.append(base + sum(r * e for r, e in zip(raises, extra)))
    tol = 1e-9
    if per_layer:
        for l, (need, pl) in enumerate(zip(need_per_layer, p)):
            have = avg_bits * float(pl.sum())
            if need > have + tol * max(1.0, have):
                raise UserError(
                    f"bit budget {avg_bits} average is infeasible for layer {l}: it needs at least "
                    f"{need / float(pl.sum()):.4f} bits on average with these constraints; raise avg_bits or relax them"
                )
    else:
        need, have = sum(need_per_layer), avg_bits * float(p.sum())
        if need > have + tol * max(1.0, have):
            raise UserError(
                f"bit budget {avg_bits} average is infeasible: at least {need / float(p.sum()):.4f} bits on average "
                f"are needed with these constraints; raise avg_bits or relax them"
            )


# ---------------------------------------------------------------------------- CBC
def _solve_cbc(costs, widths, allowed, required, p, avg_bits, per_layer):
    import pulp

    L, E, W = costs.shape
    scale = float(costs.abs().max())
    c = (costs / scale * 1e4 if scale > 0 else costs).tolist()  # positive rescale: same argmin
    pl = p.tolist()
    prob = pulp.LpProblem("pmq", pulp.LpMinimize)
    x = [[[pulp.LpVariable(f"x_{l}_{i}_{k}", cat="Binary") if allowed[k] else None for k in range(W)]
          for i in range(E)] for l in range(L)]
    prob += pulp.lpSum(c[l][i][k] * x[l][i][k] for l in range(L) for i in range(E) for k in range(W) if x[l][i][k] is not None)
    for l in range(L):
        for i in range(E):
            prob += pulp.lpSum(v for v in x[l][i] if v is not None) == 1
        for k in required:
            prob += pulp.lpSum(x[l][i][k] for i in range(E)) >= 1
    def used(l):
        return pulp.lpSum(pl[l][i] * widths[k] * x[l][i][k] for i in range(E) for k in range(W) if x[l][i][k] is not None)
    if per_layer:
        for l in range(L):
            prob += used(l) <= avg_bits * sum(pl[l])
    else:
        prob += pulp.lpSum(used(l) for l in range(L)) <= avg_bits * float(p.sum())
    status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] != "Optimal":
        raise UserError(f"PMQ bit allocation: CBC returned {pulp.LpStatus[status]!r}; raise avg_bits or relax the constraints")
    choice = torch.zeros(L, E, dtype=torch.int64)
    for l in range(L):
        for i in range(E):
            vals = [(v.value() or 0.0) if v is not None else -1.0 for v in x[l][i]]
            choice[l, i] = max(range(W), key=lambda k: vals[k])
    return choice


# ---------------------------------------------------------------------------- exact DP
_DP_MAX_CELLS = 50_000_000


def _dp_units(p, widths, avg_bits, per_layer):
    """Integer item weights (p / gcd(p)) and the budget(s) in units of p·b, or None when the
    parameter counts are not integers or the DP tables would be too large."""
    if p.numel() == 0 or not torch.all(p == torch.round(p)):
        return None
    pint = p.to(torch.int64)
    g = 0
    for v in set(pint.flatten().tolist()):
        g = math.gcd(g, int(v))
    units = pint // max(g, 1)  # expert i at width b weighs units_i · b
    L, E = p.shape
    layer_max = int(units.sum(1).max()) * max(widths)
    total = int(units.sum()) * max(widths)
    if L * E * 4 * (layer_max + 1) > _DP_MAX_CELLS or (not per_layer and total > _DP_MAX_CELLS // 100):
        return None
    if per_layer:
        budgets = [math.floor(avg_bits * int(u.sum()) + 1e-9) for u in units]
    else:
        budgets = [math.floor(avg_bits * int(units.sum()) + 1e-9)]
    return units, budgets


def _layer_curves(costs, widths, allowed, required, units):
    """Exact per-layer cost curves by DP over experts (multiple-choice knapsack).

    State (layer, flags, s): flags = which required widths are used so far (bit r ⇔
    ``required[r]``), s = weight used. Returns curves [L, S] (min cost with all flags set,
    inf where unreachable), the per-expert back-pointer tables and the number of flag states.
    """
    L, E, W = costs.shape
    F = 1 << len(required)
    S = int(units.sum(1).max()) * max(widths) + 1
    ks = [k for k in range(W) if allowed[k]]
    flag_of = {k: sum(1 << r for r, kk in enumerate(required) if kk == k) for k in ks}
    # candidate (k, f) pairs, in the order they are stacked below, grouped by target flags f | bit_k
    pairs = [(k, f) for k in ks for f in range(F)]
    by_target = [[j for j, (k, f) in enumerate(pairs) if f | flag_of[k] == t] for t in range(F)]
    codes = torch.tensor([k * F + f for k, f in pairs], dtype=torch.int16)
    pos = torch.arange(S)
    dp = torch.full((L, F, S), _INF, dtype=torch.float64)
    dp[:, 0, 0] = 0.0
    back = []  # per expert: int16 [L, F, S] = k·F + previous flags (−1: unreachable)
    for i in range(E):
        cands = []
        for k in ks:
            src = pos.unsqueeze(0) - (units[:, i] * widths[k]).unsqueeze(1)  # [L, S]: s − weight
            g = dp.gather(2, src.clamp(min=0).unsqueeze(1).expand(L, F, S))
            g = g.masked_fill((src < 0).unsqueeze(1), _INF) + costs[:, i, k].view(L, 1, 1)
            cands.append(g)
        C = torch.stack(cands, 1).reshape(L, len(pairs), S)  # [L, (k, f), S]
        new = torch.full_like(dp, _INF)
        arg = torch.full((L, F, S), -1, dtype=torch.int16)
        for t, idx in enumerate(by_target):
            if not idx:
                continue
            m, a = C[:, idx].min(dim=1)
            new[:, t] = m
            arg[:, t] = torch.where(torch.isfinite(m), codes[idx][a], arg[:, t])
        dp = new
        back.append(arg)
    return dp[:, F - 1, :], back, F


def _solve_dp(costs, widths, allowed, required, per_layer, units, budgets):
    L, E, W = costs.shape
    curves, back, nflags = _layer_curves(costs, widths, allowed, required, units)
    S = curves.shape[1]
    if per_layer:
        totals = []
        for l in range(L):
            b = min(budgets[l], S - 1)
            seg = curves[l, : b + 1]
            totals.append(int(torch.argmin(seg)))
    else:
        totals = _combine_layers(curves, budgets[0])
    choice = torch.zeros(L, E, dtype=torch.int64)
    for l in range(L):
        s, f = totals[l], nflags - 1
        if not math.isfinite(float(curves[l, s])):
            raise UserError("PMQ bit allocation is infeasible: raise avg_bits or relax the constraints")
        for i in range(E - 1, -1, -1):
            code = int(back[i][l, f, s])
            assert code >= 0, "DP back-pointer to an unreachable state"
            k, pf = divmod(code, nflags)
            choice[l, i] = k
            s -= int(units[l, i]) * widths[k]
            f = pf
    return choice


def _combine_layers(curves, budget):
    """Min-plus convolution of the per-layer curves under one global budget.

    Each curve is shifted by its smallest reachable weight lo_ℓ so the running table only
    spans [0, budget − Σ lo]; one layer is folded in with a single vectorised
    (sliding-window) min. Returns each layer's total weight.
    """
    L, S = curves.shape
    fin = torch.isfinite(curves)
    lo = [int(torch.nonzero(fin[l])[0]) for l in range(L)]
    hi = [int(torch.nonzero(fin[l])[-1]) for l in range(L)]
    cap = budget - sum(lo)
    if cap < 0:
        raise UserError("PMQ bit allocation is infeasible: raise avg_bits or relax the constraints")
    acc = curves[0, lo[0] : min(hi[0], lo[0] + cap) + 1].clone()
    picks = []
    for l in range(1, L):
        f = curves[l, lo[l] : min(hi[l], lo[l] + cap) + 1]  # f[s]: layer l uses lo_l + s
        n = min(acc.shape[0] + f.shape[0] - 1, cap + 1)
        # new[t] = min_s acc[t − s] + f[s]: windows of acc padded with inf on the left
        padded = torch.cat([torch.full((f.shape[0] - 1,), _INF, dtype=acc.dtype), acc,
                            torch.full((max(0, n - acc.shape[0]),), _INF, dtype=acc.dtype)])
        win = padded.unfold(0, f.shape[0], 1)[:n]  # win[t, j] = acc[t − (len(f) − 1) + j]
        tot = win + f.flip(0)  # j ↔ s = len(f) − 1 − j
        best, j = tot.min(dim=1)
        acc = best
        picks.append(f.shape[0] - 1 - j)
    end = int(torch.argmin(acc))
    if not math.isfinite(float(acc[end])):
        raise UserError("PMQ bit allocation is infeasible: raise avg_bits or relax the constraints")
    totals = [0] * L
    for l in range(L - 1, 0, -1):
        s = int(picks[l - 1][end])
        totals[l] = lo[l] + s
        end -= s
    totals[0] = lo[0] + end
    return totals
