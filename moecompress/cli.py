"""The `moecompress` command line: flags → Recipe → recipes.run(). No logic of its own.

Exit codes: 0 ok, 2 user error (one line, no traceback; `--debug` shows it), 1 internal error.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import click
import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from moecompress.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress Mixture-of-Experts language models and measure what was lost.")
out = Console()
err = Console(stderr=True)


def _parse_sets(sets: list[str]) -> tuple[dict, dict]:
    """--set key=value pairs → (method options, calibration overrides for keys 'data.*' / 'calibration.*')."""
    options, calibration = {}, {}
    for item in sets:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"--set expects key=value, got '{item}'")
        parsed = yaml.safe_load(value) if value else ""
        head, dot, rest = key.partition(".")
        if dot and head in ("data", "calibration"):
            calibration[rest] = parsed
        else:
            options[key] = parsed
    return options, calibration


# Where and how the model is held: the same options on prune, quantize and run (→ the recipe's `model:` spec).
DTYPE = typer.Option(None, "--dtype", help="auto (the checkpoint's own, default) | bfloat16 | float16 | float32")
DEVICE = typer.Option(None, "--device", help="auto (a GPU when there is one, default) | cpu | cuda | cuda:N")
DEVICE_MAP = typer.Option(None, "--device-map", help="accelerate device_map for a model held in memory: auto, "
                          "balanced, sequential, cpu, or JSON {module: device}")
MAX_MEMORY = typer.Option(None, "--max-memory", help="per-device budget for --device-map, e.g. 0=20GiB,cpu=60GiB")
OFFLOAD = typer.Option(None, "--offload-folder", help="disk offload folder for --device-map")
ONLOAD = typer.Option(None, "--onload", help="memory: load whole | layers: read one decoder layer at a time "
                      "(models larger than RAM/GPU) | auto (default: layers when the model needs over half the "
                      "free memory)")
SHARD = typer.Option(None, "--max-shard-size", help="largest output safetensors shard (default 5GB)")
FORMAT = typer.Option(None, "--format", help="native (default) | compressed-tensors (vLLM, SGLang) | gguf "
                      "(llama.cpp) | hf (dequantized stock): the output as `moecompress export` writes it")


def _model(model_id: str, dtype, device, device_map, max_memory, offload_folder, onload) -> dict:
    """The recipe's model spec from the CLI flags (unset flags keep the spec's defaults)."""
    spec = {"id": model_id, "dtype": dtype, "device": device, "device_map": _device_map(device_map),
            "max_memory": max_memory, "offload_folder": offload_folder, "onload": onload}
    return {k: v for k, v in spec.items() if v is not None}


def _device_map(text: str | None):
    if text is None or not text.strip().startswith("{"):
        return text
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"--device-map is not valid JSON ({e.msg}); use auto, cpu or {{\"module\": \"device\"}}") \
            from None
    if not isinstance(value, dict):
        raise UserError("--device-map JSON must be an object {module: device}")
    return value


def _output(output, overwrite: bool, max_shard_size, fmt=None, target=None) -> dict:
    spec = {"path": str(output) if output else None, "overwrite": overwrite, "format": fmt, "target": target,
            "max_shard_size": max_shard_size}
    return {k: v for k, v in spec.items() if v is not None or k == "path"}


def _report(result, dry_run: bool) -> None:
    for line in result.lines:
        out.print(line, highlight=False)
    if not dry_run:
        out.print(f"wrote {result.output}")


@app.command()
def prune(
    model: str = typer.Argument(..., help="local model directory or Hugging Face hub id"),
    method: str = typer.Option(..., "-m", "--method", help="pruning method (see `moecompress methods`)"),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="fraction of routed experts (channel methods: "
                                          "routed-expert channels) removed, 0 < R < 1"),
    keep: Optional[int] = typer.Option(None, "--keep", help="experts kept per layer"),
    scope: Optional[str] = typer.Option(None, "--scope", help="layer: same count per layer; global: ranked across "
                                        "layers (default: the method's; layer for expert methods, global for heapr)"),
    data: str = typer.Option("reference", "--data", help="calibration text: .txt/.jsonl file, reference[:domain], hf:NAME"),
    samples: int = typer.Option(64, "--samples", help="calibration sequences"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per calibration sequence"),
    seed: int = typer.Option(0, "--seed"),
    sets: list[str] = typer.Option([], "--set", help="method option key=value (data.KEY=VALUE for calibration)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the per-layer plan; write nothing"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration statistics"),
    dtype: Optional[str] = DTYPE, device: Optional[str] = DEVICE, device_map: Optional[str] = DEVICE_MAP,
    max_memory: Optional[str] = MAX_MEMORY, offload_folder: Optional[str] = OFFLOAD, onload: Optional[str] = ONLOAD,
    max_shard_size: Optional[str] = SHARD, fmt: Optional[str] = FORMAT,
):
    """Remove experts (or channels) from an MoE model."""
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import parse_recipe

    options, calibration = _parse_sets(sets)
    recipe = parse_recipe({
        "model": _model(model, dtype, device, device_map, max_memory, offload_folder, onload),
        "calibration": {"source": data, "samples": samples, "seq_len": seq_len, "seed": seed,
                        "cache": not no_cache, **calibration},
        "stages": [{"method": method, "ratio": ratio, "keep": keep, "scope": scope, "options": options}],
        "output": _output(output, overwrite, max_shard_size, fmt),
    })
    _report(run(recipe, dry_run=dry_run), dry_run)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="local model directory or Hugging Face hub id"),
    method: str = typer.Option(..., "-m", "--method", help="quantization method (see `moecompress methods`)"),
    bits: Optional[int] = typer.Option(None, "--bits", help="uniform bits per routed-expert weight (1-8)"),
    avg_bits: Optional[float] = typer.Option(None, "--avg-bits", help="average bits budget (mixed precision)"),
    group_size: Optional[int] = typer.Option(None, "--group-size", help="input columns per scale/zero group "
                                             "(default 128; 32 for --target llamacpp)"),
    attn_bits: Optional[int] = typer.Option(None, "--attn-bits", help="bits for attention/shared/dense linears"),
    data: str = typer.Option("reference", "--data", help="calibration text (for data-aware methods)"),
    samples: int = typer.Option(64, "--samples"),
    seq_len: int = typer.Option(256, "--seq-len"),
    seed: int = typer.Option(0, "--seed"),
    sets: list[str] = typer.Option([], "--set", help="method option key=value (data.KEY=VALUE for calibration)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    dry_run: bool = typer.Option(False, "--dry-run"),
    no_cache: bool = typer.Option(False, "--no-cache"),
    dtype: Optional[str] = DTYPE, device: Optional[str] = DEVICE, device_map: Optional[str] = DEVICE_MAP,
    max_memory: Optional[str] = MAX_MEMORY, offload_folder: Optional[str] = OFFLOAD, onload: Optional[str] = ONLOAD,
    max_shard_size: Optional[str] = SHARD, fmt: Optional[str] = FORMAT,
    target: Optional[str] = typer.Option(None, "--target", help="vllm | sglang | llamacpp: quantize with a scheme "
                                         "the server runs and write its format (refused in one line if it cannot)"),
):
    """Quantize the routed experts (and optionally other linears) of an MoE model."""
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import parse_recipe

    from moecompress.methods.base import get_method

    options, calibration = _parse_sets(sets)
    cls = get_method(method)
    if cls.kind != "quantization":
        raise UserError(f"'{method}' is a {cls.kind} method; `quantize` takes rtn, gptq, pmq, bnb-nf4 or bnb-int8 "
                        f"(pruning: moecompress prune)")
    fields = cls.Config.model_fields
    if "group_size" in fields and group_size is not None:
        options.setdefault("group_size", group_size)
    elif group_size is not None and "group_size" not in fields:
        raise UserError(f"{method} has a fixed block layout: drop --group-size")
    if attn_bits is not None:
        if "attn_bits" not in fields:
            raise UserError(f"{method} quantizes the routed experts only: drop --attn-bits")
        options["attn_bits"] = attn_bits
    recipe = parse_recipe({
        "model": _model(model, dtype, device, device_map, max_memory, offload_folder, onload),
        "calibration": {"source": data, "samples": samples, "seq_len": seq_len, "seed": seed,
                        "cache": not no_cache, **calibration},
        "stages": [{"method": method, "bits": bits, "avg_bits": avg_bits, "options": options}],
        "output": _output(output, overwrite, max_shard_size, fmt, target),
    })  # run() checks the stage's target (--bits / --avg-bits) before loading the model: exit 2, nothing written
    _report(run(recipe, dry_run=dry_run), dry_run)


@app.command("run")
def run_recipe(
    recipe_path: Path = typer.Argument(..., help="recipe YAML (or the name of a built-in recipe)"),
    model: Optional[str] = typer.Option(None, "--model", help="override the recipe's model"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="override the recipe's output directory"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    dry_run: bool = typer.Option(False, "--dry-run"),
    dtype: Optional[str] = DTYPE, device: Optional[str] = DEVICE, device_map: Optional[str] = DEVICE_MAP,
    max_memory: Optional[str] = MAX_MEMORY, offload_folder: Optional[str] = OFFLOAD, onload: Optional[str] = ONLOAD,
    max_shard_size: Optional[str] = SHARD, fmt: Optional[str] = FORMAT,
):
    """Run a recipe: model → calibration → stages → checkpoint (flags override the recipe's model and output)."""
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import load_recipe, parse_recipe

    recipe = load_recipe(recipe_path).model_dump(mode="json", exclude_unset=True)
    recipe["model"] = {**recipe["model"], **_model(model or recipe["model"]["id"], dtype, device, device_map,
                                                     max_memory, offload_folder, onload)}
    output_spec = recipe.setdefault("output", {})
    if output:
        output_spec["path"] = str(output)
    output_spec["overwrite"] = output_spec.get("overwrite", False) or overwrite
    if max_shard_size is not None:
        output_spec["max_shard_size"] = max_shard_size
    if fmt is not None:
        output_spec["format"] = fmt
    _report(run(parse_recipe(recipe), dry_run=dry_run), dry_run)


@app.command("export")
def export_checkpoint(
    checkpoint: Path = typer.Argument(..., help="checkpoint directory (moecompress output or a HF model)"),
    fmt: str = typer.Option(..., "--format", "-f", help="compressed-tensors (vLLM, SGLang) | gguf (llama.cpp) | "
                            "hf (dequantized stock transformers)"),
    output: Path = typer.Option(..., "-o", "--output", help="output directory"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    max_shard_size: Optional[str] = SHARD,
    sets: list[str] = typer.Option([], "--set", help="format option key=value (gguf: requantize=q8_0|q4_0|f16|..., "
                                   "pre=NAME: the llama.cpp pre-tokenizer)"),
):
    """Write a compressed checkpoint in a format a server loads without moecompress."""
    from moecompress.export import export
    from moecompress.runtime import parse_size

    options, _ = _parse_sets(sets)
    summary = export(checkpoint, fmt, output, overwrite=overwrite, options=options,
                     max_shard_size=parse_size(max_shard_size) if max_shard_size else None)
    for key, value in summary.items():
        out.print(f"  {key}: {value}", highlight=False)
    out.print(f"wrote {summary['output']}")


@app.command("eval")
def eval_model(
    model: str = typer.Argument(..., help="checkpoint directory, hub id, or reference:NAME"),
    tasks: str = typer.Option("reference", "--tasks", help="reference (offline suite) or lm-eval task names, comma-separated"),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="base model (evaluated the same way) or its report dir"),
    limit: Optional[int] = typer.Option(None, "--limit", help="documents per task (default: all)"),
    output: Path = typer.Option(..., "-o", "--output", help="report directory"),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Score a model with lm-eval; write report.json, report.md and plots (recovery vs --baseline)."""
    from moecompress.evals.pipeline import eval_to_report

    path = eval_to_report(model, output, tasks=tasks, limit=limit, baseline=baseline, overwrite=overwrite)
    out.print((path / "report.md").read_text(), highlight=False, soft_wrap=True)
    out.print(f"wrote {path}")


@app.command()
def report(
    dirs: list[Path] = typer.Argument(..., help="report directories written by `moecompress eval`"),
    output: Path = typer.Option(..., "-o", "--output", help="directory for the comparison"),
):
    """Compare several evaluation reports: one table and a quality-vs-size Pareto plot."""
    from moecompress.evals.pipeline import ensure_reports
    from moecompress.evals.report import compare_reports

    path = compare_reports(ensure_reports(dirs), output)
    out.print(f"wrote {path}")


@app.command()
def demo(
    reference: str = typer.Option("tiny", "--model", help="reference model: tiny (minutes) or small / small-shared"),
    method: str = typer.Option("frequency", "-m", "--method"),
    ratio: float = typer.Option(0.25, "--ratio"),
    limit: Optional[int] = typer.Option(None, "--limit", help="documents per task (default: all)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="default: runs/demo-MODEL-METHOD-RATIO"),
):
    """Build the reference MoE if missing, compress it, evaluate base and compressed, write the report."""
    from moecompress.evals.pipeline import run_demo

    path = run_demo(reference, method, ratio, output, limit)
    out.print((path / "report" / "report.md").read_text(), highlight=False, soft_wrap=True)
    out.print(f"report: {path / 'report' / 'report.md'}  compressed model: {path / 'model'}")


reference_app = typer.Typer(help="The bundled reference MoE models (trained offline from bundled text).")
app.add_typer(reference_app, name="reference")


@reference_app.command("build")
def reference_build(name: str = typer.Argument("tiny"), force: bool = typer.Option(False, "--force")):
    """Train (or reuse) a reference model; print its directory."""
    from moecompress.reference import build_reference

    out.print(str(build_reference(name, force=force)))


@reference_app.command("path")
def reference_path_cmd(name: str = typer.Argument("tiny")):
    """Print a built reference model's directory."""
    from moecompress.reference import reference_path

    out.print(str(reference_path(name)))


@app.command()
def methods():
    """List the compression methods: name, kind, paper, one line."""
    from moecompress.methods.base import all_methods

    table = Table("name", "kind", "paper", "what it does")
    for name, cls in all_methods().items():
        table.add_row(name, cls.kind, cls.paper, cls.summary)
    out.print(table)


def _data_spec(data: str, samples: int, seq_len: int, seed: int, calibration: dict):
    from pydantic import ValidationError

    from moecompress.calibration.data import DataSpec

    try:
        return DataSpec(source=data, samples=samples, seq_len=seq_len, seed=seed, **calibration)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"data.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


@app.command()
def calibrate(
    model: str = typer.Argument(..., help="local model directory or Hugging Face hub id"),
    data: str = typer.Option("reference", "--data", help="calibration text: .txt/.jsonl, reference[:domain], "
                             "hf:NAME[:CONFIG][:SPLIT][:FIELD], demos:PROMPTS.jsonl"),
    collect: str = typer.Option("routing", "--collect", help="comma-separated collectors: routing, reap, easy_ep, "
                                "channels, channel_grads, gram, block_io"),
    samples: int = typer.Option(64, "--samples", help="calibration sequences"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per calibration sequence"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    sequential: bool = typer.Option(False, "--sequential", help="layer-by-layer pass (forward-only collectors)"),
    sets: list[str] = typer.Option([], "--set", help="collector option NAME.KEY=VALUE (data.KEY=VALUE for data)"),
    output: Path = typer.Option(..., "-o", "--output", help="statistics directory to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration statistics"),
):
    """Gather calibration statistics (safetensors + JSON summary) for the chosen collectors."""
    from moecompress.calibration.commands import calibrate_to_dir, parse_collectors

    options, calibration = _parse_sets(sets)
    spec = _data_spec(data, samples, seq_len, seed, calibration)
    facts = calibrate_to_dir(model, spec, parse_collectors(collect, options), output, batch_size=batch_size,
                             cache=not no_cache, overwrite=overwrite,
                             engine="sequential" if sequential else "full")
    out.print(f"collected {', '.join(facts['cache_hits'] + facts['computed'])} over {facts['tokens']} tokens "
              f"(cache: {', '.join(facts['cache_hits']) or 'none'})", highlight=False)
    out.print(f"wrote {output}")


@app.command()
def analyze(
    model: str = typer.Argument(..., help="local model directory or Hugging Face hub id"),
    data: str = typer.Option("reference", "--data", help="calibration text (as for calibrate)"),
    samples: int = typer.Option(64, "--samples", help="calibration sequences"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per calibration sequence"),
    seed: int = typer.Option(0, "--seed"),
    batch_size: int = typer.Option(8, "--batch-size", help="sequences per forward pass"),
    sets: list[str] = typer.Option([], "--set", help="data.KEY=VALUE for calibration data options"),
    output: Path = typer.Option(..., "-o", "--output", help="report directory to write"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration statistics"),
):
    """Expert usage before compressing: heatmap, never-routed experts, routing entropy per layer."""
    from moecompress.calibration.commands import analyze_to_dir

    options, calibration = _parse_sets(sets)
    if options:
        raise UserError(f"analyze takes only data.KEY=VALUE settings, not {', '.join(options)}")
    spec = _data_spec(data, samples, seq_len, seed, calibration)
    analysis = analyze_to_dir(model, spec, output, batch_size=batch_size, cache=not no_cache, overwrite=overwrite)
    for i, layer in analysis["layers"].items():
        out.print(f"layer {i:>3}: never routed {layer['never_routed'] or '-'}, usage entropy "
                  f"{layer['usage_entropy']:.3f}, 90% of tokens on {layer['experts_for_share']['90%']} of "
                  f"{layer['experts']} experts", highlight=False)
    out.print(f"wrote {output}")


def main() -> None:
    debug = "--debug" in sys.argv
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval/datasets bars; our own passes use rich
    if debug:
        sys.argv.remove("--debug")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)])
    import transformers

    transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "lm_eval", "datasets", "httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as e:
        e.show()
        sys.exit(2 if isinstance(e, click.UsageError) else e.exit_code)
    except UserError as e:
        if debug:
            traceback.print_exc()
        err.print(f"error: {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            _internal_error(e, debug)
        if debug:
            traceback.print_exc()
        err.print(f"error: no space left on the device ({e.filename or 'output'}): free space or choose another -o",
                  highlight=False, soft_wrap=True)
        sys.exit(2)
    except Exception as e:
        _internal_error(e, debug)


def _internal_error(e: Exception, debug: bool) -> None:
    """An internal error: one line (exit 1) unless --debug."""
    if debug:
        raise e
    err.print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
    sys.exit(1)

if __name__ == "__main__":
    main()
