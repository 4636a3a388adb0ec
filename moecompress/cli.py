"""The `moecompress` command line: flags → Recipe → recipes.run(). No logic of its own.

Exit codes: 0 ok, 2 user error (one line, no traceback; `--debug` shows it), 1 internal error.
"""

from __future__ import annotations

import logging
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


def _report(result, dry_run: bool) -> None:
    for line in result.lines:
        out.print(line, highlight=False)
    if not dry_run:
        out.print(f"wrote {result.output}")


@app.command()
def prune(
    model: str = typer.Argument(..., help="local model directory or Hugging Face hub id"),
    method: str = typer.Option(..., "-m", "--method", help="pruning method (see `moecompress methods`)"),
    ratio: Optional[float] = typer.Option(None, "--ratio", help="fraction of routed experts removed, 0 < R < 1"),
    keep: Optional[int] = typer.Option(None, "--keep", help="experts kept per layer"),
    scope: str = typer.Option("layer", "--scope", help="layer: same count per layer; global: ranked across layers"),
    data: str = typer.Option("reference", "--data", help="calibration text: .txt/.jsonl file, reference[:domain], hf:NAME"),
    samples: int = typer.Option(64, "--samples", help="calibration sequences"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per calibration sequence"),
    seed: int = typer.Option(0, "--seed"),
    sets: list[str] = typer.Option([], "--set", help="method option key=value (data.KEY=VALUE for calibration)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="output directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty output directory"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the per-layer plan; write nothing"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute calibration statistics"),
):
    """Remove experts (or channels) from an MoE model."""
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import parse_recipe

    options, calibration = _parse_sets(sets)
    recipe = parse_recipe({
        "model": model,
        "calibration": {"source": data, "samples": samples, "seq_len": seq_len, "seed": seed,
                        "cache": not no_cache, **calibration},
        "stages": [{"method": method, "ratio": ratio, "keep": keep, "scope": scope, "options": options}],
        "output": {"path": str(output) if output else None, "overwrite": overwrite},
    })
    _report(run(recipe, dry_run=dry_run), dry_run)


@app.command()
def quantize(
    model: str = typer.Argument(..., help="local model directory or Hugging Face hub id"),
    method: str = typer.Option(..., "-m", "--method", help="quantization method (see `moecompress methods`)"),
    bits: Optional[int] = typer.Option(None, "--bits", help="uniform bits per routed-expert weight (1-8)"),
    avg_bits: Optional[float] = typer.Option(None, "--avg-bits", help="average bits budget (mixed precision)"),
    group_size: int = typer.Option(128, "--group-size", help="input columns per scale/zero group"),
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
):
    """Quantize the routed experts (and optionally other linears) of an MoE model."""
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import parse_recipe

    options, calibration = _parse_sets(sets)
    options.setdefault("group_size", group_size)
    if attn_bits is not None:
        options["attn_bits"] = attn_bits
    recipe = parse_recipe({
        "model": model,
        "calibration": {"source": data, "samples": samples, "seq_len": seq_len, "seed": seed,
                        "cache": not no_cache, **calibration},
        "stages": [{"method": method, "bits": bits, "avg_bits": avg_bits, "options": options}],
        "output": {"path": str(output) if output else None, "overwrite": overwrite},
    })
    _report(run(recipe, dry_run=dry_run), dry_run)


@app.command("run")
def run_recipe(
    recipe_path: Path = typer.Argument(..., help="recipe YAML (or the name of a built-in recipe)"),
    model: Optional[str] = typer.Option(None, "--model", help="override the recipe's model"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="override the recipe's output directory"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    dry_run: bool = typer.Option(False, "--dry-run"),
):
    """Run a recipe: model → calibration → stages → checkpoint."""
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import load_recipe

    recipe = load_recipe(recipe_path)
    if model:
        recipe.model = model
    if output:
        recipe.output.path = str(output)
    recipe.output.overwrite = recipe.output.overwrite or overwrite
    _report(run(recipe, dry_run=dry_run), dry_run)


@app.command()
def methods():
    """List the compression methods: name, kind, paper, one line."""
    from moecompress.methods.base import all_methods

    table = Table("name", "kind", "paper", "what it does")
    for name, cls in all_methods().items():
        table.add_row(name, cls.kind, cls.paper, cls.summary)
    out.print(table)


def main() -> None:
    debug = "--debug" in sys.argv
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
    except Exception as e:  # an internal error: one line unless --debug
        if debug:
            raise
        err.print(f"internal error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                  f"(rerun with --debug for the traceback)", highlight=False, soft_wrap=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
