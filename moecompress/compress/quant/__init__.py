"""Quantization core: packing, RTN, GPTQ, PackedLinear, PMQ bit allocation, bitsandbytes helper.

Pure tensor code, no model plumbing. bitsandbytes (``nf4.linearise_bnb``) is imported lazily.
"""

from .gptq import gptq_quantize
from .ilp import BitAllocation, allocate_bits, pmq_costs, solve_allocation
from .linear import PackedLinear
from .packing import codes_per_word, pack_codes, packed_width, unpack_codes
from .rtn import QuantizedWeight, dequantize, quantize_rtn

__all__ = [
    "BitAllocation",
    "PackedLinear",
    "QuantizedWeight",
    "allocate_bits",
    "codes_per_word",
    "dequantize",
    "gptq_quantize",
    "pack_codes",
    "packed_width",
    "pmq_costs",
    "quantize_rtn",
    "solve_allocation",
    "unpack_codes",
]
