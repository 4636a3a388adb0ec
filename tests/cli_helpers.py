"""Run the `moecompress` entry point in-process, as a user would call it, and capture exit code and output."""

from __future__ import annotations

import subprocess
import sys

import pytest

from moecompress import cli


def run_cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what the test's own setup printed
    argv = sys.argv
    sys.argv = ["moecompress", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# Parameters are copied into memory torch owns before the forward: safetensors ≥ 0.8 hands out views into its map of
# the file, aligned by the tensor's offset in it, and MKL's one-row GEMM (an expert routed a single token) rounds
# differently on data that is not 16-byte aligned — same weights, logits ~1e-7 apart. Copies compare like with like.
RELOAD_STOCK = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
for t in list(model.parameters()) + list(model.buffers()):
    t.data = t.data.clone()
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
assert not any(m.startswith("moecompress") for m in sys.modules), "moecompress was imported"
"""


def logits_without_moecompress(path, ids, tmp_path):
    import torch

    torch.save(ids, tmp_path / "ids.pt")
    done = subprocess.run([sys.executable, "-c", RELOAD_STOCK, str(path), str(tmp_path / "ids.pt"),
                           str(tmp_path / "logits.pt")], capture_output=True, text=True, cwd=tmp_path)
    if done.returncode:
        pytest.fail(done.stderr[-2000:])
    return torch.load(tmp_path / "logits.pt")


def assert_same_logits_across_processes(got, want) -> None:
    """Logits of the same weights computed in another process: bitwise equal in a fresh process, but inside a long
    test worker the CPU GEMM's rounding can depend on process state (MKL's one-row path on how the allocator
    aligned a tensor), so they are compared to fp32 rounding. A wrong expert or weight moves them by > 1e-2."""
    import torch

    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
