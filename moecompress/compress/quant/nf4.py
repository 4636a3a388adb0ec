"""bitsandbytes baseline helper (baselines.md §12, pitfalls.md §12).

``BitsAndBytesConfig`` only replaces ``nn.Linear``, so fused 3-D experts stay BF16. After
the experts are linearised (one [out, in] matrix each), this wraps one matrix in a
bitsandbytes ``Linear4bit`` (NF4, block 64, optional double quantization) or
``Linear8bitLt`` (LLM.int8 row-wise absmax, ``threshold=0``: no fp16 outlier path).

Quantization happens when the parameter is moved to a device (``.to(device)``), which is
how bitsandbytes works; bitsandbytes ≥ 0.48 has a CPU backend, so ``device="cpu"`` works
(the "kernels-community" message bitsandbytes prints at import on CPU is harmless: it
falls back to its built-in torch implementation).

Stored in the native checkpoint as bitsandbytes' own serialisation (the names its ``state_dict`` gives and
``Params4bit.from_prequantized`` / ``Int8Params`` read back): NF4/FP4 ``weight`` (packed uint8 codes, two per
byte), ``weight.absmax``, ``weight.quant_map``, the ``weight.nested_*`` tensors with double quantization and
``weight.quant_state.bitsandbytes__nf4`` (blocksize, dtype, shape as a small uint8 JSON blob); int8 ``weight``
(the int8 codes CB) and ``SCB`` (fp32 row scales). :meth:`BnbLinear.structure` / :meth:`BnbLinear.empty` /
:meth:`BnbLinear.load_tensors` are the checkpoint's hooks.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from moecompress.errors import UserError

__all__ = ["BnbLinear", "linearise_bnb"]

KINDS = ("nf4", "fp4", "int8")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - declared dependency
        raise UserError("bitsandbytes is not installed: pip install bitsandbytes") from e
    return bnb


def _module(kind: str, in_f: int, out_f: int, has_bias: bool, compute_dtype: torch.dtype, double_quant: bool,
            device=None) -> nn.Module:
    """An unquantized bitsandbytes Linear of this shape (``device="meta"``: an empty one to load into)."""
    bnb = _bnb()
    if kind in ("nf4", "fp4"):
        m = bnb.nn.Linear4bit(in_f, out_f, bias=has_bias, compute_dtype=compute_dtype,
                              compress_statistics=double_quant, quant_type=kind, device=device)
        # bitsandbytes 0.50 on AVX512-BF16 CPUs repacks the codes on the first eval-mode forward: it rounds absmax
        # to bf16, asserts out_features % 32 == 0, breaks dequantize_4bit (dense_weight) and its state_dict
        # inverse leaves absmax in the repacked layout (the reloaded weight is wrong). The canonical layout is
        # kept instead: dequantize + matmul, identical on every CPU and exactly what dense_weight returns.
        m.support_avx512bf16_for_cpu = False
        return m
    if kind == "int8":
        return bnb.nn.Linear8bitLt(in_f, out_f, bias=has_bias, has_fp16_weights=False, threshold=0.0,
                                   device=device)
    raise UserError(f"unknown bitsandbytes kind {kind!r}: use 'nf4', 'fp4' or 'int8'")


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
    bnb = _bnb()
    if weight.dim() != 2:
        raise UserError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    m = _module(kind, in_f, out_f, bias is not None, compute_dtype, double_quant)
    w = weight.detach().to(torch.float16 if kind == "int8" else compute_dtype).contiguous()
    if kind == "int8":
        m.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    else:
        m.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type=kind, module=m)
    if bias is not None:
        m.bias = nn.Parameter(bias.detach().to(compute_dtype).clone(), requires_grad=False)
    return m.to(device)  # quantizes here


class BnbLinear(nn.Module):
    """A Linear-like wrapper (``in_features``, ``out_features``, ``forward``, ``dense_weight()``) around a
    bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` so that it can sit inside an ``ExpertList``.

    ``forward`` casts the input to the bnb module's compute dtype (NF4/FP4) and the result back to the input's
    dtype. ``dense_weight()`` dequantizes exactly what the kernel uses (NF4: ``dequantize_4bit``; int8: the
    row-wise absmax codes CB·SCB/127). Its state-dict entries are bitsandbytes' own (``inner.weight``,
    ``inner.weight.absmax``, …, or ``inner.weight`` + ``inner.SCB``); a checkpoint stores them with
    :meth:`structure` and reloads them with :meth:`empty` + :meth:`load_tensors`.
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
        if _flat(kind, out_f, in_f, blocksize):
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

    @property
    def has_bias(self) -> bool:
        return (self.bias if self.flat else self.inner.bias) is not None

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

    # ----- checkpoint hooks ----------------------------------------------------------------------------------
    def structure(self) -> dict[str, Any]:
        """What :meth:`empty` needs to rebuild this module's shapes (the tensors carry the rest)."""
        out = {"kind": "bnb", "quant_type": self.kind, "in_features": self.in_features,
               "out_features": self.out_features, "has_bias": self.has_bias, "flat": self.flat}
        if self.kind != "int8":
            state = self.inner.weight.quant_state
            out.update(blocksize=int(state.blocksize), double_quant=bool(state.nested),
                       compute_dtype=str(self.inner.compute_dtype).removeprefix("torch."))
        return out

    @classmethod
    def empty(cls, structure: dict[str, Any]) -> "BnbLinear":
        """A module of the recorded structure with meta-device weights, for :meth:`load_tensors`."""
        kind, out_f, in_f = structure["quant_type"], structure["out_features"], structure["in_features"]
        if kind not in KINDS:
            raise UserError(f"unknown bitsandbytes kind {kind!r} in the checkpoint; re-create it")
        dtype = getattr(torch, structure.get("compute_dtype", "float32"))
        double_quant = structure.get("double_quant", False)
        if not structure["flat"]:
            return cls(_module(kind, in_f, out_f, structure["has_bias"], dtype, double_quant, "meta"), kind)
        blocksize = structure["blocksize"]
        inner = _module(kind, blocksize, out_f * in_f // blocksize, False, dtype, double_quant, "meta")
        bias = torch.empty(out_f, dtype=dtype, device="meta") if structure["has_bias"] else None
        return cls(inner, kind, (out_f, in_f)).with_bias(bias, dtype)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Assign this module's state-dict entries (names relative to it), as bitsandbytes stores them."""
        bnb = _bnb()
        needed = ["inner.weight", "inner.SCB" if self.kind == "int8" else "inner.weight.absmax"]
        if self.has_bias:
            needed.append("bias" if self.flat else "inner.bias")
        missing = [name for name in needed if name not in tensors]
        if missing:
            raise UserError(f"the checkpoint lacks {missing[0]!r} of a bitsandbytes {self.kind} expert linear; "
                            f"it is inconsistent, re-create it")
        data = tensors["inner.weight"]
        n = self.out_features * self.in_features
        if data.numel() != (n if self.kind == "int8" else (n + 1) // 2):
            raise UserError(f"the checkpoint holds {data.numel()} bytes of {self.kind} codes for a "
                            f"[{self.out_features}, {self.in_features}] expert linear; it is inconsistent, "
                            f"re-create it")
        if self.kind == "int8":
            self.inner.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data,
                                                  SCB=tensors["inner.SCB"])
        else:
            stats = {k.removeprefix("inner.weight."): v for k, v in tensors.items() if k.startswith("inner.weight.")}
            self.inner.weight = bnb.nn.Params4bit.from_prequantized(data, stats, device=data.device,
                                                                    module=self.inner)
        if self.has_bias and self.flat:
            self.bias = tensors["bias"]
        elif self.has_bias:
            self.inner.bias = nn.Parameter(tensors["inner.bias"], requires_grad=False)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}"


def _flat(kind: str, out_f: int, in_f: int, blocksize: int) -> bool:
    """Whether ``from_weight`` quantizes this shape as the flat [n/blocksize, blocksize] view."""
    return kind != "int8" and in_f % blocksize != 0 and (out_f * in_f) % blocksize == 0
