"""PackedLinear: forward accuracy, safetensors round trip, odd shapes, byte accounting."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.quant.rtn import quantize_rtn
from moecompress.errors import UserError


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def test_8bit_rtn_is_close_to_fp32():
    W = torch.randn(64, 300, generator=_gen(0))  # 300: partial last group
    b = torch.randn(64, generator=_gen(1))
    x = torch.randn(10, 300, generator=_gen(2))
    m = PackedLinear.from_weight(W, bits=8, group_size=128, bias=b)
    y, ref = m(x), torch.nn.functional.linear(x, W, b)
    # hard bound: every weight is within half a step, so |Δy| ≤ Σ_c |x_c| · s_c / 2
    step = m.weight_scale.float().repeat_interleave(128, dim=1)[:, :300]
    assert ((y - ref).abs() <= (x.abs() @ (step / 2).T) + 1e-4).all()
    # relative output error: 8-bit noise floor is s/√12 ≈ range/(255·√12) ≈ 0.7 % of a Gaussian
    # weight's std (measured 5.8e-3); tolerance 1e-2
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    assert torch.equal(m.dense_weight(), quantize_rtn(W, 8, 128).dequantize())


def _roundtrip(m, tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    structure = json.loads(json.dumps(m.structure()))
    m2 = PackedLinear.empty(structure)
    m2.load_state_dict(load_file(str(path)), strict=True)
    return m2


CASES = [
    dict(bits=4, group_size=128, sym=False, method="rtn"),
    dict(bits=3, group_size=64, sym=True, method="rtn"),
    dict(bits=1, group_size=128, sym=False, method="rtn"),
    dict(bits=2, group_size=32, sym=False, method="gptq", act_order=True),
    dict(bits=5, group_size=-1, sym=False, method="gptq"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("with_bias", [False, True])
def test_safetensors_round_trip_gives_identical_outputs(case, with_bias, tmp_path):
    W = torch.randn(48, 200, generator=_gen(3))
    X = torch.randn(600, 200, generator=_gen(4))
    bias = torch.randn(48, generator=_gen(5)) if with_bias else None
    m = PackedLinear.from_weight(W, bias=bias, hessian=X.T @ X, tokens=600, **case)
    assert (m.weight_g_idx is not None) == bool(case.get("act_order"))
    m2 = _roundtrip(m, tmp_path)
    x = torch.randn(7, 200, generator=_gen(6))
    assert torch.equal(m(x), m2(x))
    assert m2.structure() == m.structure()
    assert set(m.state_dict()) >= {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    assert m.weight_packed.dtype == torch.int32 and m.weight_shape.tolist() == [48, 200]


def test_zero_output_channels(tmp_path):
    m = PackedLinear.from_weight(torch.zeros(0, 96), bits=3, group_size=64, bias=torch.zeros(0))
    y = m(torch.randn(2, 5, 96))
    assert y.shape == (2, 5, 0)
    m2 = _roundtrip(m, tmp_path)
    assert m2(torch.randn(4, 96)).shape == (4, 0)
    assert m.theoretical_bytes() == 0


def test_bytes_actual_vs_theoretical():
    m = PackedLinear.from_weight(torch.randn(256, 512, generator=_gen(7)), bits=4, group_size=128)
    # codes 256·512·4/8 = 65536; scale + zero: 256·4 groups · 2 B each = 2048 + 2048
    assert m.theoretical_bytes() == 65536 + 4096
    assert m.actual_bytes() == 65536 + 4096 + 8  # + weight_shape (2 × int32)
    m3 = PackedLinear.from_weight(torch.randn(256, 512, generator=_gen(7)), bits=3, group_size=128)
    assert m3.weight_packed.shape == (256, 52)  # 10 codes per word
    assert m3.actual_bytes() == 256 * 52 * 4 + 4096 + 8


def test_dtype_casts_keep_fp16_scales_and_bf16_forward():
    W = torch.randn(32, 128, generator=_gen(8))
    m = PackedLinear.from_weight(W, bits=4, bias=torch.randn(32))
    scale = m.weight_scale.clone()
    m = m.to(torch.bfloat16)
    assert m.weight_scale.dtype == torch.float16 and torch.equal(m.weight_scale, scale)
    assert m.bias.dtype == torch.bfloat16
    x = torch.randn(3, 128, generator=_gen(9))
    y = m(x.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = m.float()(x)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2  # bf16 rounding of x, ŵ and y


def test_gptq_through_from_weight_beats_rtn():
    g = _gen(10)
    W = torch.randn(32, 256, generator=g)
    X = torch.randn(800, 8, generator=g) @ torch.randn(8, 256, generator=g) + 0.2 * torch.randn(800, 256, generator=g)
    ref = X @ W.T
    err = {meth: float((PackedLinear.from_weight(W, 3, method=meth, hessian=X.T @ X, tokens=800)(X) - ref).norm())
           for meth in ("rtn", "gptq")}
    assert err["gptq"] < 0.6 * err["rtn"]


def test_bad_input():
    with pytest.raises(UserError):
        PackedLinear.from_weight(torch.randn(4, 8), bits=4, method="awq")
    with pytest.raises(UserError):
        PackedLinear.from_weight(torch.randn(4, 8), bits=9)
    with pytest.raises(UserError):
        PackedLinear.empty({"bits": 4})
