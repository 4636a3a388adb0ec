"""compressed-tensors `pack-quantized` export: what vLLM and SGLang serve, and what transformers loads with the
`compressed-tensors` package installed.

Per quantized Linear, under the hub checkpoint's per-expert names (layout.py):

* `weight_packed` int32 [out, ⌈in·b/32⌉]: the codes as *signed* integers (ours minus 2^(b−1)) packed by
  compressed-tensors' own `pack_to_int32` (dense bit packing: for 4 and 8 bits bit-identical to the native
  words, for 3/5/6/7 bits the words differ, so every width is repacked by the library);
* `weight_scale` [out, in/g] in the model's dtype (the native fp16 scales are cast; a cast that is not exact,
  fp16 → bf16, is counted and reported);
* `weight_zero_point` (asymmetric only) int32 packed along dim 0 by `pack_to_int32`, signed (ours − 2^(b−1));
* `weight_shape` [2].

`config.json` gets `quantization_config` (`quant_method: compressed-tensors`, `format: pack-quantized`,
`quantization_status: compressed`): one config group per scheme, its `targets` `re:` regexes over module names,
and an `ignore` list of every Linear left in full precision (LM head, routers, shared-expert gates, unquantized
attention), built with compressed-tensors' own pydantic models.

Dequantization is exact: compressed-tensors computes ŵ = s·(q − z) with the same integers and scales.

Refused, one line each: asymmetric codes (transformers 5.24 drops the zero points of experts and mis-shapes those
of dense layers when loading; symmetric is what vLLM's MoE kernels serve anyway), 1-bit codes (the binariser's
zero point 0.5 has no integer form), a group size that does not divide a linear's input columns, act-order GPTQ
(transformers' expert decompression carries no `g_idx`), experts of one layer with different schemes or some left
dense (a fused MoE layer holds one scheme), and everything `layout.refuse_nonstock` refuses.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import nn

from moecompress.compress.experts import ExpertList
from moecompress.compress.moe import decoder_layers, moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.quant.packing import unpack_codes
from moecompress.errors import UserError
from moecompress.export.layout import LayerTensors, refuse_nonstock

log = logging.getLogger("moecompress")

FORMAT = "compressed-tensors"


@dataclass(frozen=True)
class Scheme:
    """One weight quantization scheme, as a compressed-tensors config group states it."""

    bits: int
    group_size: int
    sym: bool

    @classmethod
    def of(cls, linear: PackedLinear) -> "Scheme":
        return cls(linear.bits, linear.group_size, linear.sym)

    def args(self) -> dict:
        strategy = "channel" if self.group_size == -1 else "group"
        return {"num_bits": self.bits, "type": "int", "symmetric": self.sym, "strategy": strategy,
                "group_size": None if self.group_size == -1 else self.group_size, "dynamic": False,
                "observer": "minmax"}

    def label(self) -> str:
        g = "channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits}A16 {'sym' if self.sym else 'asym'} {g}"


def expert_schemes(model: nn.Module) -> dict[int, Scheme | None]:
    """The one scheme of each MoE layer's routed experts (None: left dense), refusing a layer that mixes them."""
    out = {}
    for layer in moe_layers(model):
        linears = ([getattr(mlp, part) for mlp in layer.experts for part in ("gate_proj", "up_proj", "down_proj")]
                   if isinstance(layer.experts, ExpertList) else [])
        schemes = {Scheme.of(m) if isinstance(m, PackedLinear) else None for m in linears} or {None}
        if len(schemes) > 1:
            shown = sorted("dense" if s is None else s.label() for s in schemes)
            raise UserError(f"layer {layer.layer_idx} holds its experts in several schemes ({', '.join(shown)}); "
                            f"a fused MoE layer in {FORMAT} has one: quantize every expert of a layer alike "
                            f"(e.g. -m gptq --bits 4) or keep the moecompress checkpoint")
        out[layer.layer_idx] = schemes.pop()
    return out


def other_packed(model: nn.Module) -> dict[str, PackedLinear]:
    """Packed linears outside the routed experts, by module name."""
    inside = {id(m) for e in model.modules() if isinstance(e, ExpertList) for m in e.modules()}
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedLinear) and id(m) not in inside}


def check(model: nn.Module) -> None:
    """Refuse (one line) what this format cannot hold; works on a meta skeleton (no weights needed)."""
    refuse_nonstock(model, FORMAT)
    experts = expert_schemes(model)
    packed = [m for e in model.modules() if isinstance(e, ExpertList) for m in e.modules()
              if isinstance(m, PackedLinear)] + list(other_packed(model).values())
    for m in packed:
        if m.bits == 1:
            raise UserError(f"1-bit codes have no {FORMAT} form (the binariser's zero point is 0.5, not an "
                            f"integer): quantize at 2 bits or more, or keep the moecompress checkpoint")
        if not m.sym:
            raise UserError(f"asymmetric codes (zero points) are not loadable from {FORMAT} by transformers 5 (its "
                            f"expert and dense loaders drop or mis-shape zero points): quantize with --set sym=true "
                            f"(or --target vllm)")
        if m.group_size != -1 and m.in_features % m.group_size:
            raise UserError(f"group size {m.group_size} does not divide a linear's {m.in_features} input columns; "
                            f"{FORMAT} needs whole groups: quantize with a --group-size that divides it")
        if m.weight_g_idx is not None:
            raise UserError(f"act-order GPTQ (g_idx) experts are not loadable from {FORMAT} by transformers: "
                            f"re-quantize with --set act_order=false")
    if not any(s is not None for s in experts.values()) and not other_packed(model):
        raise UserError(f"the model holds no quantized weights, so {FORMAT} has nothing to describe: export with "
                        f"--format hf")


def convert(name: str, linear: PackedLinear, dtype: torch.dtype, inexact: list[int]) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one packed linear named `name` (see the module docstring)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (linear.bits - 1)
    codes = unpack_codes(linear.weight_packed, linear.bits, linear.in_features)
    signed = (codes.to(torch.int16) - offset).to(torch.int8)
    scale = linear.weight_scale.to(dtype)
    if not torch.equal(scale.to(linear.weight_scale.dtype), linear.weight_scale):
        inexact.append(int((scale.to(linear.weight_scale.dtype) != linear.weight_scale).sum()))
    out = {
        f"{name}.weight_packed": pack_to_int32(signed, linear.bits),
        f"{name}.weight_scale": scale.contiguous(),
        f"{name}.weight_shape": torch.tensor([linear.out_features, linear.in_features], dtype=torch.int64),
    }
    if not linear.sym:
        zero = linear.weight_zero_point.float()
        zp = (zero.round().to(torch.int16) - offset).to(torch.int8)
        out[f"{name}.weight_zero_point"] = pack_to_int32(zp, linear.bits, packed_dim=0)
    if linear.bias is not None:
        out[f"{name}.bias"] = linear.bias.to(dtype)
    return out


def layer_tensors(parts: LayerTensors, dtype: torch.dtype, inexact: list[int]) -> dict[str, torch.Tensor]:
    tensors = dict(parts.plain)
    for name, linear in parts.packed.items():
        tensors.update(convert(name, linear, dtype, inexact))
    return tensors


# ----- quantization_config ------------------------------------------------------------------------------------
def quantization_config(model: nn.Module) -> dict:
    """`config.json`'s quantization_config for `model`.

    One scheme overall → one config group targeting `Linear` with everything in full precision in `ignore`: the
    form llm-compressor writes and every server version reads (older SGLang only reads a `Linear` target; vLLM
    copies it onto the fused MoE layers). Several schemes → the routed experts get one group per scheme with `re:`
    targets over their layers (naming both the `gate_proj|up_proj|down_proj` names vLLM gives fused experts and
    Mixtral's `w1|w3|w2`), placed first (transformers takes the first group naming experts as the experts'
    scheme); the other quantized linears a `Linear` group, or name regexes when they hold several schemes."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    experts: dict[Scheme, list[int]] = defaultdict(list)
    for index, scheme in expert_schemes(model).items():
        if scheme is not None:
            experts[scheme].append(index)
    others: dict[Scheme, list[str]] = defaultdict(list)
    for name, linear in other_packed(model).items():
        others[Scheme.of(linear)].append(name)
    targets: list[tuple[Scheme, list[str]]] = []
    if len(set(experts) | set(others)) == 1:
        targets.append((next(iter(set(experts) | set(others))), ["Linear"]))
    else:
        for scheme, layers in experts.items():
            targets.append((scheme, [_experts_pattern(layers)]))
        for scheme, names in others.items():
            targets.append((scheme, ["Linear"] if len(others) == 1 else [f"re:^{re.escape(n)}$" for n in names]))
    groups = {f"group_{i}": QuantizationScheme(targets=t, weights=QuantizationArgs(**scheme.args()))
              for i, (scheme, t) in enumerate(targets)}
    config = QuantizationConfig(config_groups=groups, format="pack-quantized", quantization_status="compressed",
                                ignore=ignored_linears(model))
    out = config.model_dump(exclude_none=False)
    out["quant_method"] = "compressed-tensors"
    out["version"] = ct_version
    return out


def _experts_pattern(layers: list[int]) -> str:
    numbers = "|".join(str(i) for i in sorted(layers))
    return rf"re:.*layers\.({numbers})\.[a-z_]+\.experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)$"


def ignored_linears(model: nn.Module) -> list[str]:
    """Every full-precision Linear-like module a server would otherwise expect quantized: the LM head, each
    router (and Qwen2's shared-expert gate), and every plain nn.Linear of the decoder layers outside the routed
    experts; by name suffix (in-memory and checkpoint names both, where they differ) when it holds for every
    layer that has the module, else by full name."""
    from moecompress.compress.shards import to_checkpoint_names

    where: dict[str, set[int]] = defaultdict(set)
    present: dict[str, set[int]] = defaultdict(set)
    routers = {id(l.router) for l in moe_layers(model)}
    for index, block in enumerate(decoder_layers(model)):
        inside = {id(m) for e in block.modules() if isinstance(e, ExpertList) for m in e.modules()}
        for name, module in block.named_modules():
            if not name or id(module) in inside:
                continue
            present[name].add(index)
            weight = getattr(module, "weight", None)
            if (isinstance(module, nn.Linear) or id(module) in routers) and isinstance(weight, torch.Tensor):
                full = f"model.layers.{index}.{name}"
                hub = next(iter(to_checkpoint_names(model, {f"{full}.weight": weight}))).removesuffix(".weight")
                for suffix in {name, hub.removeprefix(f"model.layers.{index}.")}:
                    where[suffix].add(index)
                    present[suffix].add(index)
    out = ["lm_head"]
    for suffix, layers in sorted(where.items()):
        if layers == present[suffix]:
            out.append(rf"re:.*\.{re.escape(suffix)}$")
        else:
            out.extend(f"model.layers.{i}.{suffix}" for i in sorted(layers))
    return out
