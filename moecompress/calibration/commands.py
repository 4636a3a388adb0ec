"""What `moecompress calibrate` and `moecompress analyze` do (the CLI only parses flags and calls these).

Both check their output first (never the model's directory or inside it; a non-empty one needs `overwrite`) and
write it atomically (a temporary directory beside it, renamed into place), so a failure leaves nothing behind.

* `calibrate_to_dir` — fill the requested collectors (statistics cache or one pass) and write them to a directory:
  `<collector>.safetensors` + `<collector>.json` per collector and `summary.json` (pass facts). Read back with
  `moecompress.calibration.cache.load_stats(DIR)`.
* `analyze_to_dir` — routing statistics → `expert_usage.png` (per-layer expert-usage heatmap), `report.md` and
  `analysis.json`: per layer the never-routed and rarely-routed experts, the usage entropy, the mean per-token
  router entropy, and how many experts carry 50 / 90 / 99 % of the routed tokens — what to look at before choosing
  a pruning ratio.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from moecompress.calibration.cache import save_stats
from moecompress.calibration.collectors import Collector, RoutingCounts, make_collector
from moecompress.calibration.data import DataSpec
from moecompress.calibration.engine import RARE_THRESHOLD
from moecompress.calibration.pipeline import collect
from moecompress.errors import UserError

log = logging.getLogger("moecompress")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def check_tokenizer(tokenizer, model_id: str):
    """`tokenizer` if it is a real one: transformers 5 builds an empty (one-token) tokenizer from a directory that
    holds no tokenizer files instead of failing, and calibrating or evaluating with it would score unknown tokens."""
    path = Path(str(model_id)).expanduser()
    missing = path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES)
    if missing or tokenizer is None or len(tokenizer) < 2:
        raise UserError(f"no tokenizer could be loaded from '{model_id}' (no tokenizer files there); save the "
                        f"model's tokenizer next to it (tokenizer.save_pretrained(DIR))")
    return tokenizer


def load_model_and_tokenizer(model_id: str):
    from transformers import AutoTokenizer

    from moecompress.compress.checkpoint import load

    model = load(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"no tokenizer could be loaded from '{model_id}' ({str(e).splitlines()[0][:120]}); "
                        f"calibration needs one: save it next to the model") from None
    return model, check_tokenizer(tokenizer, model_id)


def parse_collectors(names: str, options: dict[str, Any]) -> list[Collector]:
    """`"routing,reap"` and `{"gram.intermediate": True}` → fresh collectors."""
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    if not wanted:
        raise UserError("--collect needs at least one collector name, e.g. --collect routing,reap")
    per: dict[str, dict[str, Any]] = {n: {} for n in wanted}
    for key, value in options.items():
        name, dot, option = key.partition(".")
        if not dot or name not in per:
            raise UserError(f"--set {key}: collector options are NAME.OPTION=VALUE for a collected NAME "
                            f"({', '.join(wanted)})")
        per[name][option] = value
    return [make_collector(n, **per[n]) for n in dict.fromkeys(wanted)]


def _check_output(out: Path, model_id: str, overwrite: bool) -> Path:
    """The output directory checked (not created): not the model's directory or inside it, not a file, empty
    unless `overwrite`. Results are written to a temporary directory beside it and renamed into place."""
    from moecompress.compress.checkpoint import check_output_dir

    model_dir = Path(str(model_id)).expanduser()
    return check_output_dir(Path(out), [model_dir] if model_dir.is_dir() else [], overwrite)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, not {batch_size}")


def calibrate_to_dir(model_id: str, spec: DataSpec, collectors: list[Collector], out: Path, batch_size: int = 8,
                     cache: bool = True, overwrite: bool = False, engine: str = "full") -> dict[str, Any]:
    from moecompress.paths import atomic_directory

    _check_batch_size(batch_size)
    out = _check_output(out, model_id, overwrite)
    model, tokenizer = load_model_and_tokenizer(model_id)
    stats, facts = collect(model, tokenizer, spec, collectors, batch_size=batch_size, cache=cache, engine=engine)
    facts = {"model": str(model_id), **facts}
    atomic_directory(out, lambda tmp: save_stats(stats, tmp, facts))
    return facts


# ----- analysis ------------------------------------------------------------------------------------------------
def routing_analysis(routing: RoutingCounts, threshold: int = RARE_THRESHOLD) -> dict[str, Any]:
    """Per-layer usage facts from a filled `routing` collector."""
    layers = {}
    for i in routing.layers():
        counts = routing.counts(i).double()
        total = float(counts.sum())
        n = len(counts)
        share = counts / total if total else torch.zeros_like(counts)
        nz = share[share > 0]
        entropy = float(-(nz * nz.log()).sum()) if len(nz) else 0.0
        ordered = torch.sort(share, descending=True).values.cumsum(0)
        cover = {f"{int(q * 100)}%": int((ordered < q - 1e-12).sum()) + 1 if total else 0 for q in (0.5, 0.9, 0.99)}
        layers[i] = {
            "experts": n,
            "tokens": routing.tokens(i),
            "routed_tokens": [int(c) for c in counts.tolist()],
            "share": [round(s, 6) for s in share.tolist()],
            "never_routed": (counts == 0).nonzero().flatten().tolist(),
            "rarely_routed": ((counts > 0) & (counts < threshold)).nonzero().flatten().tolist(),
            "usage_entropy": round(entropy / math.log(n), 4) if n > 1 else 0.0,
            "router_entropy": round(routing.mean_token_entropy(i) / math.log(n), 4) if n > 1 else 0.0,
            "experts_for_share": cover,
            "max_over_mean_load": round(float(share.max() * n), 3) if total else 0.0,
        }
    return {"rare_threshold": threshold, "layers": layers}


def _heatmap(analysis: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = analysis["layers"]
    width = max(v["experts"] for v in layers.values())
    grid = torch.full((len(layers), width), float("nan"))
    for row, v in enumerate(layers.values()):
        grid[row, : v["experts"]] = torch.tensor(v["share"]) * v["experts"]  # 1 = uniform load
    fig, ax = plt.subplots(figsize=(min(2 + 0.25 * width, 24), 1.5 + 0.35 * len(layers)))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    for row, v in enumerate(layers.values()):
        for e in v["never_routed"]:
            ax.text(e, row, "×", ha="center", va="center", color="red", fontsize=8)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [str(i) for i in layers])
    ax.set_title("expert load (share × experts; 1 = uniform, × = never routed)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(model_id: str, analysis: dict[str, Any], facts: dict[str, Any]) -> str:
    lines = [f"# Expert usage — {model_id}", "",
             f"Calibration: `{facts.get('source')}`, {facts.get('sequences')} sequences, {facts.get('tokens')} "
             f"tokens (seq_len {facts.get('seq_len')}, seed {facts.get('seed')}). Rarely routed = fewer than "
             f"{analysis['rare_threshold']} tokens. Entropies are normalised by log(E) (1 = uniform).", "",
             "![expert usage](expert_usage.png)", "",
             "| layer | experts | never routed | rarely routed | usage entropy | router entropy | max/mean load "
             "| experts for 50% / 90% / 99% of tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for i, v in analysis["layers"].items():
        cover = v["experts_for_share"]
        lines.append(f"| {i} | {v['experts']} | {v['never_routed'] or '-'} | {v['rarely_routed'] or '-'} | "
                     f"{v['usage_entropy']:.3f} | {v['router_entropy']:.3f} | {v['max_over_mean_load']:.2f} | "
                     f"{cover['50%']} / {cover['90%']} / {cover['99%']} |")
    never = sum(len(v["never_routed"]) for v in analysis["layers"].values())
    total = sum(v["experts"] for v in analysis["layers"].values())
    lines += ["", f"{never} of {total} routed experts were never routed on this data."]
    return "\n".join(lines) + "\n"


def analyze_to_dir(model_id: str, spec: DataSpec, out: Path, batch_size: int = 8, cache: bool = True,
                   overwrite: bool = False, threshold: int = RARE_THRESHOLD) -> dict[str, Any]:
    from moecompress.paths import atomic_directory

    _check_batch_size(batch_size)
    out = _check_output(out, model_id, overwrite)
    model, tokenizer = load_model_and_tokenizer(model_id)
    stats, facts = collect(model, tokenizer, spec, [RoutingCounts()], batch_size=batch_size, cache=cache)
    analysis = routing_analysis(stats["routing"], threshold)
    analysis = {"model": str(model_id), "calibration": {k: facts.get(k) for k in (
        "source", "fingerprint", "samples", "seq_len", "seed", "sequences", "tokens")}, **analysis}

    def write(tmp: Path) -> None:
        (tmp / "analysis.json").write_text(json.dumps(analysis, indent=1))
        _heatmap(analysis, tmp / "expert_usage.png")
        (tmp / "report.md").write_text(_markdown(model_id, analysis, facts))

    atomic_directory(out, write)
    return analysis
