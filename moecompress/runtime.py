"""Where and in what precision a run computes: the model spec a recipe names, and the runtime that carries device,
dtype and process rank through load, calibration passes and save.

* `ModelSpec` — what the recipe's `model:` holds: a string (the model id, everything else default) or
  `{id, dtype, device, device_map, max_memory, offload_folder, onload}`. `dtype: auto` (default) is the checkpoint's
  own dtype (`config.dtype`); `device: auto` is the first GPU when there is one, else the CPU; `onload` chooses
  how the model is held: `memory` (loaded whole, optionally spread by an accelerate `device_map`), `layers`
  (a meta-device skeleton whose decoder layers are read from the checkpoint's shards one at a time, so peak
  memory is about one decoder layer whatever the depth) or `auto` (layers when the checkpoint does not fit in
  half of the free memory of the device that would hold it).
* `Runtime` — the resolved device and dtype plus the process rank and world size from accelerate's
  `PartialState` (the one place that knows about `accelerate launch`; no other module reads RANK/WORLD_SIZE).
  Statistics always accumulate in fp32/fp64 whatever the weights' dtype (the collectors' rule).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from moecompress.errors import UserError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


class ModelSpec(BaseModel):
    """The model a run compresses and how it is held (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="local directory, hub id, or reference:NAME")
    dtype: str = Field("auto", description="auto (the checkpoint's own) | bfloat16 | float16 | float32")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    device_map: str | dict[str, Any] | None = Field(None, description="accelerate device_map (onload: memory)")
    max_memory: dict[str, str] | None = Field(None, description="per device budget, e.g. {0: 20GiB, cpu: 60GiB}")
    offload_folder: str | None = Field(None, description="disk offload folder for device_map")
    onload: Literal["auto", "memory", "layers"] = Field("auto", description="memory, layers, or auto")

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        name = DTYPE_ALIASES.get(v, v)
        if name != "auto" and name not in DTYPES:
            raise ValueError(f"dtype '{v}' is not supported: use auto, bfloat16, float16 or float32")
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", v):
            raise ValueError(f"device '{v}' is not supported: use auto, cpu, cuda or cuda:N")
        return v

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, v):
        return parse_max_memory(v) if isinstance(v, str) else v


def parse_max_memory(text: str | None) -> dict[str, str] | None:
    """`0=20GiB,cpu=60GiB` (the CLI's --max-memory) → {"0": "20GiB", "cpu": "60GiB"}; sizes checked by
    accelerate's own parser."""
    if text is None or not str(text).strip():
        return None
    out = {}
    for part in str(text).split(","):
        key, eq, size = part.strip().partition("=")
        if not eq or not key.strip() or not size.strip():
            raise UserError(f"--max-memory '{text}' is not DEVICE=SIZE[,DEVICE=SIZE]; e.g. 0=20GiB,cpu=60GiB")
        parse_size(size.strip(), f"--max-memory {key.strip()}")
        out[key.strip()] = size.strip()
    return out


def parse_size(size: str | int, what: str = "size") -> int:
    """Bytes of '5GB' / '500MiB' / 12345 (accelerate's parser); UserError naming `what` when unparsable."""
    from accelerate.utils import convert_file_size_to_int

    try:
        value = convert_file_size_to_int(size)
    except (ValueError, TypeError):
        raise UserError(f"{what} '{size}' is not a size; use e.g. 5GB, 500MiB or a byte count") from None
    if value <= 0:
        raise UserError(f"{what} '{size}' must be positive")
    return value


@dataclass
class Runtime:
    """Device, dtype and process facts for one run (built by `Runtime.create`)."""

    device: torch.device
    dtype: torch.dtype
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes outputs (under `accelerate launch`)."""
        return self.rank == 0

    @classmethod
    def create(cls, spec: ModelSpec, config=None) -> "Runtime":
        """Resolve `spec` (device available? dtype auto → the config's) and read the process facts."""
        state = partial_state()
        device = resolve_device(spec.device, state)
        return cls(device=device, dtype=resolve_dtype(spec.dtype, config), rank=state.process_index,
                   world_size=state.num_processes)

    def facts(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."), "rank": self.rank,
                "world_size": self.world_size}


def partial_state():
    """accelerate's process state (a singleton: the first call decides the backend). Without a usable GPU (or with
    ACCELERATE_USE_CPU) the processes of `accelerate launch` form a gloo group on the CPU."""
    import os

    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu)


def process_facts() -> tuple[int, int]:
    """(rank, world size) of this process (1 process unless under `accelerate launch`)."""
    state = partial_state()
    return state.process_index, state.num_processes


def resolve_device(device: str, state=None) -> torch.device:
    if device == "auto":
        if state is not None and state.device.type == "cuda":
            return state.device
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA GPU is available here; use --device cpu (or auto)")
    index = int(device.partition(":")[2] or (state.local_process_index if state is not None else 0))
    if index >= torch.cuda.device_count():
        raise UserError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here; use cuda:0…"
                        f"cuda:{torch.cuda.device_count() - 1}")
    return torch.device("cuda", index)


def resolve_dtype(name: str, config=None) -> torch.dtype:
    """`auto` → the checkpoint's own dtype (config.dtype / torch_dtype), float32 when the config names none."""
    if name != "auto":
        return DTYPES[name]
    found = getattr(config, "dtype", None) if config is not None else None
    if found is None and config is not None:
        found = getattr(config, "torch_dtype", None)
    if isinstance(found, str):
        found = DTYPES.get(found)
    return found if isinstance(found, torch.dtype) and found.is_floating_point else torch.float32


def available_memory(device: torch.device) -> int:
    """Free bytes where the model would live: the GPU's free memory, or the machine's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def model_spec(value: str | dict | ModelSpec) -> ModelSpec:
    if isinstance(value, ModelSpec):
        return value
    return ModelSpec(id=value) if isinstance(value, str) else ModelSpec(**value)
