"""GPTQ per routed expert, sequential layer by layer (baselines.md §10; pmq.md step 4), and the shared helpers the
data-aware quantization methods (GPTQ, PMQ) use to run it."""

from __future__ import annotations

import logging
from pydantic import Field

from moecompress.compress.moe import moe_layers
from moecompress.methods.base import BitPlan, LayerStep, Method, Pass, apply_plan, register, scale_dtype_for
from moecompress.methods.rtn import QuantConfig, check_uniform_bits

log = logging.getLogger("moecompress")


class GPTQOptions(QuantConfig):
    damp: float = Field(0.01, ge=0, description="Hessian damping λ = damp·mean diag(H)")
    act_order: bool = Field(False, description="process columns by descending diag(H) (stores g_idx)")
    min_tokens: int | None = Field(None, ge=0, description="routed tokens below which an expert falls back to RTN "
                                   "(same scheme, logged); default 2·group_size (GPTQModel's failsafe)")
    sequential: bool = Field(True, description="layer-by-layer: Hessians of layer l+1 are gathered on the outputs "
                             "of the already quantized layers ≤ l (GPTQ style); False: one full pass on the FP model")


class GPTQConfig(GPTQOptions):
    """GPTQ (Frantar et al., arXiv 2210.17323) on every routed expert; MoE specifics per baselines.md §10.

    * Hessian of expert i from the tokens routed to it only (gram collector): XᵀX of the MoE-block input for
      gate/up, AᵀA of the intermediate activations for down; H = (2/N)·Σxxᵀ + λI, λ = damp·mean diag(H);
      asymmetric, group 128, block 128, act-order off by default.
    * Experts with fewer than `min_tokens` routed tokens (default 2·group_size) are quantized by RTN with the
      same scheme and named in a warning (pitfall 1; never left unquantized).
    * Sequential (default): after `plan()`, the runner runs a layer-by-layer pass (`SequentialGPTQ`); after
      layer l's statistics are gathered its experts are quantized in the pass's layer hook, then its outputs are
      recomputed and feed layer l+1. Calibration statistics are therefore not cached. The same pass serves a model
      in memory and one onloaded layer by layer (each layer is written as soon as it is quantized).
    * `attn_bits`: attention, shared-expert and dense-MLP linears are quantized by **RTN** (data-free), each
      layer's before its batches run, so the experts' Hessians see the quantized attention. *Deviation:* the
      reference GPTQ quantizes those with GPTQ as well.
    * Dead input columns (never active) keep RTN-like codes instead of being zeroed (see compress.quant.gptq).
    """


class SequentialGPTQ:
    """The layer hooks of a sequential GPTQ pass (GPTQ, PMQ): before a layer's batches, RTN of its other linears
    (`attn_bits`); after them, GPTQ of its experts at `plan.bits` from the `gram` statistics of this pass, whose
    layer state is then dropped. Collects the experts that fell back to RTN (too few routed tokens)."""

    def __init__(self):
        self.fallbacks: dict[int, list[int]] = {}

    def pass_(self) -> Pass:
        from moecompress.calibration.collectors import GramStats

        return Pass("sequential", [GramStats(intermediate=True)], before_layer=self.before, on_layer=self.quantize,
                    changes_model=True, after_plan=True, label="GPTQ (layer-wise)")

    def before(self, step: LayerStep) -> None:
        from moecompress.compress.quantize import quantize_other_linears

        plan = step.plan
        if plan.other_bits is not None:
            quantize_other_linears(step.model, plan.other_bits, plan.group_size, plan.sym, [step.index],
                                   scale_dtype=scale_dtype_for(plan, step.model))

    def quantize(self, step: LayerStep) -> None:
        from moecompress.compress.quantize import hessians_from_gram, quantize_experts

        plan, i = step.plan, step.index
        if step.moe is None or i not in plan.bits:
            return
        gram = step.stats["gram"]
        self.fallbacks.update(quantize_experts(step.model, {i: plan.bits[i]}, plan.group_size, plan.sym, "gptq",
                                               hessians_from_gram(gram, [i]), damp=plan.damp,
                                               act_order=plan.act_order, min_tokens=plan.min_tokens,
                                               scale_dtype=scale_dtype_for(plan, step.model)))
        gram.drop_layer(i)

    def record(self, plan: BitPlan) -> BitPlan:
        plan.details = {**(plan.details or {}), "rtn_fallbacks": {str(k): v for k, v in self.fallbacks.items()}}
        return plan


def apply_quant_layer(model, plan: BitPlan, stats, index: int) -> None:
    """Per-layer application of a BitPlan: after a sequential GPTQ pass only ODP's router is left to install."""
    if plan.quantizer == "gptq" and plan.sequential:
        from moecompress.compress.routers import install_odp

        if plan.dynamic and index in plan.dynamic:
            install_odp(model, {index: plan.dynamic[index]}, plan.dynamic_renormalize, plan.dynamic_protect_ratio)
    else:
        apply_plan(model, plan, stats, [index])


@register
class GPTQ(Method):
    name = "gptq"
    kind = "quantization"
    paper = "arXiv 2210.17323"
    summary = "uniform GPTQ of every routed expert, per-expert Hessians from routed tokens, layer by layer"
    Config = GPTQConfig
    needs_tokenizer = True

    def __init__(self, config=None):
        super().__init__(config)
        self.sequential = SequentialGPTQ()

    def collectors(self):
        if self.config.sequential:
            return []  # the sequential pass after the plan gathers its own statistics
        from moecompress.calibration.collectors import GramStats

        return [GramStats(intermediate=True)]

    def passes(self, target):
        return [self.sequential.pass_()] if self.config.sequential else super().passes(target)

    def check_target(self, bits, avg_bits):
        check_uniform_bits(self.name, bits, avg_bits)

    def plan(self, model, stats, target):
        self.check_target(target.bits, target.avg_bits)
        c = self.config
        bits = {l.layer_idx: [target.bits] * l.num_experts for l in moe_layers(model)}
        return BitPlan(bits=bits, group_size=c.group_size, sym=c.sym, quantizer="gptq", other_bits=c.attn_bits, scale_dtype=c.scale_dtype,
                       damp=c.damp, act_order=c.act_order, min_tokens=c.min_tokens, sequential=c.sequential)

    def apply_layer(self, model, plan, stats, index):
        apply_quant_layer(model, plan, stats, index)

    def finish(self, model, plan):
        return self.sequential.record(plan) if plan.sequential else plan
