"""GPTQ (Frantar et al., arXiv 2210.17323) for one weight W [out, in].

Spec: baselines.md §10; defaults per pmq.md step 4 (asym, g = 128, damp 0.01, block 128,
act-order off). Input is the *unnormalised* Gram matrix Σ_t x_t x_tᵀ over the calibration
tokens routed to this Linear, plus the token count N.

1. H = (2/N)·Σ x xᵀ (the scale cancels in GPTQ's updates; it only helps conditioning).
2. Dead inputs (diag H = 0, never active in calibration): H_dd = 1. *Deviation:* the
   reference GPTQ also zeroes W[:, d]; we keep those weights and quantize them like RTN
   (H_dd = 1 with zero off-diagonals decouples them: no error flows into or out of them),
   because the calibration says nothing about them and zeroing throws them away.
3. Damping H += λI, λ = damp·mean diag(H). If the Cholesky factorisation still fails, the
   damping is multiplied by 10 (up to 4 times) with a logged warning.
4. Optional act-order: columns processed by descending diag(H). Groups then follow the
   *processing* order: the j-th processed column belongs to group ⌊j/g⌋, recorded in
   ``g_idx`` [in] (the "desc_act + g_idx" layout of GPTQ checkpoints; no static groups).
   Without act-order, ``g_idx`` is None (group = ⌊c/g⌋).
5. U = upper Cholesky factor of H⁻¹. Columns in blocks of ``block_size``: for column c,
   fresh scale/zero (rtn.group_params) at each group start, q = Q(w_c), e = (w_c − ŵ_c)/U_cc,
   W[:, c:block_end] −= e·U_{c, c:block_end}; the block's errors are applied to the later
   columns lazily, E·U_{block, later}. When a group straddles a block end, its parameters
   are computed from the current in-block columns plus the later columns as lazily updated
   so far (exactly what the reference does when g divides the block size: then no straddle).
6. Fallback (pitfalls.md §1): with fewer than ``min_tokens`` tokens (default 2·group_size,
   GPTQModel's failsafe), RTN with the same scheme is used and a warning is logged.

Returns the same :class:`~moecompress.compress.quant.rtn.QuantizedWeight` as RTN.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from moecompress.errors import UserError

from .rtn import QuantizedWeight, check_scheme, group_params, quantize_rtn, quantize_with

__all__ = ["gptq_quantize"]

log = logging.getLogger(__name__)


def _inverse_cholesky_upper(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp·mean diag H, raising λ ×10 on failure."""
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype, device=H.device)
    base = float(torch.diag(H).mean())
    lam = damp * base
    for attempt in range(5):
        L, info = torch.linalg.cholesky_ex(H + lam * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0:
                return U
        new = lam * 10 if lam > 0 else 1e-6 * max(base, 1.0)
        log.warning("GPTQ: Hessian not positive definite with damping %.3g; retrying with %.3g", lam, new)
        lam = new
    raise UserError("GPTQ Hessian is not positive definite even with heavy damping: check the calibration statistics for NaN/inf or use method='rtn'")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: Optional[torch.Tensor],
    tokens: int,
    bits: int,
    group_size: int = 128,
    sym: bool = False,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    min_tokens: Optional[int] = None,
    scale_dtype: torch.dtype = torch.float16,
) -> QuantizedWeight:
    """Quantize ``weight`` [out, in] with GPTQ given ``hessian`` = Σ x xᵀ [in, in] over ``tokens`` tokens."""
    check_scheme(bits, group_size)
    if weight.dim() != 2:
        raise UserError(f"weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not damp >= 0:
        raise UserError(f"damp={damp!r} must be ≥ 0 (typical: 0.01)")
    if block_size < 1:
        raise UserError(f"block_size={block_size!r} must be a positive integer (typical: 128)")
    out_f, in_f = weight.shape
    if min_tokens is None:
        min_tokens = 2 * group_size if group_size > 0 else 256
    if tokens < min_tokens:
        log.warning(
            "GPTQ: only %d calibration tokens (< min_tokens=%d) for a %dx%d weight; falling back to RTN (%d bits, g=%d)",
            tokens, min_tokens, out_f, in_f, bits, group_size,
        )
        return quantize_rtn(weight, bits, group_size, sym, scale_dtype)
    if hessian is None:
        raise UserError("GPTQ needs a Hessian (Σ x xᵀ from calibration): pass hessian=..., or use method='rtn'")
    if hessian.shape != (in_f, in_f):
        raise UserError(f"Hessian shape {tuple(hessian.shape)} does not match weight in_features {in_f}: expected ({in_f}, {in_f})")
    if not torch.isfinite(hessian).all() or not torch.isfinite(weight).all():
        raise UserError("GPTQ input contains NaN/inf (weight or Hessian): fix the calibration statistics")
    if out_f == 0 or in_f == 0:
        return quantize_rtn(weight, bits, group_size, sym, scale_dtype)

    W = weight.detach().to(torch.float32).clone()
    H = hessian.detach().to(torch.float64) * (2.0 / tokens)  # float64: cheap here, avoids Cholesky trouble
    H = (H + H.T) / 2
    dead = torch.diag(H) <= 0
    if dead.any():
        H[dead, :] = 0
        H[:, dead] = 0
        H[dead, dead] = 1.0

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    U = _inverse_cholesky_upper(H, damp).to(torch.float32)

    g = in_f if group_size == -1 else group_size
    ng = (in_f + g - 1) // g
    dev = W.device
    codes = torch.zeros(out_f, in_f, dtype=torch.uint8, device=dev)
    scales = torch.zeros(out_f, ng, dtype=torch.float32, device=dev)
    zeros = torch.zeros(out_f, ng, dtype=torch.float32, device=dev)
    scale = zero = None

    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:
                end = min(col + g, in_f)
                grp = W1[:, i : end - i1] if end <= i2 else torch.cat([W1[:, i:], W[:, i2:end]], dim=1)
                scale, zero = group_params(grp, bits, sym, scale_dtype)
                scales[:, col // g] = scale
                zeros[:, col // g] = zero
            w = W1[:, i]
            q = quantize_with(w, scale, zero, bits)
            codes[:, col] = q.to(torch.uint8)
            err = (w - scale * (q - zero)) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        g_idx = (torch.arange(in_f, device=dev) // g)[inv].to(torch.int32)
    return QuantizedWeight(
        codes=codes,
        scale=scales.to(scale_dtype),
        zero=zeros.to(scale_dtype),
        bits=bits,
        group_size=group_size,
        sym=sym,
        g_idx=g_idx,
    )
