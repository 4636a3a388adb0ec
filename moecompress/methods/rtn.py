"""Uniform round-to-nearest quantization of every routed expert (baselines.md §9)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moecompress.compress.moe import moe_layers
from moecompress.errors import UserError
from moecompress.methods.base import BitPlan, Method, MethodConfig, register


def check_uniform_bits(method: str, bits: int | None, avg_bits: float | None) -> None:
    """Uniform methods take --bits B (1-8) and no --avg-bits (checked before any model is loaded)."""
    if avg_bits is not None:
        raise UserError(f"{method} quantizes every expert to the same width: pass --bits B (1-8), not --avg-bits "
                        f"(mixed precision: -m pmq --avg-bits B)")
    if bits is None:
        raise UserError(f"{method} needs --bits B (1-8)")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise UserError(f"--bits {bits} is not supported by {method}: use an integer from 1 to 8")


class QuantConfig(MethodConfig):
    """Group-wise scheme shared by the quantization methods."""

    group_size: int = Field(128, description="input columns per scale/zero group (-1: one group per row)")
    sym: bool = Field(False, description="symmetric (signed) codes instead of asymmetric min/max")
    scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="dtype of the stored scales and zero points (auto: the model's dtype for fp16/bf16 "
        "models, float16 for fp32 ones; serving engines read scales in the model's dtype)")
    attn_bits: int | None = Field(None, ge=1, le=8, description="bits for attention, shared-expert and dense-MLP "
                                  "linears (RTN); None keeps them in full precision")


class RTNConfig(QuantConfig):
    """Asymmetric min/max RTN per group of `group_size` input columns (s = (max−min)/(2^b−1), z = round(−min/s));
    1 bit binarises to ±mean|w| per row-group (MC's binariser). Data-free: no calibration pass. No deviation."""


@register
class RTN(Method):
    name = "rtn"
    kind = "quantization"
    paper = "baseline (round-to-nearest)"
    summary = "uniform group-wise round-to-nearest of every routed expert"
    Config = RTNConfig

    def check_target(self, bits, avg_bits):
        check_uniform_bits(self.name, bits, avg_bits)

    def plan(self, model, stats, target):
        self.check_target(target.bits, target.avg_bits)
        bits = {l.layer_idx: [target.bits] * l.num_experts for l in moe_layers(model)}
        return BitPlan(bits=bits, group_size=self.config.group_size, sym=self.config.sym, quantizer="rtn", scale_dtype=self.config.scale_dtype,
                       other_bits=self.config.attn_bits)
