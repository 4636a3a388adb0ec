"""Offline lm-eval tasks, evaluate() on the tiny reference model, reports."""

from __future__ import annotations

import json
import math

import pytest

from moecompress.errors import UserError
from moecompress.evals import reference_tasks as rt
from moecompress.evals.lmeval import evaluate, parse_tasks, summarize, task_manager
from moecompress.evals.report import compare_reports, pareto_front, recovery, size_facts, write_report
from moecompress.reference import DOMAINS, corpus


def test_task_items_sizes_and_heldout(reference_env):
    for dom in DOMAINS:
        test, val, train = (rt.mc_items(dom, s) for s in ("test", "validation", "train"))
        assert len(test) >= 400 and len(val) >= 200 and len(train) >= 200, dom
        for it in test[:50]:
            assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
            assert 0 <= it["label"] < 4
        # disjoint splits
        key = lambda it: (it["context"], it["choices"][it["label"]])  # noqa: E731
        assert not {key(i) for i in test} & {key(i) for i in val}
        assert not {key(i) for i in test} & {key(i) for i in train}
        # the answer position is not a giveaway
        labels = [it["label"] for it in test]
        assert max(labels.count(k) for k in range(4)) < 0.4 * len(labels)
    # held-out items never appear verbatim in the training text
    for dom in ("prose", "technical", "facts"):
        train_text = "\n".join(corpus.documents(dom, "train"))
        for it in rt.mc_items(dom, "test")[:150]:
            assert f"{it['context']} {it['choices'][it['label']]}" not in train_text, (dom, it)
    assert rt.mc_items("arithmetic", "test") == rt.mc_items("arithmetic", "test")  # deterministic


def test_tasks_register_with_lm_eval(reference_env):
    tm = task_manager(["reference"])
    for name in rt.all_names():
        assert name in tm.all_tasks
    assert set(rt.group_names()) <= set(tm.all_groups)
    loaded = tm.load(["reference_arithmetic"])["tasks"]
    (task,) = loaded.values()
    docs = list(task.test_docs())
    assert len(docs) == rt.task_stats()["reference_arithmetic/test"]
    answer = task.doc_to_choice(docs[0])[task.doc_to_target(docs[0])].rstrip(".").split(" = ")[-1]
    assert answer == str(eval(docs[0]["context"].rstrip(":")))  # "37 + 48:" -> "..., so 37 + 48 = 85."
    # the task files live in the session's MOECOMPRESS_HOME
    assert str(reference_env) in str(rt.tasks_dir())


def test_parse_tasks_and_unknown_task(reference_env):
    assert parse_tasks("reference, reference_mc,reference") == ["reference", "reference_mc"]
    assert parse_tasks(["reference_prose"]) == ["reference_prose"]
    with pytest.raises(UserError):
        parse_tasks(" , ")
    with pytest.raises(UserError, match="unknown lm-eval task"):
        task_manager(["reference", "no_such_task_xyz"])


def test_evaluate_tiny_all_reference_tasks(tiny_reference_model, reference_env):
    model, tok = tiny_reference_model
    res = evaluate(model, tok, "reference", limit=8, batch_size=8)
    assert "results" in res and "configs" in res and "n-samples" in res  # raw lm-eval output, whole
    s = summarize(res)
    for dom in DOMAINS:
        acc = s[rt.mc_task(dom)]["acc"]
        assert 0.0 <= acc <= 1.0
        ppl = s[rt.ppl_task(dom)]
        assert math.isfinite(ppl["word_perplexity"]) and ppl["word_perplexity"] > 1.0
        assert 0 < ppl["bits_per_byte"] < 8
    assert res["n-samples"][rt.mc_task("prose")]["effective"] == 8
    assert not model.training


def test_size_facts_tiny(tiny_reference_model, tiny_reference, tmp_path):
    model, _ = tiny_reference_model
    f = size_facts(model, tiny_reference)
    cfg = model.config
    per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert f["parameters_routed_experts"] == cfg.num_hidden_layers * cfg.num_experts * per_expert
    assert f["parameters_total"] == sum(p.numel() for p in model.parameters())
    assert f["parameters_non_expert"] == f["parameters_total"] - f["parameters_routed_experts"]
    assert f["experts_per_layer"] == [cfg.num_experts] * cfg.num_hidden_layers
    assert f["weight_bytes_on_disk"] >= 4 * f["parameters_total"] * 0.99
    assert f["manifest"] is False
    # a manifest with bit widths is read, tolerantly
    (tmp_path / "moecompress.json").write_text(json.dumps({"format_version": 1, "summary": {"avg_bits": 2.5}}))
    g = size_facts(model, tmp_path)
    assert g["manifest"] is True and g["bits"] == {"summary.avg_bits": 2.5}
    with pytest.raises(UserError):
        size_facts(model, tmp_path / "missing")


def _fake_results(acc: float, ppl: float) -> dict:
    return {
        "results": {
            "reference_prose": {"alias": "reference_prose", "acc,none": acc, "acc_stderr,none": 0.02, "acc_norm,none": acc},
            "reference_prose_ppl": {"word_perplexity,none": ppl, "word_perplexity_stderr,none": "N/A", "bits_per_byte,none": 1.5},
        },
        "higher_is_better": {"reference_prose": {"acc": True, "acc_norm": True},
                             "reference_prose_ppl": {"word_perplexity": False, "bits_per_byte": False}},
        "configs": {"reference_prose": {"task": "reference_prose"}},
    }


def test_write_and_compare_reports(tmp_path):
    base_facts = {"parameters_total": 1000, "parameters_routed_experts": 800, "experts_per_layer": [8, 8],
                  "weight_bytes_on_disk": 4000}
    small_facts = {"parameters_total": 600, "parameters_routed_experts": 400, "experts_per_layer": [4, 4],
                   "weight_bytes_on_disk": 2400}
    base = write_report(tmp_path / "base", _fake_results(0.8, 10.0), base_facts, title="base")
    comp = write_report(tmp_path / "pruned", _fake_results(0.6, 20.0), small_facts, baseline=base, title="pruned")
    rep = json.loads((comp / "report.json").read_text())
    assert rep["results"] == _fake_results(0.6, 20.0)  # raw results whole
    assert rep["baseline"] == _fake_results(0.8, 10.0) and rep["facts"] == small_facts
    rows = {(r["task"], r["metric"]): r for r in rep["summary"]}
    assert rows[("reference_prose", "acc")]["recovery"] == pytest.approx(0.75)
    assert rows[("reference_prose_ppl", "word_perplexity")]["recovery"] == pytest.approx(0.5)  # lower is better
    md = (comp / "report.md").read_text()
    assert "| reference_prose | acc | 0.6000 | 0.0200 | 0.8000 | 0.750 | 0.25 |" in md
    for png in ("experts_per_layer.png", "recovery.png"):
        assert (comp / png).read_bytes()[:4] == b"\x89PNG"
    assert not list(comp.glob(".*tmp"))  # atomic writes leave nothing behind
    out = compare_reports([base, comp], tmp_path / "cmp")
    table = (out / "comparison.md").read_text()
    assert "| base |" in table and "| pruned |" in table and "0.750" in table
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(UserError):
        compare_reports([tmp_path / "nothing"], tmp_path / "cmp2")


def test_recovery_and_pareto_helpers():
    assert recovery(0.5, 1.0, True) == 0.5 and recovery(20.0, 10.0, False) == 0.5
    assert recovery(None, 1.0, True) is None and recovery(float("nan"), 1.0, True) is None
    pts = [(10, 0.9), (5, 0.8), (7, 0.7), (12, 0.85), (3, 0.5)]
    assert pareto_front(pts) == [4, 1, 0]


def test_size_facts_counts_packed_low_bit_weights():
    import torch
    from torch import nn

    from moecompress.evals.report import _tensor_bytes

    class FakePacked(nn.Module):  # the shape of compress.quant.linear.PackedLinear: weights in buffers
        def __init__(self, inf, outf, bits):
            super().__init__()
            self.in_features, self.out_features, self.bits = inf, outf, bits
            self.register_buffer("weight_packed", torch.zeros(outf, inf * bits // 32, dtype=torch.int32))

    m = nn.Sequential(FakePacked(64, 32, 2), nn.Linear(8, 8, bias=False))
    n, b, bits = _tensor_bytes(m)
    assert n == 64 * 32 + 64
    assert b == 32 * 4 * 4 + 64 * 4
    assert bits / n == pytest.approx((64 * 32 * 2 + 64 * 32) / n)
