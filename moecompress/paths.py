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


def umask() -> int:
    """The process umask (read without changing it for longer than the call)."""
    current = os.umask(0)
    os.umask(current)
    return current


def follow_umask(root: Path) -> None:
    """Give `root` and everything below it the modes a plain mkdir/open would (0777/0666 minus the umask):
    temporary directories are created 0700, which would hide an output from the serving user."""
    mask = umask()
    root.chmod(0o777 & ~mask)
    for path in root.rglob("*"):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def atomic_directory(out: Path, write) -> Path:
    """Run write(tmp_dir), then move tmp_dir to `out` (replacing an existing `out`); modes follow the umask."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        follow_umask(tmp)
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
