"""Deployable exports of a reference MoE: file bytes, load time and perplexity in each loader, side by side with
llm-compressor's GPTQ W4A16 export of the same model.

    python benchmarks/bench_export.py                                   # reference `small` (built if missing)
    python benchmarks/bench_export.py --llmcompressor /path/venv/bin/python --llama-cpp /path/llama.cpp/build/bin
    python benchmarks/bench_export.py --model tiny --json export.json

Rows (all 4-bit rows: symmetric int4, groups of 32 input columns, the same 64 × 256 calibration tokens):
* `base`: the fp32 reference model — transformers; and its GGUF (F32) in llama.cpp;
* `moecompress gptq w4`: routed experts GPTQ, attention / dense linears RTN, `moecompress quantize -m gptq --bits 4
  --group-size 32 --attn-bits 4 --set sym=true`, loaded three ways: (a) `moecompress.load` of the native
  checkpoint, (b) transformers + compressed-tensors of `moecompress export --format compressed-tensors`, (c)
  llama.cpp of `moecompress export --format gguf` (Q4_0, exact);
* `moecompress reap 25% + gptq w4`: REAP-pruned 25 % of the routed experts first, then the same quantization;
* `llm-compressor gptq w4`: llm-compressor 0.14 `oneshot` with `GPTQModifier` (targets Linear: experts and attention
  GPTQ, router and lm_head ignored; its defaults otherwise: static act-order, all experts calibrated on all tokens),
  run in its own virtual environment (`--llmcompressor PYTHON`; the row is skipped without it), loaded by
  transformers + compressed-tensors in this one.

Perplexity follows llama-perplexity's protocol so that every loader is scored alike: the held-out test split of the
bundled corpus (all domains) tokenized once, cut into chunks of `--ctx` tokens (each chunk's first token replaced by
BOS when the tokenizer adds one — the reference tokenizer does not), the negative log-likelihood averaged over the
second half of every chunk. The llama.cpp rows run
`llama-perplexity` itself on the text; the token ids llama.cpp produces (`llama-tokenize`) are compared with the HF
tokenizer's and the table says whether they are identical (then the numbers are directly comparable). Load time:
from the files on disk to a model ready to run, once per loader, with a warm page cache. Bytes: the weight files
(`*.safetensors` / `*.gguf`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MOECOMPRESS = [str(Path(sys.executable).parent / "moecompress")]

LLMCOMPRESSOR_SCRIPT = r'''
import sys, time, torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from llmcompressor import oneshot
from llmcompressor.modifiers.quantization import GPTQModifier
base, calib, out, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.set_num_threads(2)
data = torch.load(calib)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(base)
ds = Dataset.from_dict({"input_ids": data["input_ids"].tolist(), "attention_mask": data["attention_mask"].tolist()})
scheme = {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                                               "group_size": group}}
recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"])
start = time.time()
oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ds),
        max_seq_length=data["input_ids"].shape[1])
print("LLMC_SECONDS", time.time() - start)
model.save_pretrained(out, save_compressed=True)
tok.save_pretrained(out)
'''


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    if done.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed:\n{done.stderr[-3000:]}")
    return done


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".gguf"))


# ----- perplexity, llama-perplexity's protocol -----------------------------------------------------------------
def chunk_perplexity(logits_of, ids: list[int], ctx: int, bos: int | None) -> float:
    """exp(mean NLL) over the second half of every `ctx`-token chunk; with `bos` (the tokenizer adds one, so
    llama.cpp's add_bos is on) each chunk's first token is set to it, as llama-perplexity does."""
    import torch

    nll, count = 0.0, 0
    for start in range(0, len(ids) - ctx + 1, ctx):
        chunk = torch.tensor([ids[start:start + ctx]])
        if bos is not None:
            chunk[0, 0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(logits_of(chunk)[0].double(), dim=-1)
        first = ctx // 2
        targets = chunk[0, first + 1:]
        nll -= float(logp[first:ctx - 1].gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(nll / count)


def test_text(limit_tokens: int, tokenizer) -> tuple[str, list[int], int | None]:
    """The test text, its ids as the tokenizer gives them (special tokens as it adds them, as llama.cpp's tokenizer
    copies its add_bos flag) and the BOS id when it adds one."""
    from moecompress.reference import reference_texts

    docs, text = reference_texts(None, "test"), ""
    for doc in docs:
        text += doc + "\n\n"
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= limit_tokens:
            break
    ids = tokenizer(text)["input_ids"]
    return text, ids, (ids[0] if ids and ids[0] == tokenizer.bos_token_id else None)


def timed_load(load):
    start = time.perf_counter()
    model = load()
    return model, time.perf_counter() - start


def hf_row(path: Path, ids, ctx, bos) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model, seconds = timed_load(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
    return {"bytes": weight_bytes(path), "load_s": seconds,
            "ppl": chunk_perplexity(lambda x: model(x).logits, ids, ctx, bos)}


def native_row(path: Path, ids, ctx, bos) -> dict:
    from moecompress.compress.checkpoint import load

    model, seconds = timed_load(lambda: load(path))
    return {"bytes": weight_bytes(path), "load_s": seconds,
            "ppl": chunk_perplexity(lambda x: model(x).logits, ids, ctx, bos)}


def llama_row(gguf_dir: Path, text_file: Path, ctx: int, bins: Path, hf_ids: list[int]) -> dict:
    model = gguf_dir / "model.gguf"
    tokenized = run([bins / "llama-tokenize", "-m", model, "-f", text_file, "--ids", "--log-disable",
                     "--no-escape"]).stdout
    llama_ids = json.loads(tokenized.strip().splitlines()[-1])
    for _ in range(3):  # its log is written by a thread: now and then the process ends before the last lines
        start = time.perf_counter()
        done = run([bins / "llama-perplexity", "-m", model, "-f", text_file, "-c", ctx, "-b", ctx, "-t", "2",
                    "--no-escape"])
        seconds = time.perf_counter() - start
        log = done.stdout + done.stderr
        found = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
        if found:
            break
    load = re.search(r"load time =\s+([0-9.]+) ms", log)
    return {"bytes": weight_bytes(gguf_dir), "load_s": float(load.group(1)) / 1000 if load else seconds,
            "ppl": float(found.group(1)) if found else float("nan"), "ids_identical": llama_ids == hf_ids}


# ----- the runs -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=8192, help="test tokens scored (before chunking)")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--llmcompressor", type=Path, help="python of a venv with llmcompressor 0.14")
    parser.add_argument("--llama-cpp", type=Path, help="directory holding llama-perplexity and llama-tokenize")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--keep", type=Path, help="keep the checkpoints in this directory")
    args = parser.parse_args(argv)

    import torch

    from moecompress.calibration.data import DataSpec, build_calibration
    from moecompress.reference import reference_path
    from transformers import AutoTokenizer

    torch.set_num_threads(2)
    base = Path(reference_path(args.model))
    if not (base / "config.json").exists():
        run(MOECOMPRESS + ["reference", "build", args.model])
    tokenizer = AutoTokenizer.from_pretrained(base)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-export-"))
    work.mkdir(parents=True, exist_ok=True)
    text, ids, bos = test_text(args.tokens, tokenizer)
    text_file = work / "test.txt"
    text_file.write_text(text)
    ctx, g = args.ctx, args.group_size
    rows: list[dict] = []

    def add(name, loader, **row):
        rows.append({"config": name, "loader": loader, **row})
        print(f"{name:<34} {loader:<30} {json.dumps(row)}", flush=True)

    try:
        quant = ["-m", "gptq", "--bits", "4", "--group-size", g, "--attn-bits", "4", "--set", "sym=true"]
        configs = {"moecompress gptq w4": [MOECOMPRESS + ["quantize", base, *quant]],
                   "moecompress reap 25% + gptq w4": [MOECOMPRESS + ["prune", base, "-m", "reap", "--ratio", "0.25"],
                                                      MOECOMPRESS + ["quantize", "{prev}", *quant]]}
        add("base (fp32)", "transformers", **hf_row(base, ids, ctx, bos))
        if args.llama_cpp:
            run(MOECOMPRESS + ["export", base, "--format", "gguf", "-o", work / "base.gguf", "--overwrite"])
            add("base (fp32)", "llama.cpp (GGUF F32)", **llama_row(work / "base.gguf", text_file, ctx,
                                                                  args.llama_cpp, ids))
        for name, steps in configs.items():
            slug = re.sub(r"[^a-z0-9]+", "-", name)
            prev, start = base, time.perf_counter()
            for k, step in enumerate(steps):
                out = work / f"{slug}-{k}"
                run([str(prev) if c == "{prev}" else c for c in step] + ["-o", out, "--overwrite"])
                prev = out
            seconds = time.perf_counter() - start
            add(name, "moecompress.load (native)", compress_s=seconds, **native_row(prev, ids, ctx, bos))
            ct = work / f"{slug}-ct"
            run(MOECOMPRESS + ["export", prev, "--format", "compressed-tensors", "-o", ct, "--overwrite"])
            add(name, "transformers + compressed-tensors", **hf_row(ct, ids, ctx, bos))
            if args.llama_cpp:
                gg = work / f"{slug}-gguf"
                run(MOECOMPRESS + ["export", prev, "--format", "gguf", "-o", gg, "--overwrite"])
                add(name, "llama.cpp (GGUF Q4_0)", **llama_row(gg, text_file, ctx, args.llama_cpp, ids))
        if args.llmcompressor:
            calib = build_calibration(tokenizer, DataSpec())  # the calibration moecompress used (defaults)
            torch.save({"input_ids": calib.input_ids, "attention_mask": calib.attention_mask}, work / "calib.pt")
            script = work / "llmc.py"
            script.write_text(LLMCOMPRESSOR_SCRIPT)
            out = work / "llmc-w4"
            start = time.perf_counter()
            done = run([args.llmcompressor, script, base, work / "calib.pt", out, g])
            found = re.search(r"LLMC_SECONDS ([0-9.]+)", done.stdout + done.stderr)
            add("llm-compressor gptq w4", "transformers + compressed-tensors",
                compress_s=float(found.group(1)) if found else time.perf_counter() - start,
                **hf_row(out, ids, ctx, bos))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"| config | loader | bytes | load s | perplexity | ppl ÷ base |")
    print("|---|---|---|---|---|---|")
    base_ppl = {r["loader"].split(" ")[0]: r["ppl"] for r in rows if r["config"].startswith("base")}
    for r in rows:
        ref = base_ppl.get("llama.cpp") if r["loader"].startswith("llama.cpp") else base_ppl.get("transformers")
        note = "" if "ids_identical" not in r else (" (same token ids)" if r["ids_identical"] else " (ids differ)")
        print(f"| {r['config']} | {r['loader']}{note} | {r['bytes']:,} | {r['load_s']:.2f} | {r['ppl']:.3f} | "
              f"{r['ppl'] / ref:.4f} |")
    if args.json:
        args.json.write_text(json.dumps({"ctx": ctx, "tokens": len(ids), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
