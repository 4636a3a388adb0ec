"""How a run holds its model: whole in memory, or as a skeleton whose decoder layers are read one at a time.

* **memory** — the model loaded whole (`checkpoint.load`: its own dtype by default, optionally spread over
  devices and offloaded by an accelerate `device_map`). `layer(i)` onloads accelerate-offloaded submodules of
  decoder layer i for the duration of the block (a no-op for ordinary models).
* **layers** — layer-by-layer onloading for models larger than memory. The model is built on the meta device
  from its config (a native moecompress checkpoint's recorded structure replayed); the embeddings, final norm,
  LM head and buffers are real, every decoder layer is meta. `layer(i)` reads that layer's tensors from the input
  shards (`shards.CheckpointReader`, renamed to the in-memory layout by the model's own conversion mapping),
  places them on the run's device in the run's dtype, and on exit returns the layer to the meta device (whatever
  was changed inside the block is written inside it). The next layer is read ahead in a background thread. Peak
  memory ≈ one decoder layer (two while the next is read) + embeddings/head + the calibration activations,
  independent of depth.

`materialized_layers(model)` counts the decoder layers that hold real weights (tests assert ≤ 1 at any time).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from moecompress.compress.moe import decoder_layers
from moecompress.compress.shards import CheckpointReader, to_model_names
from moecompress.errors import UserError
from moecompress.runtime import ModelSpec, Runtime, available_memory

log = logging.getLogger("moecompress")


class ModelHolder:
    """The model of a run and how its decoder layers become real (see the module docstring)."""

    layered = False

    def __init__(self, model: nn.Module, path: Path | None, runtime: Runtime):
        self.model = model
        self.path = path
        self.runtime = runtime

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        from moecompress.calibration.engine import onloaded

        layer = decoder_layers(self.model)[index]
        with onloaded(layer):
            yield layer

    def facts(self) -> dict:
        return {"onload": "layers" if self.layered else "memory", **self.runtime.facts()}


class LayeredModel(ModelHolder):
    """A meta-device skeleton whose decoder layers are read from a safetensors checkpoint on demand."""

    layered = True

    def __init__(self, model: nn.Module, path: Path, runtime: Runtime, reader: CheckpointReader,
                 convert_names: bool, prefetch: bool = True):
        super().__init__(model, path, runtime)
        self.reader = reader
        self.convert_names = convert_names
        self.reads = 0  # decoder layers read from disk (benchmarks, tests)
        self.prefetch = prefetch  # read layer i+1 in a background thread while layer i computes
        self._pool = None
        self._ahead: tuple[int, object] | None = None

    @contextmanager
    def layer(self, index: int) -> Iterator[nn.Module]:
        layer = decoder_layers(self.model)[index]
        self._materialize(index, layer)
        try:
            yield layer
        finally:
            decoder_layers(self.model)[index].to("meta")  # the layer as it is now (a method may have replaced parts)

    def _read(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s tensors as stored: from the read started ahead, or now."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == index:
            return ahead[1].result()
        return self.reader.read(self.reader.layer_names(index))

    def _read_ahead(self, index: int) -> None:
        """Start reading layer `index` in the background (after the current layer is converted and placed, so at
        most one layer as stored and one layer in use are held besides the work on it)."""
        if not self.prefetch or index >= len(decoder_layers(self.model)):
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moecompress-prefetch")
        self._ahead = (index, self._pool.submit(self.reader.read, self.reader.layer_names(index)))

    def _materialize(self, index: int, layer: nn.Module) -> None:
        from moecompress.compress.checkpoint import check_finite

        tensors = self._read(index)
        if self.convert_names:
            tensors = to_model_names(self.model, tensors)
        prefix = f"model.layers.{index}."
        expected = {prefix + k: t for k, t in _tensors(layer).items()}
        missing = sorted(set(expected) - set(tensors))
        if missing:
            raise UserError(f"{self.path}: decoder layer {index} lacks {missing[0]} (and {len(missing) - 1} more) "
                            f"in its checkpoint; the checkpoint does not match its config")
        for name, meta in expected.items():
            if tuple(tensors[name].shape) != tuple(meta.shape):
                raise UserError(f"{self.path}: {name} has shape {tuple(tensors[name].shape)}, the config says "
                                f"{tuple(meta.shape)}; the checkpoint does not match its config")
            value = tensors.pop(name)
            check_finite(name, value, self.path)
            place(self.model, name, meta, value, self.runtime.device)
        tensors = None  # the layer holds its tensors; drop the read buffers before reading ahead
        self.reads += 1
        self._read_ahead(index + 1)


def place(model: nn.Module, name: str, meta: torch.Tensor, value: torch.Tensor, device) -> None:
    """Put `value` at tensor `name` of `model` on `device`, in the dtype the skeleton gives it (floating ones)."""
    from accelerate.utils import set_module_tensor_to_device

    if value.is_floating_point() and meta.is_floating_point():
        value = value.to(meta.dtype)
    set_module_tensor_to_device(model, name, device, value=value)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def materialized_layers(model: nn.Module) -> int:
    """Decoder layers holding real (non-meta) parameters right now."""
    return sum(1 for layer in decoder_layers(model)
               if any(p.device.type != "meta" for p in layer.parameters()))


# ----- building holders ---------------------------------------------------------------------------------------
def hold(spec: ModelSpec, path: str, config, runtime: Runtime) -> ModelHolder:
    """Load `path` as `spec` asks: whole in memory, or layered (`onload: auto` decides by size)."""
    from moecompress.compress.checkpoint import load

    onload = spec.onload
    local = Path(path).expanduser()
    if onload == "auto":
        onload = _auto_onload(local, config, runtime)
    if onload == "layers":
        if spec.device_map is not None:
            raise UserError("--device-map spreads a model held in memory; layer-by-layer onloading (--onload "
                            "layers) reads one layer at a time onto --device: drop one of them")
        return layered(local if local.exists() else _snapshot(path), runtime)
    model = load(path, dtype=runtime.dtype, device_map=_device_map(spec, runtime),
                 max_memory=spec.max_memory, offload_folder=spec.offload_folder)
    return ModelHolder(model, local if local.exists() else None, runtime)


def _device_map(spec: ModelSpec, runtime: Runtime):
    if spec.device_map is not None:
        return spec.device_map
    return None if runtime.device.type == "cpu" else {"": str(runtime.device)}


def _auto_onload(path: Path, config, runtime: Runtime) -> str:
    """layers when the checkpoint (at the run's dtype) needs more than half of the free memory, else memory."""
    if not path.exists():
        return "memory"
    try:
        reader = CheckpointReader(path)
    except UserError:
        return "memory"
    stored = reader.total_bytes()
    dtype_of = getattr(config, "dtype", None)
    ratio = 1.0
    if isinstance(dtype_of, torch.dtype) and dtype_of.is_floating_point:
        ratio = torch.finfo(runtime.dtype).bits / torch.finfo(dtype_of).bits
    need, free = stored * ratio, available_memory(runtime.device)
    choice = "layers" if need > 0.5 * free else "memory"
    log.info("onload %s: the checkpoint needs %.1f GB at %s, %.1f GB free on %s", choice, need / 1e9,
             str(runtime.dtype).removeprefix("torch."), free / 1e9, runtime.device)
    return choice


def _snapshot(model_id: str) -> Path:
    """A hub model's files on local disk (layer-by-layer onloading reads shards by name)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                "*.jinja"]))
    except Exception as e:  # offline, unknown id, no access
        raise UserError(f"cannot download '{model_id}' for layer-by-layer onloading: {str(e).splitlines()[0]}") \
            from None


def _release_freed_memory() -> None:
    """Make glibc hand large freed blocks back to the system at once. Its mmap threshold otherwise rises to the
    size of the last freed block, so the per-expert tensors of every layer read (MBs each, in two threads' arenas)
    come from heaps that are not trimmed, and the resident size grows well past the one layer held."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks ≥ 1 MiB are mmapped (and unmapped when freed)
    except (OSError, AttributeError):  # not glibc
        pass


def layered(path: Path, runtime: Runtime) -> LayeredModel:
    """The skeleton of the checkpoint at `path`: real embeddings/norm/head/buffers, meta decoder layers."""
    _release_freed_memory()
    from accelerate.utils import set_module_tensor_to_device

    from moecompress.compress.checkpoint import check_finite, empty_model, load_config, read_manifest, rebuild

    config = load_config(path)
    manifest = read_manifest(path)
    native = manifest is not None and manifest.get("format") == "native"
    model = empty_model(config, runtime.dtype)
    if native:
        rebuild(model, manifest["structure"])
    for layer in decoder_layers(model):
        layer.to("meta")
    reader = CheckpointReader(path)
    tensors = reader.read(reader.other_names())
    if not native:
        tensors = to_model_names(model, tensors)
    expected = {n: t for n, t in _tensors(model).items() if not n.startswith("model.layers.")}
    for name, meta in expected.items():
        if name in tensors:
            check_finite(name, tensors[name], path)
            place(model, name, meta, tensors[name], runtime.device)
    model.tie_weights()
    left = [n for n, t in _tensors(model).items() if t.device.type == "meta" and not n.startswith("model.layers.")]
    if left:
        raise UserError(f"{path}: the checkpoint lacks {left[0]}; it does not match its config")
    for name, buffer in list(model.named_buffers()):
        if not name.startswith("model.layers.") and buffer.device != runtime.device:
            set_module_tensor_to_device(model, name, runtime.device, value=buffer)
    if native:
        from moecompress.compress.surgery import sync_config

        sync_config(model)
    return LayeredModel(model.eval(), path, runtime, reader, convert_names=not native)
