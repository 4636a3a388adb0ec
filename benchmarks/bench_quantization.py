"""Quantization benchmark on a reference MoE: quality recovery, checkpoint size vs theory, forward speed, ILP time.

    python benchmarks/bench_quantization.py                    # reference `small` (must be built), limit 200
    python benchmarks/bench_quantization.py --model tiny --limit 100 --json quant.json

One run measures, side by side on the same machine:
* recovery (compressed ÷ base; perplexity base ÷ compressed) on the offline `reference` suite for uniform RTN and
  GPTQ at 2/3/4 bits, PMQ at 2.0/2.5/3.0 average expert bits (GPTQ backend) and bitsandbytes NF4 — experts only,
  group size 128, attention left in fp32, so the configurations differ only in the experts;
* checkpoint bytes ÷ theoretical bytes: the packed expert buffers vs b bits per weight + fp16 scale/zero per group
  (`PackedLinear.theoretical_bytes`), and the whole model.safetensors vs (theoretical experts + everything else at
  its stored dtype);
* forward time ÷ fp32: median wall time of one forward over a [8, 256] batch, quantized and fp32 base timed
  alternately (> 1 = slower; packed experts are dequantized on every call, there is no low-bit kernel);
* the PMQ ILP solve time on a 48-layer × 128-expert × 4-width global instance (benchmarks/bench_ilp.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = ([("rtn", {"bits": b}) for b in (2, 3, 4)] + [("gptq", {"bits": b}) for b in (2, 3, 4)]
           + [("pmq", {"avg_bits": a}) for a in (2.0, 2.5, 3.0)] + [("bnb-nf4", {})])


def headline(results: dict) -> dict:
    """Mean MC accuracy and mean word perplexity over the reference tasks."""
    from moecompress.evals.lmeval import summarize
    from moecompress.evals.reference_tasks import mc_task_names, ppl_task_names

    s = summarize(results)
    acc = [s[t]["acc"] for t in mc_task_names() if t in s]
    ppl = [s[t]["word_perplexity"] for t in ppl_task_names() if t in s]
    return {"acc": statistics.mean(acc), "ppl": statistics.mean(ppl), "per_task": s}


def recovery(base: dict, q: dict) -> dict:
    from moecompress.evals.reference_tasks import mc_task_names, ppl_task_names

    acc = [q["per_task"][t]["acc"] / base["per_task"][t]["acc"] for t in mc_task_names()]
    ppl = [base["per_task"][t]["word_perplexity"] / q["per_task"][t]["word_perplexity"] for t in ppl_task_names()]
    return {"acc": statistics.median(acc), "ppl": statistics.median(ppl)}


def forward_ratio(model, base, ids, repeats: int) -> float:
    """median(quantized forward) ÷ median(fp32 forward), timed alternately so machine load hits both alike."""
    import torch

    tq, tb = [], []
    with torch.no_grad():
        model(ids[:1, :16])  # warm-up
        base(ids[:1, :16])
        for _ in range(repeats):
            for m, acc in ((model, tq), (base, tb)):
                t = time.perf_counter()
                m(ids)
                acc.append(time.perf_counter() - t)
    return statistics.median(tq) / statistics.median(tb)


def sizes(model, out: Path | None) -> dict:
    from moecompress.compress.quant.linear import PackedLinear
    from moecompress.compress.quant.nf4 import BnbLinear

    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    bnb = [m for m in model.modules() if isinstance(m, BnbLinear)]
    theory_q = sum(m.theoretical_bytes() for m in packed) + sum(m.theoretical_bytes() for m in bnb)
    actual_q = sum(m.actual_bytes() for m in packed)
    inside = {id(t) for m in packed + bnb for t in list(m.parameters()) + list(m.buffers())}
    other = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers())
                if id(t) not in inside)
    facts = {"theoretical_quantized_bytes": theory_q, "theoretical_model_bytes": theory_q + other}
    if packed:
        facts["packed_bytes"] = actual_q
        facts["packed_over_theory"] = actual_q / theory_q
    if out is not None:
        facts["checkpoint_bytes"] = (out / "model.safetensors").stat().st_size
        facts["checkpoint_over_theory"] = facts["checkpoint_bytes"] / facts["theoretical_model_bytes"]
    return facts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small", help="reference model (default small; must be built)")
    ap.add_argument("--limit", type=int, default=200, help="documents per task")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5, help="forward timings per model (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma-separated config labels to run (e.g. gptq-3,pmq-2.5)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from moecompress.compress.checkpoint import load
    from moecompress.evals.lmeval import evaluate
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import parse_recipe
    from moecompress.reference import is_built, reference_path

    if not is_built(args.model):
        print(f"reference model '{args.model}' is not built: run `moecompress reference build {args.model}`",
              file=sys.stderr)
        return 2
    path = reference_path(args.model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    base = load(path)
    ids = torch.randint(0, base.config.vocab_size, (8, 256), generator=torch.Generator().manual_seed(0))
    t = time.time()
    base_head = headline(evaluate(base, tok, "reference", limit=args.limit))
    print(f"# {args.model}: base acc {base_head['acc']:.4f}, word ppl {base_head['ppl']:.3f} "
          f"(eval {time.time() - t:.0f} s)", flush=True)
    rows, dump = [], {"model": args.model, "limit": args.limit, "base": base_head}
    wanted = set(args.only.split(",")) if args.only else None
    with tempfile.TemporaryDirectory() as tmp:
        for method, target in CONFIGS:
            label = f"{method}-{target.get('bits', target.get('avg_bits', 4))}"
            if wanted and label not in wanted:
                continue
            t = time.time()
            options = {"group_size": 128} if not method.startswith("bnb") else {}
            stage = {"method": method, **target, "options": options}
            out = Path(tmp) / label
            res = run(parse_recipe({"model": str(path), "stages": [stage], "output": {"path": str(out)},
                                    "calibration": {"source": "reference", "samples": args.samples,
                                                    "seq_len": args.seq_len}}))
            model = load(out)  # what a user gets back from the checkpoint
            plan_facts = res.plans[0].details or {}
            build_s = time.time() - t
            head = headline(evaluate(model, tok, "reference", limit=args.limit))
            rec = recovery(base_head, head)
            fwd = forward_ratio(model, base, ids, args.repeats)
            size = sizes(model, out)
            row = {"config": label, "build_s": build_s, "acc": head["acc"], "ppl": head["ppl"],
                   "recovery_acc": rec["acc"], "recovery_ppl": rec["ppl"], "forward_over_fp32": fwd,
                   **size}
            if "experts_per_width" in plan_facts:
                row["experts_per_width"] = plan_facts["experts_per_width"]
                row["avg_bits_experts"] = plan_facts["avg_bits_experts"]
            rows.append(row)
            dump[label] = {**row, "per_task": head["per_task"]}
            print(json.dumps(row), flush=True)
            del model

    from bench_ilp import run as ilp_run

    med, times, res = ilp_run("auto", 3)
    dump["ilp"] = {"median_s": med, "times": times, "solver": res.solver, "objective": res.objective}
    print(f"\nILP 48x128x4 global ({res.solver}): median {med:.3f} s over {len(times)} runs")

    print("\n| config | mean acc | acc recovery (median over tasks) | word ppl | ppl recovery | "
          "packed ÷ theory | checkpoint ÷ theory | forward ÷ fp32 | build s |")
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| fp32 base | {base_head['acc']:.4f} | 1 | {base_head['ppl']:.3f} | 1 | – | – | 1 | – |")
    for r in rows:
        extra = f" ({r['experts_per_width']})" if "experts_per_width" in r else ""
        print(f"| {r['config']}{extra} | {r['acc']:.4f} | {r['recovery_acc']:.3f} | {r['ppl']:.3f} | "
              f"{r['recovery_ppl']:.3f} | {r.get('packed_over_theory', float('nan')):.3f} | "
              f"{r.get('checkpoint_over_theory', float('nan')):.3f} | {r['forward_over_fp32']:.2f} | "
              f"{r['build_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(dump, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
