"""bitsandbytes baseline helper (baselines.md §12, pitfalls.md §12).

``BitsAndBytesConfig`` only replaces ``nn.Linear``, so fused 3-D experts stay BF16. After
the experts are linearised (one [out, in] matrix each), this wraps one matrix in a
bitsandbytes ``Linear4bit`` (NF4, block 64, optional double quantization) or
``Linear8bitLt`` (LLM.int8 row-wise absmax, ``threshold=0``: no fp16 outlier path).

Quantization happens when the parameter is moved to a device (``.to(device)``), which is
how bitsandbytes works; bitsandbytes ≥ 0.48 has a CPU backend, so ``device="cpu"`` works
(the "kernels-community" message bitsandbytes prints at import on CPU is harmless: it
falls back to its built-in torch implementation). In-memory baseline only: not exported.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moecompress.errors import UserError

__all__ = ["linearise_bnb"]


def linearise_bnb(
    weight: torch.Tensor,
    kind: str = "nf4",
    bias: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    double_quant: bool = False,
    blocksize: int = 64,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """A bitsandbytes Linear holding ``weight`` [out, in] quantized as ``kind`` ("nf4", "fp4" or "int8")."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - declared dependency
        raise UserError("bitsandbytes is not installed: pip install bitsandbytes") from e
    if weight.dim() != 2:
        raise UserError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    w = weight.detach().to(torch.float16 if kind == "int8" else compute_dtype).contiguous()
    if kind in ("nf4", "fp4"):
        m = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=kind)
        m.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=kind, module=m)
    elif kind == "int8":
        m = bnb.nn.Linear8bitLt(in_f, out_f, bias=bias is not None, has_fp16_weights=False, threshold=0.0)
        m.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        raise UserError(f"unknown bitsandbytes kind {kind!r}: use 'nf4', 'fp4' or 'int8'")
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return m.to(device)  # quantizes here
