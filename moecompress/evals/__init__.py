"""Evaluation: lm-eval over an in-memory model (offline `reference` suite or standard tasks) and reports.

    from moecompress.evals import evaluate, size_facts, write_report, compare_reports
    results = evaluate(model, tokenizer, "reference", limit=None)      # lm-eval's raw results, whole
    write_report("out/eval", results, size_facts(model, "out/model"), baseline="out/base-eval")
"""

from __future__ import annotations

from moecompress.evals.lmeval import REFERENCE_SUITE, evaluate, metric_rows, parse_tasks, summarize, task_manager
from moecompress.evals.reference_tasks import all_names as reference_task_names
from moecompress.evals.reference_tasks import mc_items, tasks_dir
from moecompress.evals.report import compare_reports, size_facts, write_report

__all__ = [
    "REFERENCE_SUITE",
    "compare_reports",
    "evaluate",
    "mc_items",
    "metric_rows",
    "parse_tasks",
    "reference_task_names",
    "size_facts",
    "summarize",
    "task_manager",
    "tasks_dir",
    "write_report",
]
