"""Expert-level pruning on a reference model: method × ratio × reference tasks, recovery vs the base model.

    python benchmarks/bench_expert_pruning.py --model small --ratios 0.25 0.5 --limit 200 --write

Checks the papers' relative claims on this model and says which way they come out:
* EASY-EP with in-domain demonstrations ≥ frequency and gating on the in-domain task (each domain pruned with 25
  demonstrations from that domain's train split, answered by the model itself);
* EEP ≥ NAEE and frequency on its search task's held-out (test) split (search on train, final pick on validation);
* REAP ≥ frequency.
Every method sees the same calibration data (the bundled reference corpus) unless it says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TQDM_DISABLE", "1")
import moecompress  # noqa: E402
from moecompress.evals.lmeval import evaluate, summarize
from moecompress.evals.reference_tasks import mc_items, mc_task, mc_task_names
from moecompress.recipes.run import load_tokenizer
from moecompress.reference import DOMAINS, build_reference

GENERIC = ["random", "frequency", "gating", "reap", "naee", "easy_ep"]


def headline(results: dict) -> dict[str, float]:
    return {task: metrics.get("acc") for task, metrics in summarize(results).items() if "acc" in metrics}


def score(model, tokenizer, tasks, limit) -> dict[str, float]:
    return headline(evaluate(model, tokenizer, tasks=tasks, limit=limit))


def prune(model_dir: str, method: str, ratio: float, options: dict | None = None, source: str = "reference",
          samples: int = 64):
    recipe = {"model": model_dir, "calibration": {"source": source, "samples": samples, "seq_len": 256},
              "stages": [{"method": method, "ratio": ratio, "options": options or {}}]}
    start = time.perf_counter()
    model = moecompress.run(recipe, dry_run=True).model
    return model, time.perf_counter() - start


def demos_file(domain: str, folder: Path, count: int = 25) -> str:
    path = folder / f"demos-{domain}.jsonl"
    items = mc_items(domain, "train")[:count]
    path.write_text("".join(json.dumps({"prompt": it["context"], "max_new_tokens": 24}) + "\n" for it in items))
    return f"demos:{path}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--limit", type=int, default=200, help="test items per task")
    parser.add_argument("--methods", nargs="+", default=GENERIC + ["easy_ep_domain", "eep"])
    parser.add_argument("--eep-task", default=mc_task("facts"))
    parser.add_argument("--eep-steps", type=int, default=24)
    parser.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = parser.parse_args()
    torch.manual_seed(0)

    model_dir = str(build_reference(args.model))
    tokenizer = load_tokenizer(model_dir, required=True)
    tasks = mc_task_names()
    base = score(moecompress.load(model_dir), tokenizer, tasks, args.limit)
    rows: list[tuple[str, float, dict[str, float], float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios:
            for method in args.methods:
                if method == "easy_ep_domain":
                    scores, seconds = {}, 0.0
                    for domain in DOMAINS:
                        model, s = prune(model_dir, "easy_ep", ratio, source=demos_file(domain, Path(tmp)),
                                         samples=25)
                        scores.update(score(model, tokenizer, [mc_task(domain)], args.limit))
                        seconds += s
                elif method == "eep":
                    options = {"task": args.eep_task, "split": "train", "fitness_limit": 64, "final_split":
                               "validation", "final_limit": 100, "final_top": 4, "population": 8,
                               "prune_steps": args.eep_steps, "merge_steps": 0, "groups": 0, "seed": 0}
                    model, seconds = prune(model_dir, "eep", ratio, options)
                    scores = score(model, tokenizer, tasks, args.limit)
                else:
                    model, seconds = prune(model_dir, method, ratio)
                    scores = score(model, tokenizer, tasks, args.limit)
                rows.append((method, ratio, scores, seconds))
                print(f"{method:>15} {ratio:.2f} " + " ".join(f"{t}={v:.3f}" for t, v in scores.items())
                      + f"  ({seconds:.0f} s)", flush=True)
    table = render(args, base, rows, tasks)
    print(table)
    if args.write:
        write_section(Path(__file__).resolve().parents[1] / "BENCHMARKS.md", "expert-pruning", table)


def render(args, base: dict[str, float], rows, tasks: list[str]) -> str:
    short = {t: t.removeprefix("reference_") for t in tasks}
    lines = [f"### Expert pruning on `{args.model}` (accuracy on {args.limit} test items per task; recovery = "
             "pruned ÷ base)", "",
             f"Command: `python benchmarks/bench_expert_pruning.py --model {args.model} --ratios "
             f"{' '.join(map(str, args.ratios))} --limit {args.limit} --write`", "",
             "| method | removed | " + " | ".join(short[t] for t in tasks) + " | mean recovery | plan time (s) |",
             "|---|---|" + "---|" * len(tasks) + "---|---|",
             "| base | 0 % | " + " | ".join(f"{base[t]:.3f}" for t in tasks) + " | 1.000 | – |"]
    for method, ratio, scores, seconds in rows:
        cells, recs = [], []
        for t in tasks:
            if t in scores:
                rec = scores[t] / base[t] if base[t] else float("nan")
                recs.append(rec)
                cells.append(f"{scores[t]:.3f} ({rec:.2f})")
            else:
                cells.append("–")
        mean = sum(recs) / len(recs) if recs else float("nan")
        lines.append(f"| {method} | {ratio:.0%} | " + " | ".join(cells) + f" | {mean:.3f} | {seconds:.0f} |")
    lines += ["", *claims(base, rows, args.eep_task)]
    return "\n".join(lines)


def claims(base, rows, eep_task: str) -> list[str]:
    def get(method, ratio, task):
        for m, r, s, _ in rows:
            if m == method and r == ratio and task in s:
                return s[task]
        return None

    out = []
    for ratio in sorted({r for _, r, _, _ in rows}):
        for domain in DOMAINS:
            task = mc_task(domain)
            e, f, g = get("easy_ep_domain", ratio, task), get("frequency", ratio, task), get("gating", ratio, task)
            if None not in (e, f, g):
                verdict = "holds" if e >= max(f, g) else "does not hold"
                out.append(f"- {ratio:.0%}, {domain}: EASY-EP (in-domain demos) {e:.3f} vs frequency {f:.3f}, "
                           f"gating {g:.3f} — claim {verdict}.")
        e, n, f = get("eep", ratio, eep_task), get("naee", ratio, eep_task), get("frequency", ratio, eep_task)
        if None not in (e, n, f):
            verdict = "holds" if e >= max(n, f) else "does not hold"
            out.append(f"- {ratio:.0%}, {eep_task} (EEP's search task, held-out test split): EEP {e:.3f} vs NAEE "
                       f"{n:.3f}, frequency {f:.3f} — claim {verdict}.")
        r_means = [sum(s.values()) / len(s) for m, rr, s, _ in rows if m == "reap" and rr == ratio]
        f_means = [sum(s.values()) / len(s) for m, rr, s, _ in rows if m == "frequency" and rr == ratio]
        if r_means and f_means:
            verdict = "holds" if r_means[0] >= f_means[0] else "does not hold"
            out.append(f"- {ratio:.0%}: REAP mean accuracy {r_means[0]:.3f} vs frequency {f_means[0]:.3f} — claim "
                       f"{verdict}.")
    return out


def write_section(path: Path, name: str, body: str) -> None:
    text = path.read_text()
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    if start not in text:
        sys.exit(f"{path} has no {start} marker")
    text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: f"{start}\n{body}\n{end}", text, flags=re.S)
    path.write_text(text)


if __name__ == "__main__":
    main()
