"""Faults: `kill -9` of a `moecompress prune` process during calibration and during the save, and a full disk.

Whatever the moment of the kill, the output path is either absent or a complete, loadable checkpoint; a rerun of
the same command then succeeds and leaves no temporary directory beside the output. The kill points are reached
deterministically: the prune runs in a subprocess whose named step (calibration pass, writing a decoder layer,
the rename into place) first drops a marker file and sleeps, and the test kills it with SIGKILL when the marker
appears; one more run is killed at a random moment (seeded) after its calibration pass starts.

The full disk is a 64 KiB tmpfs (needs root and a mount namespace that allows it; skipped otherwise).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import run_cli
from tiny_models import calibration_file, save_tiny

# Run the CLI with a stop at KILL_AT: touch KILL_MARKER and sleep (the test kills the process there).
WRAPPER = r"""
import os, sys, time
point, marker = os.environ.get("KILL_AT", ""), os.environ.get("KILL_MARKER", "")

def stop():
    open(marker, "w").close()
    time.sleep(120)

if point == "calibration":
    import moecompress.calibration.pipeline as pipeline
    engine_pass = pipeline._engine_pass
    def _engine_pass(*a, **k):
        stop()
    pipeline._engine_pass = _engine_pass
elif point == "random":
    import moecompress.calibration.pipeline as pipeline
    engine_pass = pipeline._engine_pass
    def _engine_pass(*a, **k):
        open(marker, "w").close()
        time.sleep(float(os.environ["KILL_SLOW"]))  # a slower pass, so the random kill can land in it
        return engine_pass(*a, **k)
    pipeline._engine_pass = _engine_pass
elif point == "write":
    from moecompress.compress.checkpoint import CheckpointWriter
    write_layer = CheckpointWriter.write_layer
    def _write_layer(self, index):
        if index == 1:  # layer 0's tensors are in the shard already
            stop()
        return write_layer(self, index)
    CheckpointWriter.write_layer = _write_layer
elif point == "rename":
    import moecompress.paths as paths
    follow = paths.follow_umask
    def _follow_umask(root):
        follow(root)
        stop()  # everything written, not yet renamed into place
    paths.follow_umask = _follow_umask
elif point == "swap":
    import moecompress.paths as paths
    replace = paths.os.replace
    calls = []
    class _OS:
        def __getattr__(self, name):
            return getattr(os, name)
        def replace(self, a, b):
            calls.append(a)
            replace(a, b)
            if len(calls) == 1:
                stop()  # --overwrite: the old output moved aside, the new one not yet in place
    paths.os = _OS()

from moecompress import cli
sys.argv = ["moecompress", *sys.argv[1:]]
cli.main()
"""

POINTS = ["calibration", "write", "rename", "swap"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return save_tiny("qwen3_moe", root / "model"), calibration_file(root / "calib.txt")


def _argv(model_dir, data, out):
    return ["prune", model_dir, "-m", "frequency", "--keep", 6, "--data", data, "--samples", 4, "--seq-len", 16,
            "--no-cache", "-o", out]


def _kill_at(point: str, argv, tmp_path: Path, slow: float = 0.0, delay: float | None = None) -> int:
    marker = tmp_path / f"marker-{point}"
    env = {**os.environ, "KILL_AT": point, "KILL_MARKER": str(marker), "KILL_SLOW": str(slow),
           "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *map(str, argv)], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before reaching {point}: {proc.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{point} not reached in 120 s")
        time.sleep(0.02)
    if delay:
        time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    proc.stderr.close()
    return proc.returncode


def _assert_absent_or_complete(out: Path) -> str:
    if not out.exists():
        return "absent"
    from moecompress import load
    from moecompress.compress.moe import moe_layers

    names = {p.name for p in out.iterdir()}
    assert {"config.json", "moecompress.json", "model.safetensors"} <= names, names
    model = load(out)
    assert [layer.num_experts for layer in moe_layers(model)] == [6, 6]
    return "complete"


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


STALE_TEMP = ("a SIGKILL leaves atomic_directory's `.OUT.tmp-*` (and, mid-swap, `.OUT.old-*`) beside the output "
              "and no later run removes them: moecompress/paths.atomic_directory should name its temporaries "
              "`.OUT.tmp-<pid>-*` / `.OUT.old-<pid>-*` and, before creating one, remove siblings of that form whose "
              "pid is no longer alive (os.kill(pid, 0) raises ProcessLookupError); a stale `.OUT.old-*/old` found "
              "while OUT is absent is the previous output and should be moved back first")


@pytest.mark.parametrize("point", [
    "calibration",
    pytest.param("write", marks=pytest.mark.xfail(strict=True, reason=STALE_TEMP)),
    pytest.param("rename", marks=pytest.mark.xfail(strict=True, reason=STALE_TEMP)),
    pytest.param("swap", marks=pytest.mark.xfail(strict=True, reason=STALE_TEMP)),
])
def test_kill_9_leaves_nothing_or_a_complete_checkpoint(point, inputs, tmp_path, capsys):
    model_dir, data = inputs
    out = tmp_path / "out"
    argv = _argv(model_dir, data, out)
    if point == "swap":  # an earlier output that --overwrite replaces
        code, _, err = run_cli(capsys, *argv)
        assert code == 0, err
        argv = [*argv, "--overwrite"]
    assert _kill_at(point, argv, tmp_path) == -signal.SIGKILL
    assert _assert_absent_or_complete(out) == "absent"  # every point comes before the rename into place
    code, _, err = run_cli(capsys, *_argv(model_dir, data, out), "--overwrite")
    assert code == 0, err
    assert _assert_absent_or_complete(out) == "complete"
    assert _leftovers(out) == [], "temporary directories left beside the output"


def test_kill_9_at_a_random_moment(inputs, tmp_path, capsys):
    """Killed somewhere in a (slowed) calibration pass or the save after it: absent or complete, and a rerun
    gives a complete checkpoint. (Stale temporaries: see the xfail rows above.)"""
    model_dir, data = inputs
    out = tmp_path / "out"
    delay = random.Random(os.environ.get("PYTEST_XDIST_WORKER", "") + "17").uniform(0.0, 0.6)
    _kill_at("random", _argv(model_dir, data, out), tmp_path, slow=0.4, delay=delay)
    _assert_absent_or_complete(out)
    code, _, err = run_cli(capsys, *_argv(model_dir, data, out), "--overwrite")
    assert code == 0, err
    assert _assert_absent_or_complete(out) == "complete"


# ----- disk full -------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def _digest(root: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def test_disk_full_leaves_nothing(small_disk, inputs, capsys):
    model_dir, data = inputs
    before = _digest(model_dir)
    out = small_disk / "out"
    code, _, err = run_cli(capsys, "prune", model_dir, "-m", "random", "--keep", 6, "-o", out)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert "no space left" in lines[0].lower(), lines[0]
    assert list(small_disk.iterdir()) == [], "a partial output or temporary directory was left on the full disk"
    assert _digest(model_dir) == before


def test_disk_full_is_a_user_error(small_disk, inputs, capsys):
    model_dir, _ = inputs
    code, _, err = run_cli(capsys, "prune", model_dir, "-m", "random", "--keep", 6, "-o", small_disk / "out")
    assert code == 2 and err.startswith("error: ") and "-o" in err, err
