"""Evaluate an in-memory model with lm-eval: the offline reference suite, or any standard lm-eval task.

``evaluate(model, tokenizer, "reference")`` scores the bundled offline tasks (no network). Names that are not
reference tasks (``"hellaswag"``, ``"mmlu"``, ...) go to lm-eval's own task registry; their datasets come from the
Hugging Face Hub, so those need network (or a warm ``HF_DATASETS_CACHE``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

from moecompress.errors import UserError
from moecompress.evals import reference_tasks as rt

REFERENCE_SUITE = GROUP = rt.GROUP
mc_task_names = rt.mc_task_names
ppl_task_names = rt.ppl_task_names


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"reference,hellaswag"`` or a list → a clean list of names (order kept, duplicates dropped)."""
    if isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",")]
    else:
        names = [str(t).strip() for t in tasks]
    names = list(dict.fromkeys(t for t in names if t))
    if not names:
        raise UserError("no evaluation task given: pass e.g. --tasks reference (or reference_mc, hellaswag, ...)")
    return names


def is_reference(name: str) -> bool:
    return name in rt.all_names()


def check_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[str]:
    """The task names, checked before any model is loaded: UserError for an empty list or an unknown name.
    Reference names (and unknown `reference*` ones) are checked without lm-eval; other names cost one scan of
    lm-eval's task registry (seconds)."""
    names = parse_tasks(tasks)
    ours = [t for t in names if t.startswith(GROUP) and not is_reference(t)]  # the reference_* names are ours
    if ours:
        raise UserError(f"unknown reference task {ours[0]}: the offline suite has {', '.join(rt.all_names())}")
    if not all(is_reference(t) for t in names):
        task_manager(names)
    return names


def task_manager(tasks: list[str]):
    """A TaskManager that knows the reference tasks, plus lm-eval's defaults if any task is not ours."""
    from lm_eval.tasks import TaskManager

    include_defaults = not all(is_reference(t) for t in tasks)
    tm = TaskManager(include_path=str(rt.tasks_dir()), include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: use 'reference' (offline suite: "
            f"{', '.join(rt.all_names())}) or a task name from `lm-eval ls tasks`"
        )
    return tm


@contextlib.contextmanager
def _quiet_env():
    """Serial bootstrap (lm-eval otherwise forks a process pool next to a loaded model) and a quieter lm-eval."""
    old = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.level, logging.WARNING))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = old
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def evaluate(
    model,
    tokenizer,
    tasks: str | list[str] = REFERENCE_SUITE,
    limit: int | float | None = None,
    batch_size: int | str = 16,
    num_fewshot: int | None = None,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 1234,
    **simple_evaluate_kwargs: Any,
) -> dict:
    """Run lm-eval's ``simple_evaluate`` on an in-memory HF causal LM; returns lm-eval's raw results, whole.

    ``limit`` caps the documents per task (int) or takes a fraction (float < 1); ``None`` scores every test item.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    names = parse_tasks(tasks)
    tm = task_manager(names)
    was_training = model.training
    model.eval()
    hflm_kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length is not None:
        hflm_kwargs["max_length"] = max_length
    try:
        with _quiet_env():
            lm = HFLM(**hflm_kwargs)
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=names,
                num_fewshot=num_fewshot,
                limit=limit,
                task_manager=tm,
                bootstrap_iters=bootstrap_iters,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
                **simple_evaluate_kwargs,
            )
    finally:
        model.train(was_training)
    if results is None:  # only on non-zero ranks in distributed runs
        return {}
    return dict(results)


# ---------------------------------------------------------------------------------------------- summaries

#: the headline metric per output type, and whether higher is better
HEADLINE = {"acc": True, "acc_norm": True, "word_perplexity": False, "bits_per_byte": False, "byte_perplexity": False}


def metric_rows(results: dict) -> list[dict]:
    """Flatten lm-eval results to rows ``{task, metric, value, stderr, filter}`` (numeric metrics only)."""
    rows = []
    for task, metrics in sorted((results.get("results") or {}).items()):
        for key, value in metrics.items():
            if "," not in key or "_stderr" in key:
                continue
            metric, filt = key.split(",", 1)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            stderr = metrics.get(f"{metric}_stderr,{filt}")
            rows.append(
                {
                    "task": task,
                    "metric": metric,
                    "filter": filt,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "higher_is_better": (results.get("higher_is_better") or {}).get(task, {}).get(metric, HEADLINE.get(metric)),
                }
            )
    return rows


def summarize(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` for every numeric metric (NaN kept as None)."""
    out: dict[str, dict[str, float]] = {}
    for r in metric_rows(results):
        v = r["value"]
        out.setdefault(r["task"], {})[r["metric"]] = v if math.isfinite(v) else None
    return out


def chance(task: str) -> float | None:
    """Chance accuracy of a reference MC task (4-way), else None."""
    return 0.25 if task in rt.mc_task_names() else None
