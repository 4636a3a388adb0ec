"""Safetensors checkpoints that scale: read one decoder layer's tensors from the input shards, and write outputs
shard by shard as layers finish (the full state dict never exists in memory).

* `CheckpointReader(path)` — a local checkpoint directory (`model.safetensors`, or shards named by
  `model.safetensors.index.json`): tensor name → file, the names of decoder layer i (`model.layers.{i}.…`) and
  of everything else, and `read(names)` through `safe_open` (one tensor at a time, nothing else touched).
* `to_model_names(model, tensors)` — checkpoint names → the in-memory names and layouts of transformers 5
  (e.g. per-expert `experts.{e}.gate_proj.weight` → fused `experts.gate_up_proj [E, 2I, H]`), by applying the
  model's own conversion mapping (`transformers.conversion_mapping`) to a partial state dict.
  `to_checkpoint_names` is its inverse (`transformers.core_model_loading.revert_weight_conversion`): what
  `save_pretrained` writes, so a stock output loads with `from_pretrained` anywhere.
* `ShardWriter(directory, max_shard_size)` — buffers tensors up to `max_shard_size` bytes, writes each full shard,
  and at `close()` names them `model-0000i-of-0000N.safetensors` with a `model.safetensors.index.json` (or a
  single `model.safetensors` when one shard holds everything), as `save_pretrained` does.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from moecompress.errors import UserError

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_SIZE = 5 * 10**9  # save_pretrained's default "5GB"
_LAYER = re.compile(r"^(?:model\.)?(?:language_model\.)?layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer index of a tensor name `model.layers.{i}.…`, else None."""
    found = _LAYER.match(name)
    return int(found.group(1)) if found else None


class CheckpointReader:
    """The safetensors tensors of a local checkpoint directory, read lazily one tensor at a time."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._headers: dict[Path, dict] = {}
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index} is not a safetensors index (no weight_map); re-create the checkpoint") \
                    from None
            self.files = {name: self.path / file for name, file in weight_map.items()}
        elif (self.path / WEIGHTS).is_file():
            self.files = {name: self.path / WEIGHTS for name in self._header(self.path / WEIGHTS)}
        else:
            raise UserError(f"{self.path} has no {WEIGHTS} or {INDEX}; layer-by-layer onloading reads safetensors "
                            f"checkpoints (use --onload memory for other formats)")
        missing = sorted({str(f) for f in self.files.values() if not f.is_file()})
        if missing:
            raise UserError(f"{self.path}: the index names shard {missing[0]}, which does not exist")
        self.by_layer: dict[int | None, list[str]] = defaultdict(list)
        for name in self.files:
            self.by_layer[layer_of(name)].append(name)

    def layer_names(self, index: int) -> list[str]:
        return list(self.by_layer.get(index, []))

    def other_names(self) -> list[str]:
        return list(self.by_layer.get(None, []))

    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))

    def _header(self, file: Path) -> dict[str, dict]:
        """The tensor entries of a safetensors file's header (name → dtype, shape, data offsets), with the data
        start under "__data__"; a UserError for anything that is not a whole safetensors file."""
        if file not in self._headers:
            try:
                with open(file, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    if not 0 < size <= 100 << 20:
                        raise ValueError(f"invalid header length {size}")
                    header = json.loads(f.read(size))
                header.pop("__metadata__", None)
                end = max((e["data_offsets"][1] for e in header.values()), default=0)
                if file.stat().st_size < 8 + size + end:
                    raise ValueError(f"{file.stat().st_size} bytes, the header describes {8 + size + end}")
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"cannot read the weights in {file}: {e}; the file is corrupt or truncated") from None
            self._headers[file] = {**header, "__data__": 8 + size}
        return {k: v for k, v in self._headers[file].items() if k != "__data__"}

    def iter_tensors(self, names: list[str], dtype: torch.dtype | None = None):
        """(name, tensor) one at a time, file by file, on the CPU; floating ones cast to `dtype` (None: as
        stored). Each tensor is read with one `readinto` straight into memory torch allocates: no file map stays
        behind, every tensor has torch's alignment (MKL's one-row GEMM rounds differently on misaligned data),
        and a cold read is a plain sequential read."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        for file, keys in by_file.items():
            entries = self._header(file)
            start = self._headers[file]["__data__"]
            with open(file, "rb", buffering=0) as f:
                for key in sorted(keys, key=lambda k: entries[k]["data_offsets"][0]):
                    entry = entries[key]
                    begin, end = entry["data_offsets"]
                    t = torch.empty(end - begin, dtype=torch.uint8)
                    if end > begin:
                        f.seek(start + begin)
                        if f.readinto(memoryview(t.numpy())) != end - begin:
                            raise UserError(f"cannot read {key} from {file}: the file is truncated")
                    t = t.view(TORCH_DTYPES[entry["dtype"]]).reshape(entry["shape"])
                    cast = dtype is not None and t.is_floating_point() and t.dtype != dtype
                    yield key, (t.to(dtype) if cast else t)

    def read(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors on the CPU (see `iter_tensors`)."""
        return dict(self.iter_tensors(names, dtype))


# ----- names: checkpoint ↔ in-memory --------------------------------------------------------------------------
def _transforms(model: nn.Module):
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming

    transforms = [t for t in get_model_conversion_mapping(model) if not isinstance(t, PrefixChange)]
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def to_model_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors → in-memory names/layouts (the model's conversion mapping, as `from_pretrained` applies
    it); tensors that no transform matches keep their names. `tensors` must hold whole conversion groups (all
    experts of a layer), which one decoder layer's names always do."""
    from copy import deepcopy

    from transformers.core_model_loading import WeightRenaming, dot_natural_key, rename_source_key

    renamings, converters = _transforms(model)
    if not renamings and not converters:
        return dict(tensors)
    pattern_to_converter = {p: c for c in converters for p in c.source_patterns}
    pending: dict[str, object] = {}
    for key, tensor in sorted(tensors.items(), key=lambda kv: dot_natural_key(kv[0])):
        renamed, pattern = rename_source_key(key, renamings, converters)
        if pattern is not None:
            transform = pending.setdefault(renamed, deepcopy(pattern_to_converter[pattern]))
        else:
            transform = pending.setdefault(renamed, WeightRenaming(key, renamed))
            pattern = key
        transform.add_tensor(renamed, key, pattern, tensor)
    out = {}
    for name, transform in pending.items():
        for target, value in transform.convert(name, model=model, config=model.config).items():
            out[target] = value[0] if isinstance(value, list) else value
    return out


def to_checkpoint_names(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """In-memory tensors → the names and layouts `save_pretrained` writes (the inverse of `to_model_names`)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, dict(tensors))


# ----- writing --------------------------------------------------------------------------------------------------
def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}


class _Shard:
    """One safetensors file written as its tensors come: the data goes straight to disk after a header region
    reserved up front, and `close()` writes the header into it (padded with spaces, which the format allows).
    Should the header outgrow the reserve — or a shard under 256 MB be left with more than 64 KB of padding — the
    file is rewritten once with a header of the right size."""

    def __init__(self, path: Path, reserve: int, metadata: dict):
        self.path, self.reserve, self.metadata = path, reserve, metadata
        self.file = open(path, "wb")
        self.file.seek(8 + reserve)
        self.entries: dict[str, dict] = {}
        self.offset = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {t.dtype} has no safetensors name")
        data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
        self.file.write(memoryview(data))
        end = self.offset + data.nbytes
        self.entries[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self.offset, end]}
        self.offset = end

    def close(self) -> None:
        header = json.dumps({"__metadata__": self.metadata, **self.entries}, separators=(",", ":")).encode()
        if len(header) <= self.reserve and (self.reserve - len(header) <= 64 << 10 or self.offset >= 256 << 20):
            self.file.seek(0)
            self.file.write(len(header + b" " * (self.reserve - len(header))).to_bytes(8, "little"))
            self.file.write(header + b" " * (self.reserve - len(header)))
            self.file.close()
            return
        self.file.close()  # the header outgrew the reserve, or a small shard would carry a large padding: copy
        # the data behind a header of the right size
        size = -(-len(header) // 8) * 8
        moved = self.path.with_suffix(".data")
        self.path.replace(moved)
        with open(moved, "rb") as src, open(self.path, "wb") as dst:
            dst.write(size.to_bytes(8, "little") + header + b" " * (size - len(header)))
            src.seek(8 + self.reserve)
            import shutil

            shutil.copyfileobj(src, dst, 16 << 20)
        moved.unlink()


class ShardWriter:
    """Write tensors into safetensors shards of at most `max_shard_size` bytes, in the order they come. Each tensor
    goes to disk when it is added (nothing is buffered), so writing a checkpoint costs no memory beyond the
    tensors being written."""

    def __init__(self, directory: Path, max_shard_size: int = DEFAULT_SHARD_SIZE, metadata: dict | None = None):
        self.directory = Path(directory)
        self.max_shard_size = max_shard_size
        self.metadata = {"format": "pt", **(metadata or {})}
        self.current: _Shard | None = None
        self.shards: list[tuple[Path, list[str]]] = []
        self.total = 0
        self.names: set[str] = set()
        self.reserve = min(2 << 20, max(4096, max_shard_size // 1000 // 8 * 8))

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.names:
                raise RuntimeError(f"tensor {name} written twice")
            self.names.add(name)
            size = tensor_bytes(t)
            if self.current is not None and self.current.offset + size > self.max_shard_size:
                self.flush()
            if self.current is None:
                path = self.directory / f".shard-{len(self.shards) + 1:05d}.safetensors"
                self.current = _Shard(path, self.reserve, self.metadata)
            self.current.add(name, t)
            self.total += size

    def flush(self) -> None:
        if self.current is None:
            return
        self.current.close()
        self.shards.append((self.current.path, list(self.current.entries)))
        self.current = None

    def close(self) -> list[Path]:
        """Finish the open shard and give the shards their final names (+ the index when there are several)."""
        self.flush()
        if len(self.shards) <= 1:
            final = self.directory / WEIGHTS
            if self.shards:
                self.shards[0][0].replace(final)
            else:
                save_file({}, str(final), metadata=self.metadata)
            return [final]
        n = len(self.shards)
        weight_map, files = {}, []
        for i, (path, names) in enumerate(self.shards, 1):
            final = self.directory / f"model-{i:05d}-of-{n:05d}.safetensors"
            path.replace(final)
            files.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.directory / INDEX).write_text(json.dumps(index, indent=2))
        return files
