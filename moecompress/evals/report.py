"""Reports: size facts of a (compressed) MoE, lm-eval results with recovery vs a baseline, plots, comparisons.

``write_report(out_dir, results, facts, baseline)`` writes ``report.json`` (raw lm-eval results whole, facts,
baseline), ``report.md`` and PNG plots. ``compare_reports(dirs, out_dir)`` writes one table over several reports and
a quality-vs-size Pareto plot. Every file is written atomically (temporary file + rename).

Recovery is compressed ÷ baseline for higher-is-better metrics (accuracy) and baseline ÷ compressed for
lower-is-better ones (perplexity, bits per byte), so 1.0 always means "nothing lost" and < 1 means worse.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from moecompress.errors import UserError
from moecompress.evals.lmeval import chance, metric_rows

REPORT_VERSION = 1
MANIFEST = "moecompress.json"
HEADLINE_METRICS = ("acc", "word_perplexity")  # per task, the first one present is its headline


# ---------------------------------------------------------------------------------------------- size facts


def _experts_count(experts) -> int | None:
    for attr in ("num_experts", "n_routed_experts", "num_local_experts"):
        v = getattr(experts, attr, None)
        if isinstance(v, int):
            return v
    try:
        return len(experts)
    except TypeError:
        pass
    w = getattr(experts, "gate_up_proj", None)
    if w is not None and getattr(w, "ndim", 0) == 3:
        return int(w.shape[0])
    return None


def _is_packed(m) -> bool:
    """A packed low-bit linear (moecompress.compress.quant.linear.PackedLinear or alike): weights live in buffers."""
    return all(isinstance(getattr(m, a, None), int) for a in ("bits", "in_features", "out_features")) and not any(
        True for _ in m.parameters(recurse=False)
    )


def _tensor_bytes(module) -> tuple[int, int, float]:
    """(logical parameter count, bytes of parameters + buffers, bit-weighted parameter count) of a module.

    A packed linear counts in_features x out_features logical parameters at its ``bits``, and the bytes of every
    tensor its state dict holds (a bitsandbytes wrapper's inner module and quantization state included, once)."""
    n, b, bitsum = 0, 0, 0.0
    inside_packed: set[int] = set()
    for m in module.modules():
        if id(m) in inside_packed:
            continue
        if _is_packed(m):
            inside_packed.update(id(sub) for sub in m.modules())
            count = m.in_features * m.out_features
            n += count
            bitsum += count * m.bits
            b += sum(t.numel() * t.element_size() for t in m.state_dict().values())
            continue
        for buf in m.buffers(recurse=False):
            b += buf.numel() * buf.element_size()
        for p in m.parameters(recurse=False):
            n += p.numel()
            b += p.numel() * p.element_size()
            bitsum += p.numel() * p.element_size() * 8
    return n, b, bitsum


def _layers(model):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        layers = getattr(getattr(inner, "language_model", None), "layers", None)
    return list(layers) if layers is not None else []


def _read_manifest(checkpoint_dir: Path) -> dict | None:
    path = checkpoint_dir / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _find_bits(manifest: Any) -> dict[str, Any]:
    """Numeric entries whose key mentions bits, anywhere in the manifest (shallow paths, tolerant)."""
    found: dict[str, Any] = {}

    def walk(obj, prefix, depth):
        if depth > 3 or len(found) > 20:
            return
        if isinstance(obj, dict):
            for k, v in obj.items():
                key = f"{prefix}.{k}" if prefix else str(k)
                if "bit" in str(k).lower() and isinstance(v, (int, float)) and not isinstance(v, bool):
                    found[key] = v
                elif isinstance(v, dict):
                    walk(v, key, depth + 1)

    walk(manifest, "", 0)
    return found


def size_facts(model, checkpoint_dir: str | os.PathLike | None = None) -> dict:
    """Parameter counts (total / routed-expert / shared-expert / non-expert), memory and disk bytes, average bits per
    parameter (packed low-bit linears count in x out parameters at their ``bits``; ``routed_expert_storage_bits`` is
    the routed experts' stored bytes x 8 per weight, scales and quantization state included), experts per MoE layer,
    and the bit widths a ``moecompress.json`` manifest states. Tolerant of unknown module layouts."""
    total, total_bytes, total_bits = _tensor_bytes(model)
    routed, routed_bytes, routed_bits, shared = 0, 0, 0.0, 0
    experts_per_layer: list[int | None] = []
    widths: list[int | None] = []
    for layer in _layers(model):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        experts = getattr(mlp, "experts", None) if mlp is not None else None
        if experts is None:
            experts_per_layer.append(None)
            widths.append(None)
            continue
        n, b, bits = _tensor_bytes(experts)
        routed += n
        routed_bytes += b
        routed_bits += bits
        experts_per_layer.append(_experts_count(experts))
        w = getattr(experts, "intermediate_dim", None)
        if w is None and getattr(getattr(experts, "down_proj", None), "ndim", 0) == 3:
            w = int(experts.down_proj.shape[-1])
        widths.append(int(w) if isinstance(w, int) else None)
        for name in ("shared_experts", "shared_expert"):
            sub = getattr(mlp, name, None)
            if sub is not None:
                shared += _tensor_bytes(sub)[0]
    config = getattr(model, "config", None)
    facts: dict[str, Any] = {
        "model_type": getattr(config, "model_type", None),
        "parameters_total": total,
        "parameters_routed_experts": routed,
        "parameters_shared_experts": shared,
        "parameters_non_expert": total - routed,
        "routed_expert_fraction": routed / total if total else 0.0,
        "bytes_in_memory": total_bytes,
        "bytes_routed_experts_in_memory": routed_bytes,
        "average_bits": total_bits / total if total else None,
        "routed_expert_bits": routed_bits / routed if routed else None,
        "routed_expert_storage_bits": 8 * routed_bytes / routed if routed else None,
        "moe_layers": sum(e is not None for e in experts_per_layer),
        "experts_per_layer": experts_per_layer,
        "expert_width_per_layer": widths,
        "top_k": getattr(config, "num_experts_per_tok", None),
        "dtype": str(next(iter(model.parameters())).dtype).replace("torch.", "") if total else None,
    }
    facts["expert_bits"] = expert_bit_map(model)
    if checkpoint_dir is not None:
        d = Path(checkpoint_dir)
        if not d.is_dir():
            raise UserError(f"checkpoint directory {d} does not exist: pass the directory the model was saved to")
        files = [p for p in d.rglob("*") if p.is_file()]
        facts["checkpoint_dir"] = str(d)
        facts["bytes_on_disk"] = sum(p.stat().st_size for p in files)
        facts["weight_bytes_on_disk"] = sum(
            p.stat().st_size for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".gguf")
        )
        manifest = _read_manifest(d)
        if manifest is not None:
            facts["manifest"] = True
            facts["bits"] = _find_bits(manifest)
            for k in ("format_version", "method", "methods", "recipe_name"):
                if isinstance(manifest.get(k), (str, int, float, list)):
                    facts[f"manifest_{k}"] = manifest[k]
        else:
            facts["manifest"] = False
    return facts


# ------------------------------------------------------------------------------------------------ writing


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def _atomic_write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_savefig(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _atomic_write(path, buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _load_baseline(baseline) -> tuple[dict | None, dict | None]:
    """Baseline as (lm-eval results, size facts): accepts raw results, a report dict, a report.json or its dir."""
    if baseline is None:
        return None, None
    if isinstance(baseline, (str, os.PathLike)):
        p = Path(baseline)
        p = p / "report.json" if p.is_dir() else p
        if not p.is_file():
            raise UserError(f"baseline report {p} not found: pass a report directory written by `moecompress report`/eval")
        baseline = json.loads(p.read_text())
    if not isinstance(baseline, dict):
        raise UserError("baseline must be lm-eval results, a report dict, or a path to a report directory")
    if "results" in baseline and isinstance(baseline.get("results"), dict) and "results" in baseline["results"]:
        return baseline["results"], baseline.get("facts")  # a report.json
    return baseline, None


def recovery(value: float | None, base: float | None, higher_is_better: bool | None) -> float | None:
    if value is None or base is None or not (math.isfinite(value) and math.isfinite(base)):
        return None
    if higher_is_better is False:
        return base / value if value else None
    return value / base if base else None


def compare_rows(results: dict, baseline_results: dict | None) -> list[dict]:
    base = {(r["task"], r["metric"]): r for r in metric_rows(baseline_results)} if baseline_results else {}
    rows = []
    for r in metric_rows(results):
        b = base.get((r["task"], r["metric"]))
        rows.append(
            {
                **r,
                "baseline": b["value"] if b else None,
                "recovery": recovery(r["value"], b["value"] if b else None, r["higher_is_better"]) if b else None,
                "chance": chance(r["task"]) if r["metric"] in ("acc", "acc_norm") else None,
            }
        )
    return rows


def _fmt(v, digits=4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _headline(rows: list[dict]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for metric in HEADLINE_METRICS:
        for r in rows:
            if r["metric"] == metric and r["task"] not in out:
                out[r["task"]] = r
    return out


def _markdown(title: str, rows: list[dict], facts: dict, base_facts: dict | None, has_baseline: bool) -> str:
    lines = [f"# {title}", ""]
    lines += ["## Size", "", "| fact | value |" + (" baseline |" if base_facts else ""), "|---|---|" + ("---|" if base_facts else "")]
    for k in (
        "model_type",
        "parameters_total",
        "parameters_routed_experts",
        "parameters_shared_experts",
        "parameters_non_expert",
        "bytes_in_memory",
        "bytes_on_disk",
        "weight_bytes_on_disk",
        "moe_layers",
        "top_k",
        "experts_per_layer",
        "expert_width_per_layer",
        "average_bits",
        "routed_expert_bits",
        "routed_expert_storage_bits",
        "bits",
    ):
        if k in facts:
            row = f"| {k} | {_fmt(facts[k]) if not isinstance(facts[k], (list, dict)) else json.dumps(facts[k])} |"
            if base_facts:
                bv = base_facts.get(k)
                row += f" {_fmt(bv) if not isinstance(bv, (list, dict)) else json.dumps(bv)} |"
            lines.append(row)
    lines += ["", "## Scores", ""]
    lines.append("| task | metric | value | ± stderr | baseline | recovery | chance |")
    lines.append("|---|---|---|---|---|---|---|")
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['metric']} | {_fmt(r['value'])} | {_fmt(r['stderr'])} | {_fmt(r['baseline'])} "
            f"| {_fmt(r['recovery'], 3)} | {_fmt(r['chance'], 2)} |"
        )
    heads = [r for r in _headline(rows).values() if r["recovery"] is not None]
    if heads:
        mean = sum(r["recovery"] for r in heads) / len(heads)
        lines += ["", f"Mean recovery over the headline metric of {len(heads)} task(s): **{mean:.3f}**."]
    lines += [
        "",
        "Recovery = compressed ÷ baseline for higher-is-better metrics, baseline ÷ compressed for perplexity and bits "
        "per byte (1.0 = nothing lost)." if has_baseline else "No baseline given: no recovery column.",
        "",
    ]
    return "\n".join(lines)


def _plot_experts(facts: dict, base_facts: dict | None, path: Path) -> bool:
    per = facts.get("experts_per_layer") or []
    if not any(isinstance(e, int) for e in per):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(per) + 2), 3))
    xs = list(range(len(per)))
    if base_facts and base_facts.get("experts_per_layer"):
        bper = base_facts["experts_per_layer"]
        ax.bar(xs, [e or 0 for e in bper[: len(per)]], color="#dddddd", label="baseline")
    ax.bar(xs, [e or 0 for e in per], color="#3b6ea8", width=0.6, label="kept")
    ax.set_xlabel("layer")
    ax.set_ylabel("routed experts")
    ax.set_title("Experts kept per layer")
    ax.legend(fontsize=8)
    _atomic_savefig(fig, path)
    plt.close(fig)
    return True


def expert_bit_map(model) -> list[list[int] | None] | None:
    """Bits per routed expert per decoder layer (16 = dense, None = no MoE layer), from the modules themselves
    (packed / bitsandbytes linears carry `bits`); None when no expert is quantized."""
    import torch

    out, any_q = [], False
    for layer in _layers(model):
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        experts = getattr(mlp, "experts", None) if mlp is not None else None
        if not isinstance(experts, torch.nn.ModuleList):
            out.append(None)
            continue
        bits = [int(getattr(getattr(e, "gate_proj", None), "bits", 16)) for e in experts]
        any_q |= any(b != 16 for b in bits)
        out.append(bits)
    return out if any_q else None


def _plot_bits(facts: dict, path: Path) -> bool:
    """Heatmap of bits per routed expert (rows = MoE layers), e.g. PMQ's bit map."""
    per = [b for b in (facts.get("expert_bits") or []) if b]
    if not per:
        return False
    plt = _plt()
    width = max(len(b) for b in per)
    grid = [b + [float("nan")] * (width - len(b)) for b in per]
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * width + 2), max(2.5, 0.3 * len(per) + 1.5)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="bits")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("Bits per routed expert")
    _atomic_savefig(fig, path)
    plt.close(fig)
    return True


def _plot_recovery(rows: list[dict], path: Path) -> bool:
    heads = [r for r in _headline(rows).values() if r["recovery"] is not None]
    if not heads:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(heads) + 2), 3.2))
    names = [f"{r['task']}\n({r['metric']})" for r in heads]
    vals = [r["recovery"] for r in heads]
    ax.bar(range(len(vals)), vals, color=["#3b8a3b" if v >= 0.95 else "#c9822b" if v >= 0.8 else "#b33" for v in vals])
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(vals)), names, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("recovery (1 = no loss)")
    ax.set_title("Recovery per task")
    _atomic_savefig(fig, path)
    plt.close(fig)
    return True


def write_report(
    out_dir: str | os.PathLike,
    results: dict,
    facts: dict | None = None,
    baseline: dict | str | os.PathLike | None = None,
    title: str | None = None,
    extra: dict | None = None,
) -> Path:
    """Write ``report.json``, ``report.md``, ``experts_per_layer.png`` and ``recovery.png`` (when they apply).

    ``baseline`` is the base model's lm-eval results, a report dict, or a report directory. Returns ``out_dir``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = dict(facts or {})
    base_results, base_facts = _load_baseline(baseline)
    rows = compare_rows(results, base_results)
    from moecompress import __version__

    report = {
        "report_version": REPORT_VERSION,
        "moecompress_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "title": title or out.name,
        "facts": facts,
        "baseline_facts": base_facts,
        "summary": rows,
        "results": results,
        "baseline": base_results,
        **(extra or {}),
    }
    _atomic_write(out / "report.json", json.dumps(report, indent=2, default=_json_default) + "\n")
    _atomic_write(out / "report.md", _markdown(title or out.name, rows, facts, base_facts, base_results is not None))
    _plot_experts(facts, base_facts, out / "experts_per_layer.png")
    _plot_recovery(rows, out / "recovery.png")
    _plot_bits(facts, out / "expert_bits.png")
    return out


# ------------------------------------------------------------------------------------------------ compare


def _read_report(d: Path) -> dict:
    p = d / "report.json" if d.is_dir() else d
    if not p.is_file():
        raise UserError(f"{p} is not a report: pass directories written by write_report / `moecompress eval`")
    return json.loads(p.read_text())


_SIZE_KEYS = (
    ("weight_bytes_on_disk", "weight bytes on disk"),
    ("bytes_on_disk", "bytes on disk"),
    ("bytes_in_memory", "bytes in memory"),
    ("parameters_total", "parameters"),
)


def _size_key(all_facts: list[dict]) -> tuple[str | None, str]:
    """The first size measure every report has (so the comparison never mixes units)."""
    for key, label in _SIZE_KEYS:
        if all(isinstance(f.get(key), (int, float)) and f.get(key) > 0 for f in all_facts):
            return key, label
    return None, ""


def _quality(heads: dict[str, dict], common: list[str]) -> tuple[float | None, str]:
    """Mean accuracy over the MC tasks every report has (comparable across reports); else mean recovery."""
    acc = [heads[t]["value"] for t in common if t in heads and heads[t]["metric"] == "acc"]
    if acc:
        return sum(acc) / len(acc), f"mean accuracy over {len(acc)} task(s)"
    rec = [h["recovery"] for h in heads.values() if h.get("recovery") is not None]
    if rec:
        return sum(rec) / len(rec), "mean recovery"
    return None, ""


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points not dominated (smaller size and higher quality is better), sorted by size."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def compare_reports(dirs: list[str | os.PathLike], out_dir: str | os.PathLike, names: list[str] | None = None) -> Path:
    """One Markdown table over several reports + ``pareto.png`` (quality vs size). Returns ``out_dir``."""
    if not dirs:
        raise UserError("no report to compare: pass one or more report directories")
    reports = [_read_report(Path(d)) for d in dirs]
    labels = names or [r.get("title") or Path(d).name for r, d in zip(reports, dirs)]
    tasks: list[str] = []
    heads_by_report = []
    for r in reports:
        heads = _headline(r.get("summary") or compare_rows(r["results"], r.get("baseline")))
        heads_by_report.append(heads)
        tasks += [t for t in heads if t not in tasks]
    common = [t for t in tasks if all(t in h for h in heads_by_report)]
    entries = []
    size_key, size_label = _size_key([r.get("facts") or {} for r in reports])
    for label, r, heads in zip(labels, reports, heads_by_report):
        facts = r.get("facts") or {}
        size = float(facts[size_key]) if size_key else None
        quality, q_label = _quality(heads, common)
        entries.append({"name": label, "size": size, "size_label": size_label, "quality": quality, "quality_label": q_label,
                        "facts": facts, "heads": heads})
    lines = ["# Comparison", ""]
    header = ["report", "parameters", "routed expert params", "size", "quality"] + tasks
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for e in entries:
        cells = [
            e["name"],
            _fmt(e["facts"].get("parameters_total")),
            _fmt(e["facts"].get("parameters_routed_experts")),
            f"{_fmt(e['size'])} ({e['size_label']})" if e["size"] is not None else "–",
            f"{_fmt(e['quality'], 3)} ({e['quality_label']})" if e["quality"] is not None else "–",
        ]
        for t in tasks:
            h = e["heads"].get(t)
            if h is None:
                cells.append("–")
            else:
                cell = f"{_fmt(h['value'])}"
                if h.get("recovery") is not None:
                    cell += f" ({_fmt(h['recovery'], 3)})"
                cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Task cells: headline metric (acc, or word perplexity), recovery in brackets when a baseline was given.", ""]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "comparison.md", "\n".join(lines))
    _atomic_write(
        out / "comparison.json",
        json.dumps([{k: v for k, v in e.items() if k != "heads"} | {"headline": e["heads"]} for e in entries],
                   indent=2, default=_json_default) + "\n",
    )
    pts = [(e["size"], e["quality"]) for e in entries if e["size"] is not None and e["quality"] is not None]
    if pts:
        plotted = [e for e in entries if e["size"] is not None and e["quality"] is not None]
        front = pareto_front(pts)
        plt = _plt()
        fig, ax = plt.subplots(figsize=(5.5, 4))
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="#3b6ea8")
        for e, p in zip(plotted, pts):
            ax.annotate(e["name"], p, fontsize=7, xytext=(3, 3), textcoords="offset points")
        fp = [pts[i] for i in front]
        ax.plot([p[0] for p in fp], [p[1] for p in fp], color="#b33", lw=1, label="Pareto front")
        ax.set_xlabel(plotted[0]["size_label"])
        ax.set_ylabel(plotted[0]["quality_label"])
        ax.set_title("Quality vs size")
        ax.legend(fontsize=8)
        _atomic_savefig(fig, out / "pareto.png")
        plt.close(fig)
    return out
