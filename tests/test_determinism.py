"""The same command twice gives the same checkpoint, byte for byte: every `*.safetensors` shard, `config.json` and
the other files; the manifest (moecompress.json) may differ only in timing and runtime facts.

Each command is run exactly as written both times (same output path: the first result is moved aside), with
`--no-cache` so both runs compute their statistics; then twice without it (the first fills the statistics cache,
the second reads it), which must agree too, but for the recipe's `calibration.cache` flag and the pass facts
that say where the statistics came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_helpers import run_cli
from tiny_models import calibration_file, save_tiny

DATA = ["--samples", 4, "--seq-len", 16]
COMMANDS = {
    "frequency": ["prune", "-m", "frequency", "--ratio", 0.25],
    "random": ["prune", "-m", "random", "--keep", 5],
    "reap": ["prune", "-m", "reap", "--keep", 6],
    "camera_p": ["prune", "-m", "camera_p", "--ratio", 0.25],
    "rtn": ["quantize", "-m", "rtn", "--bits", 3, "--group-size", 16],
    "gptq": ["quantize", "-m", "gptq", "--bits", 4, "--group-size", 16],
}
VOLATILE = {"seconds", "elapsed", "created", "timestamp", "runtime", "eval_seconds", "tokens_per_second"}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core machine two OpenMP threads spin against each other (the sequential
    GPTQ pass goes from 0.05 s to 4 s). Determinism is asserted per thread setting, which this keeps fixed."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("determinism")
    return save_tiny("qwen3_moe", root / "model"), calibration_file(root / "calib.txt")


def _stable(value):
    """The manifest without its timing / runtime facts."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE and not k.endswith("_seconds")}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _assert_same_checkpoint(a: Path, b: Path, ignore_cache_flag: bool = False) -> None:
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    assert any(name.endswith(".safetensors") for name in fa) and "config.json" in fa
    for name in fa:
        if name == "moecompress.json":
            ma, mb = _stable(json.loads(fa[name])), _stable(json.loads(fb[name]))
            if ignore_cache_flag:  # the recipe records --no-cache; the pass facts say where statistics came from
                for m in (ma, mb):
                    m["recipe"]["calibration"].pop("cache")
                    for facts in m["calibration"]:
                        for key in ("cache_hits", "computed", "engine"):
                            facts.pop(key, None)
            assert ma == mb
        else:
            assert fa[name] == fb[name], f"{name} differs between two runs of the same command"


@pytest.mark.parametrize("method", sorted(COMMANDS))
def test_same_command_same_bytes(method, model, tmp_path, capsys):
    model_dir, data = model
    command, *rest = COMMANDS[method]
    out = tmp_path / "out"
    argv = [command, model_dir, *rest, "--data", data, *DATA, "-o", out]
    runs = []
    # compute, compute, compute and fill the cache, read the cache
    for k, extra in enumerate((["--no-cache"], ["--no-cache"], [], [])):
        code, _, err = run_cli(capsys, *argv, *extra)
        assert code == 0, err
        runs.append(out.rename(tmp_path / f"run-{k}"))
    manifests = [json.loads((r / "moecompress.json").read_text()) for r in runs]
    assert manifests[0]["method"] == method
    assert all(not f["cache_hits"] for m in manifests[:3] for f in m["calibration"])
    assert all(f["cache_hits"] or f["pass"] == "sequential" for f in manifests[3]["calibration"]), \
        manifests[3]["calibration"]
    _assert_same_checkpoint(runs[0], runs[1])
    for later in runs[2:]:
        _assert_same_checkpoint(runs[0], later, ignore_cache_flag=True)
