"""Evaluate checkpoints end to end (load → lm-eval → size facts → report), and the `demo` job.

The CLI's `eval`, `report` and `demo` commands are thin wrappers over these functions.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from moecompress.calibration.commands import check_tokenizer
from moecompress.compress.checkpoint import check_output_dir, load
from moecompress.errors import UserError
from moecompress.evals.lmeval import check_tasks, evaluate
from moecompress.evals.report import size_facts, write_report
from moecompress.paths import atomic_directory
from moecompress.recipes.run import load_tokenizer, resolve_model

log = logging.getLogger("moecompress")


def evaluate_model(model_id: str, tasks: str = "reference", limit: int | None = None,
                   label: str | None = None) -> tuple[dict, dict]:
    """(lm-eval results, size facts) of a checkpoint (local path, hub id or reference:NAME); `label` names it in
    the facts (default: `model_id`)."""
    path = resolve_model(model_id)
    model = load(path)
    tokenizer = check_tokenizer(load_tokenizer(path, required=True), path)
    start = time.perf_counter()
    results = evaluate(model, tokenizer, tasks=tasks, limit=limit)
    facts = size_facts(model, path if Path(path).is_dir() else None)
    facts["eval_seconds"] = round(time.perf_counter() - start, 1)
    facts["model"] = str(label or model_id)
    return results, facts


def _baseline(baseline: str | None, tasks: str, limit: int | None) -> dict | None:
    """A baseline report: an existing report directory is reused; a model is evaluated with the same settings."""
    if baseline is None:
        return None
    path = Path(baseline)
    if (path / "report.json").is_file():
        return json.loads((path / "report.json").read_text())
    results, facts = evaluate_model(baseline, tasks, limit)
    return {"results": results, "facts": facts}


def eval_to_report(model_id: str, out: Path, tasks: str | list[str] = "reference", limit: int | None = None,
                   baseline: str | None = None, overwrite: bool = False, label: str | None = None,
                   inputs: list[Path] = ()) -> Path:
    """Evaluate `model_id` (and `baseline`), write report.json / report.md / plots to `out` atomically. `label`
    names the model in the report (default: `model_id`); `out` may not lie inside `inputs` (nor the model's or the
    baseline's directory)."""
    guarded = [Path(p) for p in (*inputs, model_id, *([baseline] if baseline else []))
               if Path(str(p)).expanduser().is_dir() and not (Path(str(p)) / "report.json").is_file()]
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1 document per task, not {limit} (omit it to score every one)")
    out = check_output_dir(out, guarded, overwrite)
    tasks = check_tasks(tasks)
    base = _baseline(baseline, tasks, limit)
    results, facts = evaluate_model(model_id, tasks, limit, label=label)

    def write(tmp: Path) -> None:
        write_report(tmp, results, facts, baseline=base, title=Path(str(label or model_id)).name)

    return atomic_directory(out, write)


def run_demo(reference: str = "tiny", method: str = "frequency", ratio: float = 0.25, out: Path | None = None,
             limit: int | None = None, overwrite: bool = True) -> Path:
    """Build (or reuse) a reference model, compress it, evaluate base and compressed, write the report."""
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import parse_recipe
    from moecompress.reference import build_reference

    out = Path(out or Path("runs") / f"demo-{reference}-{method}-{int(ratio * 100)}")
    out = check_output_dir(out, [], overwrite)
    base_dir = build_reference(reference)
    log.info("reference model %s: %s", reference, base_dir)
    with tempfile.TemporaryDirectory(prefix="moecompress-demo-") as tmp:
        recipe = parse_recipe({
            "model": str(base_dir),
            "calibration": {"source": "reference", "samples": 64, "seq_len": 128},
            "stages": [{"method": method, "ratio": ratio}],
            "output": {"path": str(Path(tmp) / "model")},
        })
        compressed = run(recipe).output
        base_results, base_facts = evaluate_model(str(base_dir), "reference", limit)
        results, facts = evaluate_model(str(compressed), "reference", limit)
        facts["recipe"] = recipe.model_dump(mode="json")

        def write(dest: Path) -> None:
            write_report(dest / "report", results, facts, title=f"{reference}: {method} {ratio:.0%} of experts removed",
                         baseline={"results": base_results, "facts": base_facts})
            import shutil

            shutil.copytree(compressed, dest / "model")

        return atomic_directory(out, write)


def ensure_reports(dirs: list[Path]) -> list[Path]:
    missing = [d for d in dirs if not (Path(d) / "report.json").is_file()]
    if missing:
        raise UserError(f"{missing[0]} has no report.json; pass directories written by `moecompress eval`")
    return dirs
