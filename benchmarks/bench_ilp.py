"""Time the PMQ bit allocation on a 48-layer × 128-expert × 4-width *global* instance.

Usage: python benchmarks/bench_ilp.py [--cbc] [--repeats 3]

Prints the median wall time of the exact DP solver (the default, solver="auto") and,
with --cbc, of the same ILP through PuLP/CBC, plus their objectives (which must agree).
Target: < 5 s.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from moecompress.compress.quant.ilp import allocate_bits


def instance(L=48, E=128, W=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    freq = torch.rand(L, E, generator=g) ** 3  # skewed routing frequencies
    weight = freq * (0.5 + torch.rand(L, E, generator=g))
    error = torch.rand(L, E, W, generator=g).sort(-1, descending=True).values * torch.rand(L, E, 1, generator=g)
    return freq, weight, error


def run(solver: str, repeats: int):
    freq, weight, error = instance()
    times, res = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        res = allocate_bits(freq, weight, error, widths=(1, 2, 3, 4), avg_bits=2.5, per_layer=False, solver=solver)
        times.append(time.perf_counter() - t)
    return statistics.median(times), times, res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cbc", action="store_true", help="also time PuLP/CBC on the same instance")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"torch threads: {torch.get_num_threads()}; instance: 48 layers x 128 experts x widths (1,2,3,4), global budget 2.5 bits")
    for solver in ["auto"] + (["cbc"] if args.cbc else []):
        med, times, res = run(solver, args.repeats)
        hist = torch.bincount(res.bits.flatten(), minlength=5)[1:].tolist()
        print(f"{res.solver:>4}: median {med:.3f} s over {len(times)} runs ({', '.join(f'{t:.3f}' for t in times)}); "
              f"objective {res.objective:.9g}; avg bits {res.avg_bits:.4f}; experts at 1/2/3/4 bits: {hist}")


if __name__ == "__main__":
    main()
