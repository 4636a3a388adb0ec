"""The default fitness: an lm-eval task metric, in points (×100; negated when lower is better), on a chosen split.

A fitness is any callable `fitness(model) -> float` (higher is better); EEP calls it on the live model with the
candidate applied. `LmEvalFitness` builds the HFLM wrapper once and scores the task's documents of `split`
(EEP searches on the **training** split and re-scores its finalists on a held-out split). Groups (e.g.
`reference_mc`) are expanded to their tasks and scored as the mean over them.

Why not `moecompress.evals.lmeval.evaluate`: it always scores a task's test split (task names only), and EEP must
not search on the test split. This class uses the same task manager (bundled reference tasks + lm-eval's) and the
same lm-eval entry point with a split override (an inline lm-eval task config).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os

from moecompress.errors import UserError

log = logging.getLogger("moecompress")


class LmEvalFitness:
    def __init__(self, tokenizer, task: str, metric: str = "acc,none", split: str | None = "train",
                 limit: int | None = None, batch_size: int = 16, num_fewshot: int | None = None, manager=None):
        from moecompress.evals import lmeval

        if tokenizer is None:
            raise UserError("EEP's fitness runs lm-eval and needs the model's tokenizer; save it next to the model")
        self.tokenizer, self.task, self.metric, self.split = tokenizer, task, metric, split
        self.limit, self.batch_size, self.num_fewshot = limit, batch_size, num_fewshot
        names = lmeval.parse_tasks(task)
        self.manager = manager or lmeval.task_manager(names)
        with _quiet():
            self.leaves = [t for name in names for t in self.manager.load([name])["tasks"]]
        self._lm = None
        self._model = None
        self.calls = 0

    def spec(self) -> list:
        """One inline lm-eval group over the leaf tasks, each overridden to score `split` with `num_fewshot`."""
        tasks = []
        for t in self.leaves:
            override = {"task": t}
            if self.split is not None:
                override["test_split"] = self.split
            if self.num_fewshot is not None:
                override["num_fewshot"] = self.num_fewshot
            tasks.append(override)
        return [{"group": "eep_fitness", "task": tasks}]

    def results(self, model) -> dict:
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        if self._lm is None or self._model is not model:
            with _quiet():
                self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
            self._model = model
        was_training = model.training
        model.eval()
        try:
            with _quiet():  # lm-eval's evaluate (not simple_evaluate: that collects pip/env info on every call)
                task_dict = self.manager.load(self.spec())
                for task in task_dict["tasks"].values():
                    if task.get_config("num_fewshot") is None:
                        task.set_config(key="num_fewshot", value=0)
                    task.set_fewshot_seed(seed=1234)
                out = evaluate(lm=self._lm, task_dict=task_dict, limit=self.limit, bootstrap_iters=0,
                               log_samples=False, verbosity="ERROR")
        except (KeyError, ValueError) as e:
            raise UserError(f"EEP fitness: lm-eval could not score task '{self.task}' on split '{self.split}' "
                            f"({str(e).splitlines()[0][:160]}); choose a split the task has (--set split=...)") from None
        finally:
            model.train(was_training)
        self.calls += 1
        return out or {}

    def __call__(self, model) -> float:
        out = self.results(model)
        values = []
        name = self.metric.split(",")[0]
        for leaf in self.leaves:
            metrics = out.get("results", {}).get(leaf, {})
            if self.metric not in metrics:
                raise UserError(f"EEP fitness: task '{leaf}' reports no metric '{self.metric}' (it has "
                                f"{', '.join(k for k in metrics if ',' in k and '_stderr' not in k)}); "
                                f"pass --set metric=...")
            value = float(metrics[self.metric])
            higher = out.get("higher_is_better", {}).get(leaf, {}).get(name, True)
            values.append(100.0 * value if higher else -value)
        score = sum(values) / len(values)
        return score if math.isfinite(score) else float("-inf")


@contextlib.contextmanager
def _quiet():
    """Serial lm-eval (no process pool beside a loaded model), no lm-eval logging or tqdm bars on stderr (hundreds of
    fitness calls; EEP shows its own progress bar)."""
    saved = {k: os.environ.get(k) for k in ("DISABLE_MULTIPROC", "TQDM_DISABLE")}
    os.environ.update(DISABLE_MULTIPROC="1", TQDM_DISABLE="1")
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)
