"""The foundation's end-to-end contract: `moecompress prune` on every family, reloads with and without moecompress."""

import json

import pytest
import torch

from cli_helpers import assert_same_logits_across_processes, logits_without_moecompress, run_cli
from moecompress.compress.checkpoint import MANIFEST, load
from moecompress.compress.moe import moe_layers
from moecompress.recipes.run import run
from moecompress.recipes.schema import parse_recipe
from tiny_models import FAMILIES, calibration_file, save_tiny, tokens


def in_memory(model_dir, data, scope):
    recipe = parse_recipe({"model": str(model_dir), "calibration": {"source": str(data), "samples": 8, "seq_len": 32},
                           "stages": [{"method": "frequency", "ratio": 0.25, "scope": scope}]})
    return run(recipe, dry_run=True).model


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_frequency_reloads_without_moecompress(family, tmp_path, capsys):
    model_dir = save_tiny(family, tmp_path / "model")
    data = calibration_file(tmp_path / "calib.txt")
    code, out, err = run_cli(capsys, "prune", model_dir, "-m", "frequency", "--ratio", "0.25", "--data", data,
                             "--samples", 8, "--seq-len", 32, "-o", tmp_path / "out")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["format"] == "stock"
    kept = manifest["plans"][0]["keep"]
    assert all(len(k) == 6 for k in kept.values())
    ids = tokens()
    expected = in_memory(model_dir, data, "layer")(ids).logits.detach()
    assert_same_logits_across_processes(logits_without_moecompress(tmp_path / "out", ids, tmp_path), expected)
    assert (tmp_path / "out" / "tokenizer.json").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_global_scope_reloads_with_moecompress(family, tmp_path, capsys):
    model_dir = save_tiny(family, tmp_path / "model")
    data = calibration_file(tmp_path / "calib.txt")
    code, out, err = run_cli(capsys, "prune", model_dir, "-m", "frequency", "--ratio", "0.25", "--scope", "global",
                             "--data", data, "--samples", 8, "--seq-len", 32, "-o", tmp_path / "out")
    assert code == 0, err
    reloaded = load(tmp_path / "out")
    expected = in_memory(model_dir, data, "global")
    counts = [l.num_experts for l in moe_layers(reloaded)]
    assert counts == [l.num_experts for l in moe_layers(expected)]
    assert sum(counts) == 6 * len(counts)  # the same total as per-layer pruning
    ids = tokens()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)


def test_dry_run_prints_plan_and_writes_nothing(tmp_path, capsys):
    model_dir = save_tiny("qwen3_moe", tmp_path / "model")
    code, out, err = run_cli(capsys, "prune", model_dir, "-m", "random", "--keep", 4, "--dry-run")
    assert code == 0, err
    assert out.count("keep   4 experts") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_methods_lists_registered_methods(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and "frequency" in out and "random" in out
