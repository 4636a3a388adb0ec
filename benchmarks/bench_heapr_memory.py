"""HEAPr's forward + backward pass: peak memory with and without activation checkpointing, and what it costs.

    python benchmarks/bench_heapr_memory.py            # ~3 min on 2 cores
    python benchmarks/bench_heapr_memory.py --layers 8 --hidden 512 --experts 32 --samples 16 --seq-len 256

A random Qwen3-MoE (bf16 weights in memory, fp32 statistics) is scored by HEAPr's `channel_grads` collector over the
same calibration batches, once with `checkpoint=False` and once with `checkpoint=True` (each decoder layer keeps
only its input and is recomputed in the backward), each in a fresh process so that the peak RSS (ru_maxrss) is its
own. Reported: peak RSS, its excess over the weights, wall time, and that both give the same statistics.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from transformers import Qwen3MoeConfig, AutoModelForCausalLM
from moecompress.calibration.collectors import ChannelGrads
from moecompress.calibration.data import CalibrationSet
from moecompress.calibration.engine import run_full
a = json.loads(sys.argv[1])
torch.manual_seed(0)
config = Qwen3MoeConfig(vocab_size=4096, hidden_size=a["hidden"], intermediate_size=4 * a["hidden"],
                        moe_intermediate_size=a["hidden"] // 2, num_experts=a["experts"], num_experts_per_tok=4,
                        num_hidden_layers=a["layers"], num_attention_heads=8, num_key_value_heads=2,
                        head_dim=a["hidden"] // 8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                        max_position_embeddings=a["seq_len"], tie_word_embeddings=False)
model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
g = torch.Generator().manual_seed(1)
ids = torch.randint(3, 4096, (a["samples"], a["seq_len"]), generator=g)
calib = CalibrationSet(ids, torch.ones_like(ids), "random", "bench")
collector = ChannelGrads()
start = time.perf_counter()
run_full(model, calib, [collector], batch_size=a["batch"], backward=True, checkpoint=a["checkpoint"])
seconds = time.perf_counter() - start
digest = sum(float(v.double().sum()) for v in collector.state.values())
print(json.dumps({"seconds": seconds, "weights": weights, "digest": digest,
                  "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(args: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(args)], capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    ns = parser.parse_args()
    base = {"layers": ns.layers, "hidden": ns.hidden, "experts": ns.experts, "samples": ns.samples,
            "seq_len": ns.seq_len, "batch": ns.batch}
    rows = {}
    for checkpoint in (False, True):
        rows[checkpoint] = measure({**base, "checkpoint": checkpoint})
    plain, ckpt = rows[False], rows[True]
    gib = 2 ** 30
    print(f"model: {ns.layers} layers, hidden {ns.hidden}, {ns.experts} experts, bf16 weights "
          f"{plain['weights'] / gib:.2f} GiB; {ns.samples} × {ns.seq_len} tokens in batches of {ns.batch}")
    print("| backward pass | peak RSS GiB | peak − weights GiB | wall s |")
    print("|---|---:|---:|---:|")
    for label, r in (("plain", plain), ("activation checkpointing", ckpt)):
        print(f"| {label} | {r['peak'] / gib:.2f} | {(r['peak'] - r['weights']) / gib:.2f} | {r['seconds']:.1f} |")
    print(f"checkpointing: peak − weights ÷ plain = {(ckpt['peak'] - ckpt['weights']) / (plain['peak'] - plain['weights']):.2f}, "
          f"wall ÷ plain = {ckpt['seconds'] / plain['seconds']:.2f}; statistics digest equal: "
          f"{abs(plain['digest'] - ckpt['digest']) <= 1e-6 * abs(plain['digest'])}")


if __name__ == "__main__":
    main()
