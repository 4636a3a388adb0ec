"""PMQ bit allocation (arXiv 2410.06270, pmq.md step 3): ILP (CBC) and exact DP vs brute force."""

import itertools

import pytest
import torch

from moecompress.compress.quant.ilp import allocate_bits, pmq_costs, solve_allocation
from moecompress.errors import UserError

WIDTHS = [1, 2, 3]


def brute_force(costs, widths, avg_bits, p, per_layer, require_top, require_middle):
    """Enumerate every assignment; returns (best objective, feasible?)."""
    L, E, W = costs.shape
    order = sorted(range(W), key=lambda k: widths[k])
    required = ([order[-1]] if require_top else []) + ([order[-2]] if require_middle else [])
    A = torch.tensor(list(itertools.product(range(W), repeat=L * E))).view(-1, L, E)  # [n, L, E]
    bits = torch.tensor(widths, dtype=torch.float64)[A]
    obj = costs.unsqueeze(0).expand(A.shape[0], -1, -1, -1).gather(3, A.unsqueeze(-1)).squeeze(-1).sum((1, 2))
    used = (bits * p).sum(2)  # [n, L]
    ok = (used <= avg_bits * p.sum(1) + 1e-9).all(1) if per_layer else used.sum(1) <= avg_bits * p.sum() + 1e-9
    for k in required:
        ok &= (A == k).any(2).all(1)
    if not ok.any():
        return None
    return float(obj[ok].min())


def _instance(L, E, seed, monotone=True):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(L, E, 3, generator=g, dtype=torch.float64)
    return c.sort(-1, descending=True).values if monotone else c


@pytest.mark.parametrize("shape,seed", [((1, 6), 0), ((1, 6), 1), ((2, 4), 2)])
@pytest.mark.parametrize("weighted", [False, True])
def test_dp_and_cbc_equal_brute_force(shape, seed, weighted):
    L, E = shape
    costs = _instance(L, E, seed, monotone=seed != 1)
    p = torch.randint(1, 4, (L, E), generator=torch.Generator().manual_seed(seed)).double() if weighted else None
    pp = p if weighted else torch.ones(L, E, dtype=torch.float64)
    checked = 0
    for avg in (1.2, 1.5, 2.0, 2.5):
        for per_layer in ((True, False) if L > 1 else (True,)):
            for req in ((True, True), (False, False), (True, False)):
                best = brute_force(costs, WIDTHS, avg, pp, per_layer, *req)
                for solver in ("dp", "cbc"):
                    kw = dict(param_counts=p, per_layer=per_layer, require_top=req[0], require_middle=req[1], solver=solver)
                    if best is None:
                        with pytest.raises(UserError):
                            solve_allocation(costs, WIDTHS, avg, **kw)
                        continue
                    r = solve_allocation(costs, WIDTHS, avg, **kw)
                    assert r.objective == pytest.approx(best, rel=1e-9, abs=1e-12), (avg, per_layer, req, solver)
                    # the returned widths really satisfy the constraints
                    used = (r.bits.double() * pp).sum(1)
                    assert ((used <= avg * pp.sum(1) + 1e-9).all() if per_layer else used.sum() <= avg * pp.sum() + 1e-9)
                    if req[0]:
                        assert (r.bits == 3).any(1).all()
                    if req[1]:
                        assert (r.bits == 2).any(1).all()
                    checked += 1
    assert checked >= 12


def test_pmq_minimum_budget_is_n_minus_2_plus_5():
    costs = _instance(1, 8, 3)
    # pmq.md: the smallest feasible budget is (n − 2)·1 + 2 + 3 = 11 bits for n = 8
    r = solve_allocation(costs, WIDTHS, 11 / 8)
    assert sorted(r.bits[0].tolist()) == [1] * 6 + [2, 3]
    for solver in ("dp", "cbc"):
        with pytest.raises(UserError, match="infeasible"):
            solve_allocation(costs, WIDTHS, 10.99 / 8, solver=solver)
    with pytest.raises(UserError, match="infeasible"):
        solve_allocation(_instance(3, 8, 4), WIDTHS, 1.3, per_layer=False)


def test_dp_equals_cbc_on_a_medium_global_instance():
    g = torch.Generator().manual_seed(5)
    costs = torch.rand(6, 16, 4, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    for avg in (1.7, 2.5):
        for per_layer in (True, False):
            dp = solve_allocation(costs, [1, 2, 3, 4], avg, per_layer=per_layer, solver="dp")
            cbc = solve_allocation(costs, [1, 2, 3, 4], avg, per_layer=per_layer, solver="cbc")
            assert dp.objective == pytest.approx(cbc.objective, rel=1e-9)
            assert dp.avg_bits <= avg + 1e-12


def test_allocate_bits_costs_and_single_layer_shapes():
    g = torch.Generator().manual_seed(6)
    phi, w = torch.rand(8, generator=g), torch.rand(8, generator=g)
    eps = torch.rand(8, 3, generator=g).sort(-1, descending=True).values
    c = pmq_costs(phi[None], w[None], eps[None], alpha=1.0, beta=1.5, gamma=2.0)
    expect = (phi / phi.sum()).double()[:, None] * ((w / w.sum()).double() ** 1.5)[:, None] * eps.double() ** 2
    assert torch.allclose(c[0], expect)
    r = allocate_bits(phi, w, eps, avg_bits=2.0, gamma=2.0)
    assert r.bits.shape == (8,) and r.avg_bits <= 2.0
    r2 = solve_allocation(c, WIDTHS, 2.0)
    assert torch.equal(r.bits, r2.bits[0])
    # a never-routed expert costs 0 at every width; min_bits keeps everyone at ≥ 2 bits
    phi[0] = 0
    r3 = allocate_bits(phi, w, eps, avg_bits=2.5, min_bits=2)
    assert (r3.bits >= 2).all()


def test_bad_input():
    c = _instance(1, 4, 7)
    with pytest.raises(UserError):
        solve_allocation(c, [1, 2], 2.0)  # 3 cost columns, 2 widths
    with pytest.raises(UserError):
        allocate_bits(torch.rand(4), torch.rand(4), -torch.rand(4, 3), avg_bits=2.0)
    with pytest.raises(UserError):
        solve_allocation(c, WIDTHS, 2.0, min_bits=4)
    with pytest.raises(UserError):
        solve_allocation(c, WIDTHS, 2.0, solver="gurobi")
