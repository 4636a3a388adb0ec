"""bitsandbytes baselines `bnb-nf4` and `bnb-int8` (baselines.md §12; pitfalls.md §12; formats.md §6).

`BitsAndBytesConfig` quantizes only `nn.Linear`, so transformers 5.x's fused experts would stay dense; here the
experts are linearised into an `ExpertList` and every gate/up/down is wrapped in a bitsandbytes `Linear4bit` (NF4)
or `Linear8bitLt` (LLM.int8) module (`compress.quant.nf4.BnbLinear`).

Checkpoint: native (`moecompress quantize MODEL -m bnb-nf4 -o OUT`, then `moecompress.load(OUT)` or
`moecompress eval OUT`). The safetensors file holds bitsandbytes' own serialisation of each expert linear — the
packed 4-bit codes with their absmax and quant-state tensors, or the int8 codes with their row scales SCB — so the
bytes on disk are the quantized ones; the manifest records each linear's shape and block layout. The checkpoint
needs moecompress (and bitsandbytes) to load; no other engine reads per-expert bitsandbytes linears.
In memory, without writing:

    from moecompress import load
    from moecompress.methods.bnb import quantize_bnb
    model = quantize_bnb(load(path), "nf4")      # then moecompress.evals.lmeval.evaluate(model, tokenizer, ...)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from moecompress.compress.moe import moe_layers
from moecompress.errors import UserError
from moecompress.methods.base import BitPlan, Method, MethodConfig, apply_plan, register


class BnbConfig(MethodConfig):
    """bitsandbytes baseline (QLoRA NF4, arXiv 2305.14314; LLM.int8, arXiv 2208.07339) on the routed experts.

    NF4: block-wise absmax, block 64, optional double quantization (`double_quant`), compute dtype float32 on
    CPU. int8: row-wise absmax, `threshold=0` (no fp16 outlier decomposition); in eval mode bitsandbytes multiplies
    int8 × int8 with the activations quantized row-wise too (LLM.int8), in training mode its CPU path dequantizes
    the weight instead. Attention and other linears stay in full precision (bitsandbytes' own defaults would
    quantize them; here only the experts are compared). Deviations from `BitsAndBytesConfig`: the fused experts
    are linearised first (otherwise they stay dense, pitfall 12); NF4 never takes bitsandbytes 0.50's AVX512-BF16
    CPU repacking (bf16 absmax; see `compress.quant.nf4`), so results match on every CPU."""

    double_quant: bool = Field(False, description="NF4: quantize the absmax constants too (8-bit, block 256)")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = "float32"


KINDS = {"bnb-nf4": ("nf4", 4), "bnb-int8": ("int8", 8)}


def quantize_bnb(model, kind: str = "nf4", double_quant: bool = False, compute_dtype: str = "float32"):
    """Quantize every routed expert of `model` in place with bitsandbytes (`kind` "nf4", "fp4" or "int8")."""
    import torch

    from moecompress.compress.quantize import quantize_experts_bnb

    quantize_experts_bnb(model, kind, getattr(torch, compute_dtype), double_quant)
    return model


class _Bnb(Method):
    kind = "quantization"
    paper = "arXiv 2305.14314 / 2208.07339 (bitsandbytes)"
    Config = BnbConfig

    def check_target(self, bits, avg_bits):
        width = KINDS[self.name][1]
        if avg_bits is not None or (bits is not None and bits != width):
            raise UserError(f"{self.name} is {width}-bit only: drop --avg-bits/--bits (or pass --bits {width})")

    def plan(self, model, stats, target):
        self.check_target(target.bits, target.avg_bits)
        width = KINDS[self.name][1]
        return BitPlan(bits={l.layer_idx: [width] * l.num_experts for l in moe_layers(model)},
                       group_size=64 if width == 4 else -1, quantizer=self.name,
                       details={"double_quant": self.config.double_quant, "compute_dtype": self.config.compute_dtype})

    def layered_refusal(self, target):
        return "bitsandbytes modules are built and serialised whole in memory"

    def apply(self, model, plan, stats):
        if self.config.double_quant or self.config.compute_dtype != "float32":
            quantize_bnb(model, KINDS[self.name][0], self.config.double_quant, self.config.compute_dtype)
        else:
            apply_plan(model, plan, stats)


@register
class BnbNF4(_Bnb):
    name = "bnb-nf4"
    summary = "bitsandbytes NF4 (block 64) per linearised expert; native checkpoint"


@register
class BnbInt8(_Bnb):
    name = "bnb-int8"
    summary = "bitsandbytes LLM.int8 per linearised expert; native checkpoint"
