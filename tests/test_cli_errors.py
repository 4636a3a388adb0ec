"""Bad input: exit code 2, one line on stderr saying what is wrong, and nothing written."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from cli_helpers import run_cli
from tiny_models import save_tiny


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("m") / "model")


def assert_user_error(capsys, args, pattern, out_dir=None):
    code, out, err = run_cli(capsys, *args)
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert pattern.lower() in lines[0].lower(), lines[0]
    assert "Traceback" not in err
    if out_dir is not None:
        assert not out_dir.exists()


def test_dense_model(tmp_path, capsys):
    config = AutoConfig.for_model("llama", vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "dense")
    assert_user_error(capsys, ["prune", tmp_path / "dense", "-m", "random", "--keep", 2, "-o", tmp_path / "o"],
                      "dense model", tmp_path / "o")


def test_unsupported_family(tmp_path, capsys):
    config = AutoConfig.for_model("granitemoe", vocab_size=97, hidden_size=16, intermediate_size=8,
                                  num_hidden_layers=1, num_attention_heads=2, num_local_experts=4)
    config.save_pretrained(tmp_path / "granite")
    assert_user_error(capsys, ["prune", tmp_path / "granite", "-m", "random", "--keep", 2, "-o", tmp_path / "o"],
                      "not a supported MoE family", tmp_path / "o")


@pytest.mark.parametrize("ratio", ["0", "1", "-0.5", "1.5"])
def test_ratio_out_of_range(model_dir, tmp_path, capsys, ratio):
    assert_user_error(capsys, ["prune", model_dir, "-m", "random", "--ratio", ratio, "-o", tmp_path / "o"],
                      "ratio", tmp_path / "o")


def test_top_k_above_kept(model_dir, tmp_path, capsys):
    assert_user_error(capsys, ["prune", model_dir, "-m", "random", "--keep", 1, "-o", tmp_path / "o"],
                      "top_k", tmp_path / "o")
    assert_user_error(capsys, ["prune", model_dir, "-m", "random", "--ratio", "0.95", "-o", tmp_path / "o"],
                      "top_k", tmp_path / "o")


def test_missing_and_empty_calibration_file(model_dir, tmp_path, capsys):
    assert_user_error(capsys, ["prune", model_dir, "-m", "frequency", "--ratio", "0.5", "--data",
                               tmp_path / "nope.txt", "-o", tmp_path / "o"], "does not exist", tmp_path / "o")
    (tmp_path / "empty.txt").write_text("\n\n")
    assert_user_error(capsys, ["prune", model_dir, "-m", "frequency", "--ratio", "0.5", "--data",
                               tmp_path / "empty.txt", "-o", tmp_path / "o"], "no text", tmp_path / "o")
    (tmp_path / "bad.jsonl").write_text('{"content": "x"}\n')
    assert_user_error(capsys, ["prune", model_dir, "-m", "frequency", "--ratio", "0.5", "--data",
                               tmp_path / "bad.jsonl", "-o", tmp_path / "o"], "no 'text' field", tmp_path / "o")


def test_unknown_recipe_key_names_path_and_allowed(model_dir, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {model_dir}\nstages:\n  - method: random\n    keep: 4\n    sope: layer\n"
                      f"output:\n  path: {tmp_path / 'o'}\n")
    assert_user_error(capsys, ["run", recipe], "unknown key 'sope' at stages.0; allowed: method", tmp_path / "o")
    recipe.write_text(f"model: {model_dir}\nstages:\n  - method: random\n    keep: 4\n    scope: everywhere\n")
    assert_user_error(capsys, ["run", recipe, "-o", tmp_path / "o"], "stages.0.scope", tmp_path / "o")
    recipe.write_text(f"model: {model_dir}\nstages:\n  - method: random\n    keep: 4\n    options: {{sed: 1}}\n")
    assert_user_error(capsys, ["run", recipe, "-o", tmp_path / "o"], "unknown key 'sed' at stages.0.options; "
                      "allowed: seed", tmp_path / "o")


def test_output_equal_to_input(model_dir, capsys):
    before = sorted(p.name for p in model_dir.iterdir())
    assert_user_error(capsys, ["prune", model_dir, "-m", "random", "--keep", 4, "-o", model_dir], "input model")
    assert sorted(p.name for p in model_dir.iterdir()) == before


def test_non_empty_output_needs_overwrite(model_dir, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "precious.txt").write_text("x")
    assert_user_error(capsys, ["prune", model_dir, "-m", "random", "--keep", 4, "-o", tmp_path / "o"], "--overwrite")
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["precious.txt"]
    code, _, err = run_cli(capsys, "prune", model_dir, "-m", "random", "--keep", 4, "-o", tmp_path / "o",
                           "--overwrite")
    assert code == 0, err
    assert not (tmp_path / "o" / "precious.txt").exists()


def test_corrupt_safetensors(model_dir, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    assert_user_error(capsys, ["prune", broken, "-m", "random", "--keep", 4, "-o", tmp_path / "o"],
                      "cannot read", tmp_path / "o")


def test_unknown_method(model_dir, tmp_path, capsys):
    assert_user_error(capsys, ["prune", model_dir, "-m", "magic", "--keep", 4, "-o", tmp_path / "o"],
                      "unknown method 'magic'", tmp_path / "o")


def test_internal_error_exit_1(model_dir, tmp_path, capsys, monkeypatch):
    import moecompress.recipes.run as run_module

    monkeypatch.setattr(run_module, "hold", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kaboom")))
    code, _, err = run_cli(capsys, "prune", model_dir, "-m", "random", "--keep", 4, "-o", tmp_path / "o")
    assert code == 1 and "kaboom" in err and "--debug" in err and "Traceback" not in err
