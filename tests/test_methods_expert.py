"""Expert-pruning methods: one row per method. Each plan respects the target on every family, its checkpoint reloads
with identical logits, and its scores match a brute-force computation from the stock modules."""

import pytest
import torch

from moecompress.compress.checkpoint import load, save
from moecompress.compress.moe import moe_layers
from moecompress.errors import UserError
from moecompress.methods.base import Target, apply_plan, get_method
from moecompress.recipes.run import gather_statistics, run_method
from moecompress.recipes.schema import CalibrationSpec
from tiny_models import FAMILIES, calibration_file, tiny_model, tiny_tokenizer

METHODS = [("random", {}), ("frequency", {}), ("gating", {}), ("gating", {"signal": "prob"}), ("reap", {}),
           ("reap", {"criterion": "ean"}), ("easy_ep", {}), ("easy_ep", {"deploy": "masked"}),
           ("easy_ep", {"deploy": "no_reroute"}), ("easy_ep", {"hidden": "block_input"}),
           ("naee", {"max_tokens": 64}), ("naee", {"max_tokens": 64, "max_subsets": 10, "samples": 12})]


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
    if family == "phimoe" and options.get("deploy") == "masked":
        with pytest.raises(UserError, match="sparsemixer"):
            apply_plan(model, plan_for(model, method, options, Target(ratio=0.5), tmp_path)[0])
        return
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


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_reap_renormalize_switches_norm_topk_prob(family, tmp_path):
    model = tiny_model(family, norm_topk_prob=False)
    plan, stats = plan_for(model, "reap", {"renormalize": True}, Target(ratio=0.25), tmp_path)
    saliency = stats["reap"].saliency(moe_layers(model)[0].layer_idx)
    assert plan.scores[moe_layers(model)[0].layer_idx] == saliency.tolist()
    apply_plan(model, plan)
    assert model.config.norm_topk_prob and all(l.router.norm_topk_prob for l in moe_layers(model))
    reloaded = load(save(model, tmp_path / "out"))
    assert reloaded.config.norm_topk_prob


def test_easy_ep_mixed_domains_normalise_then_sum(tmp_path):
    """Mixed-domain scores = Σ_domains (per-layer score / its sum), each domain from its own calibration pass."""
    model = tiny_model("qwen3_moe")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("37 + 48 = 85. 12 * 7 = 84. 9 - 3 = 6.\n\n" * 20)
    b.write_text("In the beginning was the word, and the word was with the model.\n\n" * 20)
    per_domain = []
    for src in (a, b):
        m = get_method("easy_ep")()
        spec = CalibrationSpec(source=str(src), samples=4, seq_len=24)
        stats, _ = gather_statistics(model, tiny_tokenizer(), spec, m.collectors())
        per_domain.append(stats["easy_ep"])
    method = get_method("easy_ep")(get_method("easy_ep").Config(domains=[str(a), str(b)]))
    plan, result = run_method(model, tiny_tokenizer(), method, Target(keep=4), CalibrationSpec(samples=4, seq_len=24),
                              plan_only=True)
    assert [c["source"] for c in result.calibration] == [str(a), str(b)]
    for layer in moe_layers(model):
        i = layer.layer_idx
        want = sum(d.score(i) / d.score(i).sum() for d in per_domain)
        assert torch.allclose(torch.tensor(plan.scores[i], dtype=torch.float64), want.double())
        assert sorted(plan.keep[i]) == sorted(torch.argsort(want, descending=True)[:4].tolist())


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_naee_choice_is_the_brute_force_minimiser(family, tmp_path):
    """Apply every candidate subset to a copy of the model and measure the block error directly: NAEE's pick wins."""
    import copy
    import itertools

    from moecompress.compress.surgery import keep_experts

    model = tiny_model(family)
    plan, stats = plan_for(model, "naee", {"max_tokens": 48}, Target(keep=4), tmp_path)
    layer = moe_layers(model)[0]
    x, y = stats["block_io"].inputs(layer.layer_idx), stats["block_io"].outputs(layer.layer_idx)
    errors = {}
    groups = [range(0, 4), range(4, 8)] if family == "deepseek_v3" else [range(8)]
    per = 4 // len(groups)
    for parts in itertools.product(*(itertools.combinations(g, per) for g in groups)):
        subset = sorted(e for p in parts for e in p)
        pruned = copy.deepcopy(model)
        keep_experts(pruned, {layer.layer_idx: subset})
        with torch.no_grad():
            out = moe_layers(pruned)[0].block(x[None])
        out = out[0] if isinstance(out, tuple) else out
        errors[tuple(subset)] = float(torch.linalg.norm(out[0].double() - y.double()))
    best = min(errors, key=errors.get)
    assert plan.keep[layer.layer_idx] == list(best)
    assert abs(plan.scores[layer.layer_idx][0] - errors[best]) < 1e-4 * max(1.0, errors[best])
