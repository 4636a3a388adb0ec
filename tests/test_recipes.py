"""Every built-in recipe validates against the schema, names registered methods and runs by name."""

import pytest

from moecompress.methods.base import all_methods
from moecompress.recipes.schema import builtin_recipes, load_recipe


@pytest.mark.parametrize("name", builtin_recipes())
def test_builtin_recipe_validates(name):
    recipe = load_recipe(name)
    assert recipe.stages and all(stage.method in all_methods() for stage in recipe.stages)


def test_every_pruning_method_has_a_builtin_recipe():
    covered = {stage.method for name in builtin_recipes() for stage in load_recipe(name).stages}
    pruning = {n for n, m in all_methods().items() if m.kind.endswith("pruning")}
    assert pruning <= covered


# ----- stage targets are checked before any model is resolved or loaded ----------------------------------------
BAD_STAGES = [
    ({"method": "bnb-nf4", "bits": 3}, "4-bit only"),
    ({"method": "bnb-int8", "avg_bits": 3.5}, "8-bit only"),
    ({"method": "gptq"}, "needs --bits"),
    ({"method": "rtn", "avg_bits": 2.5}, "same width"),
    ({"method": "pmq", "bits": 3}, "--avg-bits"),
    ({"method": "pmq", "avg_bits": 3.5}, "outside the candidate widths"),
    ({"method": "rtn", "bits": 9}, "less than or equal to 8"),
    ({"method": "bnb-nf4", "options": {"group_size": 64}}, "unknown key 'group_size'"),
    ({"method": "frequency", "ratio": 0.25, "bits": 3}, "drop bits/avg_bits"),
    ({"method": "rtn", "bits": 3, "ratio": 0.25}, "drop ratio/keep/scope"),
]


@pytest.mark.parametrize("stage,needle", BAD_STAGES)
def test_recipe_quantization_errors_come_before_the_model_loads(stage, needle, tmp_path, capsys, monkeypatch):
    import yaml

    from cli_helpers import run_cli

    def boom(*a, **k):
        raise AssertionError("a model was resolved or loaded")

    for name in ("resolve_model", "hold", "load_config", "load_tokenizer"):
        monkeypatch.setattr(f"moecompress.recipes.run.{name}", boom)
    recipe = {"model": str(tmp_path / "no-such-model"),  # would fail to load: the stage error must come first
              "stages": [{"method": "frequency", "ratio": 0.25}, stage],
              "output": {"path": str(tmp_path / "out")}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    code, out, err = run_cli(capsys, "run", tmp_path / "r.yaml")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_recipe_with_a_reference_model_is_not_built_for_a_bad_stage(tmp_path, capsys, monkeypatch):
    """`reference:NAME` models are built on first use: a bad stage must fail before that build."""
    import yaml

    from cli_helpers import run_cli

    monkeypatch.setattr("moecompress.reference.build_reference", lambda *a, **k: pytest.fail("model was built"))
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"model": "reference:tiny", "stages": [{"method": "gptq"}]}))
    code, out, err = run_cli(capsys, "run", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert code == 2 and "gptq needs --bits" in err, err
