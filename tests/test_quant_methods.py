"""Quantization methods end to end: GPTQ (sequential, per-expert Hessians), PMQ (costs, ILP, bit map), ODP
(runtime router stored in the checkpoint), bitsandbytes baselines, CLI validation and prune → quantize."""

import copy
import itertools
import json
import logging

import pytest
import torch

from cli_helpers import run_cli
from moecompress.calibration.collectors import BlockIO, RoutingCounts
from moecompress.calibration.data import build_calibration
from moecompress.calibration.engine import run_full
from moecompress.compress.checkpoint import MANIFEST, load, save
from moecompress.compress.moe import moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.quant.nf4 import BnbLinear
from moecompress.compress.quantize import expert_bits, quantize_experts
from moecompress.compress.routers import ODPRouter, odp_counts
from moecompress.errors import UserError
from moecompress.methods.pmq import PMQ, PMQConfig
from moecompress.recipes.run import run
from moecompress.recipes.schema import CalibrationSpec, parse_recipe
from tiny_models import FAMILIES, calibration_file, save_tiny, tiny_tokenizer, tokens

CALIB = dict(samples=16, seq_len=32, cache=False)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("quant")
    save_tiny("qwen3_moe", d / "m")
    calibration_file(d / "calib.txt")
    return d


def recipe(d, *stages, out=None):
    return parse_recipe({"model": str(d / "m"), "calibration": {"source": str(d / "calib.txt"), **CALIB},
                         "stages": list(stages), "output": {"path": str(out) if out else None}})


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens() if ids is None else ids).logits


def fp_block_io(d):
    """FP model, its block inputs/outputs per MoE layer and routing statistics on the calibration data."""
    model = load(d / "m")
    calib = build_calibration(tiny_tokenizer(), CalibrationSpec(source=str(d / "calib.txt"), **CALIB))
    stats = [RoutingCounts(), BlockIO(max_tokens=4096)]
    run_full(model, calib, stats)
    return model, {c.name: c for c in stats}


def layer_errors(model, bio):
    """‖block(X) − Z_fp‖_F per MoE layer on the FP block inputs X."""
    out = {}
    with torch.no_grad():
        for layer in moe_layers(model):
            x = bio.inputs(layer.layer_idx)
            out[layer.layer_idx] = float(torch.linalg.vector_norm(layer.reference_forward(x) - bio.outputs(layer.layer_idx)))
    return out


# ----- GPTQ ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_method_beats_rtn_on_layer_reconstruction(qwen_dir, sequential):
    _, stats = fp_block_io(qwen_dir)
    opts = {"group_size": 8}
    rtn = run(recipe(qwen_dir, {"method": "rtn", "bits": 3, "options": opts}), dry_run=True).model
    gptq = run(recipe(qwen_dir, {"method": "gptq", "bits": 3, "options": {**opts, "sequential": sequential}}),
               dry_run=True).model
    assert expert_bits(gptq) == expert_bits(rtn) == {0: [3] * 8, 1: [3] * 8}
    err_rtn, err_gptq = layer_errors(rtn, stats["block_io"]), layer_errors(gptq, stats["block_io"])
    for i in err_rtn:
        assert err_gptq[i] < 0.9 * err_rtn[i], (i, err_gptq, err_rtn)


def test_gptq_falls_back_to_rtn_below_min_tokens_with_a_warning(qwen_dir, caplog):
    opts = {"group_size": 8}
    rtn = run(recipe(qwen_dir, {"method": "rtn", "bits": 3, "options": opts}), dry_run=True)
    with caplog.at_level(logging.WARNING, logger="moecompress"):
        res = run(recipe(qwen_dir, {"method": "gptq", "bits": 3, "options": {**opts, "min_tokens": 10**6}}),
                  dry_run=True)
    assert "fell back to RTN" in caplog.text and "experts [0, 1, 2, 3, 4, 5, 6, 7]" in caplog.text
    assert res.plans[0].details["rtn_fallbacks"] == {"0": list(range(8)), "1": list(range(8))}
    assert torch.equal(logits(res.model), logits(rtn.model))  # same scheme as RTN, nothing left dense


# ----- PMQ ----------------------------------------------------------------------------------------------------
def brute_force_bits(cost, widths=(1, 2, 3), budget=20):
    best, arg = float("inf"), None
    for choice in itertools.product(range(len(widths)), repeat=cost.shape[0]):
        bits = [widths[k] for k in choice]
        if sum(bits) > budget or 3 not in bits or 2 not in bits:
            continue
        c = sum(float(cost[i, k]) for i, k in enumerate(choice))
        if c < best:
            best, arg = c, bits
    return best, arg


@torch.no_grad()
def test_pmq_costs_are_assembled_as_specified_and_ilp_matches_brute_force(qwen_dir):
    model, stats = fp_block_io(qwen_dir)
    method = PMQ(PMQConfig(group_size=8))
    st = method.statistics(model, stats)
    routing, bio = stats["routing"], stats["block_io"]
    for layer in moe_layers(model):
        i, n = layer.layer_idx, layer.num_experts
        phi, w, eps, how = st[i]
        x = bio.inputs(i)
        # φ = n_i / N over all calibration tokens
        assert torch.allclose(phi, routing.counts(i) / routing.tokens(i))
        # w = mean pre-renormalisation softmax probability of the selected experts (router recomputed by hand)
        probs = torch.softmax(x.double() @ layer.router_weight.double().T, dim=-1)
        top = torch.topk(probs, layer.top_k, dim=-1)
        w_ref = torch.zeros(n, dtype=torch.float64).index_add_(0, top.indices.reshape(-1), top.values.reshape(-1))
        assert how == "pre_norm" and torch.allclose(w, w_ref / len(x), atol=1e-6)
        # ε_{e,b} = ‖Z_fp − Z_{e→b}‖_F, Z = the whole block's output with only expert e RTN-quantized to b bits
        z_fp = layer.reference_forward(x)
        for e in range(n):
            for k, b in enumerate((1, 2, 3)):
                q = copy.deepcopy(model)
                quantize_experts(q, {i: [b if j == e else 16 for j in range(n)]}, group_size=8)
                z = moe_layers(q)[[l.layer_idx for l in moe_layers(q)].index(i)].reference_forward(x)
                ref = float(torch.linalg.vector_norm((z - z_fp).double()))
                assert abs(float(eps[e, k]) - ref) <= 1e-4 * ref + 1e-6, (i, e, b, float(eps[e, k]), ref)
    plan = method.plan(model, stats, type("T", (), {"bits": None, "avg_bits": 2.5})())
    for layer in moe_layers(model):
        phi, w, eps, _ = st[layer.layer_idx]
        cost = ((phi / phi.sum()) ** 1.0 * (w / w.sum()) ** 1.5)[:, None] * eps
        best, _ = brute_force_bits(cost)
        chosen = plan.bits[layer.layer_idx]
        got = sum(float(cost[e, (1, 2, 3).index(b)]) for e, b in enumerate(chosen))
        assert sum(chosen) <= 20 and 3 in chosen and 2 in chosen
        assert got == pytest.approx(best, rel=1e-9, abs=1e-15)
    assert plan.details["avg_bits_experts"] <= 2.5 and plan.quantizer == "gptq" and plan.sequential


def test_pmq_checkpoint_carries_the_bit_map_and_beats_uniform_2_bit(qwen_dir, tmp_path):
    _, stats = fp_block_io(qwen_dir)
    res = run(recipe(qwen_dir, {"method": "pmq", "avg_bits": 2.5, "options": {"group_size": 8}},
                     out=tmp_path / "pmq"))
    manifest = json.loads((tmp_path / "pmq" / MANIFEST).read_text())
    bits = {int(k): v for k, v in manifest["plans"][0]["bits"].items()}
    assert bits == expert_bits(res.model) == expert_bits(load(tmp_path / "pmq"))
    linears = manifest["structure"]["layers"]["0"]["linears"]
    assert [lin["gate_proj"]["bits"] for lin in linears] == bits[0]
    assert all(sum(v) <= 20 and 1 <= min(v) and max(v) == 3 for v in bits.values())
    from moecompress.evals.report import _plot_bits, size_facts

    facts = size_facts(load(tmp_path / "pmq"), tmp_path / "pmq")
    assert facts["expert_bits"] == [bits[0], bits[1]]
    assert _plot_bits(facts, tmp_path / "bits.png") and (tmp_path / "bits.png").stat().st_size > 0
    two = run(recipe(qwen_dir, {"method": "gptq", "bits": 2, "options": {"group_size": 8}}), dry_run=True).model
    err_pmq, err_two = layer_errors(res.model, stats["block_io"]), layer_errors(two, stats["block_io"])
    assert sum(err_pmq.values()) < sum(err_two.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["gptq", "pmq"])
def test_quantized_checkpoints_reload_with_identical_logits(family, method, tmp_path):
    save_tiny(family, tmp_path / "m")
    calibration_file(tmp_path / "calib.txt")
    options = {"group_size": 8, "attn_bits": 4}
    if method == "pmq" and family != "phimoe":
        options["odp"] = True
    stage = {"method": method, **({"bits": 3} if method == "gptq" else {"avg_bits": 2.5}), "options": options}
    res = run(recipe(tmp_path, stage, out=tmp_path / "q"))
    reloaded = load(tmp_path / "q")
    assert torch.equal(logits(reloaded), logits(res.model))
    assert expert_bits(reloaded) == expert_bits(res.model)
    assert all(isinstance(m, PackedLinear) for l in moe_layers(reloaded) for m in l.experts.modules()
               if hasattr(m, "bits"))


# ----- ODP ----------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_odp_thresholds_are_calibration_medians_and_persist(qwen_dir, tmp_path):
    model, stats = fp_block_io(qwen_dir)
    res = run(recipe(qwen_dir, {"method": "pmq", "avg_bits": 3.0,
                                "options": {"group_size": 8, "odp": True, "quantizer": "rtn"}}, out=tmp_path / "o"))
    plan = res.plans[0]
    for layer in moe_layers(model):
        w = layer.route(stats["block_io"].inputs(layer.layer_idx)).weights
        top = torch.sort(w, dim=-1, descending=True).values
        assert plan.dynamic[layer.layer_idx] == pytest.approx(float(torch.median(top[:, 1] / top[:, 0])), rel=1e-6)
    q = res.model
    assert all(isinstance(l.router, ODPRouter) for l in moe_layers(q))
    # on the calibration sample about half of the tokens drop their second expert (μ is the median)
    odp_counts(q, reset=True)
    with torch.no_grad():
        for layer in moe_layers(q):
            layer.block(stats["block_io"].inputs(layer.layer_idx)[None])
    for skipped, total in odp_counts(q).values():
        assert total == len(stats["block_io"].inputs(0)) and abs(skipped / total - 0.5) <= 0.02
    # the kept weight is renormalised: dropped tokens put their whole (renormalised) weight on expert 1
    layer = moe_layers(q)[0]
    x = stats["block_io"].inputs(0)
    _, w0, idx0 = layer.router.inner(x)
    _, w1, idx1 = layer.router(x)
    drop = (w1 == 0).any(-1)
    assert torch.equal(idx0, idx1) and drop.any() and torch.allclose(w1.sum(-1), w0.sum(-1))
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert manifest["structure"]["layers"]["0"]["router"] == "odp"
    reloaded = load(tmp_path / "o")
    assert isinstance(moe_layers(reloaded)[0].router, ODPRouter)
    assert torch.equal(logits(reloaded), logits(q))
    assert float(moe_layers(reloaded)[0].router.threshold) == pytest.approx(plan.dynamic[0], rel=1e-6)


# ----- bitsandbytes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,cls_bits", [("bnb-nf4", 4), ("bnb-int8", 8)])
def test_bnb_baselines_in_memory_and_refuse_to_save(qwen_dir, tmp_path, method, cls_bits):
    base = load(qwen_dir / "m")
    res = run(recipe(qwen_dir, {"method": method}), dry_run=True)
    q = res.model
    mods = [m for l in moe_layers(q) for mlp in l.experts for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    assert mods and all(isinstance(m, BnbLinear) and m.bits == cls_bits for m in mods)
    assert all(p.dtype in (torch.uint8, torch.int8) for m in mods for p in [m.inner.weight])  # really quantized
    for mod in mods[:3]:
        x = torch.randn(5, mod.in_features)
        for _ in range(2):  # int8 moves its scales on the first call: dense_weight must follow
            assert torch.allclose(mod(x), x @ mod.dense_weight().T, atol=1e-4, rtol=1e-3)
    # per-weight error: NF4 ≈ 4-bit, int8 ≪ that; the original weights come from the unquantized model
    ref = moe_layers(base)[0].expert_weights(0)
    got = moe_layers(q)[0].experts[0]
    for w, m in ((ref.gate, got.gate_proj), (ref.up, got.up_proj), (ref.down, got.down_proj)):
        rel = float(torch.linalg.vector_norm(m.dense_weight() - w) / torch.linalg.vector_norm(w))
        assert 0 < rel < (0.15 if cls_bits == 4 else 0.01), rel
    a, b = logits(q), logits(base)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    with pytest.raises(UserError, match="cannot be written"):
        save(q, tmp_path / "bnb")
    assert not (tmp_path / "bnb").exists()


# ----- CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["-m", "pmq", "--bits", 3], "--avg-bits"),
    (["-m", "pmq", "--avg-bits", 3.5], "outside"),
    (["-m", "gptq", "--avg-bits", 2.5], "--bits"),
    (["-m", "gptq"], "--bits"),
    (["-m", "rtn", "--bits", 9], "less than or equal to 8"),
    (["-m", "bnb-nf4", "--bits", 3], "4-bit only"),
    (["-m", "bnb-int8"], "in-memory"),
    (["-m", "frequency", "--bits", 3], "prune"),
])
def test_quantize_cli_validates_before_loading(qwen_dir, tmp_path, capsys, monkeypatch, args, needle):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("moecompress.recipes.run.load", boom)
    monkeypatch.setattr("moecompress.recipes.run.load_config", boom)
    code, out, err = run_cli(capsys, "quantize", qwen_dir / "m", *args, "-o", tmp_path / "q")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "q").exists()


def test_quantize_cli_pmq_and_bnb_dry_run(qwen_dir, tmp_path, capsys):
    data = ["--data", qwen_dir / "calib.txt", "--samples", 16, "--seq-len", 32, "--no-cache"]
    code, out, err = run_cli(capsys, "quantize", qwen_dir / "m", "-m", "pmq", "--avg-bits", 2.5, "--group-size", 8,
                             "--attn-bits", 4, *data, "-o", tmp_path / "q")
    assert code == 0, err
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert manifest["plans"][0]["other_bits"] == 4 and manifest["plans"][0]["details"]["avg_bits_experts"] <= 2.5
    code, out, err = run_cli(capsys, "quantize", qwen_dir / "m", "-m", "bnb-nf4", "--dry-run")
    assert code == 0, err and "bnb-nf4" in out


def test_prune_then_quantize_in_one_recipe(qwen_dir, tmp_path):
    res = run(recipe(qwen_dir, {"method": "frequency", "ratio": 0.25},
                     {"method": "pmq", "avg_bits": 2.5, "options": {"group_size": 8}}, out=tmp_path / "pq"))
    bits = expert_bits(res.model)
    assert all(len(v) == 6 and sum(v) <= 15 and 3 in v for v in bits.values())
    manifest = json.loads((tmp_path / "pq" / MANIFEST).read_text())
    assert [p["kind"] for p in manifest["plans"]] == ["experts", "bits"]
    reloaded = load(tmp_path / "pq")
    assert expert_bits(reloaded) == bits and torch.equal(logits(reloaded), logits(res.model))
