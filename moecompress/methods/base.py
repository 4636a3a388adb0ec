"""What a method is: a pydantic Config, the collectors it needs, and plan(model, stats, target) → Plan.

Plans are pure, JSON-serialisable decisions; `apply_plan` hands them to compress.surgery. Nothing here touches a
checkpoint file. Methods register themselves with `@register` and are found by name.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from moecompress.calibration.collectors import Collector
from moecompress.compress.families import uses_groups
from moecompress.compress.moe import MoELayer, decoder_layers, moe_layers
from moecompress.compress.surgery import (
    keep_channels,
    keep_experts,
    mask_experts,
    merge_experts,
    set_renormalize,
    set_top_k,
)
from moecompress.errors import UserError

log = logging.getLogger("moecompress")


# ----- targets and plans --------------------------------------------------------------------------------------
class Target(BaseModel):
    """How much to remove: a fraction (`ratio`) or an absolute count kept per layer (`keep`)."""

    model_config = ConfigDict(extra="forbid")

    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of routed experts (or channels) removed")
    keep: int | None = Field(None, ge=1, description="experts kept per layer")
    scope: Literal["layer", "global"] = "layer"
    bits: int | None = Field(None, ge=1, le=8, description="uniform bit width (quantization)")
    avg_bits: float | None = Field(None, gt=0, le=8, description="average bits per routed-expert weight (PMQ)")

    def kept_per_layer(self, layer: MoELayer) -> int:
        n = layer.num_experts
        kept = self.keep if self.keep is not None else round(n * (1 - self.ratio))
        if kept > n:
            raise UserError(f"--keep {kept} exceeds the {n} experts of layer {layer.layer_idx}")
        if kept < layer.top_k:
            what = f"--keep {self.keep}" if self.keep is not None else f"--ratio {self.ratio}"
            raise UserError(f"{what} leaves {kept} experts in layer {layer.layer_idx}, fewer than top_k="
                            f"{layer.top_k}; keep at least {layer.top_k} experts")
        return kept


class ExpertPlan(BaseModel):
    kind: Literal["experts"] = "experts"
    keep: dict[int, list[int]]
    scores: dict[int, list[float]] | None = None
    merge: dict[int, list[list[float]]] | None = None  # per layer [E', E] (EEP)
    router_map: dict[int, list[list[float]]] | None = None
    top_k: int | None = None
    renormalize: bool | None = None  # switch top-k renormalisation on after pruning (REAP option)
    routing: Literal["sliced", "masked", "no_reroute"] = "sliced"  # see compress.routers.MaskedRouter


class ChannelPlan(BaseModel):
    """Kept intermediate channels per MoE layer per routed expert (original indices, ascending; [] = width 0, a
    routable zero-output expert), and of each layer's shared expert. `facts`: what the plan removes (channel and
    parameter fractions, see methods._channels.plan_facts), for logs, --dry-run and the manifest."""

    kind: Literal["channels"] = "channels"
    channels: dict[int, dict[int, list[int]]]
    shared: dict[int, list[int]] | None = None
    facts: dict[str, Any] | None = None


class BitPlan(BaseModel):
    """Bits per routed expert (16 = dense), the quantizer and group scheme, and the width of other linears.

    `quantizer`: "rtn", "gptq" (Hessians per expert from the `gram` collector; `sequential=True` means the
    method's `apply` runs the layer-by-layer engine itself), or "bnb-nf4" / "bnb-int8" (bitsandbytes
    baseline, bits 4 / 8). `dynamic`: per-layer ODP thresholds μ_ℓ (a runtime router option, stored in the
    checkpoint), with `dynamic_renormalize` and `dynamic_protect_ratio` (ODP's important-token protection τ_h; 0,
    the default for plans stored before it existed, disables it). `details`: method facts for reports (e.g.
    PMQ's φ, w, ε and solver)."""

    kind: Literal["bits"] = "bits"
    bits: dict[int, list[int]]
    group_size: int = 128
    sym: bool = False
    quantizer: Literal["rtn", "gptq", "bnb-nf4", "bnb-int8"] = "rtn"
    other_bits: int | None = None
    scale_dtype: Literal["auto", "float16", "bfloat16", "float32"] = "float16"  # float16: plans stored before it
    damp: float = 0.01
    act_order: bool = False
    min_tokens: int | None = None  # GPTQ → RTN fallback threshold (None: 2·group_size)
    sequential: bool = False
    dynamic: dict[int, float] | None = None  # ODP μ_ℓ per layer
    dynamic_renormalize: bool = True
    dynamic_protect_ratio: float = Field(0.0, ge=0, le=1)  # ODP important-token protection τ_h (0: off)
    scores: dict[int, list[float]] | None = None  # e.g. PMQ importance, for reports
    details: dict[str, Any] | None = None


Plan = ExpertPlan | ChannelPlan | BitPlan


def apply_plan(model: nn.Module, plan: Plan, stats: dict[str, Collector] | None = None,
               layers: list[int] | None = None) -> None:
    """Apply `plan` to the decoder layers `layers` (default: all). Applying it layer by layer, in any order, gives
    the same model as applying it at once (layer-by-layer onloading relies on it)."""
    def mine(d):
        return {} if d is None else {i: v for i, v in d.items() if layers is None or i in layers}

    if isinstance(plan, ExpertPlan):
        keep = mine(plan.keep)
        if plan.merge:
            for layer, merge in mine(plan.merge).items():
                router_map = plan.router_map.get(layer) if plan.router_map else None
                merge_experts(model, layer, torch.tensor(merge),
                              None if router_map is None else torch.tensor(router_map))
        elif plan.routing != "sliced":
            mask_experts(model, keep, plan.routing)
        else:
            keep_experts(model, keep)
        if plan.top_k is not None and keep:
            set_top_k(model, plan.top_k, sorted(keep))
        if plan.renormalize:
            set_renormalize(model, sorted(keep) if layers is not None else None)
    elif isinstance(plan, ChannelPlan):
        keep_channels(model, mine(plan.channels), mine(plan.shared) or None)
    elif isinstance(plan, BitPlan):
        from moecompress.compress.quantize import (
            hessians_from_gram,
            quantize_experts,
            quantize_experts_bnb,
            quantize_other_linears,
        )
        from moecompress.compress.routers import install_odp

        if plan.sequential:
            raise UserError("this BitPlan asks for sequential GPTQ, which needs calibration data: apply it through "
                            "the runner (moecompress.run / a recipe), or set sequential=False")
        if plan.other_bits is not None:  # data-free RTN; first, as the sequential path does
            quantize_other_linears(model, plan.other_bits, plan.group_size, plan.sym, layers,
                                   scale_dtype=scale_dtype_for(plan, model))
        bits = mine(plan.bits)
        if plan.quantizer.startswith("bnb-"):
            quantize_experts_bnb(model, plan.quantizer.removeprefix("bnb-"), layer_indices=layers)
        else:
            hessians = None
            if plan.quantizer == "gptq" and bits:
                if not stats or "gram" not in stats:
                    raise UserError("GPTQ needs the 'gram' collector's statistics (intermediate=True)")
                hessians = hessians_from_gram(stats["gram"], sorted(bits))
            quantize_experts(model, bits, plan.group_size, plan.sym, plan.quantizer, hessians,
                             damp=plan.damp, act_order=plan.act_order, min_tokens=plan.min_tokens,
                             scale_dtype=scale_dtype_for(plan, model))
        if plan.dynamic and mine(plan.dynamic):
            install_odp(model, mine(plan.dynamic), plan.dynamic_renormalize, plan.dynamic_protect_ratio)
    else:
        raise TypeError(f"unknown plan {type(plan).__name__}")


def scale_dtype_for(plan: BitPlan, model: nn.Module) -> torch.dtype:
    """The stored scales' dtype: the plan's, or for `auto` the model's when it is 16-bit (what serving engines read
    scales in), float16 for fp32 models."""
    if plan.scale_dtype != "auto":
        return getattr(torch, plan.scale_dtype)
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def describe_plan(plan: Plan) -> list[str]:
    """Lines for --dry-run: per layer, what is kept."""
    if isinstance(plan, ExpertPlan):
        return [f"layer {layer:>3}: keep {len(kept):>3} experts {kept}" for layer, kept in sorted(plan.keep.items())]
    if isinstance(plan, BitPlan):
        lines = [f"layer {layer:>3}: bits {bits}" + (f"  odp μ={plan.dynamic[layer]:.3f}"
                                                      if plan.dynamic and layer in plan.dynamic else "")
                 for layer, bits in sorted(plan.bits.items())]
        counted = [b for bits in plan.bits.values() for b in bits]
        return lines + [f"quantizer {plan.quantizer}, group size {plan.group_size}, mean expert bits "
                        f"{sum(counted) / max(len(counted), 1):.3f}"
                        + (f", other linears {plan.other_bits} bits (RTN)" if plan.other_bits else "")
                        + (f", odp protects the top {plan.dynamic_protect_ratio:.1%} tokens at prefill"
                           if plan.dynamic and plan.dynamic_protect_ratio > 0 else "")]
    lines = []
    for layer, per in sorted(plan.channels.items()):
        shared = plan.shared.get(layer) if plan.shared else None
        tail = "" if shared is None else f" shared {len(shared)}"
        lines.append(f"layer {layer:>3}: widths {[len(c) for _, c in sorted(per.items())]}{tail}")
    if plan.facts and "param_fraction_removed" in plan.facts:
        f = plan.facts
        lines.append(f"removed {f['routed_channel_fraction_removed']:.1%} of routed-expert channels, "
                     f"{f['param_fraction_removed']:.1%} of all parameters "
                     f"({f['params_removed']:,} of {f['params_total']:,})")
    return lines


# ----- methods ------------------------------------------------------------------------------------------------
class MethodConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass
class PlanContext:
    """What the runner knows beyond the model and the statistics, for methods that evaluate the model themselves
    (EEP's fitness runs lm-eval): the tokenizer, the calibration spec, the model id/path and the process facts."""

    tokenizer: Any = None
    calibration: Any = None
    model_id: str | None = None
    world_size: int = 1


@dataclass
class LayerStep:
    """What a layer hook sees during a sequential pass: decoder layer `index` (real, on the run's device), its MoE
    view (None for dense layers), the pass's statistics so far, the plan (None before `plan`) and the model."""

    index: int
    layer: nn.Module
    moe: MoELayer | None
    stats: dict[str, Collector]
    plan: Any
    model: nn.Module


@dataclass
class Pass:
    """One calibration pass a method asks the runner for. The runner runs it (once, through the statistics cache
    where its results can be cached), records it in the manifest, and hands its collectors to the method.

    * `kind`: `forward` (statistics of the unchanged model; layer by layer when the model is onloaded layer by
      layer), `backward` (forward + backward of the next-token loss: gradient collectors), `sequential` (layer by
      layer, with the hooks below).
    * `source`: a calibration source other than the recipe's (EASY-EP's domains); the collectors then appear in
      the statistics as `"{name}@{source}"`.
    * `before_layer(step)`: runs when a layer is real, before its batches; `on_layer(step)`: after its batches
      (its statistics are complete). `changes_model`: the hooks change layers (outputs are recomputed before they
      feed the next layer; the pass is never cached).
    * `after_plan`: the pass runs after `plan()` and its hooks get the plan (sequential GPTQ quantizes there)."""

    kind: Literal["forward", "backward", "sequential"]
    collectors: list[Collector]
    source: str | None = None
    before_layer: Any = None
    on_layer: Any = None
    changes_model: bool = False
    after_plan: bool = False
    label: str = ""
    checkpoint: bool = False  # backward passes: activation checkpointing per decoder layer

    def key(self, name: str) -> str:
        return name if self.source is None else f"{name}@{self.source}"


class Method:
    name: ClassVar[str]
    kind: ClassVar[str]  # expert-pruning | channel-pruning | quantization
    paper: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    needs_tokenizer: ClassVar[bool] = False  # the runner must load a tokenizer even without collectors
    default_scope: ClassVar[str] = "layer"  # the ranking scope when a recipe/CLI leaves `scope` unset

    def __init__(self, config: MethodConfig | None = None):
        self.config = config or self.Config()
        self.context = PlanContext()  # set by recipes.run before plan()

    needs_weights_to_plan: ClassVar[bool] = False  # plan() reads weights (not just statistics and shapes)

    def collectors(self) -> list[Collector]:
        """Fresh collectors this method reads; empty if it needs no calibration data."""
        return []

    def passes(self, target: Target) -> list[Pass]:
        """The calibration passes the runner must run for this method, in order (default: one pass over
        `collectors()`, with gradients when one of them needs them)."""
        collectors = self.collectors()
        if not collectors:
            return []
        return [Pass("backward" if any(c.needs_grad for c in collectors) else "forward", collectors)]

    def plan(self, model: nn.Module, stats: dict[str, Collector], target: Target) -> Plan:
        raise NotImplementedError

    def apply_layer(self, model: nn.Module, plan: Plan, stats: dict[str, Collector], index: int) -> None:
        """Apply this method's plan to decoder layer `index` only (the runner calls it while that layer is real;
        layer-by-layer onloading calls it once per layer as the layer is written)."""
        apply_plan(model, plan, stats, [index])

    def apply(self, model: nn.Module, plan: Plan, stats: dict[str, Collector]) -> None:
        """Apply this method's plan to a model held whole in memory."""
        for index in range(len(decoder_layers(model))):
            self.apply_layer(model, plan, stats, index)

    def layered_refusal(self, target: Target) -> str | None:
        """Why this method cannot run on a model onloaded layer by layer (None: it can). Its `plan` must read
        statistics and shapes only; what needs weights happens in a pass's layer hooks."""
        if self.needs_weights_to_plan:
            return "its plan reads the weights of the whole model"
        if any(p.kind == "backward" for p in self.passes(target)):
            return "it needs gradients through the whole model (a forward + backward pass)"
        return None

    def finish(self, model: nn.Module, plan: Plan) -> Plan:
        """The plan as recorded once every pass and layer is done (methods that decide during a pass fill it)."""
        return plan

    def check_target(self, bits: int | None, avg_bits: float | None) -> None:
        """Validate the target flags before any model is loaded (UserError); quantization methods override."""


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[Method]:
    _import_all()
    if name not in METHODS:
        raise UserError(f"unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def all_methods() -> dict[str, type[Method]]:
    _import_all()
    return dict(sorted(METHODS.items()))


def _import_all() -> None:
    import moecompress.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base":
            importlib.import_module(f"moecompress.methods.{info.name}")


# ----- shared selection logic ---------------------------------------------------------------------------------
def select_experts(model: nn.Module, scores: dict[int, torch.Tensor], target: Target,
                   grouped: bool = True) -> dict[int, list[int]]:
    """Keep the highest-scoring experts: per layer (`scope=layer`), or across layers (`scope=global`, scores
    compared as given, every layer keeping at least top_k). Group-limited routers prune equally per group unless
    `grouped=False` (for masked routers, which need no per-group rule)."""
    layers = moe_layers(model)
    if target.scope == "global":
        return _select_global(layers, scores, target)
    keep = {}
    for layer in layers:
        kept = target.kept_per_layer(layer)
        keep[layer.layer_idx] = _top_in_layer(layer, scores[layer.layer_idx], kept, grouped)
    return keep


def _top_in_layer(layer: MoELayer, score: torch.Tensor, kept: int, grouped: bool = True) -> list[int]:
    score = score.double()
    if not grouped or not uses_groups(layer.spec, layer.config):
        return sorted(torch.argsort(score, descending=True, stable=True)[:kept].tolist())
    n_group = layer.config.n_group or 1
    per_group = layer.num_experts // n_group
    per_kept = max(1, round(kept / n_group))
    if per_kept * n_group != kept:
        log.warning("layer %d: group-limited routing keeps the same count per group; keeping %d instead of %d",
                    layer.layer_idx, per_kept * n_group, kept)
    out = []
    for g in range(n_group):
        group = score[g * per_group:(g + 1) * per_group]
        out += (torch.argsort(group, descending=True, stable=True)[:per_kept] + g * per_group).tolist()
    return sorted(out)


def _select_global(layers: list[MoELayer], scores: dict[int, torch.Tensor], target: Target) -> dict[int, list[int]]:
    """Keep the same total as `scope=layer` would, spread by score across layers.

    Each layer starts at its routable floor (its top_k best experts; for group-limited routers the fewest per group
    that still routes). Then increments are taken greedily by score: the next-best expert of a layer, or for a
    group-limited layer the next-best expert of *every* group at once (scored by their mean), so that each layer
    still keeps the same count per group."""
    total = sum(target.kept_per_layer(l) for l in layers)
    queues, keep = [], {}
    for layer in layers:
        score = scores[layer.layer_idx].double()
        n_group = (layer.config.n_group or 1) if uses_groups(layer.spec, layer.config) else 1
        per_group = layer.num_experts // n_group
        order = [(torch.argsort(score[g * per_group:(g + 1) * per_group], descending=True, stable=True)
                  + g * per_group).tolist() for g in range(n_group)]
        if n_group == 1:
            floor = layer.top_k
        else:
            need = 2 if layer.spec.routing == "deepseek_v3" else 1
            floor = max(need, -(-layer.top_k // (layer.config.topk_group or 1)))
        keep[layer.layer_idx] = sorted(e for group in order for e in group[:floor])
        for rank in range(floor, per_group):
            picks = [group[rank] for group in order]
            queues.append((float(score[picks].mean()), layer.layer_idx, rank, picks))
    budget = total - sum(len(k) for k in keep.values())
    for _, layer_idx, _, picks in sorted(queues, key=lambda q: (-q[0], q[1], q[2])):
        if len(picks) <= budget:  # a layer's increments all have one size and come in rank order
            keep[layer_idx] += picks
            budget -= len(picks)
    return {layer: sorted(kept) for layer, kept in keep.items()}


def layer_scores(collector: Collector, key: str) -> dict[int, torch.Tensor]:
    """`{layer: tensor}` for one statistic of a collector whose state is keyed `"{layer}.{key}"`."""
    layers = sorted({int(k.partition(".")[0]) for k in collector.state if k.partition(".")[2] == key})
    return {i: collector.layer_tensor(i, key) for i in layers}


def finite_scores(score: torch.Tensor) -> torch.Tensor:
    """Scores with NaN/inf replaced by 0 (never-routed experts score 0, pitfall 1)."""
    return torch.nan_to_num(score.double(), nan=0.0, posinf=0.0, neginf=0.0)
