"""`moecompress export CKPT --format compressed-tensors|gguf|hf -o OUT`: a compressed checkpoint in a format a
server loads without moecompress.

* `compressed-tensors` (vLLM, SGLang; transformers with the `compressed-tensors` package): quantized experts and
  linears as `pack-quantized` tensors with a `quantization_config` (compressed_tensors.py).
* `gguf` (llama.cpp): one `.gguf` file; the project's group-wise codes mapped onto GGUF block types where the
  arithmetic is the same, everything else requantized explicitly and reported (gguf_file.py).
* `hf`: a stock transformers checkpoint in the model's dtype: packed weights dequantized, variable-width experts
  zero-padded to the config's width (exact: a zero channel contributes nothing) (hf.py).

The source is read one decoder layer at a time (`onload.layered`), so an export needs about one layer of memory,
and is written atomically beside the output path; the source is never a target. What a format cannot express is
refused before anything is written, in one line.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from moecompress.errors import UserError

log = logging.getLogger("moecompress")

FORMATS = ("compressed-tensors", "gguf", "hf")


def export(source: str | Path, fmt: str, out: str | Path, *, overwrite: bool = False,
           max_shard_size: int | None = None, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export the checkpoint at `source` to `out` in format `fmt`; returns a summary (what was written, what was
    requantized or rounded)."""
    from moecompress.compress.checkpoint import check_output_dir, load_config
    from moecompress.compress.onload import layered
    from moecompress.compress.shards import DEFAULT_SHARD_SIZE
    from moecompress.runtime import Runtime, resolve_dtype

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: use one of {', '.join(FORMATS)}")
    source = Path(source).expanduser()
    if not (source / "config.json").is_file():
        raise UserError(f"{source} is not a checkpoint directory (no config.json): pass the output of "
                        f"moecompress prune/quantize/run or a Hugging Face model directory")
    out = check_output_dir(Path(out), [source], overwrite)  # never the source or inside it
    config = load_config(source)
    dtype = resolve_dtype("auto", config)
    holder = layered(source, Runtime(device=torch.device("cpu"), dtype=dtype))
    writer = _writer(fmt, holder, dtype, max_shard_size or DEFAULT_SHARD_SIZE, options or {})
    writer.check()
    from moecompress.paths import atomic_directory

    atomic_directory(out, writer.write)
    summary = {"format": fmt, "source": str(source), "output": str(out), **writer.summary()}
    log.info("exported %s", json.dumps(summary))
    return summary


def _writer(fmt: str, holder, dtype: torch.dtype, max_shard_size: int, options: dict[str, Any]):
    if fmt == "compressed-tensors":
        from moecompress.export.writers import CompressedTensorsWriter

        return CompressedTensorsWriter(holder, dtype, max_shard_size)
    if fmt == "hf":
        from moecompress.export.writers import HFWriter

        return HFWriter(holder, dtype, max_shard_size)
    from moecompress.export.gguf_file import GGUFWriter

    return GGUFWriter(holder, dtype, options)
