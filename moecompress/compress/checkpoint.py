"""Load models, and write compressed ones atomically: stock HF when the result fits the stock architecture,
safetensors + config + `moecompress.json` manifest when it does not.

* **Stock** (same expert count and width in every layer, stock fused experts, plain routers, no packed weights):
  `save_pretrained`, loadable by `AutoModelForCausalLM.from_pretrained` without moecompress installed. The manifest
  is written beside it for provenance only.
* **Native**: `model.safetensors` (in-memory state-dict names; per-expert modules use the legacy per-expert names),
  `config.json` (counts/widths hold the per-layer maximum), and the manifest whose `structure` records every layer's
  shapes. `load()` builds the stock model with empty weights, replays that structure (slices, per-expert modules,
  packed modules, bitsandbytes modules, mapped routers), then assigns the tensors (bitsandbytes modules take their
  own: `load_tensors`). No pickle, no remote code.

Writes go to a temporary sibling directory renamed into place at the end; the input model's directory is never a
target, and a non-empty output directory needs `overwrite=True`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from moecompress.compress.experts import ExpertActivation, ExpertList, ExpertMLP, make_linear
from moecompress.compress.families import FAMILIES, family_of
from moecompress.compress.moe import decoder_layers, moe_layers
from moecompress.compress.shards import (
    DEFAULT_SHARD_SIZE,
    INDEX,
    WEIGHTS,
    CheckpointReader,
    ShardWriter,
    to_checkpoint_names,
)
from moecompress.compress.quantize import install_packed, packed_outside_experts
from moecompress.compress.routers import MappedRouter, MaskedRouter, ODPRouter, wrap_odp
from moecompress.compress.surgery import _slice_layer, _slice_mlp, fuse_layer, sync_config
from moecompress.errors import UserError
from moecompress.paths import atomic_directory

FORMAT_VERSION = 1
MANIFEST = "moecompress.json"
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "chat_template.jinja", "generation_config.json")


# ----- structure: what a loader must rebuild ------------------------------------------------------------------
def linear_structure(linear: nn.Module) -> dict[str, Any]:
    if isinstance(linear, nn.Linear):
        return {"kind": "linear", "in_features": linear.in_features, "out_features": linear.out_features,
                "has_bias": linear.bias is not None}
    structure = linear.structure()
    return structure if "kind" in structure else {"kind": "packed", **structure}  # BnbLinear: kind "bnb"


def empty_linear(structure: dict[str, Any]) -> nn.Module:
    if structure["kind"] == "linear":
        weight = torch.empty(structure["out_features"], structure["in_features"], device="meta")
        bias = torch.empty(structure["out_features"], device="meta") if structure["has_bias"] else None
        return make_linear(weight, bias)
    if structure["kind"] == "bnb":
        from moecompress.compress.quant.nf4 import BnbLinear

        return BnbLinear.empty(structure)
    from moecompress.compress.quant.linear import PackedLinear

    return PackedLinear.empty({k: v for k, v in structure.items() if k != "kind"})


def describe(model: nn.Module) -> dict[str, Any]:
    """Per-MoE-layer shapes: expert count, top-k, router kind, experts storage, per-expert linears, shared width."""
    layers = {}
    for layer in moe_layers(model):
        entry: dict[str, Any] = {
            "num_experts": layer.num_experts,
            "top_k": layer.top_k,
            "router": _router_kind(layer.router),
            "experts": "list" if isinstance(layer.experts, ExpertList) else "fused",
            "widths": layer.widths(),
        }
        if isinstance(layer.router, MappedRouter):
            entry["router_experts"] = layer.router.weight.shape[0]  # the original E the mapping acts on
        if isinstance(layer.router, MaskedRouter):
            entry["router_experts"] = layer.router.full_experts
            entry["router_mode"] = layer.router.mode
        if isinstance(layer.router, ODPRouter):
            entry["odp"] = {"threshold": float(layer.router.threshold), "renormalize": layer.router.renormalize,
                            "protect_ratio": layer.router.protect_ratio}
        if isinstance(layer.experts, ExpertList):
            entry["activation"] = layer.experts.activation.to_dict()
            entry["linears"] = [
                {name: linear_structure(getattr(mlp, name)) for name in ("gate_proj", "up_proj", "down_proj")}
                for mlp in layer.experts
            ]
        if layer.shared_mlp is not None:
            entry["shared_width"] = layer.shared_mlp.gate_proj.out_features
        layers[str(layer.layer_idx)] = entry
    return {"layers": layers, "packed_modules": packed_outside_experts(model)}


def describe_routers(model: nn.Module) -> str:
    """How pruned experts are kept out of routing, over all MoE layers: `sliced` (router rows removed), `masked`
    / `no_reroute` (full router, `MaskedRouter`), `mapped` (EEP's router map), `odp` (dynamic skipping); several
    joined by '+'."""
    kinds = set()
    for layer in moe_layers(model):
        kind = _router_kind(layer.router)
        kinds.add(layer.router.mode if kind == "masked" else kind)
    return "+".join(sorted(kinds))


def _router_kind(router: nn.Module) -> str:
    if isinstance(router, MappedRouter):
        return "mapped"
    if isinstance(router, ODPRouter):
        return "odp"
    return "masked" if isinstance(router, MaskedRouter) else "sliced"


def is_stock(model: nn.Module) -> bool:
    """Whether `save_pretrained` + stock `from_pretrained` reproduces this model exactly."""
    layers = moe_layers(model)
    spec, config = layers[0].spec, model.config
    count, width = getattr(config, spec.count_key), getattr(config, spec.width_key)
    for layer in layers:
        if isinstance(layer.experts, ExpertList) or isinstance(layer.router, (MappedRouter, MaskedRouter, ODPRouter)):
            return False
        if layer.num_experts != count or layer.widths()[0] != width or layer.top_k != config.num_experts_per_tok:
            return False
        if layer.shared_mlp is not None and layer.shared_mlp.gate_proj.out_features != stock_shared_width(config):
            return False
    return not any(hasattr(m, "weight_packed") for m in model.modules())


def stock_shared_width(config) -> int:
    if hasattr(config, "shared_expert_intermediate_size"):
        return config.shared_expert_intermediate_size
    return config.moe_intermediate_size * config.n_shared_experts


def rebuild(model: nn.Module, structure: dict[str, Any]) -> None:
    """Reshape a freshly built (empty-weight) stock model into the recorded structure."""
    layers = {str(layer.layer_idx): layer for layer in moe_layers(model)}
    with torch.no_grad():
        for key, entry in structure["layers"].items():
            layer = layers[key]
            if entry["num_experts"] != layer.num_experts:
                _slice_layer(layer, list(range(entry["num_experts"])))
            if entry["router"] == "masked":
                full = copy.deepcopy(model.config)
                setattr(full, layer.spec.count_key, entry["router_experts"])
                inner = type(layer.router)(full).to("meta")
                router = MaskedRouter(inner, list(range(entry["num_experts"])), entry["router_mode"],
                                      layer.spec.routing, layer.norm_topk_prob)
                setattr(layer.block, layer.spec.router_attr, router)
            if entry["router"] == "mapped":
                weight = torch.empty(entry["router_experts"], layer.hidden_size, device="meta")
                mapping = torch.empty(entry["num_experts"], entry["router_experts"], device="meta")
                setattr(layer.block, layer.spec.router_attr, MappedRouter(weight, mapping, entry["top_k"]))
            if entry["router"] == "odp":  # the stock router wrapped; its threshold buffer comes with the weights
                odp = entry["odp"]  # manifests from before the token protection have none: they ran without it
                wrap_odp(layer, odp["threshold"], odp.get("renormalize", True), odp.get("protect_ratio", 0.0))
            if entry["experts"] == "list":
                experts = [ExpertMLP(*(empty_linear(lin[name]) for name in ("gate_proj", "up_proj", "down_proj")))
                           for lin in entry["linears"]]
                layer.block.experts = ExpertList(experts, ExpertActivation(**entry["activation"]))
            elif entry["widths"] != layer.widths():
                raise UserError(f"{key}: fused expert widths {entry['widths'][:1]} differ from the config's; "
                                f"the checkpoint is inconsistent, re-create it")
            if "shared_width" in entry and entry["shared_width"] != layer.shared_mlp.gate_proj.out_features:
                _slice_mlp(layer.shared_mlp, torch.arange(entry["shared_width"]))
            layer.router.top_k = entry["top_k"]
            if hasattr(layer.block, "top_k"):
                layer.block.top_k = entry["top_k"]
    install_packed(model, structure.get("packed_modules", {}))


# ----- output directories -------------------------------------------------------------------------------------
def check_output_dir(out: Path, inputs: list[Path] = (), overwrite: bool = False) -> Path:
    """Refuse outputs inside an input model's directory, and non-empty outputs without overwrite."""
    out = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        if src.is_dir() and (out == src or src in out.parents):
            raise UserError(f"output {out} is inside the input model's directory {src}; choose another -o path")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is a file; choose a directory path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output directory {out} is not empty; pass --overwrite to replace it")
    return out


def copy_tokenizer(source: Path | None, tokenizer, tmp: Path) -> None:
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
        return
    if source is not None and Path(source).is_dir():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).exists() and not (tmp / name).exists():
                shutil.copy2(Path(source) / name, tmp / name)


def versions() -> dict[str, str]:
    import transformers

    import moecompress

    return {"moecompress": moecompress.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__}


# ----- save ---------------------------------------------------------------------------------------------------
NATIVE_MODEL_TYPE = "moecompress"


def native_marker() -> dict[str, str]:
    """`quantization_config` of a native checkpoint (see `mark_native`)."""
    return {"quant_method": "moecompress", "format": "native", "manifest": MANIFEST,
            "load_with": "moecompress.load(PATH)",
            "export_with": "moecompress export PATH --format compressed-tensors|gguf|hf -o OUT"}


def mark_native(config_json: Path) -> None:
    """Make a native checkpoint's config.json say what it is. Left as the base model's, it looks dense and stock
    loaders fail on missing or misshapen weights (transformers only warns and re-initialises them). With
    `model_type: moecompress` and architecture `MoecompressNativeCheckpoint`, transformers' AutoConfig and vLLM /
    SGLang's architecture lookup refuse it naming moecompress, and `quantization_config` says how to load or export
    it; `load_config` restores the base family's config."""
    data = json.loads(config_json.read_text())
    marker = native_marker()
    marker["base_model_type"] = data["model_type"]
    marker["base_architectures"] = data.get("architectures")
    data.update(model_type=NATIVE_MODEL_TYPE, architectures=["MoecompressNativeCheckpoint"],
                quantization_config=marker)
    config_json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def is_native_marker(value) -> bool:
    quant_method = value.get("quant_method") if isinstance(value, dict) else getattr(value, "quant_method", None)
    return quant_method == "moecompress"


def outside_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state outside the decoder layers (embeddings, final norm, LM head), a tied weight once."""
    seen, rest = set(), {}
    for name, t in model.state_dict().items():
        if name.startswith("model.layers."):
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:  # a tied weight (lm_head = embed_tokens): written once
            continue
        seen.add(key)
        rest[name] = t
    return rest


class CheckpointWriter:
    """Write a model's tensors into `directory` decoder layer by decoder layer (`write_layer(i)`, while that layer
    is real), then everything else, config and manifest (`finish`). Stock outputs are written under the names
    `save_pretrained` uses (the model's conversion mapping reverted, per layer); native ones under the in-memory
    names. Tensors keep their dtype (the model's: the checkpoint's own unless the run asked for another)."""

    def __init__(self, directory: Path, model: nn.Module, stock: bool, max_shard_size: int = DEFAULT_SHARD_SIZE):
        self.directory, self.model, self.stock = Path(directory), model, stock
        self.shards = ShardWriter(self.directory, max_shard_size)
        self.written: set[int] = set()

    def _names(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return to_checkpoint_names(self.model, tensors) if self.stock else tensors

    def write_layer(self, index: int) -> None:
        layer = decoder_layers(self.model)[index]
        if self.stock and isinstance(getattr(getattr(layer, "mlp", None), "experts", None), ExpertList):
            fuse_layer(self.model, index)  # the stock format holds uniform experts fused
        tensors = layer.state_dict(prefix=f"model.layers.{index}.")
        meta = [n for n, t in tensors.items() if t.device.type == "meta"]
        if meta:
            raise RuntimeError(f"decoder layer {index} is not loaded ({meta[0]}); write it while it is real")
        self.shards.add(self._names(tensors))
        self.written.add(index)

    def finish(self, manifest: dict[str, Any], source: Path | None = None, tokenizer=None) -> None:
        layers = decoder_layers(self.model)
        for index in range(len(layers)):
            if index not in self.written:
                self.write_layer(index)
        self.shards.add(self._names(outside_layers(self.model)))
        self.shards.close()
        sync_config(self.model)
        config = self.model.config
        if is_native_marker(getattr(config, "quantization_config", None)):
            del config.quantization_config
        config.save_pretrained(self.directory)
        if not self.stock:
            mark_native(self.directory / "config.json")
        if getattr(self.model, "generation_config", None) is not None:
            self.model.generation_config.save_pretrained(self.directory)
        copy_tokenizer(source, tokenizer, self.directory)
        full = {"format_version": FORMAT_VERSION, "format": "stock" if self.stock else "native",
                "toolkit_version": versions()["moecompress"], "versions": versions(),
                "structure": describe(self.model), **manifest}
        (self.directory / MANIFEST).write_text(json.dumps(full, indent=2, default=str))


def save(model: nn.Module, out: Path, *, manifest: dict[str, Any] | None = None, source: Path | None = None,
         tokenizer=None, overwrite: bool = False, max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write `model` to `out` (stock when possible, native otherwise) with the manifest; atomically, in shards of
    at most `max_shard_size` bytes, in the model's dtype."""
    out = check_output_dir(out, [source] if source else [], overwrite)
    stock = is_stock(model)

    def write(tmp: Path) -> None:
        CheckpointWriter(tmp, model, stock, max_shard_size).finish(manifest or {}, source, tokenizer)

    return atomic_directory(out, write)


# ----- load ---------------------------------------------------------------------------------------------------
def read_manifest(path: Path) -> dict[str, Any] | None:
    file = Path(path) / MANIFEST
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{file} is not valid JSON ({e.msg}); re-create the checkpoint") from None


def _native_config(path: Path):
    """The base family's config of a native checkpoint (config.json says model_type `moecompress`), else None."""
    from transformers import CONFIG_MAPPING

    try:
        data = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path / 'config.json'} is not valid JSON ({e.msg}); re-create the checkpoint") from None
    if not isinstance(data, dict) or data.get("model_type") != NATIVE_MODEL_TYPE:
        return None
    marker = data.pop("quantization_config", None) or {}
    base = marker.get("base_model_type")
    if base not in CONFIG_MAPPING:
        raise UserError(f"{path / 'config.json'}: a moecompress native checkpoint without a known base model type "
                        f"({base!r}); re-create the checkpoint")
    data["model_type"] = base
    data["architectures"] = marker.get("base_architectures", data.get("architectures"))
    return CONFIG_MAPPING[base].from_dict(data)


def load_config(model_id: str | Path):
    """The config of a local directory or hub id, checked to be a supported MoE family."""
    from transformers import AutoConfig

    path = Path(model_id).expanduser()
    if path.exists() and not (path / "config.json").exists():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model directory or hub id")
    try:
        native = _native_config(path) if path.is_dir() else None
        config = native or AutoConfig.from_pretrained(str(path) if path.exists() else str(model_id))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model config from '{model_id}': {str(e).splitlines()[0]}") from None
    if config.model_type not in FAMILIES and not any(hasattr(config, k) for k in EXPERT_COUNT_KEYS):
        raise UserError(
            f"'{model_id}' is a dense model (model type '{config.model_type}', no experts); moecompress compresses "
            f"MoE models: {', '.join(s.name for s in FAMILIES.values())}"
        )
    family_of(config)
    return config


def load(model_id: str | Path, dtype: torch.dtype | None = None, device_map=None, max_memory=None,
         offload_folder=None) -> nn.Module:
    """Load a stock or moecompress checkpoint (local path or hub id) for compression or evaluation, in eval mode.

    `dtype` None: the checkpoint's own dtype. `device_map` (accelerate's: "auto", a dict, …) with `max_memory`
    and `offload_folder` spreads the model over devices, CPU and disk; native checkpoints are read lazily, one
    tensor at a time (safetensors `safe_open`), sharded or not."""
    from transformers import AutoModelForCausalLM

    from moecompress.runtime import resolve_dtype

    config = load_config(model_id)
    dtype = resolve_dtype("auto", config) if dtype is None else dtype
    path = Path(model_id).expanduser()
    manifest = read_manifest(path) if path.is_dir() else None
    try:
        if manifest is None or manifest.get("format") == "stock":
            extra = {"max_memory": _accelerate_memory(max_memory)} if max_memory else {}
            if offload_folder:
                extra["offload_folder"] = offload_folder
            model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else str(model_id),
                                                         dtype=dtype, device_map=device_map, **extra)
            own_memory(model)
            for name, t in model.state_dict().items():
                check_finite(name, t, model_id)
        else:
            model = _load_native(path, config, manifest, dtype, device_map, max_memory, offload_folder)
    except SafetensorError as e:
        raise UserError(f"cannot read the weights in {model_id}: {e}; the file is corrupt or truncated") from None
    except (OSError, RuntimeError) as e:
        if "safetensors" in str(e).lower() or "header" in str(e).lower():
            raise UserError(f"cannot read the weights in {model_id}: {str(e).splitlines()[0]}") from None
        raise
    moe_layers(model)  # a supported family with no MoE layer is a dense configuration
    return model.eval()


def check_finite(name: str, tensor: torch.Tensor, where) -> None:
    """One line naming the first weight that holds NaN or Inf: no method gives a meaningful result from it."""
    if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
        raise UserError(f"{where}: {name} holds NaN/Inf values; the checkpoint is corrupt or diverged, fix or "
                        f"re-create it before compressing")


def own_memory(model: nn.Module) -> None:
    """Copy the CPU tensors that `from_pretrained` left as misaligned views into safetensors' map of the file (an
    address set by the tensor's offset in the file) into memory torch allocates, one tensor at a time. MKL's
    one-row GEMM (an expert routed a single token) rounds differently on data that is not 16-byte aligned, so the
    same weights would otherwise give logits ~1e-7 apart depending on the file's layout."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.device.type == "cpu" and t.numel() and t.data_ptr() % 64:
                t.data = t.data.clone()


def _accelerate_memory(max_memory: dict[str, str] | None) -> dict | None:
    """--max-memory keys as accelerate wants them: GPU indices as ints, 'cpu' / 'disk' / 'mps' as strings."""
    if not max_memory:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}


def empty_model(config, dtype: torch.dtype, include_buffers: bool = False) -> nn.Module:
    """The model of `config` with meta-device weights in the dtypes `from_pretrained(dtype=…)` gives them (the
    model's keep-in-fp32 plan applied: e.g. GPT-OSS norms in fp16, DeepSeek-V3's router in fp16/bf16)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import build_glob_alternation

    with init_empty_weights(include_buffers=include_buffers):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plan = model._get_dtype_plan(dtype)
    if plan:
        pattern, groups, _ = build_glob_alternation(list(plan))
        for name, module in model.named_modules():
            for store in (module._parameters, module._buffers):
                for key, t in list(store.items()):
                    full = f"{name}.{key}" if name else key
                    found = pattern.search(full) if t is not None and t.is_floating_point() else None
                    if found:
                        wanted = plan[groups[found.lastgroup]]
                        store[key] = nn.Parameter(t.to(wanted), requires_grad=t.requires_grad) \
                            if isinstance(t, nn.Parameter) else t.to(wanted)
    return model


def _load_native(path: Path, config, manifest: dict[str, Any], dtype: torch.dtype, device_map=None,
                 max_memory=None, offload_folder=None) -> nn.Module:
    from accelerate.utils import set_module_tensor_to_device

    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer moecompress (format {manifest['format_version']}); upgrade")
    model = empty_model(config, dtype)
    rebuild(model, manifest["structure"])
    reader = CheckpointReader(path)
    owners = {name: module for name, module in model.named_modules() if hasattr(module, "load_tensors")}
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    names = set(reader.files)
    unexpected = sorted(n for n in names if n not in expected and not _owned(n, owners))
    if unexpected:
        raise UserError(f"{path}: weights do not match the manifest (unexpected {unexpected[:3]}); the checkpoint "
                        f"is inconsistent, re-create it")
    if owners:  # bitsandbytes experts assign their own tensors (quantization state in tensor subclasses)
        owned = reader.read([n for n in names if _owned(n, owners)])
        _load_module_tensors(model, owned)
    if device_map is None:
        for name, value in reader.iter_tensors(sorted(n for n in names if not _owned(n, owners))):
            check_finite(name, value, path)
            set_module_tensor_to_device(model, name, "cpu", value=value)
    else:
        _dispatch(model, path, reader, device_map, max_memory, offload_folder)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta and device_map is None:
        raise UserError(f"{path}: weights do not match the manifest (missing {still_meta[:3]}); the checkpoint is "
                        f"inconsistent, re-create it")
    sync_config(model)
    return model


def _owned(name: str, owners: dict[str, nn.Module]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in owners for i in range(1, len(parts)))


def _dispatch(model: nn.Module, path: Path, reader: CheckpointReader, device_map, max_memory, offload_folder):
    """accelerate's loader + dispatcher: each tensor read once from its shard onto its device (or disk)."""
    from accelerate import dispatch_model, infer_auto_device_map, load_checkpoint_in_model

    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            device_map = {"": device_map}
        else:
            device_map = infer_auto_device_map(model, max_memory=_accelerate_memory(max_memory),
                                               no_split_module_classes=model._no_split_modules or [])
    if "disk" in set(device_map.values()) and not offload_folder:
        raise UserError("the device map offloads to disk: pass --offload-folder DIR")
    checkpoint = path / INDEX if (path / INDEX).is_file() else path / WEIGHTS
    load_checkpoint_in_model(model, str(checkpoint), device_map=device_map, offload_folder=offload_folder,
                             offload_buffers=True)
    dispatch_model(model, device_map=device_map, offload_dir=offload_folder, offload_buffers=True,
                   force_hooks=True)


def _load_module_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Hand modules that assign their own tensors (`load_tensors`: bitsandbytes experts, whose quantization state
    lives in tensor subclasses `load_state_dict` would flatten) their entries, removed from `state`."""
    owners = {name: module for name, module in model.named_modules() if hasattr(module, "load_tensors")}
    tensors: dict[str, dict[str, torch.Tensor]] = {name: {} for name in owners}
    for key in list(state) if owners else []:
        parts = key.split(".")
        for i in range(1, len(parts)):
            if ".".join(parts[:i]) in owners:
                tensors[".".join(parts[:i])][".".join(parts[i:])] = state.pop(key)
                break
    for name, module in owners.items():
        module.load_tensors(tensors[name])


def fingerprint_config(config) -> str:
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()
