"""RTN (baselines.md §9) and GPTQ (arXiv 2210.17323, baselines.md §10)."""

import logging

import pytest
import torch

from moecompress.compress.quant.gptq import gptq_quantize
from moecompress.compress.quant.rtn import dequantize, quantize_rtn
from moecompress.errors import UserError


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- RTN
def test_rtn_asym_matches_the_formula_by_hand():
    w = torch.tensor([[-1.0, 0.5, 2.0, 0.25, -0.5]])  # g = 3 -> groups [-1, .5, 2] and [.25, -.5]
    q = quantize_rtn(w, bits=2, group_size=3, sym=False, scale_dtype=torch.float32)
    s0, s1 = 3.0 / 3, 0.75 / 3
    assert torch.allclose(q.scale, torch.tensor([[s0, s1]]))
    z0, z1 = round(1.0 / s0), round(0.5 / s1)
    assert q.zero.tolist() == [[z0, z1]]
    expect = [min(max(round(v / s0) + z0, 0), 3) for v in (-1.0, 0.5, 2.0)]
    expect += [min(max(round(v / s1) + z1, 0), 3) for v in (0.25, -0.5)]
    assert q.codes.tolist() == [expect]
    assert torch.allclose(q.dequantize(), torch.tensor([[-1.0, 0.0, 2.0, 0.25, -0.5]]))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_at_most_half_a_step(bits, sym):
    w = torch.randn(16, 200, generator=_gen(bits))  # 200 = 128 + 72: partial last group
    q = quantize_rtn(w, bits, group_size=128, sym=sym)
    assert q.codes.shape == (16, 200) and q.scale.shape == (16, 2) and q.scale.dtype == torch.float16
    assert int(q.codes.max()) <= 2**bits - 1
    step = q.scale.float().repeat_interleave(128, dim=1)[:, :200]
    err = (q.dequantize() - w).abs()
    assert (err <= step / 2 + 1e-6).all()
    if sym:
        assert (q.zero == 2 ** (bits - 1)).all()


def test_rtn_all_zero_and_constant_groups_are_finite():
    w = torch.zeros(3, 10)
    w[1, 5:] = 0.7  # constant group
    w[2, :5] = 1e-12  # below fp16 resolution
    for bits in (1, 2, 4):
        for sym in (False, True):
            q = quantize_rtn(w, bits, group_size=5, sym=sym)
            assert torch.isfinite(q.scale.float()).all() and (q.scale.float() > 0).all() if bits > 1 else (q.scale.float() >= 0).all()
            assert torch.isfinite(q.zero.float()).all()
            deq = q.dequantize()
            assert torch.isfinite(deq).all()
            assert deq[0].abs().max() == 0
            if bits > 1:
                assert torch.allclose(deq[1, 5:], torch.full((5,), 0.7), rtol=2e-3)


def test_rtn_one_bit_binariser():
    w = torch.randn(4, 70, generator=_gen(1))
    q = quantize_rtn(w, 1, group_size=32)  # groups 32, 32, 6
    assert set(q.codes.unique().tolist()) <= {0, 1}
    assert (q.zero == 0.5).all()
    deq = q.dequantize()
    for start, end in [(0, 32), (32, 64), (64, 70)]:
        m = w[:, start:end].abs().mean(dim=1, keepdim=True)
        expect = torch.where(w[:, start:end] >= 0, m, -m)
        assert torch.allclose(deq[:, start:end], expect, rtol=1e-3)


def test_rtn_group_size_minus_one_and_dequantize_function():
    w = torch.randn(5, 33, generator=_gen(2))
    q = quantize_rtn(w, 4, group_size=-1)
    assert q.scale.shape == (5, 1)
    assert torch.equal(dequantize(q.codes, q.scale, q.zero, -1), q.dequantize())


@pytest.mark.parametrize("bad", [dict(bits=0), dict(bits=9), dict(bits=2.0), dict(group_size=0), dict(group_size=-2)])
def test_rtn_bad_settings_raise_user_error(bad):
    args = dict(bits=4, group_size=128) | bad
    with pytest.raises(UserError):
        quantize_rtn(torch.randn(4, 8), **args)


def test_rtn_rejects_nan_weights():
    w = torch.randn(4, 8)
    w[0, 0] = float("nan")
    with pytest.raises(UserError):
        quantize_rtn(w, 4)


# ----------------------------------------------------------------------------- GPTQ
def _problem(out_f=96, in_f=256, n=1024, rank=12, seed=0):
    g = _gen(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(n, rank, generator=g) @ torch.randn(rank, in_f, generator=g) + 0.3 * torch.randn(n, in_f, generator=g)
    return W, X


def _out_err(X, W, Wq):
    ref = X @ W.T
    return float((ref - X @ Wq.T).norm() / ref.norm())


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(act_order):
    W, X = _problem()
    H, n = X.T @ X, X.shape[0]
    for bits in (2, 3, 4):
        e_rtn = _out_err(X, W, quantize_rtn(W, bits, 128).dequantize())
        e_gptq = _out_err(X, W, gptq_quantize(W, H, n, bits, 128, act_order=act_order).dequantize())
        assert e_gptq < 0.6 * e_rtn, (bits, e_gptq, e_rtn)
    e8 = _out_err(X, W, gptq_quantize(W, H, n, 8, 128, act_order=act_order).dequantize())
    assert e8 < 3e-3


def test_gptq_groups_not_dividing_the_block_and_one_bit():
    W, X = _problem(out_f=32, in_f=200)
    H, n = X.T @ X, X.shape[0]
    q = gptq_quantize(W, H, n, 3, group_size=96)  # groups 96, 96, 8 straddle the 128-column blocks
    assert q.scale.shape == (32, 3)
    assert _out_err(X, W, q.dequantize()) < 0.6 * _out_err(X, W, quantize_rtn(W, 3, 96).dequantize())
    q1 = gptq_quantize(W, H, n, 1, group_size=64)
    assert (q1.zero == 0.5).all() and set(q1.codes.unique().tolist()) <= {0, 1}
    assert _out_err(X, W, q1.dequantize()) < _out_err(X, W, quantize_rtn(W, 1, 64).dequantize())


def test_gptq_act_order_g_idx_describes_the_groups():
    W, X = _problem(out_f=16, in_f=200)
    X = X * torch.linspace(0.1, 3, 200)  # distinct diag(H) -> non-trivial permutation
    q = gptq_quantize(W, X.T @ X, X.shape[0], 4, 64, act_order=True)
    assert q.g_idx is not None and q.g_idx.dtype == torch.int32 and q.g_idx.shape == (200,)
    assert torch.bincount(q.g_idx.long()).tolist() == [64, 64, 64, 8]
    assert not torch.equal(q.g_idx.long(), torch.arange(200) // 64)
    # every column's code dequantized with its own group's scale stays within half a step of the group's range
    deq = q.dequantize()
    assert torch.equal(deq, dequantize(q.codes, q.scale, q.zero, 64, q.g_idx))
    assert _out_err(X, W, deq) < 0.6 * _out_err(X, W, quantize_rtn(W, 4, 64).dequantize())


def test_gptq_dead_columns_and_sym():
    W, X = _problem(out_f=8, in_f=64, n=512)
    X[:, :5] = 0  # inputs never active
    q = gptq_quantize(W, X.T @ X, X.shape[0], 4, 32, sym=True)
    deq = q.dequantize()
    assert torch.isfinite(deq).all()
    # dead columns are quantized data-free (no error flows into them), not zeroed
    rtn = quantize_rtn(W, 4, 32, sym=True).dequantize()
    assert (deq[:, :5] - W[:, :5]).abs().max() <= q.scale.float().max() / 2 + 1e-6
    assert deq[:, :5].abs().sum() > 0 and rtn.shape == deq.shape


def test_gptq_falls_back_to_rtn_below_min_tokens(caplog):
    W, X = _problem(out_f=8, in_f=64, n=100)
    with caplog.at_level(logging.WARNING, logger="moecompress.compress.quant.gptq"):
        q = gptq_quantize(W, X.T @ X, 100, 4, 32, min_tokens=256)
    assert "falling back to RTN" in caplog.text
    r = quantize_rtn(W, 4, 32)
    assert torch.equal(q.codes, r.codes) and torch.equal(q.scale, r.scale)
    # zero tokens and no Hessian at all: also the data-free fallback (pitfalls.md §1)
    assert torch.equal(gptq_quantize(W, None, 0, 4, 32).codes, r.codes)


def test_gptq_bad_input():
    W, X = _problem(out_f=8, in_f=64, n=512)
    with pytest.raises(UserError):
        gptq_quantize(W, torch.eye(32), 512, 4, 32)  # wrong Hessian shape
    with pytest.raises(UserError):
        gptq_quantize(W, None, 512, 4, 32)  # tokens but no Hessian
    with pytest.raises(UserError):
        gptq_quantize(W, X.T @ X, 512, 12, 32)
