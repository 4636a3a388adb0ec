"""EEP (arXiv 2407.00945): operators keep candidates routable, one-hot candidates are selections, candidates are
applied and undone without copies, the search finds a known optimum, a killed search resumes to the same result,
two processes equal one, and the output reloads (stock for selections, native for mapped routers)."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import assert_same_logits_across_processes, logits_without_moecompress, run_cli
from eep_helpers import TARGET, SyntheticFitness, run_search, summary
from moecompress.compress.checkpoint import MANIFEST, load, save
from moecompress.compress.moe import moe_layers
from moecompress.compress.surgery import MappedRouter
from moecompress.methods.base import ExpertPlan, Target, apply_plan
from moecompress.methods.eep import EEP, EEPConfig
from moecompress.methods.eep_search.apply import Snapshot, applied
from moecompress.methods.eep_search.operators import (Probabilities, mutate_continuous, mutate_selection,
                                                      random_selection)
from moecompress.methods.eep_search.space import SearchSpace, one_hot_picks, selection, to_plan
from tiny_models import FAMILIES, save_tiny, tiny_model, tokens

ROOT = Path(__file__).resolve().parent.parent


def logits(model):
    with torch.no_grad():
        return model(tokens()).logits


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "deepseek_v2"])
def test_mutation_keeps_rows_distinct_and_routable(family):
    model = tiny_model(family)
    space = SearchSpace.build(model, 4, groups=0, top_k=None)
    rng = np.random.default_rng(0)
    picks = random_selection(space, rng)
    changed = 0
    for _ in range(300):
        child = mutate_selection(space, picks, Probabilities(row=0.5), rng)
        for sel in child:
            assert len(set(sel)) == 4 and sel == sorted(sel)
        space.check(child)  # raises if any layer could not route it
        changed += child != picks
        picks = child
    assert changed > 100


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_continuous_operators(family):
    """Mixtral searches a real-valued W_RM; DeepSeek keeps W_RM one-hot, ascending and routable through crossover."""
    model = tiny_model(family)
    space = SearchSpace.build(model, 4, groups=0, top_k=None)
    rng = np.random.default_rng(1)
    pool = [space.one_hot(random_selection(space, rng)) for _ in range(6)]
    p = Probabilities(group=0.9)
    for i in range(60):
        a, b = pool[i % 6], pool[(i * 5 + 1) % 6]
        merge, route = mutate_continuous(space, (a, a), (b, b) if i % 2 else None, p, rng)
        assert not torch.equal(merge, a)
        if family == "mixtral":
            assert not torch.equal(route, a)  # both matrices searched, untied
        else:
            for g in range(space.n_groups):
                picks = one_hot_picks(route[g])
                assert picks is not None and picks == sorted(picks)
                space.check_group(g, picks)
        model_copy = copy.deepcopy(model) if i < 2 else None
        if model_copy is not None:  # every candidate is applicable
            apply_plan(model_copy, to_plan(space, merge, route))
            assert torch.isfinite(logits(model_copy)).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_one_hot_candidate_equals_selection(family):
    model, merged = tiny_model(family), tiny_model(family)
    space = SearchSpace.build(model, 4, groups=1, top_k=None)
    keep = [0, 2, 5, 7]
    m = space.one_hot([keep])
    plan = to_plan(space, m, m.clone())
    assert plan.merge is None and all(k == keep for k in plan.keep.values())
    assert selection(m, m.clone()) == [keep]
    apply_plan(model, plan)
    untied = ExpertPlan(keep=plan.keep, merge={i: m[0].tolist() for i in plan.keep},
                        router_map={i: m[0].tolist() for i in plan.keep})  # the merge path with one-hot maps
    apply_plan(merged, untied)
    assert torch.equal(logits(model), logits(merged))


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "phimoe"])
def test_candidates_are_applied_and_undone_without_copies(family):
    model = tiny_model(family)
    before = logits(model)
    params = {n: p for n, p in model.named_parameters()}
    config = model.config.to_dict()
    space = SearchSpace.build(model, 4, groups=1, top_k=1 if family != "phimoe" else None)
    m = space.one_hot([[1, 3, 5, 6]])
    merge = m + 0.05
    route = m + 0.03 if space.route_search else m.clone()
    snapshot = Snapshot(model)
    with applied(snapshot, to_plan(space, merge, route)) as live:
        assert live is model
        layer = moe_layers(model)[0]
        assert layer.num_experts == 4
        assert isinstance(layer.router, MappedRouter) == (family == "mixtral")
        assert not torch.equal(logits(model)[..., :5], before[..., :5])
    assert torch.equal(logits(model), before)
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(dict(model.named_parameters()))
    assert model.config.to_dict() == config


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_search_finds_known_optimum(family):
    method, plan = run_search(None, family=family, population=6, prune_steps=50, merge_steps=12, groups=1)
    entries = method.result.population.entries
    phase1 = max(e.fitness for e in entries.values() if e.phase == 1)
    assert phase1 > 79  # 10 points per target expert kept, 2 layers × 4 — the selection optimum was found
    best = method.result.best
    assert best.fitness >= phase1
    assert all(sorted(set(k)) == TARGET for k in plan.keep.values())  # dominant experts of the merged slots
    torch.set_num_threads(os.cpu_count() or 1)


def _run_helper(args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / "tests" / "eep_helpers.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True)


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    full, full_plan = run_search(None)
    killed = _run_helper([tmp_path / "state", tmp_path / "killed.json", "--kill-at", 10])
    assert killed.returncode == -9, killed.stderr[-2000:]
    index = json.loads((tmp_path / "state" / "population.json").read_text())
    assert [e["step"] for e in index["entries"]] == list(range(9))  # every finished evaluation was persisted
    resumed, resumed_plan = run_search(tmp_path / "state")
    assert resumed.result.evaluated == len(full.result.population.entries) - 9
    assert summary(resumed, resumed_plan) == summary(full, full_plan)
    for step, entry in full.result.population.entries.items():
        assert torch.equal(entry.merge, resumed.result.population.entries[step].merge)
    torch.set_num_threads(os.cpu_count() or 1)


def test_two_processes_equal_one(tmp_path):
    serial, serial_plan = run_search(None, batch=2)
    torch.set_num_threads(os.cpu_count() or 1)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           str(ROOT / "tests" / "eep_helpers.py"), str(tmp_path / "state"), str(tmp_path / "out.json"),
                           "--batch", "2"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads(Path(f"{tmp_path / 'out.json'}.{r}").read_text()) for r in (0, 1)]
    expected = summary(serial, serial_plan)
    for out in ranks:
        assert {k: out[k] for k in expected} == expected
    assert [r["evaluated"] for r in ranks] == [10, 10]  # the 20 evaluations were shared


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_cli_selection_with_lmeval_fitness_reloads_stock(family, tmp_path, capsys):
    model_dir = save_tiny(family, tmp_path / "model")
    code, out, err = run_cli(capsys, "prune", model_dir, "-m", "eep", "--keep", 4, "--set", "task=reference_facts",
                             "--set", "population=3", "--set", "prune_steps=2", "--set", "merge_steps=0",
                             "--set", "fitness_limit=6", "--set", "final_top=2", "--set", "final_limit=6",
                             "--set", f"state_dir={tmp_path / 'state'}", "-o", tmp_path / "out")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["format"] == "stock" and manifest["method"] == "eep"
    state = json.loads((tmp_path / "state" / "population.json").read_text())
    assert len(state["entries"]) == 5 and sum(e["final"] is not None for e in state["entries"]) == 2
    assert all(0 <= e["fitness"] <= 100 for e in state["entries"])
    expected = load(model_dir)
    apply_plan(expected, ExpertPlan(**manifest["plans"][0]))
    ids = tokens()
    assert_same_logits_across_processes(logits_without_moecompress(tmp_path / "out", ids, tmp_path), logits(expected))


@pytest.mark.parametrize("family,top_k,fmt", [("mixtral", None, "native"), ("deepseek_v3", None, "stock"),
                                              ("qwen3_moe", 1, "native")])
def test_merged_output_reloads(family, top_k, fmt, tmp_path):
    extra = {"norm_topk_prob": True} if family == "qwen3_moe" else {}
    model = tiny_model(family, **extra)
    original = copy.deepcopy(model)
    cfg = EEPConfig(task="synthetic", population=4, prune_steps=6, merge_steps=10, groups=0, top_k=top_k,
                    final_top=3)
    method = EEP(cfg, fitness=SyntheticFitness(model), final_fitness=SyntheticFitness(model))
    plan = method.plan(model, {}, Target(keep=4))
    assert plan.merge is not None  # phase 2 improves the synthetic fitness: the best is a merge
    assert method.result.best.final is not None
    assert torch.equal(logits(model), logits(original))  # the search left the model as it found it
    apply_plan(model, plan)
    save(model, tmp_path / "out")
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["format"] == fmt
    reloaded = load(tmp_path / "out")
    assert any(isinstance(l.router, MappedRouter) for l in moe_layers(reloaded)) == (fmt == "native")
    assert all(l.top_k == (top_k or 2) for l in moe_layers(reloaded))
    assert torch.equal(logits(reloaded), logits(model))


def test_keep_all_reduces_top_k_with_phase_two_only():
    model = tiny_model("mixtral")
    cfg = EEPConfig(task="synthetic", population=5, prune_steps=5, merge_steps=4, top_k=1, final_top=0)
    method = EEP(cfg, fitness=SyntheticFitness(model, target=list(range(8))))
    plan = method.plan(model, {}, Target(keep=8))
    phases = [e.phase for _, e in sorted(method.result.population.entries.items())]
    assert phases == [1] + [2] * 4  # the identity, then merging only
    assert plan.top_k == 1


def test_eep_requires_a_task(tmp_path, capsys):
    model_dir = save_tiny("qwen3_moe", tmp_path / "model")
    code, out, err = run_cli(capsys, "prune", model_dir, "-m", "eep", "--keep", 4, "--dry-run")
    assert code == 2 and "task" in err, err


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_plan_respects_target_and_reloads(family, tmp_path):
    """EEP (prune-only, synthetic fitness) on every family: the plan keeps 4 experts per layer, the model is
    restored after the search, and the applied result reloads with identical, finite logits."""
    method, plan = run_search(None, family=family, merge_steps=0, population=3, prune_steps=3)
    assert all(len(kept) == 4 for kept in plan.keep.values())
    model = tiny_model(family)
    apply_plan(model, plan)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
        got = load(save(model, tmp_path / "out"))(ids).logits
    assert torch.isfinite(want).all() and torch.equal(got, want)
