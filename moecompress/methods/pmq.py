"""PMQ — pre-loading mixed-precision quantization of the routed experts (MC, arXiv 2410.06270; pmq.md), with the
optional ODP runtime router (online dynamic pruning of the second expert)."""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator

from moecompress.compress.moe import ExpertWeights, MoELayer, moe_layers
from moecompress.compress.quant.ilp import allocate_bits
from moecompress.compress.quant.rtn import quantize_rtn
from moecompress.errors import UserError
from moecompress.methods.base import BitPlan, Method, Pass, register
from moecompress.methods.gptq import GPTQOptions, SequentialGPTQ, apply_quant_layer

log = logging.getLogger("moecompress")


class PMQConfig(GPTQOptions):
    """MC's PMQ (Huang et al., "Mixture Compressor for Mixture-of-Experts LLMs Gains More", arXiv 2410.06270),
    following the reference code (Aaronhuang-778/MC-MoE @ 7aa062c) where paper and code differ (pmq.md).

    1. φ_i = n_i / N (routed token slots over valid tokens; the `routing` collector, all calibration tokens).
       w_i = (1/N) Σ_t σ_{t,i} with σ the router probability of a *selected* expert **before** top-k
       renormalisation (`routing_weight="pre_norm"`, the reference code's choice): softmax over all experts
       (sigmoid score for DeepSeek-V3) gathered at the selected experts. *Deviation:* the statistics collectors
       record only the final (renormalised, scaled) weights, so w is estimated on the `block_io` token sample
       (≤ `error_tokens` tokens, uniform over the calibration set), re-routed through the router; φ uses all
       tokens. `routing_weight="final"` uses the applied weights on all tokens instead (also the fallback for
       masked/mapped routers, whose logits do not index the stored experts). φ and w are normalised to sum 1 per
       layer (reference code; ×1000 dropped, it does not change the argmin).
    2. ε_{i,b} = ‖Z_fp − Z_{i→b}‖_F on the cached block inputs (`block_io`), with **only expert i** (gate, up and
       down) quantized to b bits by RTN (asymmetric min/max per row and group of `error_group_size` columns,
       default `group_size`; binariser ±mean|w| at 1 bit) — the reference code's quantizer (the paper says GPTQ).
       Computed through the MoE layer view: routing is unchanged (the router is never quantized), so
       Z_fp − Z_{i→b} = g_i·(f_i − f̂_i) on the tokens routed to i. *Deviation:* one Frobenius norm over the
       sampled tokens instead of a sum of per-batch norms over 128 × 2048 tokens.
    3. c_{i,b} = φ_i^α · w_i^β · ε_{i,b}^γ, default (α, β, γ) = (1, 1.5, 1) (toolkit default = reference code's
       α, β; its γ is unused, i.e. 1). Binary ILP per layer (`ilp="layer"`, the paper) or over all layers
       (`ilp="global"`, extension): Σ_b x_{i,b} = 1, Σ b·x ≤ avg_bits·n ("≤" as the reference code; the paper
       writes "="), ≥ 1 expert at the top width and ≥ 1 at the second-highest (`require_top`, `require_middle`),
       optional `min_bits`. Exact solver (compress.quant.ilp: DP, or CBC). Experts of different widths (after
       channel pruning) are weighted by parameter count in the budget.
    4. The chosen widths are quantized by sequential GPTQ (asym, g128, damp 0.01, no act-order: the reference
       settings) or RTN (`quantizer="rtn"`); attention via `attn_bits` by RTN (the reference uses GPTQ, 4 bits).
    5. `odp=True` adds MC's ODP (compress.routers.ODPRouter, stored in the checkpoint with its threshold,
       renormalisation and protect ratio): per layer μ_ℓ = median of w1/w0 over the `block_io` sample, and the
       router drops a token's second expert when w1/w0 < μ_ℓ (`odp_renormalize` rescales the kept weight).
       Important-token protection (`odp_protect_ratio` = τ_h, default 0.02 as paper and code; 0 disables): at
       prefill, per sequence, the ⌈τ_h·L⌉ tokens with the largest I_j = ‖t_j‖₁ · Σ_{i≥j} A_{i,j} / (L − j) keep
       both experts — t_j the MoE block input, A the layer's attention probabilities averaged over heads, summed
       over the **column** (the attention j receives; the reference code sums rows, which collapses to
       1/(L − j)), L the real (unpadded) length; decode steps use the ratio rule alone. The ODP layers' attention
       runs eager at prefill to expose A (pitfall 18); the other layers and decode keep the model's attention
       implementation. `odp_layers` restricts ODP (the reference code uses 10 hard-coded layers).
       *Deviations:* the reference code's 32 hard-coded thresholds are replaced by the calibrated medians; `tau_l`
       (dropping all experts of the least important tokens, off in the reference code) is not implemented; in a
       prefill over cached tokens, importance covers the new tokens only.
    """

    widths: list[int] = Field([1, 2, 3], description="candidate bit widths")
    alpha: float = Field(1.0, ge=0, description="exponent of the activation frequency φ")
    beta: float = Field(1.5, ge=0, description="exponent of the mean routing weight w")
    gamma: float = Field(1.0, ge=0, description="exponent of the quantization error ε")
    ilp: Literal["layer", "global"] = Field("layer", description="one ILP per layer (paper) or one over all layers")
    require_top: bool = Field(True, description="≥ 1 expert per layer at the highest candidate width")
    require_middle: bool = Field(True, description="≥ 1 expert per layer at the second-highest candidate width")
    min_bits: int | None = Field(None, ge=1, le=8, description="no expert below this width (rare experts)")
    solver: Literal["auto", "dp", "cbc"] = "auto"
    quantizer: Literal["gptq", "rtn"] = Field("gptq", description="final quantizer for the chosen widths")
    routing_weight: Literal["pre_norm", "final"] = "pre_norm"
    error_tokens: int = Field(2048, ge=16, description="block inputs sampled for ε, w and the ODP medians")
    error_group_size: int | None = Field(None, description="RTN group size for ε (default: group_size)")
    odp: bool = Field(False, description="install MC's online dynamic pruning of the second expert")
    odp_layers: list[int] | None = Field(None, description="MoE layers with ODP (default: all)")
    odp_renormalize: bool = Field(True, description="rescale the kept weight(s) to the selected weights' sum")
    odp_protect_ratio: float = Field(0.02, ge=0, le=1, description="ODP: fraction of tokens per sequence, by "
                                     "‖t‖₁ · attention column sum, that keep both experts at prefill (0: off)")

    @field_validator("widths")
    @classmethod
    def _widths(cls, v):
        if not v or len(set(v)) != len(v) or any(not 1 <= b <= 8 for b in v):
            raise ValueError(f"widths {v} must be distinct integers from 1 to 8")
        return sorted(v)


def _probabilities(layer: MoELayer, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.double()
    return torch.sigmoid(logits) if layer.spec.routing == "deepseek_v3" else torch.softmax(logits, dim=-1)


def _stock_router(layer: MoELayer) -> bool:
    from moecompress.compress.routers import MappedRouter, MaskedRouter, ODPRouter

    return not isinstance(layer.router, (MappedRouter, MaskedRouter, ODPRouter))


def routing_importance(layer: MoELayer, routing, inputs: torch.Tensor | None, mode: str = "pre_norm"):
    """(φ [E], w [E], how w was measured): φ_i = n_i/N on all tokens; w per `mode` (see PMQConfig step 1)."""
    i, n = layer.layer_idx, layer.num_experts
    tokens = max(routing.tokens(i), 1)
    phi = routing.counts(i).double() / tokens
    if mode == "final" or inputs is None or not len(inputs) or not _stock_router(layer):
        return phi, routing.weight_sum(i).double() / tokens, "final"
    with torch.no_grad():
        r = layer.route(inputs.to(layer.router_weight.dtype))
        probs = _probabilities(layer, r.logits).gather(1, r.index)
    w = torch.zeros(n, dtype=torch.float64).index_add_(0, r.index.reshape(-1), probs.reshape(-1)) / len(inputs)
    return phi, w, "pre_norm"


def _rtn(w: torch.Tensor | None, bits: int, group_size: int, sym: bool) -> torch.Tensor | None:
    return quantize_rtn(w.detach().float(), bits, group_size, sym).dequantize(w.dtype)


def expert_errors(layer: MoELayer, inputs: torch.Tensor, widths, group_size: int = 128,
                  sym: bool = False) -> torch.Tensor:
    """ε [E, W]: ‖Z_fp − Z_{i→b}‖_F of the block output on `inputs` [n,H] with only expert i RTN-quantized to b
    bits (routing unchanged, so only the tokens routed to i differ: g_i·(f_i − f̂_i))."""
    eps = torch.zeros(layer.num_experts, len(widths), dtype=torch.float64)
    with torch.no_grad():
        x_all = inputs.to(layer.router_weight.dtype)
        r = layer.route(x_all)
        for e in range(layer.num_experts):
            tokens, pos = torch.where(r.index == e)
            if not len(tokens):
                continue  # never routed on the sample: ε = 0 (its cost is 0 whatever the width)
            w = layer.expert_weights(e)
            x, g = x_all[tokens], r.weights[tokens, pos].double()[:, None]
            y = F.linear(layer.expert_intermediate(w, x), w.down, w.down_bias).double()
            for k, b in enumerate(widths):
                q = ExpertWeights(_rtn(w.gate, b, group_size, sym), _rtn(w.up, b, group_size, sym),
                                  _rtn(w.down, b, group_size, sym), w.gate_bias, w.up_bias, w.down_bias)
                yq = F.linear(layer.expert_intermediate(q, x), q.down, q.down_bias).double()
                eps[e, k] = torch.linalg.vector_norm(g * (y - yq))
    return eps


@register
class PMQ(Method):
    name = "pmq"
    kind = "quantization"
    paper = "arXiv 2410.06270"
    summary = "mixed-precision experts: bits per expert by an ILP over usage × quantization error, then GPTQ"
    Config = PMQConfig
    needs_tokenizer = True

    def __init__(self, config=None):
        super().__init__(config)
        self.layer_stats: dict[int, tuple] = {}  # per MoE layer (φ, w, ε, how w was measured), from the pass
        self.odp: dict[int, float] = {}  # per MoE layer ODP μ_ℓ, from the pass
        self.sequential = SequentialGPTQ()

    def collectors(self):
        from moecompress.calibration.collectors import BlockIO, GramStats, RoutingCounts

        extra = [GramStats(intermediate=True)] if self.config.quantizer == "gptq" and not self.config.sequential else []
        return [RoutingCounts(), BlockIO(max_tokens=self.config.error_tokens)] + extra

    def passes(self, target):
        """φ, w, ε (and ODP's medians) need each layer's weights: a layer-wise statistics pass whose layer hook
        computes them while the layer is real; then, with the plan, the sequential GPTQ pass."""
        first = Pass("sequential", self.collectors(), on_layer=self._on_layer, label="pmq statistics")
        return [first] + ([self.sequential.pass_()] if self._sequential_gptq() else [])

    def _sequential_gptq(self) -> bool:
        return self.config.quantizer == "gptq" and self.config.sequential

    def _on_layer(self, step) -> None:
        if step.moe is None:
            return
        self.layer_stats[step.index] = self.layer_statistics(step.moe, step.stats)
        if self.config.odp and (self.config.odp_layers is None or step.index in self.config.odp_layers):
            from moecompress.compress.routers import odp_thresholds

            self.odp.update(odp_thresholds([step.moe], {step.index: step.stats["block_io"].inputs(step.index)}))

    def check_target(self, bits, avg_bits):
        if bits is not None:
            raise UserError("pmq allocates widths per expert: pass --avg-bits B (e.g. 2.5), not --bits "
                            "(uniform widths: -m gptq/rtn --bits B)")
        if avg_bits is None:
            raise UserError("pmq needs --avg-bits B, the average expert width (e.g. 2.5)")
        lo, hi = min(self.config.widths), max(self.config.widths)
        if not lo <= avg_bits <= hi:
            raise UserError(f"--avg-bits {avg_bits} is outside the candidate widths {self.config.widths}: use a "
                            f"value from {lo} to {hi} (or change the widths option)")

    def layer_statistics(self, layer: MoELayer, stats) -> tuple:
        """(φ [E], w [E], ε [E, W] (float64), how w was measured) of one MoE layer, whose weights are real."""
        c = self.config
        for name in ("routing", "block_io"):
            if name not in stats:
                raise UserError(f"pmq needs the '{name}' collector's statistics")
        routing, bio = stats["routing"], stats["block_io"]
        i = layer.layer_idx
        if f"{i}.count" not in routing.state or f"{i}.input" not in bio.state:
            raise UserError(f"pmq: no calibration statistics for MoE layer {i}; use more calibration data")
        x = bio.inputs(i)
        phi, w, how = routing_importance(layer, routing, x, c.routing_weight)
        return phi, w, expert_errors(layer, x, c.widths, c.error_group_size or c.group_size, c.sym), how

    def statistics(self, model, stats):
        """Per MoE layer: φ [E], w [E], ε [E, W] (float64), and how w was measured (model in memory)."""
        return {layer.layer_idx: self.layer_statistics(layer, stats) for layer in moe_layers(model)}

    def plan(self, model, stats, target):
        self.check_target(target.bits, target.avg_bits)
        c = self.config
        layers = moe_layers(model)
        st = self.layer_stats or self.statistics(model, stats)
        common = dict(widths=c.widths, avg_bits=target.avg_bits, alpha=c.alpha, beta=c.beta, gamma=c.gamma,
                      require_top=c.require_top, require_middle=c.require_middle, min_bits=c.min_bits,
                      solver=c.solver)

        def params(layer):
            widths = torch.tensor(layer.widths(), dtype=torch.float64)
            return None if bool((widths == widths[0]).all()) else widths * 3 * layer.hidden_size

        bits, solver, seconds = {}, set(), 0.0
        if c.ilp == "layer":
            for layer in layers:
                phi, w, eps, _ = st[layer.layer_idx]
                res = allocate_bits(phi, w, eps, param_counts=params(layer), **common)
                bits[layer.layer_idx] = res.bits.tolist()
                solver.add(res.solver)
                seconds += res.seconds
        else:
            if len({l.num_experts for l in layers}) != 1:
                raise UserError("pmq ilp=global needs the same expert count in every layer; use ilp=layer")
            counts = [params(l) for l in layers]
            p = None if all(x is None for x in counts) else torch.stack(
                [x if x is not None else torch.full((l.num_experts,), 3.0 * l.hidden_size * l.widths()[0],
                                                    dtype=torch.float64) for x, l in zip(counts, layers)])
            res = allocate_bits(torch.stack([st[l.layer_idx][0] for l in layers]),
                                torch.stack([st[l.layer_idx][1] for l in layers]),
                                torch.stack([st[l.layer_idx][2] for l in layers]),
                                per_layer=False, param_counts=p, **common)
            bits = {l.layer_idx: res.bits[k].tolist() for k, l in enumerate(layers)}
            solver.add(res.solver)
            seconds = res.seconds
        dynamic = None
        if c.odp:
            from moecompress.compress.routers import odp_thresholds

            chosen = [l for l in layers if c.odp_layers is None or l.layer_idx in c.odp_layers]
            unknown = set(c.odp_layers or []) - {l.layer_idx for l in layers}
            if unknown:
                raise UserError(f"odp_layers {sorted(unknown)} are not MoE layers ({[l.layer_idx for l in layers]})")
            dynamic = self.odp or odp_thresholds(
                chosen, {l.layer_idx: stats["block_io"].inputs(l.layer_idx) for l in chosen})
        scores = {}
        for i, (phi, w, _, _) in st.items():
            phi_n = phi / phi.sum().clamp(min=1e-300)
            w_n = w / w.sum().clamp(min=1e-300)
            scores[i] = (phi_n ** c.alpha * w_n ** c.beta).tolist()
        flat = [b for v in bits.values() for b in v]
        details = {
            "method": "pmq", "widths": c.widths, "avg_bits_target": target.avg_bits,
            "avg_bits_experts": sum(flat) / len(flat),
            "experts_per_width": {str(b): flat.count(b) for b in c.widths},
            "solver": sorted(solver), "solve_seconds": round(seconds, 4), "ilp": c.ilp,
            "routing_weight": sorted({v[3] for v in st.values()}),
            "phi": {i: v[0].tolist() for i, v in st.items()},
            "w": {i: v[1].tolist() for i, v in st.items()},
            "error": {i: v[2].tolist() for i, v in st.items()},
        }
        return BitPlan(bits=bits, group_size=c.group_size, sym=c.sym, quantizer=c.quantizer, scale_dtype=c.scale_dtype,
                       other_bits=c.attn_bits, damp=c.damp, act_order=c.act_order, min_tokens=c.min_tokens,
                       sequential=c.sequential and c.quantizer == "gptq", dynamic=dynamic,
                       dynamic_renormalize=c.odp_renormalize, dynamic_protect_ratio=c.odp_protect_ratio,
                       scores=scores, details=details)

    def apply_layer(self, model, plan, stats, index):
        apply_quant_layer(model, plan, stats, index)

    def finish(self, model, plan):
        return self.sequential.record(plan) if plan.sequential else plan
