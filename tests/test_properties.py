"""Property tests (hypothesis): recipe parsing, code packing, PMQ bit budgets, expert keep sets.

* valid random recipes parse to what was written; random garbage (values, YAML text, bytes) is a UserError or a
  recipe, never another exception;
* pack_codes / unpack_codes round-trip every width 1..8 on random shapes, and refuse out-of-range codes;
* solve_allocation never exceeds the bit budget and finds the brute-force optimum on tiny instances (both solvers),
  and refuses exactly the infeasible ones;
* keep_experts keeps exactly the asked experts (router rows and expert weights in order) when check_routable
  accepts the set — including DeepSeek's group rule, checked against an independent statement of it — and
  changes nothing when it refuses.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from moecompress.errors import UserError

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Many tiny tensor ops: one intra-op thread (two spin against each other on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----- recipes ---------------------------------------------------------------------------------------------------
PRUNING = ["random", "frequency", "reap", "gating"]
CHANNELS = ["camera_p", "heapr"]
ratios = st.floats(min_value=0.01, max_value=0.99, allow_nan=False)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=20)


@st.composite
def stages(draw):
    kind = draw(st.sampled_from(["experts", "channels", "rtn", "gptq", "pmq"]))
    if kind == "experts":
        stage = {"method": draw(st.sampled_from(PRUNING))}
        if draw(st.booleans()):
            stage["ratio"] = draw(ratios)
        else:
            stage["keep"] = draw(st.integers(1, 512))
        if draw(st.booleans()):
            stage["scope"] = draw(st.sampled_from(["layer", "global"]))
        if stage["method"] == "random" and draw(st.booleans()):
            stage["options"] = {"seed": draw(st.integers(0, 2**31))}
        return stage
    if kind == "channels":
        return {"method": draw(st.sampled_from(CHANNELS)), "ratio": draw(ratios)}
    if kind == "pmq":
        return {"method": "pmq", "avg_bits": draw(st.floats(1.0, 3.0))}
    stage = {"method": kind, "bits": draw(st.integers(1, 8))}
    if draw(st.booleans()):
        stage["options"] = {"group_size": draw(st.sampled_from([32, 64, 128])), "sym": draw(st.booleans())}
    return stage


@st.composite
def recipes(draw):
    recipe = {"model": draw(st.one_of(names, st.fixed_dictionaries({"id": names}))),
              "stages": draw(st.lists(stages(), min_size=1, max_size=3))}
    if draw(st.booleans()):
        recipe["calibration"] = {"source": draw(st.sampled_from(["reference", "reference:prose", "calib.txt"])),
                                 "samples": draw(st.integers(1, 4096)), "seq_len": draw(st.integers(8, 8192)),
                                 "seed": draw(st.integers(-2**31, 2**31)), "batch_size": draw(st.integers(1, 64))}
    if draw(st.booleans()):
        recipe["output"] = {"path": draw(names), "overwrite": draw(st.booleans()),
                            "max_shard_size": draw(st.sampled_from(["5GB", "500MB", 10**9]))}
    if draw(st.booleans()):
        recipe["eval"] = {"tasks": draw(st.sampled_from(["reference", ["reference_facts"], "a,b"])),
                          "limit": draw(st.none() | st.integers(1, 100)), "baseline": draw(st.booleans())}
    return recipe


@FAST
@given(recipes())
def test_valid_recipes_parse_to_what_was_written(data):
    from moecompress.recipes.schema import parse_recipe

    recipe = parse_recipe(copy.deepcopy(data))
    model = data["model"] if isinstance(data["model"], str) else data["model"]["id"]
    assert recipe.model.id == model
    assert [s.method for s in recipe.stages] == [s["method"] for s in data["stages"]]
    for got, want in zip(recipe.stages, data["stages"]):
        for key in ("ratio", "keep", "scope", "bits", "avg_bits"):
            assert getattr(got, key) == want.get(key)
        assert got.options == want.get("options", {})
    dumped = recipe.model_dump(mode="json", exclude_unset=True)
    assert parse_recipe(dumped) == recipe  # what the CLI's `run` does with a loaded recipe
    for section in ("calibration", "output", "eval"):
        for key, value in data.get(section, {}).items():
            assert getattr(getattr(recipe, section), key) == value


RECIPE_KEYS = ["model", "stages", "calibration", "output", "eval", "method", "ratio", "keep", "scope", "bits",
               "avg_bits", "options", "id", "dtype", "path", "overwrite", "tasks", "limit", "source", "samples",
               "seq_len", "seed", "group_size", "max_shard_size", "format", "target", "onload", "device"]
scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | names
           | st.sampled_from(["random", "frequency", "rtn", "gptq", "pmq", "heapr", "layer", "global", "auto", "5GB",
                              "reference", "cpu", "memory", "nan", "-1", ""]))
garbage = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(RECIPE_KEYS) | names | st.integers(0, 3), inner, max_size=5), max_leaves=25)


@st.composite
def near_recipes(draw):
    """Mostly-valid recipes with one part replaced by garbage: reaches the deep validators."""
    data = draw(recipes())
    path = draw(st.sampled_from([("model",), ("stages",), ("stages", 0), ("stages", 0, "options"),
                                 ("stages", 0, "method"), ("calibration",), ("output",), ("eval",), ()]))
    value = draw(garbage)
    if not path:
        data[draw(st.sampled_from(RECIPE_KEYS) | names)] = value
        return data
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return data


def _user_error_or_recipe(fn, arg):
    from moecompress.recipes.schema import Recipe

    try:
        result = fn(arg)
    except UserError as e:
        assert str(e) and "\n" not in str(e).strip(), repr(str(e))
        return None
    assert isinstance(result, Recipe)
    return result


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage | near_recipes())
def test_garbage_recipes_are_user_errors(data):
    from moecompress.recipes.schema import parse_recipe

    _user_error_or_recipe(parse_recipe, data)


@FAST
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200),
                 garbage.map(lambda v: yaml.safe_dump(v, allow_unicode=True)),
                 st.sampled_from(["model: !!python/object/apply:os.system ['true']\nstages: []\n",
                                  "a: &x [*x]\n", "- - - [\n", "model: {id: [1, 2]}\nstages: [{method: 3}]\n",
                                  "model: m\nstages:\n  - {method: random, keep: 2}\n  - {method: rtn, bits: 9}\n"])))
def test_garbage_recipe_files_are_user_errors(tmp_path_factory, content):
    from moecompress.recipes.schema import load_recipe

    path = tmp_path_factory.mktemp("recipe", numbered=True) / "r.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
    _user_error_or_recipe(load_recipe, path)


# ----- packing ---------------------------------------------------------------------------------------------------
@st.composite
def code_tensors(draw):
    bits = draw(st.integers(1, 8))
    shape = draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)) + [draw(st.integers(1, 70))]
    seed = draw(st.integers(0, 2**32 - 1))
    g = torch.Generator().manual_seed(seed)
    dtype = draw(st.sampled_from([torch.uint8, torch.int16, torch.int32, torch.int64]))
    codes = torch.randint(0, 1 << bits, shape, generator=g).to(dtype)
    if draw(st.booleans()):  # the extremes, so bit 31 of a word is set for b = 1, 2, 4, 8
        codes[..., -1] = (1 << bits) - 1
        codes[..., 0] = 0
    return bits, codes


@settings(max_examples=120, deadline=None)
@given(code_tensors())
def test_pack_unpack_round_trip(case):
    from moecompress.compress.quant.packing import codes_per_word, pack_codes, packed_width, unpack_codes

    bits, codes = case
    n = codes.shape[-1]
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (*codes.shape[:-1], packed_width(n, bits)) and packed_width(n, bits) == math.ceil(
        n / codes_per_word(bits))
    back = unpack_codes(packed, bits, n)
    assert back.dtype == torch.uint8 and torch.equal(back.long(), codes.long())
    # the padding codes of the last word are zero: padding the row with zeros packs to the same words
    pf = codes_per_word(bits)
    padded = torch.nn.functional.pad(codes.long(), (0, -n % pf))
    assert torch.equal(pack_codes(padded, bits), packed)


@FAST
@given(st.integers(1, 8), st.integers(1, 40), st.sampled_from([-1, 1]))
def test_pack_refuses_out_of_range_codes(bits, n, side):
    from moecompress.compress.quant.packing import pack_codes

    codes = torch.zeros(2, n, dtype=torch.int64)
    codes[1, n // 2] = -1 if side < 0 else 1 << bits
    with pytest.raises(UserError, match="out of range"):
        pack_codes(codes, bits)


@FAST
@given(st.integers(-3, 12), st.integers(1, 20))
def test_unpack_refuses_wrong_widths(bits, n):
    from moecompress.compress.quant.packing import pack_codes, unpack_codes

    if not 1 <= bits <= 8:
        with pytest.raises(UserError, match="bits"):
            pack_codes(torch.zeros(1, n, dtype=torch.int64), bits)
        return
    packed = pack_codes(torch.zeros(1, n, dtype=torch.int64), bits)
    with pytest.raises(UserError, match="words per row"):
        unpack_codes(packed, bits, n + 32)


# ----- PMQ bit budgets -------------------------------------------------------------------------------------------
@st.composite
def allocations(draw):
    L = draw(st.integers(1, 2))
    E = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 8), min_size=1, max_size=3, unique=True))
    W = len(widths)
    costs = torch.tensor(draw(st.lists(st.floats(0, 100, allow_nan=False), min_size=L * E * W,
                                       max_size=L * E * W)), dtype=torch.float64).reshape(L, E, W)
    counts = None
    if draw(st.booleans()):
        counts = torch.tensor(draw(st.lists(st.integers(1, 5), min_size=L * E, max_size=L * E)),
                              dtype=torch.float64).reshape(L, E)
    # the budget: what a random assignment uses (the top width in each layer's first expert, the middle one in
    # its second, when asked), plus or minus a little: mostly feasible, sometimes tight or just infeasible
    require_top, require_middle = draw(st.booleans()), W >= 2 and draw(st.booleans())
    ranked = sorted(widths)
    p = torch.ones(L, E) if counts is None else counts
    used = []
    for l in range(L):
        row = draw(st.lists(st.sampled_from(widths), min_size=E, max_size=E))
        if require_top:
            row[0] = ranked[-1]
        if require_middle and E > 1:
            row[1] = ranked[-2]
        used.append(float((p[l] * torch.tensor(row, dtype=torch.float64)).sum() / p[l].sum()))
    avg = max(used) + draw(st.floats(-0.3, 1.0, allow_nan=False))
    assume(avg > 0)
    return dict(costs=costs, widths=widths, avg_bits=avg, param_counts=counts, per_layer=draw(st.booleans()),
                require_top=require_top, require_middle=require_middle,
                min_bits=draw(st.one_of(st.none(), st.none(), st.sampled_from(ranked[:2]))))


def brute_force(costs, widths, avg_bits, param_counts, per_layer, require_top, require_middle, min_bits):
    """The optimum of the ILP by enumeration (None: infeasible)."""
    L, E, W = costs.shape
    p = torch.ones(L, E, dtype=torch.float64) if param_counts is None else param_counts
    order = sorted(range(W), key=lambda k: widths[k])
    required = ([order[-1]] if require_top else []) + ([order[-2]] if require_middle else [])
    allowed = [k for k in range(W) if min_bits is None or widths[k] >= min_bits]
    best = None
    for choice in itertools.product(allowed, repeat=L * E):
        x = [choice[l * E:(l + 1) * E] for l in range(L)]
        if any(k not in row for row in x for k in required):
            continue
        used = [sum(float(p[l, i]) * widths[x[l][i]] for i in range(E)) for l in range(L)]
        have = [avg_bits * float(p[l].sum()) for l in range(L)]
        if per_layer and any(u > h + 1e-9 for u, h in zip(used, have)):
            continue
        if not per_layer and sum(used) > sum(have) + 1e-9:
            continue
        cost = sum(float(costs[l, i, x[l][i]]) for l in range(L) for i in range(E))
        best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=60, deadline=None)
@given(allocations(), st.sampled_from(["dp", "cbc", "auto"]))
def test_allocation_respects_budget_and_matches_brute_force(case, solver):
    from moecompress.compress.quant.ilp import solve_allocation

    if solver == "dp":
        assume(case["param_counts"] is None or torch.equal(case["param_counts"], case["param_counts"].round()))
    want = brute_force(**case)
    event("feasible" if want is not None else "infeasible")
    kwargs = {k: v for k, v in case.items() if k not in ("costs", "widths", "avg_bits")}
    try:
        got = solve_allocation(case["costs"], case["widths"], case["avg_bits"], solver=solver, **kwargs)
    except UserError:
        assert want is None, f"refused a feasible instance (optimum {want})"
        return
    assert want is not None, "returned an allocation for an infeasible instance"
    p = torch.ones_like(case["costs"][..., 0]) if case["param_counts"] is None else case["param_counts"]
    bits = got.bits.double()
    assert set(got.bits.flatten().tolist()) <= set(case["widths"])
    if case["min_bits"] is not None:
        assert int(got.bits.min()) >= case["min_bits"]
    if case["per_layer"]:
        assert all(float((p[l] * bits[l]).sum()) <= case["avg_bits"] * float(p[l].sum()) + 1e-9
                   for l in range(len(p)))
    else:
        assert float((p * bits).sum()) <= case["avg_bits"] * float(p.sum()) + 1e-9
    assert got.avg_bits <= case["avg_bits"] + 1e-9
    top, mid = sorted(case["widths"])[-1], sorted(case["widths"])[-2] if len(case["widths"]) > 1 else None
    for row in got.bits.tolist():
        assert not case["require_top"] or top in row
        assert not case["require_middle"] or mid in row
    chosen = case["costs"].gather(2, torch.tensor(
        [[case["widths"].index(b) for b in row] for row in got.bits.tolist()]).unsqueeze(-1)).sum()
    assert math.isclose(float(chosen), got.objective, rel_tol=1e-9, abs_tol=1e-9)
    assert got.objective <= want + 1e-6 * max(1.0, abs(want)), (got.objective, want)


# ----- expert keep sets ------------------------------------------------------------------------------------------
_MODELS: dict[str, torch.nn.Module] = {}


def _model(family: str):
    from tiny_models import tiny_model

    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return copy.deepcopy(_MODELS[family])


def routable(family: str, config, keep: list[int], top_k: int) -> bool:
    """The rule (surgery.py docstring), stated independently: distinct indices in range, at least top_k of them,
    and for group-limited routing the same count c from every original group with c ≥ 2 (V3) / 1 (V2) and
    top_k ≤ topk_group·c."""
    n = 8
    if len(set(keep)) != len(keep) or any(not 0 <= e < n for e in keep) or len(keep) < top_k:
        return False
    grouped = family == "deepseek_v3" or (family == "deepseek_v2" and config.topk_method == "group_limited_greedy")
    if not grouped:
        return True
    size = n // config.n_group
    counts = {g: sum(1 for e in keep if e // size == g) for g in range(config.n_group)}
    c = counts[0]
    need = 2 if family == "deepseek_v3" else 1
    return len(set(counts.values())) == 1 and c >= need and top_k <= config.topk_group * c


@st.composite
def keep_sets(draw):
    """Arbitrary lists (duplicates, out of range), arbitrary subsets, and subsets taking c experts from each of the
    two groups of four (what the group rule asks for)."""
    kind = draw(st.sampled_from(["list", "subset", "grouped"]))
    if kind == "list":
        return draw(st.lists(st.integers(-1, 8), max_size=9))
    if kind == "subset":
        return draw(st.permutations(range(8)))[:draw(st.integers(0, 8))]
    c = draw(st.integers(1, 4))
    return [e for g in (0, 1) for e in draw(st.permutations(range(4 * g, 4 * g + 4)))[:c]]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3"]), keep_sets(), st.integers(0, 1))
def test_keep_experts_keeps_exactly_the_asked_set(family, keep, which):
    from moecompress.compress.moe import moe_layers
    from moecompress.compress.surgery import check_routable, keep_experts

    model = _model(family)
    layer = moe_layers(model)[which % len(moe_layers(model))]
    idx = layer.layer_idx
    ok = routable(family, model.config, keep, layer.top_k)
    router = layer.router_weight.detach().clone()
    bias = None if layer.score_correction_bias is None else layer.score_correction_bias.detach().clone()
    experts = [layer.expert_weights(e) for e in range(layer.num_experts)]
    experts = [(w.gate.detach().clone(), w.up.detach().clone(), w.down.detach().clone()) for w in experts]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    event("routable" if ok else "refused")
    try:
        checked = check_routable(layer, keep)
    except UserError:
        assert not ok, f"{family}: refused a routable set {keep}"
        with pytest.raises(UserError):
            keep_experts(model, {idx: keep})
        after = model.state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        return
    assert ok, f"{family}: accepted {keep}, which the group rule refuses"
    assert checked == sorted(keep)
    applied = keep_experts(model, {idx: keep})
    assert applied == {idx: sorted(keep)}
    layer = next(m for m in moe_layers(model) if m.layer_idx == idx)
    assert layer.num_experts == len(keep)
    assert torch.equal(layer.router_weight, router[sorted(keep)])
    if bias is not None:
        assert torch.equal(layer.score_correction_bias, bias[sorted(keep)])
    for new, old in enumerate(sorted(keep)):
        w = layer.expert_weights(new)
        assert all(torch.equal(a, b) for a, b in zip((w.gate, w.up, w.down), experts[old]))
    with torch.no_grad():  # and the model still routes
        from tiny_models import tokens

        assert torch.isfinite(model(tokens(1, 6)).logits).all()
