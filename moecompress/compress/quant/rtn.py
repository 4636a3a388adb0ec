"""Group-wise round-to-nearest (RTN) quantization along the input dimension.

Spec: baselines.md §9 (uniform RTN) and pmq.md step 2 / step 4 (1-bit binariser).
A weight W [out, in] is split along ``in`` into groups of ``group_size`` columns (the last
group may be shorter when ``in`` is not a multiple; ``group_size=-1`` = one group per row).
Every (row, group) gets its own scale s and zero point z, and

    ŵ = s · (q − z),   q ∈ {0, …, 2^b − 1} unsigned.

* **Asymmetric** (``sym=False``): s = (max − min)/(2^b − 1), z = round(−min/s),
  q = clamp(round(w/s) + z, 0, 2^b − 1).  *Deviation/precision note:* as in GPTQ's reference
  quantizer, min is clamped to ≤ 0 and max to ≥ 0, so z always lies in [0, 2^b − 1] and an
  exact 0 stays representable.
* **Symmetric** (``sym=True``, b ≥ 2): s = max|w|/(2^(b−1) − 1), signed code
  round(w/s) ∈ [−2^(b−1), 2^(b−1) − 1]; we store it offset by 2^(b−1) (unsigned, as
  compressed-tensors packs it) and set z = 2^(b−1), so one dequantizer serves both.
* **1 bit** (any ``sym``): binariser ŵ = sign(w)·mean|w| per row-group, stored as
  codes {0, 1} (1 ⇔ w ≥ 0; w = 0 maps to +mean|w|, since a binary code cannot be 0),
  s = 2·mean|w| and z = 0.5 (formats.md §7), so s·(q − z) = ±mean|w|.

Scales and zeros are stored in ``scale_dtype`` (float16 by default, the toolkit's storage
type). The scale is rounded *up* to that dtype *before* codes are computed, so
dequantization reproduces exactly what the quantizer assumed and |w − ŵ| ≤ s/2 still
holds for b ≥ 2. Zeros are integers ≤ 255 or 0.5, exact in fp16. For b ≥ 2 a group whose
range is 0 (e.g. all zeros, pitfalls.md §1) gets the smallest normal positive scale of
``scale_dtype`` instead of 0: codes = z, ŵ = 0, never NaN/inf. The 1-bit binariser never
divides by its scale, so an all-zero group keeps s = 0 (ŵ = 0 exactly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from moecompress.errors import UserError

__all__ = [
    "QuantizedWeight",
    "check_scheme",
    "n_groups",
    "group_index",
    "group_params",
    "quantize_with",
    "quantize_rtn",
    "dequantize",
]


@dataclass
class QuantizedWeight:
    """Result of a quantizer: what a packed checkpoint stores for one Linear.

    codes:  uint8 [out, in], unsigned in [0, 2^bits − 1]
    scale:  [out, n_groups] (``scale_dtype``)
    zero:   [out, n_groups] (``scale_dtype``; integer-valued except 0.5 for 1 bit)
    g_idx:  int32 [in] group of each input column, or None for the default ⌊c / group_size⌋
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    g_idx: Optional[torch.Tensor] = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero, self.group_size, self.g_idx, dtype)


def check_scheme(bits: int, group_size: int) -> None:
    """Validate user-facing quantization settings (UserError on bad input)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise UserError(f"bits={bits!r} is not supported: use an integer width from 1 to 8")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise UserError(f"group_size={group_size!r} is invalid: use a positive integer (e.g. 128) or -1 for one group per row")


def n_groups(in_features: int, group_size: int) -> int:
    """⌈in / g⌉ groups per row (1 for ``group_size=-1``; 0 columns → 0 groups)."""
    if group_size == -1:
        return 1 if in_features > 0 else 0
    return (in_features + group_size - 1) // group_size


def group_index(in_features: int, group_size: int, g_idx: Optional[torch.Tensor] = None, device=None) -> torch.Tensor:
    """Group of every input column: ``g_idx`` if given, else ⌊c / g⌋."""
    if g_idx is not None:
        return g_idx.to(device=device, dtype=torch.long)
    c = torch.arange(in_features, device=device)
    return torch.zeros_like(c) if group_size == -1 else c // group_size


def group_params(w: torch.Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16):
    """Scale and zero for each row of ``w`` [out, k] (one group): returns two [out] tensors.

    The scale is already rounded to ``scale_dtype`` (returned in float32 for computation).
    """
    w = w.float()
    tiny = torch.finfo(scale_dtype).tiny
    if bits == 1:
        scale = 2.0 * w.abs().mean(dim=1)
        zero = torch.full_like(scale, 0.5)
    elif sym:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(dim=1) / qmax
        zero = torch.full_like(scale, float(2 ** (bits - 1)))
    else:
        maxq = 2**bits - 1
        wmin = w.amin(dim=1).clamp(max=0)
        wmax = w.amax(dim=1).clamp(min=0)
        scale = (wmax - wmin) / maxq
    if bits == 1:  # the binariser never divides by its scale: an all-zero group keeps s = 0, ŵ = 0
        return _round_up(scale, scale_dtype), zero
    scale = _round_up(scale.clamp(min=tiny), scale_dtype)
    if bits > 1 and not sym:
        zero = torch.round(-wmin / scale).clamp(0, 2**bits - 1)
    return scale, zero


def _round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` *upwards* (returned as float32).

    Rounding a scale down would stretch the grid past 2^b − 1 steps, and the clamp would
    then cost more than half a step at the range ends; rounding up keeps |w − ŵ| ≤ s/2.
    """
    y = x.to(dtype)
    low = y.float() < x
    if low.any():
        y = torch.where(low, torch.nextafter(y, torch.full_like(y, float("inf"))), y)
    return y.float()


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes for ``w`` [out, k] given per-row (broadcastable) ``scale``/``zero``; float result."""
    if bits == 1:
        return (w >= 0).to(torch.float32)
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight`` [out, in] (see module docstring)."""
    check_scheme(bits, group_size)
    if weight.dim() != 2:
        raise UserError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if weight.is_floating_point() and weight.numel() and not torch.isfinite(weight).all():
        raise UserError("weight contains NaN/inf: fix the model weights before quantizing")
    out_f, in_f = weight.shape
    ng = n_groups(in_f, group_size)
    g = in_f if group_size == -1 else group_size
    w = weight.detach().float()
    # pad to whole groups (padding columns never influence min/max/mean: see below)
    pad = ng * g - in_f
    wg = torch.nn.functional.pad(w, (0, pad)).reshape(out_f * ng, g) if out_f * ng else w.new_zeros(0, max(g, 1))
    if pad and bits == 1:
        # mean|w| must ignore the zero padding: compute it over the real columns only
        counts = torch.full((ng,), float(g), device=w.device)
        counts[-1] = g - pad
        absmean = wg.abs().reshape(out_f, ng, g).sum(-1) / counts
        scale = _round_up(2.0 * absmean, scale_dtype).reshape(-1)
        zero = torch.full_like(scale, 0.5)
    else:
        # zero padding is harmless for min(·,0)/max(·,0) and for max|w|
        scale, zero = group_params(wg, bits, sym, scale_dtype)
    codes = quantize_with(wg, scale[:, None], zero[:, None], bits)
    codes = codes.reshape(out_f, ng * g)[:, :in_f].to(torch.uint8)
    return QuantizedWeight(
        codes=codes,
        scale=scale.reshape(out_f, ng).to(scale_dtype),
        zero=zero.reshape(out_f, ng).to(scale_dtype),
        bits=bits,
        group_size=group_size,
        sym=sym,
    )


def dequantize(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    g_idx: Optional[torch.Tensor] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """ŵ[o, c] = scale[o, G(c)] · (codes[o, c] − zero[o, G(c)]), computed in float32."""
    out_f, in_f = codes.shape
    gi = group_index(in_f, group_size, g_idx, device=codes.device)
    s = scale.float().index_select(1, gi) if out_f else scale.float().new_zeros(0, in_f)
    z = zero.float().index_select(1, gi) if out_f else s
    return (s * (codes.float() - z)).to(dtype)
