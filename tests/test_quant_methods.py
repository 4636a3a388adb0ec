"""Quantization methods end to end: GPTQ (sequential, per-expert Hessians), PMQ (costs, ILP, bit map), ODP
(runtime router stored in the checkpoint), bitsandbytes baselines, CLI validation and prune → quantize."""

import copy
import itertools
import json
import math
import logging

import pytest
import torch

from cli_helpers import run_cli
from moecompress.calibration.collectors import BlockIO, RoutingCounts
from moecompress.calibration.data import build_calibration
from moecompress.calibration.engine import run_full
from moecompress.compress.checkpoint import MANIFEST, load, save
from moecompress.compress.moe import instrumented, moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.quant.nf4 import BnbLinear
from moecompress.compress.quantize import expert_bits, quantize_experts
from moecompress.compress.routers import ODPRouter, install_odp, odp_counts
from moecompress.errors import UserError
from moecompress.methods.pmq import PMQ, PMQConfig
from moecompress.recipes.run import run
from moecompress.recipes.schema import CalibrationSpec, parse_recipe
from tiny_models import FAMILIES, calibration_file, save_tiny, tiny_model, tiny_tokenizer, tokens

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
    assert plan.dynamic_protect_ratio == manifest["structure"]["layers"]["0"]["odp"]["protect_ratio"] == 0.02
    reloaded = load(tmp_path / "o")
    assert isinstance(moe_layers(reloaded)[0].router, ODPRouter)
    assert moe_layers(reloaded)[0].router.protect_ratio == 0.02 and moe_layers(reloaded)[0].router.attached
    assert torch.equal(logits(reloaded), logits(q))
    assert float(moe_layers(reloaded)[0].router.threshold) == pytest.approx(plan.dynamic[0], rel=1e-6)


# ----- ODP important-token protection -------------------------------------------------------------------------
ODP_FAMILIES = [f for f in FAMILIES if f != "phimoe"]  # Phi-MoE's sparsemixer router is refused by ODP


def padded_batch():
    """Three sequences of 12 positions: full, left-padded by 3, right-padded by 2."""
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    return tokens(3, 12), mask


def odp_model(base, mu, protect):
    model = copy.deepcopy(base)
    install_odp(model, {layer.layer_idx: mu for layer in moe_layers(model)}, protect_ratio=protect)
    return model


def capture(model, ids, mask, **kwargs):
    """Logits, and per ODP layer the router's (input, weights) of one forward."""
    seen, hooks = {}, []
    for layer in moe_layers(model):
        hooks.append(layer.router.register_forward_hook(
            lambda mod, args, out, i=layer.layer_idx: seen.__setitem__(i, (args[0], out[1]))))
    with torch.no_grad():
        out = model(ids, attention_mask=mask, **kwargs)
    for h in hooks:
        h.remove()
    return out, seen


def brute_force_importance(base, ids, mask):
    """I_j = ‖t_j‖₁ · Σ_{i≥j} A_{i,j} / (L − j) per MoE layer, by loops over real tokens, from the eager attention
    probabilities that `output_attentions` returns on a copy of the stock model run eagerly."""
    ref = copy.deepcopy(base)
    ref.set_attn_implementation("eager")
    inputs, hooks = {}, []
    for layer in moe_layers(ref):
        hooks.append(layer.block.register_forward_pre_hook(
            lambda mod, args, i=layer.layer_idx: inputs.__setitem__(i, args[0])))
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, output_attentions=True)
    for h in hooks:
        h.remove()
    result = {}
    for i, x in inputs.items():
        a = out.attentions[i].double().mean(1)  # [B, q, kv], averaged over heads
        imp = torch.full(ids.shape, float("-inf"), dtype=torch.float64)
        for b in range(ids.shape[0]):
            real = mask[b].nonzero().flatten().tolist()
            for r, j in enumerate(real):
                column = sum(float(a[b, k, j]) for k in real if k >= j)  # attention that j receives
                imp[b, j] = float(x[b, j].double().abs().sum()) * column / (len(real) - r)
        result[i] = imp
    return result


def brute_force_top(imp, mask, ratio):
    top = torch.zeros(mask.shape, dtype=torch.bool)
    for b in range(mask.shape[0]):
        real = mask[b].nonzero().flatten().tolist()
        k = math.ceil(ratio * len(real) - 1e-9)
        top[b, sorted(real, key=lambda j: -float(imp[b, j]))[:k]] = True
    return top


@pytest.mark.parametrize("family", ODP_FAMILIES)
def test_odp_importance_is_the_attention_column_sum_and_eager_layers_match_sdpa(family):
    base = tiny_model(family)
    ids, mask = padded_batch()
    expected = brute_force_importance(base, ids, mask)
    odp = odp_model(base, 0.0, 0.25)  # μ = 0: nothing dropped, so every layer sees the stock hidden states
    out, _ = capture(odp, ids, mask)
    for layer in moe_layers(odp):
        i, router = layer.layer_idx, layer.router
        got = router.last_importance.double()
        assert torch.equal(got.isinf(), mask == 0)  # padding is never a candidate
        real = mask.bool()
        assert torch.allclose(got[real], expected[i][real], rtol=1e-4, atol=1e-7), (i, got, expected[i])
        # the protected tokens are exactly the top ⌈0.25·L⌉ real tokens by I_j (L = 12, 9, 10 → 3 each)
        assert torch.equal(router.last_protected, brute_force_top(expected[i], mask, 0.25))
        assert router.last_protected.sum(-1).tolist() == [3, 3, 3]
    # the ODP layers run eager at prefill, the others keep sdpa: logits match the stock model's, and each
    # attention module is back on the model's own config
    with torch.no_grad():
        stock = base(ids, attention_mask=mask).logits
    assert base.config._attn_implementation == odp.config._attn_implementation
    assert torch.allclose(out.logits[mask.bool()], stock[mask.bool()], atol=1e-5)
    assert all(layer.self_attn.config is odp.config for layer in odp.model.layers)
    # the reference (instrumented) forward sees the same protection
    class Quiet:
        def on_expert(self, *a): ...
        def on_block(self, *a): ...

    with instrumented(odp, Quiet()):
        instr, _ = capture(odp, ids, mask)
    assert torch.allclose(instr.logits[mask.bool()], stock[mask.bool()], atol=1e-5)


@pytest.mark.parametrize("family", ODP_FAMILIES)
def test_odp_protected_tokens_keep_both_experts_and_the_ratio_rule_drops_the_rest(family):
    base = tiny_model(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        stock = base(ids, attention_mask=mask).logits
    # μ = 1 drops every second expert the protection does not keep
    odp = odp_model(base, 1.0, 0.25)
    out, seen = capture(odp, ids, mask)
    for layer in moe_layers(odp):
        _, weights = seen[layer.layer_idx]
        dropped = (weights == 0).any(-1).view(mask.shape)
        assert torch.equal(dropped, ~layer.router.last_protected)
        assert layer.router.protected_tokens == 9 and layer.router.skipped == 36 - 9
    # the first MoE layer sees stock hidden states: its protected set is the brute-force top-k
    first = moe_layers(odp)[0]
    top = brute_force_top(brute_force_importance(base, ids, mask)[first.layer_idx], mask, 0.25)
    assert torch.equal(first.router.last_protected, top)
    # protect everything: no real token drops at prefill, so real tokens get the output of μ = 0 (same attention
    # path; padded positions are never protected, and no real token attends to them). Not bitwise: padded tokens
    # do drop at μ = 1, so from the next MoE layer on they route elsewhere, the experts' per-expert GEMMs (grouped_mm
    # or eager) then hold other row counts, and CPU sgemm rounds a row differently with the row count (~1e-7 fp32).
    everything, seen = capture(odp_model(base, 1.0, 1.0), ids, mask)
    assert all(torch.equal((w == 0).any(-1).view(mask.shape), mask == 0) for _, w in seen.values())
    real = mask.bool()
    torch.testing.assert_close(everything.logits[real],
                               capture(odp_model(base, 0.0, 1.0), ids, mask)[0].logits[real], rtol=1e-5, atol=1e-6)
    assert torch.allclose(everything.logits[mask.bool()], stock[mask.bool()], atol=1e-5)
    # protect nothing: exactly the ratio rule, with the model's own attention (no capture)
    plain = odp_model(base, 1.0, 0.0)
    ratio_only, seen = capture(plain, ids, mask)
    for layer in moe_layers(plain):
        x, weights = seen[layer.layer_idx]
        _, w, _ = layer.router.inner(x)
        top2 = torch.topk(w, 2, dim=-1)
        expected = w.clone()
        expected[torch.arange(len(w)), top2.indices[:, 1]] = 0.0
        expected = expected * (w.sum(-1, keepdim=True) / expected.sum(-1, keepdim=True))
        assert torch.allclose(weights, expected, atol=1e-6)
        assert layer.router.last_importance is None and layer.router.protected_tokens == 0
    for layer in moe_layers(plain):
        layer.router.detach()  # the hooks are inert at protect_ratio 0
    assert torch.equal(ratio_only.logits, capture(plain, ids, mask)[0].logits)
    assert not torch.allclose(ratio_only.logits, everything.logits, atol=1e-4)


@pytest.mark.parametrize("family", ODP_FAMILIES)
def test_odp_decode_uses_the_ratio_rule_alone(family):
    base = tiny_model(family)
    ids, mask = padded_batch()
    odp = odp_model(base, 1.0, 1.0)
    out, _ = capture(odp, ids, mask, use_cache=True)
    step = torch.tensor([[5], [7], [11]])
    step_mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
    for layer in moe_layers(odp):
        assert layer.router.protected_tokens == 31  # the prefill protected every real token ...
        layer.router.reset_counts()
    protected, seen = capture(odp, step, step_mask, cache=copy.deepcopy(out.cache))
    for layer in moe_layers(odp):  # ... the decode step protects none: every second expert is dropped
        assert layer.router.protected_tokens == 0 and layer.router.skipped == 3
        assert (seen[layer.layer_idx][1] == 0).any(-1).all()
        layer.router.protect_ratio = 0.0
    ratio_only, _ = capture(odp, step, step_mask, cache=copy.deepcopy(out.cache))
    assert torch.equal(protected.logits, ratio_only.logits)
    assert all(layer.self_attn.config is odp.config for layer in odp.model.layers)
    # greedy generation with nothing dropped equals the stock model's (eager prefill on ODP layers, sdpa decode)
    with torch.no_grad():
        kwargs = dict(attention_mask=mask[:2, :], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert torch.equal(odp_model(base, 0.0, 0.5).generate(ids[:2], **kwargs), base.generate(ids[:2], **kwargs))


@pytest.mark.parametrize("family", ODP_FAMILIES)
def test_odp_protection_is_saved_and_reloaded(family, tmp_path):
    base = tiny_model(family)
    ids, mask = padded_batch()
    mu = 0.6
    odp = odp_model(base, mu, 0.25)
    save(odp, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    layers = manifest["structure"]["layers"]
    assert all(entry["odp"] == {"threshold": pytest.approx(mu), "renormalize": True, "protect_ratio": 0.25}
               for entry in layers.values())
    reloaded = load(tmp_path / "q")
    assert all(layer.router.protect_ratio == 0.25 and layer.router.attached for layer in moe_layers(reloaded))
    got, want = capture(reloaded, ids, mask)[0].logits, capture(odp, ids, mask)[0].logits
    assert torch.equal(got, want)
    assert all(bool(layer.router.last_protected.any()) for layer in moe_layers(reloaded))
    unprotected = capture(odp_model(base, mu, 0.0), ids, mask)[0].logits
    assert not torch.allclose(got, unprotected, atol=1e-5)  # the protection changes this model's output
    # manifests written before the protection existed reload without it (the behaviour they were saved with)
    for entry in layers.values():
        del entry["odp"]["protect_ratio"]
    (tmp_path / "q" / MANIFEST).write_text(json.dumps(manifest))
    old = load(tmp_path / "q")
    assert all(layer.router.protect_ratio == 0.0 for layer in moe_layers(old))
    assert torch.equal(capture(old, ids, mask)[0].logits, unprotected)


def test_odp_protect_ratio_is_validated_and_carried_by_pmq_plans():
    base = tiny_model("qwen3_moe")
    with pytest.raises(UserError, match="protect ratio"):
        install_odp(copy.deepcopy(base), {0: 0.5}, protect_ratio=1.5)
    assert PMQConfig().odp_protect_ratio == 0.02
    with pytest.raises(ValueError):
        PMQConfig(odp_protect_ratio=-0.1)


# ----- bitsandbytes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,cls_bits", [("bnb-nf4", 4), ("bnb-int8", 8)])
def test_bnb_baselines_quantize_and_save(qwen_dir, tmp_path, method, cls_bits):
    base = load(qwen_dir / "m")
    res = run(recipe(qwen_dir, {"method": method}, out=tmp_path / "bnb"))
    q = res.model
    mods = [m for l in moe_layers(q) for mlp in l.experts for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    assert mods and all(isinstance(m, BnbLinear) and m.bits == cls_bits and not m.training for m in mods)
    assert all(p.dtype in (torch.uint8, torch.int8) for m in mods for p in [m.inner.weight])  # really quantized
    for mod in mods[:3]:
        x = torch.randn(5, mod.in_features)
        for _ in range(2):  # int8 moves its scales on the first call: dense_weight must follow
            y, ref = mod(x), x @ mod.dense_weight().T
            if cls_bits == 4:
                assert torch.allclose(y, ref, atol=1e-4, rtol=1e-3)
            else:  # eval mode: LLM.int8 quantizes the activations row-wise too
                assert float(torch.linalg.vector_norm(y - ref) / torch.linalg.vector_norm(ref)) < 2e-2
    # per-weight error: NF4 ≈ 4-bit, int8 ≪ that; the original weights come from the unquantized model
    ref = moe_layers(base)[0].expert_weights(0)
    got = moe_layers(q)[0].experts[0]
    for w, m in ((ref.gate, got.gate_proj), (ref.up, got.up_proj), (ref.down, got.down_proj)):
        rel = float(torch.linalg.vector_norm(m.dense_weight() - w) / torch.linalg.vector_norm(w))
        assert 0 < rel < (0.15 if cls_bits == 4 else 0.01), rel
    a, b = logits(q), logits(base)
    assert torch.isfinite(a).all() and not torch.equal(a, b)
    reloaded = load(tmp_path / "bnb")
    assert expert_bits(reloaded) == expert_bits(q) == {0: [cls_bits] * 8, 1: [cls_bits] * 8}
    assert torch.equal(logits(reloaded), a)


# ----- CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["-m", "pmq", "--bits", 3], "--avg-bits"),
    (["-m", "pmq", "--avg-bits", 3.5], "outside"),
    (["-m", "gptq", "--avg-bits", 2.5], "--bits"),
    (["-m", "gptq"], "--bits"),
    (["-m", "rtn", "--bits", 9], "less than or equal to 8"),
    (["-m", "bnb-nf4", "--bits", 3], "4-bit only"),
    (["-m", "bnb-int8", "--group-size", 64], "fixed block layout"),
    (["-m", "frequency", "--bits", 3], "prune"),
])
def test_quantize_cli_validates_before_loading(qwen_dir, tmp_path, capsys, monkeypatch, args, needle):
    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("moecompress.recipes.run.hold", boom)
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
