"""Engines (full, backward, sequential, offloaded), the statistics cache, data sources and the two CLI commands."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from cli_helpers import run_cli
from moecompress.calibration import engine
from moecompress.calibration.cache import load_stats, model_fingerprint
from moecompress.calibration.collectors import ChannelGrads, ReapSaliency, RoutingCounts
from moecompress.calibration.data import DataSpec, build_calibration, read_texts
from moecompress.calibration.engine import run_full, run_sequential
from moecompress.compress.moe import moe_layers
from moecompress.errors import UserError
from moecompress.recipes.run import gather_statistics, run
from moecompress.recipes.schema import CalibrationSpec, parse_recipe
from test_collectors import all_forward, calib_set, f64_model
from tiny_models import calibration_file, save_tiny, tiny_tokenizer


def assert_same_state(a, b, rtol=1e-10, atol=1e-12):
    for x, y in zip(a, b):
        assert x.name == y.name and sorted(x.state) == sorted(y.state), x.name
        for key in x.state:
            assert torch.allclose(x.state[key].double(), y.state[key].double(), rtol=rtol, atol=atol), \
                f"{x.name} {key}: {(x.state[key].double() - y.state[key].double()).abs().max()}"


@pytest.mark.parametrize("family", ["gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_sequential_equals_full(family):
    """Layer-wise with captured kwargs (GPT-OSS: sliding and full masks; DeepSeek: a dense first layer)."""
    model = f64_model(family)
    calib = calib_set()
    full, seq = all_forward(), all_forward()
    facts_full = run_full(model, calib, full, batch_size=2)
    facts_seq = run_sequential(model, calib, seq, batch_size=2)
    tol = dict(rtol=1e-5, atol=1e-8) if family.startswith("deepseek") else {}
    assert_same_state(full, seq, **tol)
    assert facts_seq["engine"] == "sequential" and facts_seq["routed_tokens"] == facts_full["routed_tokens"]


def test_sequential_and_full_from_disk_offload(tmp_path):
    """A model loaded with a disk-offload device_map (layer 1 on disk) gives the in-memory statistics."""
    from transformers import AutoModelForCausalLM

    path = save_tiny("qwen3_moe", tmp_path / "m")
    memory = AutoModelForCausalLM.from_pretrained(path).eval()
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(path, device_map=device_map,
                                                     offload_folder=str(tmp_path / "offload")).eval()
    assert offloaded.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"
    calib = calib_set()
    reference = all_forward()
    run_full(memory, calib, reference, batch_size=2)
    for runner in (run_sequential, run_full):
        got = all_forward()
        runner(offloaded, calib, got, batch_size=2)
        assert_same_state(reference, got, rtol=1e-5, atol=1e-6)
    assert offloaded.model.layers[1].mlp.experts.gate_up_proj.device.type == "meta"  # released again


def test_sequential_callback_compresses_before_propagating():
    calib = calib_set()
    model = f64_model("qwen3_moe")
    seen = []

    def silence_expert0(i, layer, moe, stats):
        seen.append((i, moe.layer_idx, sorted(stats)))
        if i == 0:
            with torch.no_grad():
                moe.experts.down_proj[0].zero_()

    seq = all_forward()
    run_sequential(model, calib, seq, batch_size=2, callback=silence_expert0)
    assert seen == [(0, 0, sorted(c.name for c in seq)), (1, 1, sorted(c.name for c in seq))]
    # layer 0 was observed before the change, layer 1 after it: compare with full passes on each model
    before, after = all_forward(), all_forward()
    run_full(f64_model("qwen3_moe"), calib, before, batch_size=2)
    run_full(model, calib, after, batch_size=2)  # model now has expert 0 silenced
    for s, b, a in zip(seq, before, after):
        for key in s.state:
            ref = b if key.startswith("0.") else a
            assert torch.allclose(s.state[key].double(), ref.state[key].double(), rtol=1e-10, atol=1e-12), key
    assert not torch.equal(before[1].state["1.gnorm_sum"], after[1].state["1.gnorm_sum"])


def test_gradient_collectors_need_the_full_engine():
    with pytest.raises(UserError, match="sequential engine is forward-only"):
        run_sequential(f64_model("olmoe"), calib_set(), [ChannelGrads()])


def test_backward_pass_sees_the_same_forward_statistics():
    """Forward collectors riding along a backward pass get exactly the forward-only numbers; params restored."""
    model = f64_model("mixtral")
    calib = calib_set()
    fwd, bwd = all_forward(), all_forward()
    run_full(model, calib, fwd, batch_size=2)
    facts = run_full(model, calib, bwd + [ChannelGrads(loss_reduction="mean")], batch_size=2)
    assert facts["engine"] == "backward"
    assert_same_state(fwd, bwd)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


# ----- cache ---------------------------------------------------------------------------------------------------
@pytest.fixture
def on_disk(tmp_path):
    model_dir = save_tiny("qwen3_moe", tmp_path / "model")
    data = calibration_file(tmp_path / "calib.txt")
    return model_dir, data


def _spec(data, **kw):
    return CalibrationSpec(source=str(data), samples=6, seq_len=24, **kw)


def test_cache_per_collector_reuse_superset_and_bypass(on_disk, caplog):
    from moecompress.compress.checkpoint import load

    model_dir, data = on_disk
    model, tok = load(model_dir), tiny_tokenizer()
    caplog.set_level(logging.INFO, logger="moecompress")
    passes = sum(engine.PASSES.values())
    first, facts = gather_statistics(model, tok, _spec(data), [RoutingCounts()])
    assert facts["computed"] == ["routing"] and sum(engine.PASSES.values()) == passes + 1
    stats, facts = gather_statistics(model, tok, _spec(data), [RoutingCounts(), ReapSaliency()])
    assert facts["cache_hits"] == ["routing"] and facts["computed"] == ["reap"]
    assert sum(engine.PASSES.values()) == passes + 2
    assert torch.equal(stats["routing"].counts(0), first["routing"].counts(0))
    stats, facts = gather_statistics(model, tok, _spec(data), [ReapSaliency(), RoutingCounts()])
    assert facts["computed"] == [] and facts["engine"] == "cache" and sum(engine.PASSES.values()) == passes + 2
    assert "statistics cache hit: reap, routing" in caplog.text
    assert facts["routed_tokens"]  # the routing report survives the cache
    # a different seed, other collector options, --no-cache, or changed weights: recomputed
    _, facts = gather_statistics(model, tok, _spec(data, seed=1), [RoutingCounts()])
    assert facts["computed"] == ["routing"]
    _, facts = gather_statistics(model, tok, _spec(data, cache=False), [RoutingCounts()])
    assert facts["computed"] == ["routing"]
    fp = model_fingerprint(model)
    with torch.no_grad():
        moe_layers(model)[0].experts.down_proj[3].mul_(0.5)
    assert model_fingerprint(model) != fp
    _, facts = gather_statistics(model, tok, _spec(data), [RoutingCounts()])
    assert facts["computed"] == ["routing"]
    assert sum(engine.PASSES.values()) == passes + 5


def test_two_methods_on_the_same_model_and_data_run_one_pass(on_disk, caplog):
    from moecompress.methods import base

    model_dir, data = on_disk

    class GatingScore(base.Method):  # a second method reading the same statistics as `frequency`
        name, kind, paper, summary = "test-gating", "expert-pruning", "-", "keep the largest Σ routing weight"

        def collectors(self):
            return [RoutingCounts()]

        def plan(self, model, stats, target, *args, **kwargs):
            routing = stats["routing"]
            scores = {i: routing.weight_sum(i) for i in routing.layers()}
            return base.ExpertPlan(keep=base.select_experts(model, scores, target))

    base._import_all()
    base.METHODS["test-gating"] = GatingScore
    caplog.set_level(logging.INFO, logger="moecompress")
    try:
        passes = sum(engine.PASSES.values())
        for method, ratio in [("frequency", 0.25), ("test-gating", 0.25), ("frequency", 0.5)]:
            recipe = parse_recipe({"model": str(model_dir), "calibration": {"source": str(data), "samples": 8,
                                                                            "seq_len": 32},
                                   "stages": [{"method": method, "ratio": ratio}]})
            result = run(recipe, dry_run=True)
            assert result.plans
        assert sum(engine.PASSES.values()) == passes + 1
        assert caplog.text.count("calibration pass:") == 1 and caplog.text.count("statistics cache hit:") == 2
    finally:
        base.METHODS.pop("test-gating", None)


# ----- data sources --------------------------------------------------------------------------------------------
def test_demos_source_appends_the_models_greedy_answers(on_disk, tmp_path, caplog):
    from moecompress.compress.checkpoint import load

    model_dir, _ = on_disk
    model, tok = load(model_dir), tiny_tokenizer()
    demos = tmp_path / "demos.jsonl"
    demos.write_text(json.dumps({"prompt": "The capital of Varnia is"}) + "\n\n"
                     + json.dumps({"prompt": "37 + 48 =", "max_new_tokens": 3}) + "\n")
    caplog.set_level(logging.INFO, logger="moecompress")
    texts = read_texts(f"demos:{demos}", tokenizer=tok, model=model, max_new_tokens=6)
    assert len(texts) == 2 and texts[0].startswith("The capital of Varnia is") and texts[1].startswith("37 + 48 =")
    ids = tok("37 + 48 =", add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                              do_sample=False, pad_token_id=tok.pad_token_id)
    assert texts[1] == "37 + 48 =" + tok.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert texts[1] != "37 + 48 ="
    assert read_texts(f"demos:{demos}", tokenizer=tok, model=model, max_new_tokens=6) == texts
    assert "demonstrations cache hit" in caplog.text
    calib = build_calibration(tok, DataSpec(source=f"demos:{demos}", samples=2, seq_len=8), model=model)
    assert calib.num_tokens > 0
    bad = tmp_path / "bad.jsonl"
    for content, message in [("{\"q\": 1}\n", "has no 'prompt'"), ("nope\n", "not valid JSON"),
                             ("{\"prompt\": \"x\", \"max_new_tokens\": 0}\n", "max_new_tokens")]:
        bad.write_text(content)
        with pytest.raises(UserError, match=message):
            read_texts(f"demos:{bad}", tokenizer=tok, model=model)
    with pytest.raises(UserError, match="needs the model"):
        read_texts(f"demos:{demos}", tokenizer=tok)
    with pytest.raises(UserError, match="does not exist"):
        read_texts(f"demos:{tmp_path / 'missing.jsonl'}", tokenizer=tok, model=model)


def test_jsonl_chat_messages_use_the_chat_template(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert read_texts(str(path), "messages", tok) == ["user: hi\nassistant: hello"]
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    assert read_texts(str(path), "messages", tok) == ["<user>hi<assistant>hello"]
    with pytest.raises(UserError, match="has no 'text' field"):
        read_texts(str(path), "text", tok)


def test_reference_source_calls_the_reference_corpus():
    from moecompress.reference import reference_texts

    assert read_texts("reference:facts") == reference_texts("facts", "train")
    with pytest.raises(UserError):
        read_texts("reference:nope")


def test_seeded_sampling_is_reproducible(on_disk):
    _, data = on_disk
    tok = tiny_tokenizer()
    a, b = (build_calibration(tok, DataSpec(source=str(data), samples=4, seq_len=16, seed=s)) for s in (7, 7))
    c = build_calibration(tok, DataSpec(source=str(data), samples=4, seq_len=16, seed=8))
    assert a.fingerprint == b.fingerprint and torch.equal(a.input_ids, b.input_ids)
    assert a.fingerprint != c.fingerprint


# ----- CLI -----------------------------------------------------------------------------------------------------
def test_cli_calibrate_writes_loadable_statistics(on_disk, tmp_path, capsys):
    model_dir, data = on_disk
    out = tmp_path / "stats"
    code, stdout, err = run_cli(capsys, "calibrate", model_dir, "--data", data, "--collect", "routing,reap,gram",
                                "--set", "gram.intermediate=true", "--samples", 6, "--seq-len", 24, "-o", out)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gram.json", "gram.safetensors", "reap.json", "reap.safetensors", "routing.json", "routing.safetensors",
         "summary.json"])
    stats = load_stats(out)
    assert stats["gram"].intermediate and stats["gram"].ata(0, 0).shape == (16, 16)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == int(stats["routing"].counts(0).sum()) // 2  # top-2
    # sequential engine, same numbers, from the cache-free path
    out2 = tmp_path / "stats2"
    code, _, err = run_cli(capsys, "calibrate", model_dir, "--data", data, "--collect", "routing", "--sequential",
                           "--no-cache", "--samples", 6, "--seq-len", 24, "-o", out2)
    assert code == 0, err
    assert torch.allclose(load_stats(out2)["routing"].counts(1), stats["routing"].counts(1))
    code, _, err = run_cli(capsys, "calibrate", model_dir, "--data", data, "--collect", "routing", "-o", out)
    assert code == 2 and "not empty" in err
    code, _, err = run_cli(capsys, "calibrate", model_dir, "--data", data, "--collect", "routing,nope", "-o",
                           tmp_path / "x")
    assert code == 2 and "unknown collector 'nope'" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "calibrate", model_dir, "--data", data, "--set", "reap.x=1", "-o", tmp_path / "y")
    assert code == 2 and "collector options" in err


def test_cli_analyze_writes_heatmap_report_and_json(on_disk, tmp_path, capsys):
    model_dir, data = on_disk
    out = tmp_path / "analysis"
    code, stdout, err = run_cli(capsys, "analyze", model_dir, "--data", data, "--samples", 6, "--seq-len", 24,
                                "-o", out)
    assert code == 0, err
    assert (out / "expert_usage.png").read_bytes()[:4] == b"\x89PNG"
    analysis = json.loads((out / "analysis.json").read_text())
    layer = analysis["layers"]["0"]
    assert layer["experts"] == 8 and sum(layer["routed_tokens"]) == 2 * layer["tokens"]
    assert 0 < layer["usage_entropy"] <= 1 and 0 < layer["router_entropy"] <= 1
    assert 1 <= layer["experts_for_share"]["50%"] <= layer["experts_for_share"]["90%"] <= 8
    assert "| layer | experts | never routed" in (out / "report.md").read_text()
    assert "layer   0: never routed" in stdout
    code, _, err = run_cli(capsys, "analyze", model_dir, "--data", tmp_path / "missing.txt", "-o", tmp_path / "z")
    assert code == 2 and "does not exist" in err
