"""Diagnostics behind the reference-model design (BENCHMARKS.md, "What changed since build version 2").

    python benchmarks/reference_diagnostics.py arithmetic --format bare --steps 800     # digits learnt? (~6 min)
    python benchmarks/reference_diagnostics.py arithmetic --format worked --steps 500
    python benchmarks/reference_diagnostics.py text MODEL_DIR --items 150              # MC distractor designs
    python benchmarks/reference_diagnostics.py positions MODEL_DIR                     # loss by position
    python benchmarks/reference_diagnostics.py max-positions                          # weights vs max_position_embeddings

``arithmetic`` trains the `small` architecture on arithmetic text alone (bare ``"37 + 48 = 85"`` lines, zero-padded
``"37 + 48 = 085"``, or the corpus's worked sums) and scores held-out sums: bare/padded against answers off by
±1/±2/±9–11 ("near"), ±1/±2 ("units"), ±10/±20 ("tens"); worked against three worked solutions with one wrong step.
``text`` scores a built model on prose/technical test sentences with three distractor designs: endings of other
sentences of the same length (tasks version 1), the same with up to 60 words of preceding context, and the one-word
cloze of tasks version 2. Needs a MOECOMPRESS_HOME for the tokenizer (built on demand).
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import sys


def loglik(model, tok, ctx: str, conts: list[str]) -> list[float]:
    import torch

    ids = [tok(ctx + " " + c, add_special_tokens=False)["input_ids"] for c in conts]
    n = len(tok(ctx, add_special_tokens=False)["input_ids"])
    x = torch.full((len(ids), max(map(len, ids))), tok.pad_token_id)
    for i, r in enumerate(ids):
        x[i, : len(r)] = torch.tensor(r)
    with torch.no_grad():
        lp = model(input_ids=x).logits.log_softmax(-1)
    return [sum(lp[i, j - 1, r[j]].item() for j in range(n, len(r))) for i, r in enumerate(ids)]


def accuracy(model, tok, items) -> float:
    hits = 0
    for ctx, choices, label in items:
        s = loglik(model, tok, ctx, choices)
        hits += max(range(len(choices)), key=s.__getitem__) == label
    return hits / len(items)


def arithmetic(fmt: str, steps: int, items: int) -> None:
    from moecompress.reference import build, corpus
    from moecompress.reference.tokenizer import load_tokenizer

    if fmt in ("bare", "padded"):
        pad = fmt == "padded"
        corpus.Equation.prompt = property(lambda e: f"{e.a:02d} {e.op} {e.b:02d} =" if pad else f"{e.a} {e.op} {e.b} =")
        show = (lambda e, c: f"{c:03d}" if e.op == "+" else f"{c:02d}") if pad else (lambda e, c: str(c))
        corpus.Equation.text = property(lambda e: f"{e.prompt} {show(e, e.answer)}")
    tok = load_tokenizer()
    spec = dataclasses.replace(build.get_spec("small"), domain_weights={"arithmetic": 1.0}, steps=steps)
    model, _ = build.train(spec, tok, progress=False, log_every=50)
    eqs = list(corpus._equations()["test"])
    rng = random.Random(1)
    rng.shuffle(eqs)
    if fmt == "worked":
        from moecompress.evals.reference_tasks import _arithmetic_items

        mc = [(it["context"], it["choices"], it["label"]) for it in _arithmetic_items("test")[:items]]
        print(f"worked, {steps} steps: right worked solution among 4: {accuracy(model, tok, mc):.3f}")
        return
    for name, deltas in (("near", (-11, -10, -9, -2, -1, 1, 2, 9, 10, 11)), ("units", (-2, -1, 1, 2)), ("tens", (-20, -10, 10, 20))):
        mc = []
        for e in eqs[:items]:
            wrong = [e.answer + d for d in deltas if e.answer + d >= 0]
            wrong = wrong if len(wrong) >= 3 else wrong + [e.answer + 30, e.answer + 40, e.answer + 50]
            choices = [show(e, c) for c in [e.answer] + rng.sample(wrong, 3)]
            mc.append((e.prompt, choices, 0))
        print(f"{fmt}, {steps} steps, distractors {name}: {accuracy(model, tok, mc):.3f}", flush=True)


def text(model_dir: str, items: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecompress.evals import reference_tasks as rt
    from moecompress.reference import corpus

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    for dom in ("prose", "technical"):
        rng = random.Random(0)
        cut = []  # (preceding text, sentence start, ending, ending length)
        for doc in corpus.documents(dom, "test"):
            sents = rt._SENT_SPLIT.split(rt.running_text(doc, dom))
            for k in range(1, len(sents)):
                words = sents[k].split()
                if 8 <= len(words) <= 60:
                    n = min(8, max(4, len(words) // 2))
                    prev = " ".join(" ".join(sents[:k]).split()[-60:])
                    cut.append((prev, " ".join(words[:-n]), " ".join(words[-n:]), n))
        rng.shuffle(cut)
        by_len: dict[int, list[str]] = {}
        for *_, end, n in cut:
            by_len.setdefault(n, []).append(end)
        other, context = [], []
        for prev, start, end, n in cut[:items]:
            choices = [end] + rng.sample([e for e in by_len[n] if e != end], 3)
            other.append((start, choices, 0))
            context.append((f"{prev} {start}", choices, 0))
        cloze = [(it["context"], it["choices"], it["label"]) for it in rt.mc_items(dom, "test")[:items]]
        print(f"{dom}: other-sentence endings {accuracy(model, tok, other):.3f}, with preceding context "
              f"{accuracy(model, tok, context):.3f}, one-word cloze (tasks v2) {accuracy(model, tok, cloze):.3f}", flush=True)


def positions(model_dir: str, length: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moecompress.reference import corpus

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor([[tok.bos_token_id] + tok(corpus.documents("arithmetic", "test")[0])["input_ids"][: length - 1]])
    with torch.no_grad():
        lp = model(input_ids=ids).logits.log_softmax(-1)
    nll = -lp[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
    print("mean loss per 64 positions:", [round(float(nll[i : i + 64].mean()), 3) for i in range(0, len(nll), 64)])


def max_positions() -> None:
    import torch

    from moecompress.reference import build
    from moecompress.reference.tokenizer import load_tokenizer

    tok = load_tokenizer()
    shrink = {"small-shared": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                                   kv_lora_rank=16, v_head_dim=16, qk_nope_head_dim=16, qk_rope_head_dim=8)}
    for name in ("tiny", "small-shared"):
        spec = build.get_spec(name)
        weights = []
        for mp in (spec.seq_len, 512):
            arch = {**spec.arch, **shrink.get(name, {}), "max_position_embeddings": mp}
            model, _ = build.train(dataclasses.replace(spec, arch=arch, steps=25, batch_size=4), tok, progress=False, threads=1)
            weights.append(model.state_dict())
        same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
        print(f"{spec.family}: weights bit-identical with max_position_embeddings {spec.seq_len} and 512: {same}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("arithmetic")
    a.add_argument("--format", choices=["bare", "padded", "worked"], default="worked")
    a.add_argument("--steps", type=int, default=500)
    a.add_argument("--items", type=int, default=200)
    t = sub.add_parser("text")
    t.add_argument("model_dir")
    t.add_argument("--items", type=int, default=150)
    p = sub.add_parser("positions")
    p.add_argument("model_dir")
    p.add_argument("--length", type=int, default=512)
    sub.add_parser("max-positions")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.cmd == "arithmetic":
        arithmetic(args.format, args.steps, args.items)
    elif args.cmd == "text":
        text(args.model_dir, args.items)
    elif args.cmd == "positions":
        positions(args.model_dir, args.length)
    else:
        max_positions()
    return 0


if __name__ == "__main__":
    sys.exit(main())
