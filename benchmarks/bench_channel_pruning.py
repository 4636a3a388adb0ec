"""Channel-level pruning (HEAPr, CAMERA-P) vs expert-level pruning (REAP, frequency) at equal parameter count.

    .venv/bin/python benchmarks/bench_channel_pruning.py [--models small small-shared] [--ratios 0.2 0.4 0.6]
        [--limit 100] [--samples 32] [--seq-len 256] [--repeats 5] [--json out.json]

Models: the reference models named (default `small` and `small-shared`); a model that is not built is skipped
with a note, and when none is built the script falls back to `tiny` (built here, ~1 min) and says so.

Measured, in one run, per model and channel ratio R (fraction of routed-expert channels removed):
* quality: lm-eval on the offline `reference` suite (`--limit` items per task): mean MC-accuracy recovery (acc ÷
  base acc over the 4 MC tasks) and mean perplexity recovery (base word perplexity ÷ word perplexity over the 4
  perplexity tasks), for HEAPr (global ranking, the paper), CAMERA-P (sequential, per layer, shared included,
  α = 0.9) and REAP / frequency **at equal total parameter count**: the experts removed per layer are
  round(params removed by HEAPr at R ÷ params of one expert ÷ MoE layers) (group-limited routers round to a
  multiple of n_group); every row reports its own actual fraction of parameters removed;
* checkpoint bytes ÷ base (files written by `moecompress.compress.checkpoint.save`);
* forward speed of the pruned model ÷ base (base CPU time ÷ pruned CPU time for one forward over `--speed-batch`
  sequences of `--seq-len` tokens, 1 torch thread, median of `--repeats` interleaved rounds; > 1 = faster);
* HEAPr scoring time ÷ plain forward time on the same calibration tokens (the `channel_grads` forward+backward
  pass vs the stock forward with logits; CPU time, median of `--repeats`).
Calibration: `--samples` × `--seq-len` tokens of the reference corpus (seed 0), shared by every method.

Cost on the reference architectures (`--arch`, default `small small-shared`): compute and memory do not depend on
training, so the scoring-time ratio, the forward speed ratio and the checkpoint-size ratio of HEAPr- and
CAMERA-P-pruned models (non-sequential CAMERA statistics) are also measured on the *untrained* architectures
(`moecompress.reference.build.make_model`, seeded random token ids, `--samples` × `--seq-len`) — so those figures
exist even when the trained models are not built yet.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("heapr", "camera_p", "reap", "frequency")


def cpu_time(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def checkpoint_bytes(model, directory: Path) -> int:
    from moecompress.compress.checkpoint import save

    save(model, directory, overwrite=True)
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file() and p.suffix == ".safetensors")


def recoveries(results: dict, base: dict) -> dict[str, float]:
    from moecompress.evals.lmeval import summarize
    from moecompress.evals.reference_tasks import mc_task_names, ppl_task_names
    from moecompress.evals.report import recovery

    s, b = summarize(results), summarize(base)
    mc = [recovery(s[t]["acc"], b[t]["acc"], True) for t in mc_task_names()]
    ppl = [recovery(s[t]["word_perplexity"], b[t]["word_perplexity"], False) for t in ppl_task_names()]
    return {"mc_recovery": statistics.mean(mc), "ppl_recovery": statistics.mean(ppl),
            "mc_acc": statistics.mean(s[t]["acc"] for t in mc_task_names())}


def expert_keep(model, params_removed: int) -> int:
    """Experts kept per layer so that expert pruning removes about `params_removed` parameters."""
    from moecompress.compress.families import uses_groups
    from moecompress.compress.moe import moe_layers

    layers = moe_layers(model)
    layer = layers[0]
    w = layer.expert_weights(0)
    per_expert = w.gate.numel() + w.up.numel() + w.down.numel()
    per_layer = round(params_removed / per_expert / len(layers))
    keep = layer.num_experts - per_layer
    if uses_groups(layer.spec, layer.config):
        g = layer.config.n_group or 1
        keep = max(g * 2, round(keep / g) * g)
    return max(layer.top_k, min(layer.num_experts, keep))


def arch_costs(name: str, ratios, samples: int, seq_len: int, speed_batch: int, repeats: int, tmp: Path) -> dict:
    """Scoring / speed / size ratios of channel-pruned copies of the untrained reference architecture `name`."""
    from moecompress.calibration.collectors import ChannelGrads, ChannelStats
    from moecompress.calibration.data import CalibrationSet
    from moecompress.calibration.engine import run_full
    from moecompress.methods.base import apply_plan, get_method
    from moecompress.reference.build import get_spec, make_model

    model = make_model(get_spec(name)).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (samples, seq_len), generator=g)
    calib = CalibrationSet(ids, torch.ones_like(ids), "random", "random")

    def plain():
        with torch.inference_mode():
            for b, m in calib.batches(8):
                model(input_ids=b, attention_mask=m)

    grads = ChannelGrads()
    heapr_t, plain_t = [], []
    for _ in range(repeats):
        plain_t.append(cpu_time(plain))
        grads = ChannelGrads()
        heapr_t.append(cpu_time(lambda: run_full(model, calib, [grads], batch_size=8)))
    channels = ChannelStats(shared=True)
    run_full(model, calib, [channels], batch_size=8)
    heapr = get_method("heapr")()
    scores = heapr.channel_scores(model, {"channel_grads": grads})
    camera = get_method("camera_p")(get_method("camera_p").Config(sequential=False))
    base_bytes = checkpoint_bytes(model, tmp / f"arch-{name}-base")
    x = ids[:speed_batch]
    rows = []
    for ratio in ratios:
        variants = {}
        for label, make in (("heapr", lambda m: heapr.select(m, scores, ratio, "global")),
                            ("camera_p", lambda m: camera.select(m, {"channels": channels}, ratio))):
            m = copy.deepcopy(model)
            apply_plan(m, make(m))
            variants[label] = m
        times = {k: [] for k in ["base", *variants]}
        with torch.inference_mode():
            for m in [model, *variants.values()]:
                m(x)
            for _ in range(repeats):
                times["base"].append(cpu_time(lambda: model(x)))
                for k, m in variants.items():
                    times[k].append(cpu_time(lambda m=m: m(x)))
        for k, m in variants.items():
            rows.append({"arch": name, "ratio": ratio, "method": k,
                         "param_fraction_removed": 1 - sum(p.numel() for p in m.parameters())
                         / sum(p.numel() for p in model.parameters()),
                         "bytes_ratio": checkpoint_bytes(m, tmp / f"arch-{name}-{k}-{ratio}") / base_bytes,
                         "speed_ratio": statistics.median(times["base"]) / statistics.median(times[k])})
            print(f"arch {name} R={ratio:.1f} {k}: speed {rows[-1]['speed_ratio']:.2f}", file=sys.stderr, flush=True)
    return {"scoring": {"heapr_cpu_s": statistics.median(heapr_t), "plain_cpu_s": statistics.median(plain_t),
                        "ratio": statistics.median(heapr_t) / statistics.median(plain_t)}, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["small", "small-shared"])
    ap.add_argument("--ratios", nargs="*", type=float, default=[0.2, 0.4, 0.6])
    ap.add_argument("--limit", type=int, default=100, help="items per eval task")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--speed-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--arch", nargs="*", default=["small", "small-shared"],
                    help="untrained architectures for the cost figures (empty: skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)

    from moecompress.calibration.collectors import ChannelGrads
    from moecompress.calibration.data import build_calibration
    from moecompress.calibration.engine import run_full
    from moecompress.evals.lmeval import evaluate
    from moecompress.methods.base import Target, apply_plan, get_method
    from moecompress.recipes.run import run_method
    from moecompress.recipes.run import gather_statistics
    from moecompress.recipes.schema import CalibrationSpec
    from moecompress.reference import build_reference, is_built, load_reference

    models = [m for m in args.models if is_built(m)]
    notes = [f"{m} is not built (skipped)" for m in args.models if not is_built(m)]
    if not models and args.models:
        build_reference("tiny")
        models = ["tiny"]
        notes.append("fell back to the reference `tiny` model")
    for n in notes:
        print("note:", n, file=sys.stderr)
    spec = CalibrationSpec(source="reference", samples=args.samples, seq_len=args.seq_len, seed=0, cache=False)
    out: dict = {"args": vars(args), "notes": notes, "models": {}}
    tmp = Path(tempfile.mkdtemp(prefix="bench-channels-"))
    for name in models:
        base_model, tok = load_reference(name)
        base_model.eval()
        calib = build_calibration(tok, spec)
        ids = calib.input_ids[: args.speed_batch]

        # ----- HEAPr scoring cost vs a plain forward on the same tokens
        def plain():
            with torch.inference_mode():
                for b, m in calib.batches(spec.batch_size):
                    base_model(input_ids=b, attention_mask=m)

        heapr_t, plain_t = [], []
        for _ in range(args.repeats):
            plain_t.append(cpu_time(plain))
            heapr_t.append(cpu_time(lambda: run_full(base_model, calib, [ChannelGrads()], batch_size=spec.batch_size)))
        scoring = {"heapr_cpu_s": statistics.median(heapr_t), "plain_cpu_s": statistics.median(plain_t)}
        scoring["ratio"] = scoring["heapr_cpu_s"] / scoring["plain_cpu_s"]

        # ----- statistics once on the base model
        heapr = get_method("heapr")()
        stats, _ = gather_statistics(base_model, tok, spec, heapr.collectors())
        heapr_scores = heapr.channel_scores(base_model, stats)
        expert_stats = {}
        for m in ("reap", "frequency"):
            method = get_method(m)()
            expert_stats[m] = (method, gather_statistics(base_model, tok, spec, method.collectors())[0])

        base_eval = evaluate(base_model, tok, "reference", limit=args.limit)
        base_bytes = checkpoint_bytes(base_model, tmp / f"{name}-base")
        base_params = sum(p.numel() for p in base_model.parameters())
        rows = []
        for ratio in args.ratios:
            variants = {}
            m = copy.deepcopy(base_model)
            plan = heapr.select(m, heapr_scores, ratio, "global")
            apply_plan(m, plan)
            variants["heapr"] = (m, plan.facts)
            m = copy.deepcopy(base_model)
            t0 = time.perf_counter()  # CAMERA-P's sequential pass prunes each layer before calibrating the next
            plan, _ = run_method(m, tok, get_method("camera_p")(), Target(ratio=ratio, scope="layer"), spec)
            camera_s = time.perf_counter() - t0
            variants["camera_p"] = (m, {**plan.facts, "plan_seconds": round(camera_s, 2)})
            keep = expert_keep(base_model, variants["heapr"][1]["params_removed"])
            for mname, (method, st) in expert_stats.items():
                m = copy.deepcopy(base_model)
                plan = method.plan(m, st, Target(keep=keep))
                apply_plan(m, plan)
                variants[mname] = (m, {"experts_kept_per_layer": keep})
            times = {k: [] for k in ["base", *variants]}
            with torch.inference_mode():
                for mod in [base_model] + [v[0] for v in variants.values()]:
                    mod(ids)  # warm-up
                for _ in range(args.repeats):
                    times["base"].append(cpu_time(lambda: base_model(ids)))
                    for k, (mod, _) in variants.items():
                        times[k].append(cpu_time(lambda mod=mod: mod(ids)))
            t_base = statistics.median(times["base"])
            for k, (mod, facts) in variants.items():
                params = sum(p.numel() for p in mod.parameters())
                row = {"model": name, "ratio": ratio, "method": k,
                       "param_fraction_removed": 1 - params / base_params,
                       "routed_channel_fraction_removed": facts.get("routed_channel_fraction_removed"),
                       "bytes_ratio": checkpoint_bytes(mod, tmp / f"{name}-{k}-{ratio}") / base_bytes,
                       "speed_ratio": t_base / statistics.median(times[k]),
                       **recoveries(evaluate(mod, tok, "reference", limit=args.limit), base_eval),
                       "facts": {kk: v for kk, v in facts.items() if not isinstance(v, dict)}}
                rows.append(row)
                print(f"{name} R={ratio:.1f} {k:>9}: params -{row['param_fraction_removed']:.3f} "
                      f"MC rec {row['mc_recovery']:.3f} PPL rec {row['ppl_recovery']:.3f} "
                      f"bytes {row['bytes_ratio']:.3f} speed {row['speed_ratio']:.2f}", file=sys.stderr, flush=True)
        out["models"][name] = {"scoring": scoring, "rows": rows, "base_params": base_params,
                               "base_mc_acc": recoveries(base_eval, base_eval)["mc_acc"]}
    out["arch"] = {a: arch_costs(a, args.ratios, args.samples, args.seq_len, args.speed_batch, args.repeats, tmp)
                   for a in args.arch}
    print(markdown(out))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return 0


def markdown(out: dict) -> str:
    lines = []
    for name, res in out["models"].items():
        sc = res["scoring"]
        lines += [f"**{name}** ({res['base_params']:,} parameters, base mean MC acc {res['base_mc_acc']:.3f}); "
                  f"HEAPr scoring {sc['heapr_cpu_s']:.2f} s CPU vs plain forward {sc['plain_cpu_s']:.2f} s on the "
                  f"same tokens: **{sc['ratio']:.2f}×** (target ≤ 3.5)", "",
                  "| R (channels) | method | params removed | MC-acc recovery | PPL recovery | bytes ÷ base | "
                  "speed ÷ base |", "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            what = r["method"]
            if "experts_kept_per_layer" in r["facts"]:
                what += f" (keep {r['facts']['experts_kept_per_layer']}/layer)"
            lines.append(f"| {r['ratio']:.0%} | {what} | {r['param_fraction_removed']:.1%} | {r['mc_recovery']:.3f} | "
                         f"{r['ppl_recovery']:.3f} | {r['bytes_ratio']:.3f} | {r['speed_ratio']:.2f} |")
        lines.append("")
    for name, res in out.get("arch", {}).items():
        sc = res["scoring"]
        lines += [f"**{name} architecture, untrained** (cost only): HEAPr scoring {sc['heapr_cpu_s']:.2f} s CPU vs plain "
                  f"forward {sc['plain_cpu_s']:.2f} s: **{sc['ratio']:.2f}×**", "",
                  "| R (channels) | method | params removed | bytes ÷ base | speed ÷ base |", "|---|---|---|---|---|"]
        lines += [f"| {r['ratio']:.0%} | {r['method']} | {r['param_fraction_removed']:.1%} | {r['bytes_ratio']:.3f} | "
                  f"{r['speed_ratio']:.2f} |" for r in res["rows"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
