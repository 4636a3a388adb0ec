"""Pack unsigned integer codes of width b = 1..8 into int32 words.

Layout (compressed-tensors ``pack-quantized``, formats.md §6):

* pf = ⌊32 / b⌋ codes per int32 word (3 bits: 10 per word, the top 2 bits unused;
  5 bits: 6; 6 bits: 5; 7 bits: 4);
* element c of a row goes to packed column ⌊c / pf⌋, at bit offset b·(c mod pf);
* a row of n codes becomes ⌈n / pf⌉ words; the padding codes of the last word are 0.

Codes must already be unsigned (0 … 2^b − 1). compressed-tensors stores *signed* codes
offset by 2^(b−1); our quantizers (rtn.py, gptq.py) emit unsigned codes directly with the
offset folded into the zero point, so the stored bits are the same for the symmetric case.

Words are filled in int64 and wrapped to int32 (two's complement), so a code in bit 31
(b = 1, 2, 4, 8) makes the word negative; ``unpack_codes`` undoes this exactly.
"""

from __future__ import annotations

import torch

from moecompress.errors import UserError

__all__ = ["codes_per_word", "packed_width", "pack_codes", "unpack_codes"]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise UserError(f"bits={bits!r} is not supported: use an integer width from 1 to 8")
    return bits


def codes_per_word(bits: int) -> int:
    """pf = ⌊32 / b⌋: how many b-bit codes one int32 holds."""
    return 32 // _check_bits(bits)


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words for a row of ``n`` codes: ⌈n / pf⌉."""
    pf = codes_per_word(bits)
    return (n + pf - 1) // pf


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack the last dimension of ``codes`` (any integer dtype, values in [0, 2^b − 1]).

    Returns int32 of shape ``codes.shape[:-1] + (⌈n / pf⌉,)``.
    """
    pf = codes_per_word(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise UserError(f"pack_codes needs integer codes, got {codes.dtype}: round and cast them first")
    if codes.dim() == 0:
        raise UserError("pack_codes needs at least a 1-D tensor of codes")
    c = codes.to(torch.int64)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) > (1 << bits) - 1):
        raise UserError(
            f"codes out of range for {bits} bits: found [{int(c.min())}, {int(c.max())}], "
            f"expected unsigned codes in [0, {(1 << bits) - 1}]"
        )
    n = c.shape[-1]
    cols = (n + pf - 1) // pf
    pad = cols * pf - n
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], cols, pf)
    shifts = torch.arange(pf, dtype=torch.int64, device=c.device) * bits
    words = (c << shifts).sum(dim=-1)  # disjoint bit fields: sum == bitwise or, < 2^32
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 ``[..., ⌈n / pf⌉]`` → uint8 codes ``[..., n]``."""
    pf = codes_per_word(bits)
    if packed.dtype != torch.int32:
        raise UserError(f"packed codes must be int32, got {packed.dtype}")
    cols = (n + pf - 1) // pf
    if packed.shape[-1] != cols:
        raise UserError(
            f"packed tensor has {packed.shape[-1]} words per row but {n} codes at {bits} bits need {cols}"
        )
    w = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(pf, dtype=torch.int64, device=w.device) * bits
    c = (w.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    c = c.reshape(*packed.shape[:-1], cols * pf)[..., :n]
    return c.to(torch.uint8)
