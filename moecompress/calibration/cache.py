"""Statistics cache: a second method, ratio or run on the same model and data does no calibration pass.

Keyed **per collector** by sha256 of (model fingerprint, data fingerprint, collector name, collector config, cache
format version). The model fingerprint hashes the config (minus paths and versions) and a cheap weight digest
(float64 sum and L2 norm of every in-memory parameter and buffer; offloaded tensors contribute name, shape and
dtype); the data fingerprint is the CalibrationSet's hash of token ids and mask (so source, samples, seq_len, seed,
packing and tokenizer are all covered). A run needing a superset of what is cached loads the cached collectors and
runs one pass for the missing ones only. Entries are `<key>/state.safetensors` + `<key>/meta.json` (collector
config, pass facts incl. the never/rarely-routed report), written to a temporary directory renamed into place.
No pickle anywhere. Location: `moecompress.paths.subdir("cache")` (under $MOECOMPRESS_HOME).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moecompress.calibration.collectors import COLLECTORS, Collector
from moecompress.errors import UserError
from moecompress.paths import atomic_directory

log = logging.getLogger("moecompress")

CACHE_VERSION = 1
STATE = "state.safetensors"
META = "state.json"


def _config_dict(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in ("transformers_version",)}


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the config and a per-tensor (sum, norm) digest of the weights; cheap (one read of the weights)."""
    h = hashlib.sha256()
    h.update(json.dumps(_config_dict(model.config), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if t.device.type == "meta" or t.numel() == 0 or not (t.is_floating_point() or t.dtype == torch.int64):
                continue
            s = t.sum(dtype=torch.float64).item()
            n = torch.linalg.vector_norm(t, dtype=torch.float64).item() if t.is_floating_point() else 0.0
            h.update(f"{s:.10e}:{n:.10e}".encode())
    return h.hexdigest()


def collector_key(model_fp: str, data_fp: str, collector: Collector) -> str:
    payload = {"v": CACHE_VERSION, "model": model_fp, "data": data_fp, "collector": collector.name,
               "config": collector.config()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# ----- (de)serialising collectors ------------------------------------------------------------------------------
def write_collector(collector: Collector, directory: Path, meta: dict[str, Any], stem: str = "state") -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in collector.state.items()}
    save_file(tensors, str(directory / f"{stem}.safetensors"))
    (directory / f"{stem}.json").write_text(json.dumps(
        {"collector": collector.name, "config": collector.config(), **meta}, indent=1, default=str))


def read_collector(directory: Path, stem: str = "state") -> tuple[Collector, dict[str, Any]]:
    meta_path, state_path = directory / f"{stem}.json", directory / f"{stem}.safetensors"
    if not meta_path.is_file() or not state_path.is_file():
        raise UserError(f"no statistics '{stem}' in {directory}")
    meta = json.loads(meta_path.read_text())
    cls = COLLECTORS.get(meta.get("collector"))
    if cls is None:
        raise UserError(f"{meta_path} names an unknown collector '{meta.get('collector')}'")
    collector = cls(**meta.get("config", {}))
    collector.state = dict(load_file(str(state_path)))
    return collector, meta


def save_stats(stats: dict[str, Collector], directory: Path, facts: dict[str, Any]) -> Path:
    """`<name>.safetensors` + `<name>.json` per collector and `summary.json` (pass facts), for `calibrate -o`."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, c in stats.items():
        write_collector(c, directory, {"facts": facts}, stem=name)
    (directory / "summary.json").write_text(json.dumps(facts, indent=1, default=str))
    return directory


def load_stats(directory: str | Path) -> dict[str, Collector]:
    """The collectors `calibrate -o DIR` wrote, by name."""
    directory = Path(directory)
    names = sorted(p.stem for p in directory.glob("*.safetensors"))
    if not names:
        raise UserError(f"{directory} holds no statistics; write them with `moecompress calibrate ... -o DIR`")
    return {name: read_collector(directory, name)[0] for name in names}


# ----- the cache -----------------------------------------------------------------------------------------------
class StatsCache:
    def __init__(self, root: Path | None = None):
        if root is None:
            from moecompress.paths import subdir

            root = subdir("cache")
        self.root = Path(root) / "stats"

    def _dir(self, key: str) -> Path:
        return self.root / key[:2] / key

    def load(self, model_fp: str, data_fp: str, collector: Collector) -> dict[str, Any] | None:
        """Fill `collector` from the cache; its stored pass facts, or None on a miss (or an unreadable entry)."""
        d = self._dir(collector_key(model_fp, data_fp, collector))
        if not (d / META).is_file():
            return None
        try:
            cached, meta = read_collector(d)
        except Exception as e:  # a corrupt entry is a miss, never a crash
            log.warning("ignoring unreadable cache entry %s (%s)", d, e)
            return None
        collector.state = cached.state
        return meta.get("facts", {})

    def store(self, model_fp: str, data_fp: str, collector: Collector, facts: dict[str, Any]) -> None:
        d = self._dir(collector_key(model_fp, data_fp, collector))
        try:
            atomic_directory(d, lambda tmp: write_collector(collector, tmp, {"facts": facts, "model": model_fp,
                                                                           "data": data_fp}))
        except OSError as e:  # a full disk must not fail the run
            log.warning("could not write the statistics cache at %s: %s", d, e)
