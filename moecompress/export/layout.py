"""What an export sees of a loaded checkpoint: per decoder layer, its tensors under the hub checkpoint's names, with
the packed (quantized) linears kept apart so each format can encode them its own way.

* Routed experts held per expert (`ExpertList`) are named as the family's hub checkpoints name them
  (`FamilySpec.checkpoint_block` / `checkpoint_parts`: `mlp.experts.{e}.gate_proj` for Qwen/DeepSeek/OLMoE,
  `block_sparse_moe.experts.{e}.w1|w3|w2` for Mixtral/Phi-MoE) — the names transformers' conversion mapping reads.
* Every other tensor goes through the model's own conversion mapping reverted (`shards.to_checkpoint_names`), as
  `save_pretrained` writes it (fused stock experts become per-expert tensors there).
* Packed linears outside the experts (attention, shared experts, dense MLPs) keep their in-memory names, which no
  supported family's conversion mapping renames (checked).

`refuse_nonstock(model, format)` holds the rules every stock-named export shares: one expert count and top-k in
every layer (the config's), plain sliced routers, no bitsandbytes modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moecompress.compress.experts import ExpertList
from moecompress.compress.moe import MoELayer, decoder_layers, moe_layer, moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.routers import MappedRouter, MaskedRouter, ODPRouter
from moecompress.compress.shards import to_checkpoint_names
from moecompress.errors import UserError

PARTS = ("gate_proj", "up_proj", "down_proj")


@dataclass
class LayerTensors:
    """One decoder layer as an export writes it."""

    plain: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint name → tensor
    packed: dict[str, PackedLinear] = field(default_factory=dict)  # checkpoint module name → packed linear


def expert_module_name(layer: MoELayer, expert: int, part: str) -> str:
    """The hub checkpoint's module name of routed expert `expert`'s `part` (gate_proj / up_proj / down_proj)."""
    spec = layer.spec
    if spec.checkpoint_parts is None:
        raise UserError(f"{spec.name} checkpoints store their experts fused, not per expert: this export cannot "
                        f"name them; use --format hf (dequantized) or keep the moecompress checkpoint")
    hub = dict(zip(PARTS, spec.checkpoint_parts))[part]
    return f"model.layers.{layer.layer_idx}.{spec.checkpoint_block}.experts.{expert}.{hub}"


def split_layer(model: nn.Module, index: int) -> LayerTensors:
    """Decoder layer `index` (real, not meta) as checkpoint-named plain tensors + packed linears."""
    block = decoder_layers(model)[index]
    prefix = f"model.layers.{index}"
    out = LayerTensors()
    skip: set[int] = set()
    moe = moe_layer(model, index)
    if moe is not None and isinstance(moe.experts, ExpertList):
        skip.add(id(moe.experts))
        for e, mlp in enumerate(moe.experts):
            for part in PARTS:
                linear, name = getattr(mlp, part), expert_module_name(moe, e, part)
                if isinstance(linear, PackedLinear):
                    out.packed[name] = linear
                elif type(linear) is nn.Linear:
                    out.plain[f"{name}.weight"] = linear.weight
                    if linear.bias is not None:
                        out.plain[f"{name}.bias"] = linear.bias
                else:
                    raise UserError(_unexportable(linear))
    rest: dict[str, torch.Tensor] = {}
    for name, module in block.named_modules(prefix=prefix):
        if id(module) in skip or any(id(m) in skip for m in _parents(block, name, prefix)):
            continue
        if isinstance(module, PackedLinear):
            out.packed[name] = module
            continue
        refuse_bitsandbytes(module)
        for key, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None and key not in module._non_persistent_buffers_set:
                rest[f"{name}.{key}"] = t
    out.plain.update(to_checkpoint_names(model, rest))
    return out


def _parents(block: nn.Module, name: str, prefix: str) -> list[nn.Module]:
    parts = name[len(prefix) + 1:].split(".") if name != prefix else []
    return [block.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]


def _bitsandbytes(module: nn.Module) -> bool:
    return hasattr(module, "load_tensors")  # BnbLinear assigns its own tensors


def refuse_bitsandbytes(module: nn.Module) -> None:
    for m in module.modules():
        if _bitsandbytes(m):
            raise UserError(_unexportable(m))


def _unexportable(module: nn.Module) -> str:
    return (f"{type(module).__name__} experts (bitsandbytes) have no deployable export: bitsandbytes quantizes at "
            f"load time; export the unquantized model, or quantize with -m rtn/gptq")


def other_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything outside the decoder layers (embeddings, final norm, LM head) under checkpoint names."""
    from moecompress.compress.checkpoint import outside_layers

    return to_checkpoint_names(model, outside_layers(model))


def refuse_nonstock(model: nn.Module, fmt: str, widths: bool = True) -> None:
    """One line naming why `model` cannot take a stock-named export `fmt` (see the module docstring); `widths`:
    also every routed expert at the config's intermediate size."""
    from moecompress.compress.checkpoint import stock_shared_width

    config = model.config
    layers = moe_layers(model)
    spec = layers[0].spec
    count = getattr(config, spec.count_key)
    for layer in layers:
        router = layer.router
        if isinstance(router, (MappedRouter, MaskedRouter, ODPRouter)):
            kind = {MappedRouter: "an EEP mapped router", MaskedRouter: "a masked router",
                    ODPRouter: "ODP dynamic skipping"}[type(router)]
            raise UserError(f"layer {layer.layer_idx} has {kind}, which {fmt} cannot express (stock routers only); "
                            f"keep the moecompress checkpoint, or prune with a sliced router (the default)")
        if layer.num_experts != count:
            raise UserError(f"layer {layer.layer_idx} keeps {layer.num_experts} experts but the config says {count}: "
                            f"{fmt} needs one expert count in every layer; prune the same number per layer")
        if layer.top_k != config.num_experts_per_tok:
            raise UserError(f"layer {layer.layer_idx} routes top-{layer.top_k}, the config top-"
                            f"{config.num_experts_per_tok}: {fmt} needs one top-k in every layer")
        if widths and layer.shared_mlp is not None and \
                layer.shared_mlp.gate_proj.out_features != stock_shared_width(config):
            raise UserError(f"layer {layer.layer_idx}'s shared expert was slimmed to "
                            f"{layer.shared_mlp.gate_proj.out_features} channels: {fmt} needs the config's width; "
                            f"keep the moecompress checkpoint")
        width = getattr(config, spec.width_key)
        if widths and set(layer.widths()) != {width}:
            raise UserError(f"layer {layer.layer_idx} has experts of widths {sorted(set(layer.widths()))}, not the "
                            f"config's {width}: {fmt} needs one expert width; export with --format hf (zero-padded, "
                            f"exact) or keep the moecompress checkpoint")
