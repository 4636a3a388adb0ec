"""The embedded default: corpus, tokenizer, reference model build."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moecompress.errors import UserError
from moecompress.reference import (
    DOMAINS,
    REFERENCE_NAMES,
    corpus,
    parse_reference_data,
    reference_path,
    reference_texts,
)

# ------------------------------------------------------------------------------------------------ corpus


def test_corpus_is_deterministic_across_interpreters():
    code = "from moecompress.reference import corpus; print(corpus.fingerprint())"
    outs = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    assert len(outs) == 1
    assert outs.pop().strip() == corpus.fingerprint()


def test_corpus_domains_splits_and_sizes():
    for dom in DOMAINS:
        train = corpus.documents(dom, "train")
        test = corpus.documents(dom, "test")
        val = corpus.documents(dom, "validation")
        assert len(train) > 100 and len(test) > 10 and len(val) > 10, dom
        assert not set(test) & set(train) and not set(val) & set(train), dom
    prose = " ".join(corpus.documents("prose", "train")[:3])
    assert "God" in prose and "1:1" not in prose  # verse numbers stripped
    assert "exception" in " ".join(corpus.documents("technical", "train"))


def test_arithmetic_heldout_triples_never_in_training():
    train_text = "\n".join(corpus.documents("arithmetic", "train"))
    train_lines = set(train_text.split("\n"))
    eqs = corpus._equations()
    for eq in eqs["test"][:300]:
        assert eq.text not in train_lines
    assert sum(eq.text in train_lines for eq in eqs["train"][:300]) > 250  # training triples do occur
    for line in sorted(train_lines)[:200]:
        problem, rest = line.split(": ")
        *steps, final = rest.rstrip(".").split(", ")
        lhs, rhs = final.removeprefix("so ").split(" = ")
        assert lhs == problem and eval(lhs) == int(rhs)  # exact answers
        for step in steps:  # every worked digit step is right
            left, right = step.split(" = ")
            assert eval(left) == int(right), line


def test_arithmetic_mc_distractors_are_consistent_wrong_solutions():
    from moecompress.evals import reference_tasks as rt

    for it in rt.mc_items("arithmetic", "test")[:200]:
        a, op, b = it["context"].rstrip(":").split()
        answers = []
        for choice in it["choices"]:
            *steps, final = choice.rstrip(".").split(", ")
            answers.append(int(final.split(" = ")[1]))
            wrong_steps = sum(eval(s.split(" = ")[0]) != int(s.split(" = ")[1]) for s in steps)
            assert wrong_steps == (0 if choice == it["choices"][it["label"]] else 1), it
        assert answers[it["label"]] == eval(f"{a} {op} {b}")
        assert len(set(answers)) == 4  # every wrong solution ends in a different, wrong answer


def test_facts_probe_phrasings_are_held_out():
    w = corpus.world()
    assert len(w.countries) == corpus.N_COUNTRIES == len(set(w.countries))
    train = "\n".join(corpus.documents("facts", "train"))
    for f in w.facts[:200]:
        assert f.sentence(f.probe_template) not in train  # never in this phrasing
        assert f.entity in train and f.value in train
    test_docs = "\n".join(corpus.documents("facts", "test"))
    tf = [f for f in w.facts if w.split[(f.entity, f.attribute)] == "test"]
    assert all(f.sentence(f.probe_template) in test_docs for f in tf[:100])


def test_reference_texts_and_data_spec():
    mixed = reference_texts(None, "train")
    assert mixed[:4] == [corpus.documents(d, "train")[0] for d in DOMAINS]  # round-robin over domains
    assert reference_texts("facts", "validation") == corpus.documents("facts", "validation")
    assert parse_reference_data("reference") == (None, "train")
    assert parse_reference_data("reference:arithmetic") == ("arithmetic", "train")
    assert parse_reference_data("reference:prose:test") == ("prose", "test")
    for bad in ("reference:poetry", "reference:prose:dev", "wikitext"):
        with pytest.raises(UserError):
            parse_reference_data(bad)
    with pytest.raises(UserError):
        reference_texts("nope", "train")


# --------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_deterministic_and_standard(tmp_path):
    from transformers import AutoTokenizer

    from moecompress.reference.tokenizer import VOCAB_SIZE, train_tokenizer

    a, b = tmp_path / "a", tmp_path / "b"
    train_tokenizer().save_pretrained(a)
    train_tokenizer().save_pretrained(b)
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    tok = AutoTokenizer.from_pretrained(a)
    assert len(tok) == VOCAB_SIZE
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    for text in ("37 + 48 = 85", "The capital of Varnia is Oltrek.", "def f(x):\n    return x ** 2", "Ünïcødé ✓"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    digits = tok.convert_ids_to_tokens(tok("1234", add_special_tokens=False)["input_ids"])
    assert digits == ["1", "2", "3", "4"]  # one digit per token


# ------------------------------------------------------------------------------------------------- build


def test_reference_path_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMPRESS_HOME", str(tmp_path))
    with pytest.raises(UserError, match="moecompress reference build small"):
        reference_path("small")
    with pytest.raises(UserError, match="unknown reference model"):
        reference_path("huge")
    assert set(REFERENCE_NAMES) >= {"tiny", "small", "small-shared"}


def test_training_is_deterministic(reference_env):
    import torch

    from moecompress.reference.build import get_spec, train
    from moecompress.reference.tokenizer import load_tokenizer

    tok = load_tokenizer()
    spec = get_spec("tiny")
    m1, f1 = train(spec, tok, progress=False, steps=3)
    m2, f2 = train(spec, tok, progress=False, steps=3)
    s1, s2 = m1.state_dict(), m2.state_dict()
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert f1["loss_curve"] == f2["loss_curve"]


def test_deepseek_reference_config_is_real_deepseek_v3():
    from transformers import DeepseekV3ForCausalLM

    from moecompress.reference.build import get_spec, make_model

    model = make_model(get_spec("small-shared"))
    assert isinstance(model, DeepseekV3ForCausalLM)
    cfg = model.config
    assert cfg.n_routed_experts >= 16 and cfg.n_shared_experts == 1 and cfg.n_group > 1
    moe = model.model.layers[-1].mlp
    assert moe.experts.num_experts == cfg.n_routed_experts and hasattr(moe, "shared_experts")
    assert not hasattr(model.model.layers[0].mlp, "experts")  # first layer dense


def test_deepseek_training_balances_its_routers(reference_env):
    """The DeepSeek-V3 path (no balancing loss in transformers' forward): our aux loss + bias update run."""
    import dataclasses
    import math

    from moecompress.reference.build import get_spec, train
    from moecompress.reference.tokenizer import load_tokenizer

    spec = get_spec("small-shared")
    arch = dict(spec.arch, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                qk_nope_head_dim=8, n_routed_experts=8, n_group=2, topk_group=1)
    mini = dataclasses.replace(spec, arch=arch, batch_size=4, seq_len=32, threads=1)
    model, facts = train(mini, load_tokenizer(), progress=False, steps=4)
    assert math.isfinite(facts["final_loss"]) and facts["final_aux_loss"] > 0
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.abs().sum() > 0  # the aux-loss-free bias moved towards balance
    assert not model.model.layers[1].mlp.gate._forward_hooks  # balancer hooks removed


def test_tiny_reference_build(tiny_reference, tiny_reference_model, reference_env):
    from transformers import Qwen3MoeForCausalLM

    info = json.loads((tiny_reference / "reference.json").read_text())
    t = info["training"]
    assert t["steps"] > 0 and t["tokens"] == t["steps"] * t["batch_size"] * t["seq_len"]
    assert t["final_loss"] < t["first_loss"] - 3.0  # it learned something
    assert info["build_seconds"] > 0 and info["parameters"] > 0
    assert set(info["base_scores"]) >= {"reference_prose", "reference_facts_ppl"}
    model, tok = tiny_reference_model
    assert isinstance(model, Qwen3MoeForCausalLM)
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    assert tok.model_max_length == model.config.max_position_embeddings
    # no dead expert: every expert of every layer gets traffic from some domain
    loads = info["routing_load"]
    for layer in range(model.config.num_hidden_layers):
        total = [sum(loads[d][layer][e] for d in DOMAINS) for e in range(8)]
        assert min(total) > 0.002, (layer, total)
    # and experts specialise: the domains' routing distributions differ
    import numpy as np

    a, b = np.array(loads["arithmetic"][0]), np.array(loads["prose"][0])
    assert np.abs(a - b).sum() > 0.2
    # a cached build is returned as is
    from moecompress.reference import build_reference

    assert build_reference("tiny") == tiny_reference
    assert reference_path("tiny") == tiny_reference


def test_a_build_of_an_older_spec_or_version_is_stale(tiny_reference, reference_env, monkeypatch):
    import dataclasses

    from moecompress.reference import build as b

    assert b.is_built("tiny")
    spec = b.SPECS["tiny"]
    monkeypatch.setitem(b.SPECS, "tiny", dataclasses.replace(spec, description="reworded"))
    assert b.is_built("tiny")  # the description does not change the weights
    monkeypatch.setitem(b.SPECS, "tiny", dataclasses.replace(spec, steps=spec.steps + 1))
    assert not b.is_built("tiny")
    with pytest.raises(UserError, match="older moecompress"):
        reference_path("tiny")
    monkeypatch.setitem(b.SPECS, "tiny", spec)
    monkeypatch.setattr(b, "BUILD_VERSION", b.BUILD_VERSION + 1)
    assert not b.is_built("tiny")


def test_reference_models_declare_the_context_they_are_trained_on():
    from moecompress.reference.build import SPECS

    for spec in SPECS.values():  # lm-eval's perplexity windows never reach positions training did not see
        assert spec.arch["max_position_embeddings"] == spec.seq_len, spec.name
