"""Expert-pruning methods: one row per method. Each plan respects the target on every family, its checkpoint reloads
with identical logits, and its scores match a brute-force computation from the stock modules."""

import pytest
import torch

from moecompress.compress.checkpoint import load, save
from moecompress.compress.moe import moe_layers
from moecompress.methods.base import Target, apply_plan, get_method
from moecompress.recipes.run import gather_statistics
from moecompress.recipes.schema import CalibrationSpec
from tiny_models import FAMILIES, calibration_file, tiny_model, tiny_tokenizer

METHODS = [("random", {}), ("frequency", {}), ("gating", {}), ("gating", {"signal": "prob"})]


def plan_for(model, method, options, target, tmp_path):
    m = get_method(method)(get_method(method).Config(**options))
    stats = {}
    if m.collectors():
        spec = CalibrationSpec(source=str(calibration_file(tmp_path / "c.txt")), samples=6, seq_len=24)
        stats, _ = gather_statistics(model, tiny_tokenizer(), spec, m.collectors())
    return m.plan(model, stats, target), stats


@pytest.mark.parametrize("method,options", METHODS, ids=[f"{m}{o}" for m, o in METHODS])
@pytest.mark.parametrize("family", FAMILIES)
def test_plan_respects_ratio_and_reloads(family, method, options, tmp_path):
    model = tiny_model(family)
    plan, _ = plan_for(model, method, options, Target(ratio=0.5), tmp_path)
    assert all(len(kept) == 4 for kept in plan.keep.values())
    apply_plan(model, plan)
    out = save(model, tmp_path / "out")
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        got, want = load(out)(ids).logits, model(ids).logits
    assert torch.isfinite(want).all() and torch.equal(got, want)


def block_inputs(model, ids):
    """Brute force: the stock MoE blocks' inputs, captured with forward pre-hooks."""
    seen = {}
    hooks = [l.block.register_forward_pre_hook(lambda mod, args, i=l.layer_idx: seen.setdefault(i, []).append(
        args[0].reshape(-1, args[0].shape[-1]))) for l in moe_layers(model)]
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in hooks:
        h.remove()
    return {i: torch.cat(x) for i, x in seen.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_routing_scores_match_brute_force(family, tmp_path):
    model = tiny_model(family)
    _, stats = plan_for(model, "frequency", {}, Target(ratio=0.25), tmp_path)
    spec = CalibrationSpec(source=str(tmp_path / "c.txt"), samples=6, seq_len=24)
    from moecompress.calibration.data import build_calibration

    calib = build_calibration(tiny_tokenizer(), spec)
    inputs = block_inputs(model, calib.input_ids)
    routing = stats["routing"]
    for layer in moe_layers(model):
        with torch.no_grad():
            _, weights, index = layer.router(inputs[layer.layer_idx])
        count = torch.zeros(layer.num_experts, dtype=torch.float64)
        weight_sum = torch.zeros(layer.num_experts, dtype=torch.float64)
        for t in range(index.shape[0]):
            for j in range(index.shape[1]):
                count[index[t, j]] += 1
                weight_sum[index[t, j]] += float(weights[t, j])
        assert torch.equal(routing.layer_tensor(layer.layer_idx, "count"), count)
        assert torch.allclose(routing.layer_tensor(layer.layer_idx, "weight_sum"), weight_sum, atol=1e-6)
