"""Base scores of the reference models on the offline `reference` suite (MC accuracy vs chance, perplexities).

    python benchmarks/reference_scores.py                 # small (builds it first if needed, ~14 min on 2 cores)
    python benchmarks/reference_scores.py tiny small small-shared --limit 200 --json scores.json

Prints one Markdown table per model, plus build facts from reference.json. Exit status 1 if a model scores below
2x chance on a multiple-choice task (the acceptance bar of the reference models), unless --no-check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["small"])
    ap.add_argument("--limit", type=int, default=None, help="items per task (default: all)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the raw lm-eval results here")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from moecompress.evals.lmeval import chance, evaluate, summarize
    from moecompress.evals.reference_tasks import mc_task_names, ppl_task_names
    from moecompress.reference import build_reference, load_reference, reference_info

    ok = True
    dump = {}
    for name in args.models:
        build_reference(name)
        info = reference_info(name)
        model, tok = load_reference(name)
        t0 = time.time()
        res = evaluate(model, tok, "reference", limit=args.limit)
        secs = time.time() - t0
        s = summarize(res)
        dump[name] = res
        tr = info["training"]
        print(f"\n## {name}: {info['description']}\n")
        print(
            f"{info['parameters']:,} parameters; trained {tr['steps']} steps x {tr['batch_size']} x {tr['seq_len']} = "
            f"{tr['tokens']:,} tokens in {tr['train_seconds']} s ({tr['threads']} threads), final loss "
            f"{tr['final_loss']:.3f}; build {info['build_seconds']} s; eval {secs:.0f} s\n"
        )
        print("| task | acc | acc_norm | chance | acc / chance |")
        print("|---|---|---|---|---|")
        for t in mc_task_names():
            acc, accn, c = s[t]["acc"], s[t]["acc_norm"], chance(t)
            ratio = acc / c
            ok &= ratio >= 2.0
            print(f"| {t} | {acc:.3f} | {accn:.3f} | {c:.2f} | {ratio:.2f}{'' if ratio >= 2 else ' (below 2x)'} |")
        print("\n| task | word perplexity | byte perplexity | bits per byte |")
        print("|---|---|---|---|")
        for t in ppl_task_names():
            m = s[t]
            print(f"| {t} | {m['word_perplexity']:.2f} | {m['byte_perplexity']:.3f} | {m['bits_per_byte']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dump, f, indent=2, default=repr)
    if not ok and not args.no_check:
        print("\nsome multiple-choice score is below 2x chance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
