"""EEP test helpers: a cheap deterministic synthetic fitness with a known optimum, and a script entry point used by
the resume-after-kill and the 2-process (accelerate launch) tests.

`python eep_helpers.py STATE_DIR OUT_JSON [--kill-at N] [--batch B]` runs a small EEP search on the tiny Mixtral
with `SyntheticFitness`; with --kill-at the process SIGKILLs itself during its N-th fitness evaluation.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from moecompress.compress.moe import moe_layers  # noqa: E402

TARGET = [1, 3, 5, 6]  # the optimum's kept experts (equal count per routing group for the 2-group DeepSeek)


class SyntheticFitness:
    """Reads the candidate back from the live model (so it checks that surgery applied it):
    10 · (target experts among the slots' nearest original experts, summed over layers)
    − ‖merged gate_up − (T·θ)‖ / ‖T·θ‖ per layer, with T = one-hot(TARGET) + 0.05 off-diagonal.
    Phase 1's optimum is keeping TARGET everywhere; phase 2 can then only improve the second term."""

    def __init__(self, model, target=TARGET, kill_at: int | None = None):
        self.target = list(target)
        self.original = {l.layer_idx: l.experts.gate_up_proj.detach().clone() for l in moe_layers(model)}
        n = next(iter(self.original.values())).shape[0]
        t = torch.eye(n)[self.target] + 0.05 * (1 - torch.eye(n)[self.target])
        self.wanted = {i: torch.einsum("ji,i...->j...", t, w) for i, w in self.original.items()}
        self.calls = 0
        self.kill_at = kill_at

    def __call__(self, model) -> float:
        self.calls += 1
        if self.kill_at is not None and self.calls == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        score = 0.0
        for layer in moe_layers(model):
            w = layer.experts.gate_up_proj.detach()
            orig = self.original[layer.layer_idx]
            dist = torch.cdist(w.flatten(1).double(), orig.flatten(1).double())
            nearest = set(dist.argmin(dim=1).tolist())
            score += 10 * len(nearest & set(self.target))
            score -= float((w - self.wanted[layer.layer_idx]).norm() / self.wanted[layer.layer_idx].norm())
        return round(score, 6)


def run_search(state_dir, kill_at=None, batch=1, family="mixtral", seed=0, **options):
    from tiny_models import tiny_model

    from moecompress.methods.base import Target
    from moecompress.methods.eep import EEP, EEPConfig

    torch.set_num_threads(1)
    model = tiny_model(family)
    settings = dict(task="synthetic", population=4, prune_steps=8, merge_steps=8, groups=0, seed=seed, batch=batch,
                    state_dir=None if state_dir is None else str(state_dir))
    settings.update(options)
    method = EEP(EEPConfig(**settings), fitness=SyntheticFitness(model, kill_at=kill_at))
    plan = method.plan(model, {}, Target(keep=4))
    return method, plan


def summary(method, plan) -> dict:
    entries = method.result.population.entries
    return {"plan": plan.model_dump(mode="json"), "best": method.result.best.step,
            "fitness": {str(s): e.fitness for s, e in sorted(entries.items())},
            "keys": {str(s): e.key for s, e in sorted(entries.items())}}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("state_dir")
    parser.add_argument("out")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    method, plan = run_search(args.state_dir, args.kill_at, args.batch)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}.{rank}").write_text(json.dumps({**summary(method, plan), "evaluated": method.result.evaluated}))
