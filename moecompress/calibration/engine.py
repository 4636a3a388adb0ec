"""Calibration passes: run the model over a CalibrationSet with the reference MoE forward swapped in, and let
every requested collector see every MoE block. One pass serves every collector.
"""

from __future__ import annotations

import logging
import time

import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from moecompress.calibration.collectors import Collector
from moecompress.calibration.data import CalibrationSet
from moecompress.compress.moe import ValidMask, instrumented

log = logging.getLogger("moecompress")


class _Dispatch:
    def __init__(self, collectors: list[Collector]):
        self.collectors = collectors

    def on_expert(self, *args) -> None:
        for c in self.collectors:
            c.on_expert(*args)

    def on_block(self, *args) -> None:
        for c in self.collectors:
            c.on_block(*args)


def progress_bar(description: str) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} seq"),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(), transient=True,
    )


def run_full(model: nn.Module, calib: CalibrationSet, collectors: list[Collector], batch_size: int = 8,
             description: str = "calibrating") -> dict:
    """One full-model forward pass over `calib`; returns pass facts (tokens, seconds)."""
    valid = ValidMask()
    model.eval()
    start = time.perf_counter()
    done_tokens = 0
    with instrumented(model, _Dispatch(collectors), valid), torch.inference_mode(), progress_bar(description) as bar:
        task = bar.add_task(description, total=len(calib.input_ids), rate="")
        for input_ids, mask in calib.batches(batch_size):
            valid.mask = mask.bool()
            model(input_ids=input_ids, attention_mask=mask, use_cache=False)
            done_tokens += int(mask.sum())
            rate = done_tokens / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=len(input_ids), rate=f"{rate:,.0f} tok/s")
    seconds = time.perf_counter() - start
    log.info("calibration pass: %d sequences, %d tokens, %.1f s", len(calib.input_ids), done_tokens, seconds)
    return {"tokens": done_tokens, "seconds": seconds, "sequences": len(calib.input_ids)}
