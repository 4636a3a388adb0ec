"""The safetensors exports: compressed-tensors and dequantized stock HF, written layer by layer from a layered
source (`onload.LayeredModel`: one decoder layer real at a time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moecompress.compress.checkpoint import CheckpointWriter, copy_tokenizer, read_manifest
from moecompress.compress.experts import ExpertList, dense_weight, make_linear
from moecompress.compress.moe import decoder_layers, moe_layer, moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.shards import ShardWriter
from moecompress.compress.surgery import fuse_layer, sync_config
from moecompress.export import compressed_tensors as ct
from moecompress.export.layout import other_tensors, refuse_bitsandbytes, refuse_nonstock, split_layer

PROVENANCE = "moecompress-export.json"  # not MANIFEST: the export is a stock checkpoint of its format


def _provenance(source: Path | None, fmt: str, extra: dict[str, Any]) -> dict[str, Any]:
    manifest = read_manifest(source) if source is not None else None
    keep = ("base_model", "method", "method_config", "plans", "routing_semantics", "versions")
    return {"export_format": fmt, "source": str(source),
            "source_manifest": {k: manifest[k] for k in keep if manifest and k in manifest}, **extra}


class CompressedTensorsWriter:
    def __init__(self, holder, dtype: torch.dtype, max_shard_size: int):
        self.holder, self.dtype, self.max_shard_size = holder, dtype, max_shard_size
        self.model = holder.model
        self.inexact: list[int] = []

    def check(self) -> None:
        ct.check(self.model)

    def write(self, directory: Path) -> None:
        shards = ShardWriter(directory, self.max_shard_size)
        for index in range(len(decoder_layers(self.model))):
            with self.holder.layer(index):
                shards.add(ct.layer_tensors(split_layer(self.model, index), self.dtype, self.inexact))
        shards.add(other_tensors(self.model))
        shards.close()
        config = self.model.config
        sync_config(self.model)
        config.quantization_config = ct.quantization_config(self.model)
        config.save_pretrained(directory)
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(directory)
        copy_tokenizer(self.holder.path, None, directory)
        (directory / PROVENANCE).write_text(json.dumps(_provenance(self.holder.path, ct.FORMAT, self.summary()),
                                                       indent=2, default=str))

    def summary(self) -> dict[str, Any]:
        return {"scales_rounded": sum(self.inexact), "scale_dtype": str(self.dtype).removeprefix("torch.")}


class HFWriter:
    """Stock transformers checkpoint: every packed weight dequantized to the model's dtype, experts of a smaller
    width zero-padded to the config's (gate/up rows and down columns of zeros: exact), per-expert layers fused."""

    def __init__(self, holder, dtype: torch.dtype, max_shard_size: int):
        self.holder, self.dtype, self.max_shard_size = holder, dtype, max_shard_size
        self.model = holder.model
        self.dequantized = 0
        self.padded = 0

    def check(self) -> None:
        refuse_nonstock(self.model, "a stock HF checkpoint", widths=False)
        for layer in moe_layers(self.model):
            width = getattr(self.model.config, layer.spec.width_key)
            if max(layer.widths()) > width:
                raise RuntimeError(f"layer {layer.layer_idx}: an expert is wider than the config's {width}")

    def write(self, directory: Path) -> None:
        writer = CheckpointWriter(directory, self.model, stock=True, max_shard_size=self.max_shard_size)
        for index in range(len(decoder_layers(self.model))):
            with self.holder.layer(index):
                self._to_stock(index)
                writer.write_layer(index)
        writer.finish(_provenance(self.holder.path, "hf", self.summary()), self.holder.path)

    def _to_stock(self, index: int) -> None:
        block = decoder_layers(self.model)[index]
        for name, module in list(block.named_modules()):
            if isinstance(module, PackedLinear):
                parent, _, child = name.rpartition(".")
                holder = block.get_submodule(parent) if parent else block
                bias = module.bias.to(self.dtype) if module.bias is not None else None
                setattr(holder, child, make_linear(dense_weight(module).to(self.dtype), bias))
                self.dequantized += 1
        layer = moe_layer(self.model, index)
        if layer is None or not isinstance(layer.experts, ExpertList):
            return
        refuse_bitsandbytes(block)
        width = getattr(self.model.config, layer.spec.width_key)
        for mlp in layer.experts:
            if mlp.width < width:
                _pad(mlp, width)
                self.padded += 1
        fuse_layer(self.model, index)

    def summary(self) -> dict[str, Any]:
        return {"dequantized_linears": self.dequantized, "zero_padded_experts": self.padded}


def _pad(mlp: nn.Module, width: int) -> None:
    """Zero-pad one expert's intermediate width to `width`: its output is unchanged (zero down columns)."""
    extra = width - mlp.width

    def rows(linear: nn.Linear) -> nn.Linear:
        w = linear.weight
        bias = None if linear.bias is None else torch.cat([linear.bias, linear.bias.new_zeros(extra)])
        return make_linear(torch.cat([w, w.new_zeros(extra, w.shape[1])]), bias)

    mlp.gate_proj, mlp.up_proj = rows(mlp.gate_proj), rows(mlp.up_proj)
    down = mlp.down_proj.weight
    mlp.down_proj = make_linear(torch.cat([down, down.new_zeros(down.shape[0], extra)], dim=1), mlp.down_proj.bias)
