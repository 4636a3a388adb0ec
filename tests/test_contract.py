"""The bad-input contract of every command, table-driven: exit code 2, exactly one line on stderr that says what to
fix (no traceback), nothing at the output path (nor a `.OUT*` temporary beside it), and the inputs' bytes unchanged.

All inputs are built once per module under one directory (tiny models, calibration files, recipes, checkpoints);
its hash is taken once and compared after every row. Rows whose misbehaviour needs a fix outside the files this
suite's authors could edit are `xfail(strict=True)` with the fix in the reason.

Also here: the two commands that used to ignore what they were given (a recipe's `eval:` block, the
`shared_channel_grads` collector).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cli_helpers import run_cli
from tiny_models import CORPUS, save_tiny


def _tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _edit_weights(path: Path, value: float) -> None:
    from safetensors.torch import load_file, save_file

    file = path / "model.safetensors"
    state = load_file(file)
    name = next(k for k in sorted(state) if "experts" in k and k.endswith("weight"))
    state[name] = state[name].clone()
    state[name].view(-1)[3] = value
    save_file(state, file, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def E(tmp_path_factory):
    """Every input of the table, built once."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("contract-inputs")
    e = SimpleNamespace(root=root)
    e.model = save_tiny("qwen3_moe", root / "model")

    def variant(name: str) -> Path:
        dest = root / name
        shutil.copytree(e.model, dest)
        return dest

    e.notok = variant("no-tokenizer")
    for f in e.notok.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            f.unlink()
    e.truncated = variant("truncated")
    weights = e.truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    e.badconfig = variant("bad-config")
    (e.badconfig / "config.json").write_text('{"model_type": "qwen3_moe", "hidden_size": ')
    e.nan = variant("nan-weights")
    _edit_weights(e.nan, float("nan"))
    e.inf = variant("inf-weights")
    _edit_weights(e.inf, float("inf"))
    e.noconfig = root / "not-a-model"
    e.noconfig.mkdir()
    (e.noconfig / "README.md").write_text("no model here\n")

    dense = AutoConfig.for_model("llama", vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(dense).save_pretrained(root / "dense")
    e.dense = root / "dense"
    granite = AutoConfig.for_model("granitemoe", vocab_size=97, hidden_size=16, intermediate_size=8,
                                   num_hidden_layers=1, num_attention_heads=2, num_local_experts=4)
    granite.save_pretrained(root / "granite")
    e.granite = root / "granite"

    data = root / "data"
    data.mkdir()
    e.calib = data / "calib.txt"
    e.calib.write_text(CORPUS)
    e.empty = data / "empty.txt"
    e.empty.write_text("")
    e.blank = data / "blank.txt"
    e.blank.write_text("  \n\n\t\n   \n\n")
    e.binary = data / "binary.txt"
    e.binary.write_bytes(bytes(range(256)) * 4)
    e.latin1 = data / "latin1.txt"
    e.latin1.write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e, na\xefve fa\xe7ade.\n\n".encode("latin-1") * 20)
    e.nofield = data / "nofield.jsonl"
    e.nofield.write_text('{"content": "some text"}\n{"content": "more"}\n')
    e.badjsonl = data / "bad.jsonl"
    e.badjsonl.write_text('{"text": "ok"}\n{"text": \n')
    e.csv = data / "calib.csv"
    e.csv.write_text("text\nhello world\n")

    # compressed checkpoints to export / load (built with the CLI itself; no calibration data needed)
    e.ckpt = root / "ckpts"
    e.ckpt.mkdir()
    e.native = e.ckpt / "rtn4"
    e.pruned = e.ckpt / "random4"
    e.badmanifest = e.ckpt / "bad-manifest"
    e.editedmanifest = e.ckpt / "edited-manifest"
    e.reportless = root / "not-a-report"
    e.reportless.mkdir()
    (e.reportless / "notes.txt").write_text("x")
    e.recipes = root / "recipes"
    e.recipes.mkdir()
    return e


@pytest.fixture(scope="module")
def inputs(E, tmp_path_factory):
    """E with its compressed checkpoints and recipes written (the CLI in-process; capsys is function-scoped)."""
    import contextlib
    import io
    import sys

    from moecompress import cli

    def call(*args):
        argv = sys.argv
        sys.argv = ["moecompress", *map(str, args)]
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(stderr):
                cli.main()
        except SystemExit as ex:
            assert not ex.code, stderr.getvalue()
        finally:
            sys.argv = argv

    call("quantize", E.model, "-m", "rtn", "--bits", 4, "--group-size", 32, "-o", E.native)
    call("prune", E.model, "-m", "random", "--keep", 4, "-o", E.pruned)
    shutil.copytree(E.native, E.badmanifest)
    (E.badmanifest / "moecompress.json").write_text('{"format": "native", "structure": {')
    shutil.copytree(E.native, E.editedmanifest)
    manifest = json.loads((E.editedmanifest / "moecompress.json").read_text())
    for layer in manifest["structure"]["layers"].values():
        layer["num_experts"] = 6
        layer["widths"] = layer["widths"][:6]
    (E.editedmanifest / "moecompress.json").write_text(json.dumps(manifest))
    recipe = lambda text: text.replace("MODEL", str(E.model)).replace("CALIB", str(E.calib))  # noqa: E731
    texts = {
        "typo": "model: MODEL\nstages:\n  - method: random\n    keep: 4\n    sope: layer\n",
        "top-typo": "model: MODEL\nstage:\n  - method: random\n    keep: 4\n",
        "wrong-type": "model: MODEL\nstages:\n  - method: random\n    ratio: half\n",
        "stages-not-list": "model: MODEL\nstages: random\n",
        "python-tag": "model: !!python/object/apply:os.system ['echo pwned']\nstages:\n  - method: random\n"
                      "    keep: 4\n",
        "not-yaml": "model: MODEL\nstages: [\n",
        "not-mapping": "- model: MODEL\n",
        "option-type": "model: MODEL\nstages:\n  - method: random\n    keep: 4\n    options: {seed: many}\n",
        "eval-limit": "model: MODEL\ncalibration: {source: CALIB}\nstages:\n  - method: random\n    keep: 4\n"
                      "eval: {tasks: reference_facts, limit: 0}\n",
        "eval-inside-input": "model: MODEL\nstages:\n  - method: random\n    keep: 4\n"
                             "eval: {tasks: reference_facts, output: MODEL/report}\n",
        "eval-unknown-task": "model: MODEL\nstages:\n  - method: random\n    keep: 4\neval: {tasks: [reference_trivia]}\n",
        "eval-empty-tasks": "model: MODEL\nstages:\n  - method: random\n    keep: 4\neval: {tasks: ' , '}\n",
        "binary": None,
    }
    for name, text in texts.items():
        path = E.recipes / f"{name}.yaml"
        if text is None:
            path.write_bytes(b"\xff\xfe\x00model: \x80\x81\n")
        else:
            path.write_text(recipe(text))
    E.digest = _tree_hash(E.root)
    return E


def _xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)



# (id, argv(E, out), fragment of the one error line (lower case), where nothing may appear (default: out), marks)
ROWS = [
    # ----- prune: targets, methods, options
    ("prune-ratio-zero", lambda e, o: ["prune", e.model, "-m", "random", "--ratio", 0, "-o", o], "ratio"),
    ("prune-ratio-one", lambda e, o: ["prune", e.model, "-m", "random", "--ratio", 1, "-o", o], "ratio"),
    ("prune-ratio-negative", lambda e, o: ["prune", e.model, "-m", "random", "--ratio", -0.25, "-o", o], "ratio"),
    ("prune-keep-zero", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 0, "-o", o], "keep"),
    ("prune-keep-all", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 9, "-o", o], "keep"),
    ("prune-keep-below-top-k", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 1, "-o", o], "top_k"),
    ("prune-ratio-and-keep", lambda e, o: ["prune", e.model, "-m", "random", "--ratio", .5, "--keep", 4, "-o", o],
     "exactly one of ratio or keep"),
    ("prune-no-target", lambda e, o: ["prune", e.model, "-m", "random", "-o", o], "exactly one of ratio or keep"),
    ("prune-bad-scope", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 4, "--scope", "all", "-o", o],
     "scope"),
    ("prune-unknown-method", lambda e, o: ["prune", e.model, "-m", "magic", "--keep", 4, "-o", o],
     "unknown method 'magic'"),
    ("prune-quant-method", lambda e, o: ["prune", e.model, "-m", "rtn", "--keep", 4, "-o", o], "rtn"),
    ("prune-unknown-option", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 4, "--set", "sed=1",
                                           "-o", o], "unknown key 'sed'"),
    ("prune-option-type", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 4, "--set", "seed=many",
                                        "-o", o], "seed"),
    ("prune-set-syntax", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 4, "--set", "seed", "-o", o],
     "key=value"),
    ("prune-samples-zero", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.calib,
                                         "--samples", 0, "-o", o], "samples"),
    ("prune-unknown-data-key", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.calib,
                                             "--set", "data.fild=x", "-o", o], "fild"),
    # ----- calibration data
    ("data-missing", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data",
                                   e.root / "nope.txt", "-o", o], "does not exist"),
    ("data-empty", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.empty, "-o", o],
     "no text"),
    ("data-whitespace", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.blank,
                                      "-o", o], "no text"),
    ("data-binary", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.binary, "-o", o],
     "utf-8"),
    ("data-not-utf8", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.latin1,
                                    "-o", o], "utf-8"),
    ("data-jsonl-no-field", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.nofield,
                                          "-o", o], "no 'text' field"),
    ("data-jsonl-bad-line", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.badjsonl,
                                          "-o", o], "not valid json"),
    ("data-wrong-suffix", lambda e, o: ["prune", e.model, "-m", "frequency", "--keep", 4, "--data", e.csv,
                                        "-o", o], ".csv"),
    # ----- models
    ("model-dense", lambda e, o: ["prune", e.dense, "-m", "random", "--keep", 2, "-o", o], "dense model"),
    ("model-unsupported", lambda e, o: ["prune", e.granite, "-m", "random", "--keep", 2, "-o", o],
     "not a supported moe family"),
    ("model-no-tokenizer", lambda e, o: ["prune", e.notok, "-m", "frequency", "--keep", 4, "--data", e.calib,
                                         "-o", o], "tokenizer"),
    ("model-truncated", lambda e, o: ["prune", e.truncated, "-m", "random", "--keep", 4, "-o", o], "cannot read"),
    ("model-bad-config", lambda e, o: ["prune", e.badconfig, "-m", "random", "--keep", 4, "-o", o], "config"),
    ("model-no-config", lambda e, o: ["prune", e.noconfig, "-m", "random", "--keep", 4, "-o", o], "config.json"),
    ("model-missing", lambda e, o: ["prune", e.root / "no-such-model", "-m", "random", "--keep", 4, "-o", o],
     "no-such-model"),
    ("model-nan-weights", lambda e, o: ["prune", e.nan, "-m", "frequency", "--keep", 4, "--data", e.calib,
                                        "--samples", 4, "--seq-len", 16, "-o", o], "nan"),
    ("model-inf-weights", lambda e, o: ["quantize", e.inf, "-m", "rtn", "--bits", 4, "-o", o], "nan/inf"),
    ("model-inf-weights-prune", lambda e, o: ["prune", e.inf, "-m", "random", "--keep", 4, "-o", o], "inf"),
    # ----- outputs
    ("out-is-input", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 4, "-o", e.model], "input model",
     lambda e, o: e.model / "moecompress.json"),
    ("out-inside-input", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 4, "-o", e.model / "sub"],
     "input model", lambda e, o: e.model / "sub"),
    ("out-not-empty", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 4, "-o", o], "--overwrite",
     "precious"),
    ("out-is-file", lambda e, o: ["prune", e.model, "-m", "random", "--keep", 4, "-o", e.calib], "file",
     lambda e, o: e.calib.parent / "calib.txt.tmp"),
    # ----- quantize
    ("quant-bits-nine", lambda e, o: ["quantize", e.model, "-m", "rtn", "--bits", 9, "-o", o], "bits"),
    ("quant-bits-zero", lambda e, o: ["quantize", e.model, "-m", "rtn", "--bits", 0, "-o", o], "bits"),
    ("quant-pmq-unreachable", lambda e, o: ["quantize", e.model, "-m", "pmq", "--avg-bits", 0.5, "--data", e.calib,
                                            "-o", o], "avg"),
    ("quant-pruning-method", lambda e, o: ["quantize", e.model, "-m", "frequency", "--bits", 4, "-o", o],
     "pruning"),
    ("quant-group-size-zero", lambda e, o: ["quantize", e.model, "-m", "rtn", "--bits", 4, "--group-size", 0,
                                            "-o", o], "group_size"),
    ("quant-attn-bits-unsupported", lambda e, o: ["quantize", e.model, "-m", "bnb-nf4", "--bits", 4, "--attn-bits",
                                                  4, "--data", e.calib, "-o", o], "attn"),
    # ----- run
    ("recipe-missing", lambda e, o: ["run", e.recipes / "nope.yaml", "-o", o], "does not exist"),
    ("recipe-key-typo", lambda e, o: ["run", e.recipes / "typo.yaml", "-o", o], "unknown key 'sope' at stages.0"),
    ("recipe-top-level-typo", lambda e, o: ["run", e.recipes / "top-typo.yaml", "-o", o], "unknown key 'stage'"),
    ("recipe-wrong-type", lambda e, o: ["run", e.recipes / "wrong-type.yaml", "-o", o], "stages.0.ratio"),
    ("recipe-stages-not-list", lambda e, o: ["run", e.recipes / "stages-not-list.yaml", "-o", o], "stages"),
    ("recipe-python-tag", lambda e, o: ["run", e.recipes / "python-tag.yaml", "-o", o], "not valid yaml"),
    ("recipe-not-yaml", lambda e, o: ["run", e.recipes / "not-yaml.yaml", "-o", o], "not valid yaml"),
    ("recipe-not-mapping", lambda e, o: ["run", e.recipes / "not-mapping.yaml", "-o", o], "mapping"),
    ("recipe-binary", lambda e, o: ["run", e.recipes / "binary.yaml", "-o", o], "recipe"),
    ("recipe-option-type", lambda e, o: ["run", e.recipes / "option-type.yaml", "-o", o], "stages.0.options.seed"),
    ("recipe-eval-limit", lambda e, o: ["run", e.recipes / "eval-limit.yaml", "-o", o], "eval.limit"),
    ("recipe-eval-unknown-task", lambda e, o: ["run", e.recipes / "eval-unknown-task.yaml", "-o", o],
     "unknown reference task"),
    ("recipe-eval-empty-tasks", lambda e, o: ["run", e.recipes / "eval-empty-tasks.yaml", "-o", o], "eval.tasks"),
    ("recipe-eval-inside-input", lambda e, o: ["run", e.recipes / "eval-inside-input.yaml", "-o", o],
     "input model", lambda e, o: e.model / "report"),
    # ----- eval / report
    ("eval-unknown-task", lambda e, o: ["eval", e.model, "--tasks", "reference_trivia", "-o", o],
     "unknown reference task"),
    ("eval-empty-tasks", lambda e, o: ["eval", e.model, "--tasks", ",", "-o", o], "no evaluation task"),
    ("eval-limit-zero", lambda e, o: ["eval", e.model, "--tasks", "reference_facts", "--limit", 0, "-o", o],
     "limit"),
    ("eval-missing-model", lambda e, o: ["eval", e.root / "no-such-model", "--tasks", "reference_facts", "-o", o],
     "no-such-model"),
    ("eval-no-tokenizer", lambda e, o: ["eval", e.notok, "--tasks", "reference_facts", "--limit", 2, "-o", o],
     "tokenizer"),
    ("eval-out-inside-model", lambda e, o: ["eval", e.model, "--tasks", "reference_facts", "-o", e.model / "r"],
     "input model", lambda e, o: e.model / "r"),
    ("eval-bad-manifest", lambda e, o: ["eval", e.badmanifest, "--tasks", "reference_facts", "-o", o],
     "moecompress.json"),
    ("report-not-a-report", lambda e, o: ["report", e.reportless, "-o", o], "report.json"),
    ("report-missing-dir", lambda e, o: ["report", e.root / "no-such-report", "-o", o], "report.json"),
    # ----- calibrate / analyze
    ("calibrate-unknown-collector", lambda e, o: ["calibrate", e.model, "--data", e.calib, "--collect", "magic",
                                                  "-o", o], "unknown collector 'magic'"),
    ("calibrate-no-collector", lambda e, o: ["calibrate", e.model, "--data", e.calib, "--collect", ",", "-o", o],
     "at least one collector"),
    ("calibrate-bad-option", lambda e, o: ["calibrate", e.model, "--data", e.calib, "--collect", "gram",
                                           "--set", "gram.nope=1", "-o", o], "nope"),
    ("calibrate-option-value", lambda e, o: ["calibrate", e.model, "--data", e.calib, "--collect", "channel_grads",
                                             "--set", "channel_grads.loss_reduction=max", "-o", o], "loss_reduction"),
    ("calibrate-no-tokenizer", lambda e, o: ["calibrate", e.notok, "--data", e.calib, "--collect", "routing",
                                             "-o", o], "tokenizer"),
    ("calibrate-batch-zero", lambda e, o: ["calibrate", e.model, "--data", e.calib, "--batch-size", 0, "-o", o],
     "batch"),
    ("calibrate-dense", lambda e, o: ["calibrate", e.dense, "--data", e.calib, "-o", o], "dense model"),
    ("calibrate-out-inside-model", lambda e, o: ["calibrate", e.model, "--data", e.calib, "-o", e.model / "s"],
     "input model", lambda e, o: e.model / "s"),
    ("analyze-empty-data", lambda e, o: ["analyze", e.model, "--data", e.empty, "-o", o], "no text"),
    ("analyze-non-data-set", lambda e, o: ["analyze", e.model, "--set", "foo=1", "-o", o], "data.key=value"),
    ("analyze-truncated", lambda e, o: ["analyze", e.truncated, "--data", e.calib, "-o", o], "cannot read"),
    ("analyze-not-empty", lambda e, o: ["analyze", e.model, "--data", e.calib, "-o", o], "--overwrite", "precious"),
    # ----- export
    ("export-unknown-format", lambda e, o: ["export", e.native, "--format", "onnx", "-o", o], "unknown export format"),
    ("export-not-a-checkpoint", lambda e, o: ["export", e.noconfig, "--format", "hf", "-o", o], "config.json"),
    ("export-onto-source", lambda e, o: ["export", e.native, "--format", "hf", "-o", e.native], "input model",
     lambda e, o: e.native / "model.safetensors.index.json"),
    ("export-ct-unquantized", lambda e, o: ["export", e.pruned, "--format", "compressed-tensors", "-o", o],
     "no quantized weights"),
    ("export-ct-asymmetric", lambda e, o: ["export", e.native, "--format", "compressed-tensors", "-o", o],
     "asymmetric"),
    ("export-gguf-unknown-option", lambda e, o: ["export", e.native, "--format", "gguf", "--set", "nope=1", "-o", o],
     "nope"),
    ("export-bad-manifest", lambda e, o: ["export", e.badmanifest, "--format", "hf", "-o", o], "moecompress.json"),
    ("export-edited-manifest", lambda e, o: ["export", e.editedmanifest, "--format", "hf", "-o", o], "manifest"),
    ("export-truncated", lambda e, o: ["export", e.truncated, "--format", "hf", "-o", o], "cannot read"),
]


def _param(row):
    ident, argv, fragment, *rest = row
    where = rest[0] if rest else None
    marks = rest[1:] if len(rest) > 1 else ()
    return pytest.param(argv, fragment, where, id=ident, marks=marks)


@pytest.mark.parametrize("argv,fragment,where", [_param(r) for r in ROWS])
def test_bad_input(inputs, argv, fragment, where, tmp_path, capsys):
    out = tmp_path / "out"
    precious = where == "precious"
    if precious:
        out.mkdir()
        (out / "precious.txt").write_text("keep me")
    target = out if where in (None, "precious") else where(inputs, out)
    before = sorted(p.name for p in target.parent.iterdir()) if target.parent.exists() else []
    code, stdout, err = run_cli(capsys, *argv(inputs, out))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, stdout[-500:], err[-1500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert fragment.lower() in lines[0].lower(), lines[0]
    if precious:
        assert [p.name for p in out.iterdir()] == ["precious.txt"]
        assert (out / "precious.txt").read_text() == "keep me"
    else:
        assert not target.exists(), f"{target} was written"
    after = sorted(p.name for p in target.parent.iterdir()) if target.parent.exists() else []
    assert after == before, f"left beside the output: {sorted(set(after) - set(before))}"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert _tree_hash(inputs.root) == inputs.digest, "an input was changed"


def test_table_is_large_and_covers_every_command():
    commands = set()
    for row in ROWS:
        commands.add(row[1](SimpleNamespace(**{k: Path("/x") for k in (
            "model", "dense", "granite", "notok", "truncated", "badconfig", "nan", "inf", "noconfig", "calib", "empty",
            "blank", "binary", "latin1", "nofield", "badjsonl", "csv", "native", "pruned", "badmanifest",
            "editedmanifest", "reportless", "recipes", "root")}), Path("/o"))[0])
    assert len(ROWS) >= 30
    assert commands == {"prune", "quantize", "run", "eval", "calibrate", "analyze", "report", "export"}


# ----- commands that used to ignore what they were given ---------------------------------------------------------
def test_recipe_eval_block_evaluates_the_written_checkpoint(inputs, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {inputs.model}\ncalibration: {{source: {inputs.calib}, samples: 4, seq_len: 16}}\n"
                      f"stages:\n  - method: frequency\n    keep: 6\n"
                      f"output: {{path: {tmp_path / 'out'}}}\neval: {{tasks: reference_facts, limit: 2}}\n")
    code, out, err = run_cli(capsys, "run", recipe)
    assert code == 0, err
    report = tmp_path / "out.report"
    assert f"evalreport:{report}" in "".join(out.split())  # the console wraps long lines
    data = json.loads((report / "report.json").read_text())
    assert "reference_facts" in data["results"]["results"] and "reference_facts" in data["baseline"]["results"]
    assert data["facts"]["experts_per_layer"] == [6, 6] and data["baseline_facts"]["experts_per_layer"] == [8, 8]
    assert data["facts"]["model"] == str(tmp_path / "out")
    # a second run needs --overwrite for the report as well as the checkpoint
    code, _, err = run_cli(capsys, "run", recipe)
    assert code == 2 and "--overwrite" in err
    assert _tree_hash(inputs.root) == inputs.digest


def test_calibrate_shared_channel_grads_through_the_cli(tmp_path, capsys):
    """The collector is registered by calibration.collectors itself, not as a side effect of importing heapr."""
    from moecompress.calibration.cache import load_stats

    model = save_tiny("qwen2_moe", tmp_path / "model")
    (tmp_path / "calib.txt").write_text(CORPUS)
    code, out, err = run_cli(capsys, "calibrate", model, "--data", tmp_path / "calib.txt", "--collect",
                             "shared_channel_grads", "--samples", 4, "--seq-len", 16, "-o", tmp_path / "stats")
    assert code == 0, err
    stats = load_stats(tmp_path / "stats")
    score = stats["shared_channel_grads"].score(0, "product_of_means", "sum")
    assert score.shape == (24,) and bool((score > 0).any())


def test_collector_registry_does_not_need_methods():
    import subprocess
    import sys

    code = ("import sys; from moecompress.calibration.collectors import COLLECTORS; "
            "assert 'shared_channel_grads' in COLLECTORS, sorted(COLLECTORS); "
            "assert not any(m.startswith('moecompress.methods') for m in sys.modules), 'methods imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1000:]
