"""Calibration overhead: one pass with every forward-only collector, and the gradient pass, vs a plain forward.

    .venv/bin/python benchmarks/bench_calibration.py [--sequences 16] [--seq-len 256] [--batch-size 8] [--repeats 3]

Model: the reference `small` model when it is built (`moecompress reference build small`), else the same
architecture untrained (`moecompress.reference.build.make_model`: Qwen3-MoE, 4 layers, hidden 160, 16 experts
top-2, I=128) — compute and memory do not depend on training. Data: seeded random token ids (content does not
change the cost; every token is valid).

Measured, in one run:
* time: medians over `--repeats` rounds; each round runs the configurations back to back in one process
  (interleaved, so load from other processes hits all of them alike): plain stock forward under inference_mode
  (`plain`, with logits, the baseline of the targets) and the decoder stack alone (`plain_no_head`: forward-only
  calibration passes skip the LM head, which is a large share of this small model's FLOPs — vocab 4096 vs hidden
  160 — so the `÷ no-head` column shows the collectors' overhead without that saving);
  `run_full` with all forward-only collectors (routing, reap, easy_ep, channels, gram, block_io); the same
  without gram; `run_full` with the gradient collector (channel_grads: forward + backward); `run_sequential` with
  all forward-only collectors. Wall time and this process's CPU time are both reported; on a shared machine the
  CPU-time ratio is the trustworthy one (default 1 torch thread: OpenMP barriers under contention make 2-thread
  wall times swing 10×).
* peak RSS: one fresh subprocess per configuration (ru_maxrss after one pass), reported raw, and as
  (peak − RSS after loading the model) ÷ model bytes + 1 (what the pass adds on top of the model, which is what
  scales to large models; the raw ratio on a 20 MB model is dominated by the ~400 MB Python/torch runtime).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONFIGS = ("plain", "plain_no_head", "forward_all", "forward_no_gram", "gradient", "sequential_all")


def build_model(path: Path) -> str:
    from moecompress.reference import is_built, reference_path
    from moecompress.reference.build import get_spec, make_model

    if is_built("small"):
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(reference_path("small"), dtype=torch.float32).save_pretrained(path)
        return "reference small (trained)"
    make_model(get_spec("small")).save_pretrained(path)
    return "reference small architecture, untrained (not built here)"


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def calibration(vocab: int, sequences: int, seq_len: int):
    from moecompress.calibration.data import CalibrationSet

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (sequences, seq_len), generator=g)
    return CalibrationSet(ids, torch.ones_like(ids), "random", "bench")


def collectors(config: str):
    from moecompress.calibration.collectors import make_collector

    names = {"forward_all": ["routing", "reap", "easy_ep", "channels", "gram", "block_io"],
             "sequential_all": ["routing", "reap", "easy_ep", "channels", "gram", "block_io"],
             "forward_no_gram": ["routing", "reap", "easy_ep", "channels", "block_io"],
             "gradient": ["channel_grads"]}[config]
    return [make_collector(n) for n in names]


def one_pass(model, calib, config: str, batch_size: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one pass."""
    from moecompress.calibration.engine import run_full, run_sequential

    start, cpu = time.perf_counter(), time.process_time()
    if config in ("plain", "plain_no_head"):
        forward = model if config == "plain" else model.model
        with torch.inference_mode():
            for ids, mask in calib.batches(batch_size):
                forward(input_ids=ids, attention_mask=mask, use_cache=False)
    elif config == "sequential_all":
        run_sequential(model, calib, collectors(config), batch_size=batch_size)
    else:
        run_full(model, calib, collectors(config), batch_size=batch_size)
    return time.perf_counter() - start, time.process_time() - cpu


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(args) -> None:
    """One configuration in a fresh process: RSS after loading; the peak-RSS mark is reset (Linux clear_refs 5)
    so that the peak measured is the pass's own, not the loader's."""
    torch.set_num_threads(args.threads)
    model = load(Path(args.model))
    calib = calibration(model.config.vocab_size, args.sequences, args.seq_len)
    loaded = _status("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    one_pass(model, calib, args.child, args.batch_size)
    print(json.dumps({"loaded": loaded, "peak": _status("VmHWM")}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    p.add_argument("--child", choices=CONFIGS)
    p.add_argument("--model")
    args = p.parse_args()
    import logging

    logging.getLogger("moecompress").setLevel(logging.ERROR)
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        which = build_model(path)
        model = load(path)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        calib = calibration(model.config.vocab_size, args.sequences, args.seq_len)
        tokens = calib.num_tokens
        for config in CONFIGS:  # warm-up (allocator, lazy imports)
            one_pass(model, calibration(model.config.vocab_size, args.batch_size, args.seq_len), config,
                     args.batch_size)
        times = {c: [] for c in CONFIGS}
        for _ in range(args.repeats):
            for config in CONFIGS:
                times[config].append(one_pass(model, calib, config, args.batch_size))
        med = {c: statistics.median(w for w, _ in v) for c, v in times.items()}
        cpu = {c: statistics.median(u for _, u in v) for c, v in times.items()}
        memory = {}
        for config in CONFIGS:
            done = subprocess.run([sys.executable, __file__, "--child", config, "--model", str(path),
                                   "--sequences", str(args.sequences), "--seq-len", str(args.seq_len),
                                   "--batch-size", str(args.batch_size), "--threads", str(args.threads)],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(done.stderr[-2000:])
            memory[config] = json.loads(done.stdout.strip().splitlines()[-1])

    print(f"model: {which}; {model_bytes / 2**20:.1f} MiB of fp32 weights; {tokens} tokens "
          f"({args.sequences} × {args.seq_len}), batch {args.batch_size}; torch threads {torch.get_num_threads()}; "
          f"medians of {args.repeats} interleaved rounds")
    print(f"{'configuration':<16}{'wall s':>8}{'÷ plain':>9}{'CPU s':>8}{'÷ plain':>9}{'÷ no-head':>10}{'tok/s':>8}"
          f"{'target':>8}{'peak MiB':>10}{'peak÷model':>12}{'(peak−loaded)÷model+1':>23}")
    targets = {"forward_all": "≤1.25", "gradient": "≤3.5"}
    for config in CONFIGS:
        m = memory[config]
        print(f"{config:<16}{med[config]:>8.3f}{med[config] / med['plain']:>9.2f}{cpu[config]:>8.3f}"
              f"{cpu[config] / cpu['plain']:>9.2f}{cpu[config] / cpu['plain_no_head']:>10.2f}"
              f"{tokens / med[config]:>8.0f}{targets.get(config, ''):>8}"
              f"{m['peak'] / 2**20:>10.0f}{m['peak'] / model_bytes:>12.1f}"
              f"{(m['peak'] - m['loaded']) / model_bytes + 1:>23.2f}")
    print("raw (wall, cpu) s:", json.dumps({c: [(round(w, 3), round(u, 3)) for w, u in v] for c, v in times.items()}))


if __name__ == "__main__":
    main()
