"""Apply bit decisions to a live model: routed experts per expert, other linear layers at their own width.

Routed experts become an `ExpertList` whose gate/up/down are `PackedLinear`s (any width 1–8; 16 = keep dense), so
the stock MoE block runs unchanged. "Other linears" are the decoder layers' remaining nn.Linear modules — attention
projections, shared experts, dense-layer MLPs — quantized at `other_bits` (the CLI's `--attn-bits`). Routers
(including Qwen2's shared-expert gate), embeddings, norms and lm_head are never quantized (pitfall 10).

`quantize_experts(..., quantizer="gptq")` takes per-expert Hessians: `hessians[(layer, expert)] = (H_in, n_tokens,
H_act)` with H_in = XᵀX over the expert's routed inputs (for gate/up) and H_act over its intermediate activations
(for down). Experts with too few tokens fall back to RTN inside `PackedLinear.from_weight` (logged).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from moecompress.compress.experts import ExpertList, dense_weight
from moecompress.compress.moe import decoder_layers, moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.surgery import to_expert_list
from moecompress.errors import UserError

DENSE = 16  # "bits" meaning: leave this expert unquantized


def _check_bits(bits: int) -> None:
    if bits != DENSE and not 1 <= bits <= 8:
        raise UserError(f"bits must be between 1 and 8 (or 16 to keep an expert dense), got {bits}")


def _pack(linear: nn.Module, bits: int, group_size: int, sym: bool, quantizer: str, hessian=None,
          tokens: int = 0) -> nn.Module:
    weight = dense_weight(linear).detach().float()
    bias = getattr(linear, "bias", None)
    return PackedLinear.from_weight(weight, bits, group_size=group_size, sym=sym, method=quantizer,
                                   hessian=hessian, tokens=tokens, bias=None if bias is None else bias.detach())


def quantize_experts(model: nn.Module, bits: Mapping[int, list[int]], group_size: int = 128, sym: bool = False,
                     quantizer: str = "rtn", hessians: Mapping | None = None) -> None:
    """Quantize routed expert e of MoE layer l to bits[l][e] (16 = leave dense)."""
    layers = {l.layer_idx: l for l in moe_layers(model)}
    for i, per_expert in bits.items():
        if len(per_expert) != layers[i].num_experts:
            raise UserError(f"layer {i}: {len(per_expert)} bit widths for {layers[i].num_experts} experts")
        for b in per_expert:
            _check_bits(b)
    with torch.no_grad():
        for i, per_expert in bits.items():
            experts = to_expert_list(layers[i])
            for e, b in enumerate(per_expert):
                if b == DENSE:
                    continue
                h_in, n, h_act = (hessians or {}).get((i, e), (None, 0, None))
                mlp = experts[e]
                mlp.gate_proj = _pack(mlp.gate_proj, b, group_size, sym, quantizer, h_in, n)
                mlp.up_proj = _pack(mlp.up_proj, b, group_size, sym, quantizer, h_in, n)
                mlp.down_proj = _pack(mlp.down_proj, b, group_size, sym, quantizer, h_act, n)


def other_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Decoder-layer nn.Linear modules outside the routed experts and routers, by qualified name."""
    routers = set()
    for layer in moe_layers(model):
        routers.add(id(layer.router))
        if hasattr(layer.block, "shared_expert_gate"):
            routers.add(id(layer.block.shared_expert_gate))
    found = {}
    for idx, block in enumerate(decoder_layers(model)):
        skip = {id(m) for m in block.modules() if isinstance(m, ExpertList)}
        for name, module in block.named_modules():
            if type(module) is nn.Linear and id(module) not in routers and not _inside(name, block, skip):
                found[f"model.layers.{idx}.{name}"] = module
    return found


def _inside(name: str, block: nn.Module, skip: set[int]) -> bool:
    parts = name.split(".")
    for n in range(1, len(parts)):
        if id(block.get_submodule(".".join(parts[:n]))) in skip:
            return True
    return False


def quantize_other_linears(model: nn.Module, bits: int, group_size: int = 128, sym: bool = False) -> list[str]:
    """RTN-quantize attention, shared-expert and dense-MLP linears to `bits`; returns the names replaced."""
    _check_bits(bits)
    names = list(other_linears(model))
    with torch.no_grad():
        for name in names:
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent)
            setattr(holder, child, _pack(getattr(holder, child), bits, group_size, sym, "rtn"))
    return names


def packed_outside_experts(model: nn.Module) -> dict[str, dict]:
    """Structure of every PackedLinear that is not part of a routed-experts ExpertList (for the manifest)."""
    inside = set()
    for experts in (m for m in model.modules() if isinstance(m, ExpertList)):
        inside.update(id(m) for m in experts.modules())
    return {name: m.structure() for name, m in model.named_modules()
            if isinstance(m, PackedLinear) and id(m) not in inside}


def install_packed(model: nn.Module, structures: Mapping[str, dict]) -> None:
    """Replace the named modules by empty PackedLinears of the recorded structure (checkpoint loading)."""
    for name, structure in structures.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PackedLinear.empty(structure))


def expert_bits(model: nn.Module) -> dict[int, list[int]]:
    """Bits per routed expert (16 for dense ones), from the modules themselves."""
    out = {}
    for layer in moe_layers(model):
        if isinstance(layer.experts, ExpertList):
            out[layer.layer_idx] = [getattr(mlp.gate_proj, "bits", DENSE) for mlp in layer.experts]
        else:
            out[layer.layer_idx] = [DENSE] * layer.num_experts
    return out
