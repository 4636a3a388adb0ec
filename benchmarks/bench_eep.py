"""EEP search time at the paper-like default budget, and resume-after-kill, through the real CLI.

    MOECOMPRESS_HOME=<home with small built> python benchmarks/bench_eep.py --model small --ratio 0.5

1. An uninterrupted `moecompress prune MODEL -m eep --ratio R --set task=TASK --set state_dir=A -o OUT_A`, timed.
2. The same command with its own state directory, SIGKILLed as soon as `--kill-at` candidates are persisted
   (mid-search), then run again unchanged: it resumes from the persisted population.
3. The two checkpoints' plans (kept experts, merge and router maps) and chosen fitness must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def command(model: str, ratio: float, task: str, state: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "moecompress.cli", "prune", model, "-m", "eep", "--ratio", str(ratio),
            "--set", f"task={task}", "--set", f"state_dir={state}", "-o", str(out), "--overwrite"]


def _persisted(state: Path) -> int:
    try:
        return len(json.loads((state / "population.json").read_text())["entries"])
    except (OSError, ValueError):  # not written yet, or being replaced atomically
        return 0


def plan_of(out: Path) -> dict:
    manifest = json.loads((out / "moecompress.json").read_text())
    return manifest["plans"][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--task", default="reference_facts")
    ap.add_argument("--kill-at", type=int, default=100, help="candidates persisted before the SIGKILL")
    args = ap.parse_args()

    from moecompress.reference import build_reference

    model = str(build_reference(args.model))
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        subprocess.run(command(model, args.ratio, args.task, tmp / "state-a", tmp / "out-a"), check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        full_seconds = time.perf_counter() - start
        evaluated = len(json.loads((tmp / "state-a" / "population.json").read_text())["entries"])
        print(f"uninterrupted search: {full_seconds:.0f} s wall, {evaluated} candidates evaluated", flush=True)

        cmd = command(model, args.ratio, args.task, tmp / "state-b", tmp / "out-b")
        victim = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while _persisted(tmp / "state-b") < args.kill_at and victim.poll() is None:
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        persisted = _persisted(tmp / "state-b")
        print(f"killed (SIGKILL) with {persisted} of {evaluated} candidates persisted", flush=True)
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        resumed_seconds = time.perf_counter() - start
        same = plan_of(tmp / "out-a") == plan_of(tmp / "out-b")
        print(f"resumed run: {resumed_seconds:.0f} s wall; plan identical to the uninterrupted run: {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
