"""Apply bit decisions to a live model: routed experts per expert, other linear layers at their own width.

Routed experts become an `ExpertList` whose gate/up/down are `PackedLinear`s (any width 1–8; 16 = keep dense), so
the stock MoE block runs unchanged. "Other linears" are the decoder layers' remaining nn.Linear modules — attention
projections, shared experts, dense-layer MLPs — quantized at `other_bits` (the CLI's `--attn-bits`). Routers
(including Qwen2's shared-expert gate), embeddings, norms and lm_head are never quantized (pitfall 10).

`quantize_experts(..., quantizer="gptq")` takes per-expert Hessians: `hessians[(layer, expert)] = (H_in, n_tokens,
H_act)` with H_in = XᵀX over the expert's routed inputs (for gate/up) and H_act over its intermediate activations
(for down; `hessians_from_gram` builds them from the `gram` collector). Experts with fewer than `min_tokens` routed
tokens fall back to RTN in the same scheme, with one warning per layer naming them (pitfall 1).

`quantize_experts_bnb` is the bitsandbytes baseline (NF4 / int8 per-expert modules, stored in bitsandbytes' own
serialisation by the native checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import nn

from moecompress.compress.experts import ExpertList, dense_weight
from moecompress.compress.moe import decoder_layers, moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.surgery import to_expert_list
from moecompress.errors import UserError

log = logging.getLogger("moecompress")

DENSE = 16  # "bits" meaning: leave this expert unquantized


def _check_bits(bits: int) -> None:
    if bits != DENSE and not 1 <= bits <= 8:
        raise UserError(f"bits must be between 1 and 8 (or 16 to keep an expert dense), got {bits}")


def _pack(linear: nn.Module, bits: int, group_size: int, sym: bool, quantizer: str, hessian=None,
          tokens: int = 0, damp: float = 0.01, act_order: bool = False, min_tokens: int | None = None,
          scale_dtype: torch.dtype = torch.float16) -> nn.Module:
    weight = dense_weight(linear).detach().float()
    bias = getattr(linear, "bias", None)
    return PackedLinear.from_weight(weight, bits, group_size=group_size, sym=sym, method=quantizer,
                                   hessian=hessian, tokens=tokens, damp=damp, act_order=act_order,
                                   min_tokens=min_tokens, bias=None if bias is None else bias.detach(),
                                   scale_dtype=scale_dtype)


def default_min_tokens(group_size: int) -> int:
    """GPTQModel's failsafe threshold: 2 × group size routed tokens (256 for one group per row)."""
    return 2 * group_size if group_size > 0 else 256


def quantize_experts(model: nn.Module, bits: Mapping[int, list[int]], group_size: int = 128, sym: bool = False,
                     quantizer: str = "rtn", hessians: Mapping | None = None, damp: float = 0.01,
                     act_order: bool = False, min_tokens: int | None = None,
                     scale_dtype: torch.dtype = torch.float16) -> dict[int, list[int]]:
    """Quantize routed expert e of MoE layer l to bits[l][e] (16 = leave dense).

    With `quantizer="gptq"`, experts whose Hessian is missing or built from fewer than `min_tokens` routed tokens
    (default 2·group_size) are quantized with RTN in the same scheme (pitfall 1) and a warning names them.
    Returns those RTN fallbacks per layer ({} for RTN)."""
    if quantizer not in ("rtn", "gptq"):
        raise UserError(f"unknown quantizer {quantizer!r}: use 'rtn' or 'gptq'")
    layers = {l.layer_idx: l for l in moe_layers(model)}
    for i, per_expert in bits.items():
        if i not in layers:
            raise UserError(f"layer {i} is not an MoE layer (MoE layers: {sorted(layers)})")
        if len(per_expert) != layers[i].num_experts:
            raise UserError(f"layer {i}: {len(per_expert)} bit widths for {layers[i].num_experts} experts")
        for b in per_expert:
            _check_bits(b)
    threshold = default_min_tokens(group_size) if min_tokens is None else min_tokens
    fallbacks: dict[int, list[int]] = {}
    with torch.no_grad():
        for i, per_expert in bits.items():
            experts = to_expert_list(layers[i])
            for e, b in enumerate(per_expert):
                if b == DENSE:
                    continue
                h_in, n, h_act = (hessians or {}).get((i, e), (None, 0, None))
                how = quantizer
                if quantizer == "gptq" and (h_in is None or h_act is None or n < max(threshold, 1)):
                    how = "rtn"
                    fallbacks.setdefault(i, []).append(e)
                mlp = experts[e]
                mlp.gate_proj = _pack(mlp.gate_proj, b, group_size, sym, how, h_in, n, damp, act_order, 0, scale_dtype)
                mlp.up_proj = _pack(mlp.up_proj, b, group_size, sym, how, h_in, n, damp, act_order, 0, scale_dtype)
                mlp.down_proj = _pack(mlp.down_proj, b, group_size, sym, how, h_act, n, damp, act_order, 0, scale_dtype)
    for i, experts in fallbacks.items():
        log.warning("layer %d: experts %s have fewer than %d routed calibration tokens; GPTQ fell back to RTN "
                    "(%s bits, same scheme) for them", i, experts, threshold, sorted({bits[i][e] for e in experts}))
    return fallbacks


def hessians_from_gram(gram, layer_indices=None) -> dict[tuple[int, int], tuple]:
    """`{(layer, expert): (XᵀX, n_tokens, AᵀA)}` from a `gram` collector run with `intermediate=True`
    (the input `quantize_experts(..., quantizer="gptq")` takes)."""
    if not getattr(gram, "intermediate", False):
        raise UserError("GPTQ needs the gram collector with intermediate=True (down_proj Hessians)")
    out = {}
    for i in gram.layers() if layer_indices is None else layer_indices:
        if f"{i}.count" not in gram.state:
            continue  # no routed token reached this layer: every expert falls back to RTN
        counts = gram.counts(i)
        for e in range(len(counts)):
            out[(i, e)] = (gram.xtx(i, e), int(counts[e]), gram.ata(i, e))
    return out


def quantize_experts_bnb(model: nn.Module, kind: str = "nf4", compute_dtype: torch.dtype = torch.float32,
                         double_quant: bool = False, blocksize: int = 64, layer_indices=None) -> None:
    """Linearise the routed experts (ExpertList) and wrap each gate/up/down in a bitsandbytes module
    (`BnbLinear`: NF4 / FP4 `Linear4bit` or LLM.int8 `Linear8bitLt`; pitfall 12), in the model's train/eval mode:
    bitsandbytes' CPU int8 kernel depends on it (eval: int8 × int8 with row-wise quantized activations, as a
    reloaded checkpoint runs; training: dequantized weight × fp activations)."""
    from moecompress.compress.quant.nf4 import BnbLinear

    with torch.no_grad():
        for layer in moe_layers(model):
            if layer_indices is not None and layer.layer_idx not in layer_indices:
                continue
            device = layer.router_weight.device
            for mlp in to_expert_list(layer):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    lin = getattr(mlp, name)
                    bias = getattr(lin, "bias", None)
                    q = BnbLinear.from_weight(dense_weight(lin).detach().float(), kind, bias, compute_dtype,
                                              double_quant, blocksize, device)
                    setattr(mlp, name, q.train(model.training))


def other_linears(model: nn.Module, layer_indices=None) -> dict[str, nn.Linear]:
    """Decoder-layer nn.Linear modules outside the routed experts and routers, by qualified name (of the decoder
    layers `layer_indices`, default all)."""
    routers = set()
    for layer in moe_layers(model):
        routers.add(id(layer.router))
        if hasattr(layer.block, "shared_expert_gate"):
            routers.add(id(layer.block.shared_expert_gate))
    found = {}
    for idx, block in enumerate(decoder_layers(model)):
        if layer_indices is not None and idx not in layer_indices:
            continue
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


def quantize_other_linears(model: nn.Module, bits: int, group_size: int = 128, sym: bool = False,
                           layer_indices=None, scale_dtype: torch.dtype = torch.float16) -> list[str]:
    """RTN-quantize attention, shared-expert and dense-MLP linears to `bits` (of the decoder layers
    `layer_indices`, default all); returns the names replaced."""
    _check_bits(bits)
    names = list(other_linears(model, layer_indices))
    with torch.no_grad():
        for name in names:
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent)
            setattr(holder, child, _pack(getattr(holder, child), bits, group_size, sym, "rtn",
                                         scale_dtype=scale_dtype))
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
            out[layer.layer_idx] = [int(getattr(mlp.gate_proj, "bits", DENSE)) for mlp in layer.experts]
        else:
            out[layer.layer_idx] = [DENSE] * layer.num_experts
    return out
