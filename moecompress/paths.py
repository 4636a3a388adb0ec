"""Where moecompress keeps what it builds: reference models, statistics cache, eval task data."""

from __future__ import annotations

import os
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
