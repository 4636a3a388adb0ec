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

__all__ = ["BnbLinear", "linearise_bnb"]


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


class BnbLinear(nn.Module):
    """A Linear-like wrapper (``in_features``, ``out_features``, ``forward``, ``dense_weight()``) around a
    bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` so that it can sit inside an ``ExpertList``.

    ``forward`` casts the input to the bnb module's compute dtype (NF4/FP4) and the result back to the input's
    dtype. ``dense_weight()`` dequantizes exactly what the kernel uses (NF4: ``dequantize_4bit``; int8: the
    row-wise absmax codes CB·SCB/127). In-memory only: bitsandbytes parameters carry quantization state that
    the moecompress native format does not store, so :meth:`structure` refuses (formats.md §6).
    """

    def __init__(self, inner: nn.Module, kind: str, shape: Optional[tuple[int, int]] = None):
        super().__init__()
        self.inner = inner
        self.kind = kind
        self.flat = shape is not None  # 4-bit weight quantized as a [n/blocksize, blocksize] view (see from_weight)
        self.out_features, self.in_features = shape if shape is not None else (int(inner.out_features),
                                                                                 int(inner.in_features))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, kind: str = "nf4", bias: Optional[torch.Tensor] = None,
                    compute_dtype: torch.dtype = torch.float32, double_quant: bool = False, blocksize: int = 64,
                    device: str | torch.device = "cpu") -> "BnbLinear":
        """Quantize ``weight`` [out, in]. *Workaround:* bitsandbytes 0.50's CPU 4-bit dequantizer mis-handles
        rows whose length is not a multiple of the block size (relative error 0.2–0.4 instead of 0.09 for
        [128, 160]); NF4/FP4 blocks run over the flattened weight anyway, so such weights are quantized as the
        identical flat [n/blocksize, blocksize] view (the same codes and absmax blocks) and ``forward``
        dequantizes with bitsandbytes and multiplies with ``F.linear`` instead of ``matmul_4bit``."""
        out_f, in_f = weight.shape
        if kind != "int8" and in_f % blocksize and (out_f * in_f) % blocksize == 0:
            flat = weight.reshape(-1, blocksize)
            return cls(linearise_bnb(flat, kind, None, compute_dtype, double_quant, blocksize, device), kind,
                       (out_f, in_f)).with_bias(bias, compute_dtype)
        return cls(linearise_bnb(weight, kind, bias, compute_dtype, double_quant, blocksize, device), kind)

    def with_bias(self, bias: Optional[torch.Tensor], dtype: torch.dtype) -> "BnbLinear":
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype).clone())
        return self

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.inner.weight
        if self.kind == "int8":
            scb = w.SCB if getattr(w, "SCB", None) is not None else self.inner.state.SCB  # bnb moves it on forward
            return (w.data.float() * scb.float()[:, None] / 127.0).to(dtype)
        import bitsandbytes as bnb

        d = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        return d.reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flat:
            dt = self.inner.compute_dtype
            b = None if self.bias is None else self.bias.to(dt)
            return torch.nn.functional.linear(x.to(dt), self.dense_weight(dt), b).to(x.dtype)
        if self.kind == "int8":
            return self.inner(x).to(x.dtype)
        return self.inner(x.to(self.inner.compute_dtype)).to(x.dtype)

    def theoretical_bytes(self) -> int:
        """Codes + one absmax constant (fp32) per block (NF4, no double quantization) or per row (int8)."""
        n = self.in_features * self.out_features
        if self.kind == "int8":
            return n + 4 * self.out_features
        blocksize = self.inner.weight.quant_state.blocksize
        return (n * 4 + 7) // 8 + 4 * ((n + blocksize - 1) // blocksize)

    def structure(self):
        raise UserError(
            f"bitsandbytes {self.kind} experts cannot be written to a checkpoint (their quantization state has no "
            f"stored format here; formats.md §6: in-memory baseline): evaluate in memory with "
            f"moecompress.methods.bnb.quantize_bnb(model, '{self.kind}'), or use -m rtn/gptq for a stored checkpoint")

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}"
