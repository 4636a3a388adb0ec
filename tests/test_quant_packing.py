"""Bit packing (formats.md §6): round trips and the exact word layout."""

import pytest
import torch

from moecompress.compress.quant.packing import codes_per_word, pack_codes, packed_width, unpack_codes
from moecompress.errors import UserError


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 10, 31, 33, 101, 128])
def test_round_trip_every_width_and_odd_lengths(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (5, n), generator=g)
    codes[0] = 2**bits - 1  # all ones: exercises the sign bit of the int32 word
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, packed_width(n, bits)) == (5, -(-n // (32 // bits)))
    out = unpack_codes(packed, bits, n)
    assert out.dtype == torch.uint8 and torch.equal(out.long(), codes)


def test_codes_per_word():
    assert [codes_per_word(b) for b in range(1, 9)] == [32, 16, 10, 8, 6, 5, 4, 4]


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_element_c_goes_to_word_c_div_pf_at_offset_b_times_c_mod_pf(bits):
    pf = 32 // bits
    n = 2 * pf + 3
    codes = torch.randint(0, 2**bits, (1, n), generator=torch.Generator().manual_seed(bits))
    words = pack_codes(codes, bits)[0].long() & 0xFFFFFFFF
    for c in range(n):
        assert (int(words[c // pf]) >> (bits * (c % pf))) & (2**bits - 1) == int(codes[0, c])
    # the padding codes of the last word are zero
    last = int(words[-1]) >> (bits * (n % pf)) if n % pf else 0
    assert last == 0


def test_hand_checked_words():
    # 3 bits: 10 codes per word, top 2 bits unused
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 7]])
    w = pack_codes(codes, 3)
    expected0 = sum(int(v) << (3 * j) for j, v in enumerate(codes[0, :10]))
    assert w.tolist() == [[expected0, 7]]
    # 1 bit: bit 31 set -> negative int32 (two's complement)
    ones = torch.ones(1, 32, dtype=torch.int64)
    assert pack_codes(ones, 1).tolist() == [[-1]]
    assert pack_codes(torch.tensor([[0, 0, 0, 0, 0, 0, 0, 8]]), 4).tolist() == [[-(2**31)]]


def test_batched_and_empty():
    codes = torch.randint(0, 4, (2, 3, 17))
    assert torch.equal(unpack_codes(pack_codes(codes, 2), 2, 17).long(), codes)
    empty = torch.zeros(0, 9, dtype=torch.int64)
    assert pack_codes(empty, 3).shape == (0, 1)
    assert unpack_codes(pack_codes(empty, 3), 3, 9).shape == (0, 9)


def test_bad_input():
    with pytest.raises(UserError):
        pack_codes(torch.zeros(2, 4, dtype=torch.int64), 0)
    with pytest.raises(UserError):
        pack_codes(torch.zeros(2, 4, dtype=torch.int64), 9)
    with pytest.raises(UserError, match="out of range"):
        pack_codes(torch.tensor([[0, 4]]), 2)
    with pytest.raises(UserError, match="out of range"):
        pack_codes(torch.tensor([[-1, 0]]), 2)
    with pytest.raises(UserError):
        pack_codes(torch.zeros(2, 4), 4)  # float codes
    with pytest.raises(UserError):
        unpack_codes(torch.zeros(2, 3, dtype=torch.int32), 4, 8)  # 8 codes at 4 bits = 1 word
