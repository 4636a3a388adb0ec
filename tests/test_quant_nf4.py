"""bitsandbytes baseline on CPU (baselines.md §12): NF4 and LLM.int8 wrappers."""

import pytest
import torch

from moecompress.errors import UserError

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bf  # noqa: E402

from moecompress.compress.quant.nf4 import linearise_bnb  # noqa: E402


def test_nf4_linear_on_cpu():
    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(64, 200, generator=g), torch.randn(64, generator=g), torch.randn(5, 200, generator=g)
    m = linearise_bnb(W, "nf4", bias=b, compute_dtype=torch.float32)
    assert isinstance(m, bnb.nn.Linear4bit) and m.weight.dtype == torch.uint8
    assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.blocksize == 64
    deq = bf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    assert 0.05 < float((deq - W).norm() / W.norm()) < 0.12  # 16 NF4 levels, absmax block 64
    y = m(x)
    assert torch.allclose(y, x @ deq.T + b, atol=1e-4)
    assert m(x.bfloat16()).dtype == torch.bfloat16  # default compute dtype path


def test_int8_linear_on_cpu():
    g = torch.Generator().manual_seed(1)
    W, x = torch.randn(32, 96, generator=g), torch.randn(4, 96, generator=g)
    m = linearise_bnb(W, "int8")
    assert isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8
    ref = x @ W.T
    assert float((m(x).float() - ref).norm() / ref.norm()) < 2e-2


def test_unknown_kind():
    with pytest.raises(UserError):
        linearise_bnb(torch.randn(4, 8), "nf3")
