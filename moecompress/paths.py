"""Where moecompress keeps what it builds (reference models, statistics cache, eval task data), and how it writes
directories atomically."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def home() -> Path:
    """`$MOECOMPRESS_HOME`, else `~/.cache/moecompress`. Created on first use."""
    root = Path(os.environ.get("MOECOMPRESS_HOME") or Path.home() / ".cache" / "moecompress")
    root.mkdir(parents=True, exist_ok=True)
    return root


def subdir(name: str) -> Path:
    path = home() / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_directory(out: Path, write) -> Path:
    """Run write(tmp_dir), then move tmp_dir to `out` (replacing an existing `out`)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, trash / "old")
            os.replace(tmp, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
