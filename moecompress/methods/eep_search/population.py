"""The steady-state population: every candidate evaluated so far, persisted after every evaluation.

On disk (`state_dir`):
* `cand-<step>.safetensors` — the candidate's `merge` [G,E',E] and `route` [G,E',E] (float32), one file per step;
* `population.json` — the search fingerprint (model, space, options), the RNG state, and per step: phase,
  fitness, parents, held-out re-scores.

Both are written to a temporary file and renamed into place (candidate file first), so a kill at any instant
leaves either the previous or the next consistent state; `population.json` is the single source of truth.

RNG state: the draws of step t come from `numpy.random.default_rng([seed, t])` (counter-based), so the state to
persist is (seed, next step) — a resumed search draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from moecompress.errors import UserError

STATE_VERSION = 1
INDEX = "population.json"


@dataclass
class Entry:
    step: int
    phase: int  # 1: pruning (tied one-hot), 2: merging
    merge: torch.Tensor
    route: torch.Tensor
    fitness: float
    key: str
    parents: list[int] = field(default_factory=list)
    final: float | None = None  # held-out re-score, when computed


class Population:
    def __init__(self, fingerprint: dict, seed: int, state_dir: str | Path | None = None, writer: bool = True):
        self.fingerprint = fingerprint
        self.seed = seed
        self.entries: dict[int, Entry] = {}
        self.dir = Path(state_dir) if state_dir else None
        self.writer = writer
        if self.dir is not None:
            self._load()

    # ----- queries ----------------------------------------------------------------------------------------------
    def rng(self, step: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, step])

    def before(self, step: int) -> list[Entry]:
        """The population a step's candidate is bred from: the entries of all earlier rounds, in step order."""
        return [self.entries[s] for s in sorted(self.entries) if s < step]

    def keys(self, entries: list[Entry]) -> set[str]:
        return {e.key for e in entries}

    def ranked(self) -> list[Entry]:
        """Distinct candidates, best training fitness first (ties: earlier step first)."""
        seen, out = set(), []
        for e in sorted(self.entries.values(), key=lambda e: (-e.fitness, e.step)):
            if e.key not in seen:
                seen.add(e.key)
                out.append(e)
        return out

    # ----- updates ----------------------------------------------------------------------------------------------
    def add(self, entry: Entry) -> None:
        self.entries[entry.step] = entry
        if self.dir is not None and self.writer:
            _atomic(self.dir / _cand_name(entry.step),
                    lambda path: save_file({"merge": entry.merge.contiguous(), "route": entry.route.contiguous()},
                                           str(path)))
            self._write_index()

    def set_final(self, step: int, score: float) -> None:
        self.entries[step].final = score
        if self.dir is not None and self.writer:
            self._write_index()

    # ----- persistence ------------------------------------------------------------------------------------------
    def _write_index(self) -> None:
        data = {
            "version": STATE_VERSION,
            "fingerprint": self.fingerprint,
            "rng": {"kind": "numpy default_rng([seed, step])", "seed": self.seed,
                    "next_step": max(self.entries, default=-1) + 1},
            "entries": [{"step": e.step, "phase": e.phase, "fitness": e.fitness, "key": e.key, "parents": e.parents,
                         "final": e.final, "file": _cand_name(e.step)}
                        for e in sorted(self.entries.values(), key=lambda e: e.step)],
        }
        _atomic(self.dir / INDEX, lambda path: path.write_text(json.dumps(data, indent=1)))

    def _load(self) -> None:
        index = self.dir / INDEX
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
        if not index.exists():
            return
        try:
            data = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{index} is not valid JSON ({e.msg}); remove the state directory to start over") from None
        if data.get("fingerprint") != self.fingerprint or data.get("rng", {}).get("seed") != self.seed:
            raise UserError(f"{self.dir} holds a search with other settings (model, experts kept, groups, task or "
                            f"seed); use a new state_dir, or remove this one to start over")
        for item in data["entries"]:
            tensors = load_file(str(self.dir / item["file"]))
            self.entries[item["step"]] = Entry(item["step"], item["phase"], tensors["merge"], tensors["route"],
                                               item["fitness"], item["key"], item["parents"], item.get("final"))


def _cand_name(step: int) -> str:
    return f"cand-{step:05d}.safetensors"


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
