"""MoELayer: a uniform *view* of one MoE block of any supported family, and its reference forward.

The view reads the live modules (no copies): router weight [E,H] (+ bias / score-correction bias), per-expert
gate [I_e,H], up [I_e,H], down [H,I_e] (+ biases for GPT-OSS) whatever the storage (stock fused tensors, GPT-OSS's
transposed interleaved tensors, or an `ExpertList`), the shared expert, and the family's routing semantics.

`reference_forward` recomputes the block output from those pieces and reports, to an observer, per expert the
routed tokens, their routing weights, the intermediate activations a = act(x·gateᵀ)⊙(x·upᵀ) and the expert outputs.
It equals the stock forward (fp32, ≤ 1e-5; tested for every family), which is what lets every method trust the
statistics gathered through it. Calibration swaps it in with `instrumented(model, observer)`; plain inference never
pays for it.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from moecompress.compress.experts import ExpertActivation, ExpertList, dense_weight
from moecompress.compress.families import FamilySpec, family_of
from moecompress.errors import UserError


@dataclass
class Routing:
    logits: torch.Tensor  # [T, E] raw router logits
    weights: torch.Tensor  # [T, k] final weight applied to each selected expert
    index: torch.Tensor  # [T, k] selected experts


@dataclass
class ExpertWeights:
    gate: torch.Tensor  # [I_e, H]
    up: torch.Tensor  # [I_e, H]
    down: torch.Tensor  # [H, I_e]
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    def to(self, dtype: torch.dtype) -> "ExpertWeights":
        """The same weights in `dtype` (a packed expert dequantizes to float32; the activations may be bf16)."""
        if self.gate.dtype == dtype:
            return self
        cast = [None if t is None else t.to(dtype) for t in (self.gate, self.up, self.down, self.gate_bias,
                                                              self.up_bias, self.down_bias)]
        return ExpertWeights(*cast)


class Observer(Protocol):
    """What the reference forward reports. `valid` filters out padding before anything is reported."""

    def on_expert(self, layer: "MoELayer", expert: int, tokens: torch.Tensor, x: torch.Tensor,
                  weight: torch.Tensor, a: torch.Tensor, y: torch.Tensor) -> None: ...

    def on_block(self, layer: "MoELayer", x: torch.Tensor, routing: Routing, routed: torch.Tensor,
                 shared: torch.Tensor | None) -> None: ...


class MoELayer:
    """View of the MoE block `model.model.layers[layer_idx].mlp`."""

    def __init__(self, model: nn.Module, layer_idx: int, block: nn.Module, spec: FamilySpec):
        self.model = model
        self.config = model.config
        self.layer_idx = layer_idx
        self.block = block
        self.spec = spec

    # ----- modules -------------------------------------------------------------------------------------------
    @property
    def router(self) -> nn.Module:
        return getattr(self.block, self.spec.router_attr)

    @property
    def experts(self) -> nn.Module:
        return self.block.experts

    @property
    def num_experts(self) -> int:
        return self.router.num_experts  # every stock router keeps it; surgery and our routers keep it current

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    @property
    def activation(self) -> ExpertActivation:
        if isinstance(self.experts, ExpertList):
            return self.experts.activation
        if self.spec.layout == "gpt_oss":
            return ExpertActivation("gpt_oss", alpha=self.experts.alpha, limit=self.experts.limit)
        return ExpertActivation("glu", hidden_act=self.config.hidden_act)

    @property
    def norm_topk_prob(self) -> bool:
        return self.spec.norm_topk_prob(self.config)

    # ----- router ---------------------------------------------------------------------------------------------
    @property
    def router_weight(self) -> torch.Tensor:
        return self.router.weight

    @property
    def router_bias(self) -> torch.Tensor | None:
        return getattr(self.router, "bias", None)

    @property
    def score_correction_bias(self) -> torch.Tensor | None:
        return getattr(self.router, "e_score_correction_bias", None)

    def route(self, x: torch.Tensor) -> Routing:
        """Route tokens x [T,H] exactly as the block's own router does (it is the block's own router)."""
        logits, weights, index = self.router(x)
        return Routing(logits=logits, weights=weights, index=index)

    # ----- experts --------------------------------------------------------------------------------------------
    def expert_weights(self, e: int) -> ExpertWeights:
        experts = self.experts
        if isinstance(experts, ExpertList):
            mlp = experts[e]
            return ExpertWeights(
                dense_weight(mlp.gate_proj), dense_weight(mlp.up_proj), dense_weight(mlp.down_proj),
                getattr(mlp.gate_proj, "bias", None), getattr(mlp.up_proj, "bias", None),
                getattr(mlp.down_proj, "bias", None),
            )
        if self.spec.layout == "gpt_oss":
            gate_up = experts.gate_up_proj[e]  # [H, 2I], gate/up interleaved along the last axis
            bias = experts.gate_up_proj_bias[e]
            return ExpertWeights(
                gate_up[:, ::2].T, gate_up[:, 1::2].T, experts.down_proj[e].T,
                bias[::2], bias[1::2], experts.down_proj_bias[e],
            )
        width = experts.down_proj.shape[-1]
        gate_up = experts.gate_up_proj[e]
        return ExpertWeights(gate_up[:width], gate_up[width:], experts.down_proj[e])

    def widths(self) -> list[int]:
        if isinstance(self.experts, ExpertList):
            return self.experts.widths()
        width = self.experts.down_proj.shape[1 if self.spec.layout == "gpt_oss" else 2]
        return [width] * self.num_experts

    def expert_intermediate(self, w: ExpertWeights, x: torch.Tensor) -> torch.Tensor:
        return self.activation(F.linear(x, w.gate, w.gate_bias), F.linear(x, w.up, w.up_bias))

    # ----- shared expert --------------------------------------------------------------------------------------
    @property
    def shared_mlp(self) -> nn.Module | None:
        if self.spec.shared == "qwen2":
            return self.block.shared_expert
        if self.spec.shared == "deepseek":
            return self.block.shared_experts
        return None

    def shared_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        mlp = self.shared_mlp
        if mlp is None:
            return None
        out = mlp(x)
        if self.spec.shared == "qwen2":
            out = torch.sigmoid(self.block.shared_expert_gate(x)) * out
        return out

    # ----- reference forward ----------------------------------------------------------------------------------
    def reference_forward(self, hidden_states: torch.Tensor, observer: Observer | None = None,
                          valid: torch.Tensor | None = None):
        """The block's output, recomputed from the view; same return contract as the stock block."""
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        routing = self.route(x)
        routed = torch.zeros_like(x)
        keep = None if valid is None else valid.reshape(-1).to(x.device)
        for e in torch.unique(routing.index).tolist():
            if e < 0 or e >= self.num_experts:
                continue
            tokens, pos = torch.where(routing.index == e)
            w = self.expert_weights(e).to(x.dtype)
            x_e = x[tokens]
            a = self.expert_intermediate(w, x_e)
            y = F.linear(a, w.down, w.down_bias)
            g = routing.weights[tokens, pos]
            routed.index_add_(0, tokens, (y * g[:, None]).to(routed.dtype))
            if observer is not None:
                if keep is not None:
                    m = keep[tokens]
                    tokens, x_e, g, a, y = tokens[m], x_e[m], g[m], a[m], y[m]
                if tokens.numel():
                    observer.on_expert(self, e, tokens, x_e, g, a, y)
        shared = self.shared_forward(x)
        if observer is not None:
            observer.on_block(self, x, routing, routed, shared) if keep is None else observer.on_block(
                self, x[keep], _subset(routing, keep), routed[keep], None if shared is None else shared[keep])
        out = routed if shared is None else routed + shared
        out = out.reshape(shape)
        if self.spec.block_returns_tuple:
            return out, routing.weights
        return out


def _subset(routing: Routing, keep: torch.Tensor) -> Routing:
    return Routing(routing.logits[keep], routing.weights[keep], routing.index[keep])


# ----- finding the MoE layers ---------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise UserError(f"{type(model).__name__} has no decoder layers at model.layers; is this a causal LM?")
    return layers


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """Views of every MoE block in depth order (dense layers, e.g. DeepSeek's first_k_dense_replace, skipped)."""
    spec = family_of(model.config)
    views = [
        MoELayer(model, i, layer.mlp, spec)
        for i, layer in enumerate(decoder_layers(model))
        if hasattr(layer.mlp, "experts")
    ]
    if not views:
        raise UserError(f"{type(model).__name__} has no MoE layers (a dense model?); moecompress needs an MoE model")
    return views


def moe_layer(model: nn.Module, index: int) -> MoELayer | None:
    """The view of decoder layer `index`'s MoE block, None for a dense layer."""
    return next((layer for layer in moe_layers(model) if layer.layer_idx == index), None)


@contextmanager
def instrumented(model: nn.Module, observer: Observer, valid: "ValidMask | None" = None) -> Iterator[list[MoELayer]]:
    """Swap every MoE block's forward for the reference forward reporting to `observer`; restore on exit."""
    layers = moe_layers(model)
    for layer in layers:
        layer.block.forward = _bound_reference(layer, observer, valid)
    try:
        yield layers
    finally:
        for layer in layers:
            del layer.block.forward


class ValidMask:
    """Holds the current batch's non-padding mask [B, L] for the instrumented blocks to read."""

    def __init__(self):
        self.mask: torch.Tensor | None = None


def _bound_reference(layer: MoELayer, observer: Observer, valid: ValidMask | None):
    def forward(hidden_states, *args, **kwargs):
        return layer.reference_forward(hidden_states, observer, None if valid is None else valid.mask)

    return forward
