"""``PackedLinear``: a frozen, Linear-like module holding a packed b-bit weight.

State-dict layout (compressed-tensors names, formats.md §6–7):

* ``weight_packed``      int32 [out, ⌈in/pf⌉], pf = ⌊32/b⌋ (packing.py);
* ``weight_scale``       [out, n_groups] in the scale dtype (fp16 by default; the model's for serving exports);
* ``weight_zero_point``  [out, n_groups] in the scale dtype, **unpacked**.  *Deviation from
  compressed-tensors* (int32 packed along dim 0, asymmetric only): the 1-bit binariser's
  zero point is 0.5 (formats.md §7), which an integer cannot hold; fp16 holds every zero
  exactly (integers ≤ 255 and 0.5). It is stored for symmetric schemes too (= 2^(b−1)),
  so one dequantizer serves all schemes; ``theoretical_bytes`` does not count it there;
* ``weight_shape``       int32 [2] = (out, in);
* ``weight_g_idx``       int32 [in], only with act-order GPTQ (the compressed-tensors name);
* ``bias``               optional, in the dtype it was given.

``forward`` dequantizes on every call (nothing cached) into the input's dtype and applies
``F.linear``. ``.to(dtype)`` / ``.half()`` move but never cast the scale/zero buffers, so a
model cast to bf16 keeps its fp16 quantization constants bit-exact.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moecompress.errors import UserError

from .gptq import gptq_quantize
from .packing import pack_codes, packed_width, unpack_codes
from .rtn import QuantizedWeight, check_scheme, dequantize, n_groups, quantize_rtn

__all__ = ["PackedLinear"]

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_FIXED_DTYPE_BUFFERS = ("weight_scale", "weight_zero_point")


class PackedLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int = 128,
        sym: bool = False,
        has_bias: bool = False,
        has_g_idx: bool = False,
        scale_dtype: torch.dtype = torch.float16,
        bias_dtype: torch.dtype = torch.float32,
    ):
        """Build with correctly shaped, *uninitialised* (zero) buffers; fill via ``load_state_dict``."""
        super().__init__()
        check_scheme(bits, group_size)
        if in_features < 0 or out_features < 0:
            raise UserError(f"negative Linear size ({out_features}x{in_features}): sizes must be ≥ 0")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group_size, self.sym = int(bits), int(group_size), bool(sym)
        ng = n_groups(in_features, group_size)
        self.register_buffer("weight_packed", torch.zeros(out_features, packed_width(in_features, bits), dtype=torch.int32))
        self.register_buffer("weight_scale", torch.zeros(out_features, ng, dtype=scale_dtype))
        self.register_buffer("weight_zero_point", torch.zeros(out_features, ng, dtype=scale_dtype))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int32))
        self.register_buffer("weight_g_idx", torch.zeros(in_features, dtype=torch.int32) if has_g_idx else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype) if has_bias else None)

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_quantized(cls, q: QuantizedWeight, bias: Optional[torch.Tensor] = None) -> "PackedLinear":
        out_f, in_f = q.codes.shape
        m = cls(
            in_f, out_f, q.bits, q.group_size, q.sym,
            has_bias=bias is not None, has_g_idx=q.g_idx is not None,
            scale_dtype=q.scale.dtype,
            bias_dtype=bias.dtype if bias is not None else torch.float32,
        ).to(q.codes.device)
        m.weight_packed.copy_(pack_codes(q.codes, q.bits))
        m.weight_scale.copy_(q.scale)
        m.weight_zero_point.copy_(q.zero)
        if q.g_idx is not None:
            m.weight_g_idx.copy_(q.g_idx)
        if bias is not None:
            if bias.shape != (out_f,):
                raise UserError(f"bias shape {tuple(bias.shape)} does not match out_features {out_f}")
            m.bias.copy_(bias.detach())
        return m

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bits: int,
        group_size: int = 128,
        sym: bool = False,
        method: str = "rtn",
        hessian: Optional[torch.Tensor] = None,
        tokens: int = 0,
        damp: float = 0.01,
        act_order: bool = False,
        bias: Optional[torch.Tensor] = None,
        min_tokens: Optional[int] = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> "PackedLinear":
        """Quantize ``weight`` [out, in] with RTN or GPTQ (GPTQ falls back to RTN below ``min_tokens``)."""
        if method == "rtn":
            q = quantize_rtn(weight, bits, group_size, sym, scale_dtype)
        elif method == "gptq":
            q = gptq_quantize(weight, hessian, tokens, bits, group_size, sym, damp, act_order,
                              min_tokens=min_tokens, scale_dtype=scale_dtype)
        else:
            raise UserError(f"unknown quantization method {method!r}: use 'rtn' or 'gptq'")
        return cls.from_quantized(q, bias)

    def structure(self) -> dict[str, Any]:
        """JSON-serialisable description from which :meth:`empty` rebuilds this module."""
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "in_features": self.in_features,
            "out_features": self.out_features,
            "has_bias": self.bias is not None,
            "has_g_idx": self.weight_g_idx is not None,
            "scale_dtype": str(self.weight_scale.dtype).removeprefix("torch."),
            "bias_dtype": str(self.bias.dtype).removeprefix("torch.") if self.bias is not None else None,
        }

    @classmethod
    def empty(cls, structure: dict[str, Any]) -> "PackedLinear":
        """Module with the right (zero-filled) buffers for ``structure``; then ``load_state_dict``."""
        try:
            s = structure
            scale_dtype = _DTYPES[s.get("scale_dtype") or "float16"]
            bias_dtype = _DTYPES[s.get("bias_dtype") or "float32"]
            return cls(
                int(s["in_features"]), int(s["out_features"]), int(s["bits"]), int(s["group_size"]),
                bool(s["sym"]), bool(s["has_bias"]), bool(s["has_g_idx"]), scale_dtype, bias_dtype,
            )
        except KeyError as e:
            raise UserError(f"PackedLinear structure is missing or has a bad value for {e}: rebuild it with PackedLinear.structure()") from None

    # ---------------------------------------------------------------- use
    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dequantized weight [out, in]."""
        codes = unpack_codes(self.weight_packed, self.bits, self.in_features)
        return dequantize(codes, self.weight_scale, self.weight_zero_point, self.group_size, self.weight_g_idx, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dense_weight(x.dtype)
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, w, b)

    def theoretical_bytes(self) -> int:
        """Codes at b bits + one scale per group + one zero per group (asymmetric, b ≥ 2 only), in the scales' dtype."""
        ng = n_groups(self.in_features, self.group_size)
        code_bits = self.out_features * self.in_features * self.bits
        per_group = self.weight_scale.element_size() * (2 if (not self.sym and self.bits > 1) else 1)
        return (code_bits + 7) // 8 + self.out_features * ng * per_group

    def actual_bytes(self) -> int:
        """Bytes of every quantization buffer held (packed codes, scale, zero, shape, g_idx; not bias)."""
        names = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
        return sum(b.numel() * b.element_size() for n, b in self._buffers.items() if n in names and b is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, sym={self.sym}, bias={self.bias is not None}, "
                f"g_idx={self.weight_g_idx is not None}")

    # keep the quantization constants' dtype under .to(dtype)/.half()/.bfloat16()
    def _apply(self, fn, recurse=True):
        saved = {n: self._buffers[n] for n in _FIXED_DTYPE_BUFFERS}
        for n in saved:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for n, buf in saved.items():
                new = fn(buf)
                if new.dtype != buf.dtype:
                    new = buf.to(device=new.device)
                self._buffers[n] = new
        return self
