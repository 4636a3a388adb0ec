"""The calibration pipeline the runner, the CLI and methods share: data → (cache | one pass) → statistics.

* `run_pass(holder, tokenizer, spec, p, plan)` — run one `methods.base.Pass` a method asked for over a
  `compress.onload` holder: fill every collector it can from the statistics cache ("statistics cache hit: …"),
  run **one** pass for the others ("calibration pass: …") with the engine the pass kind and the holder call for
  (whole-model forward / forward+backward in memory; layer by layer when the model is onloaded layer by layer or
  the pass has layer hooks), store them, and report never/rarely-routed experts. Returns the statistics keyed as
  the method reads them and the pass facts the manifest records.
* `collect(model, tokenizer, spec, collectors)` — the same for a model in memory and a bare collector list
  (`calibrate`, `analyze`, tests).
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Callable

import torch
from torch import nn

from moecompress.calibration.cache import StatsCache, model_fingerprint
from moecompress.calibration.collectors import Collector
from moecompress.calibration.data import DataSpec, build_calibration
from moecompress.calibration.engine import log_routing_report, run_full, run_sequential
from moecompress.compress.moe import decoder_layers, moe_layers
from moecompress.errors import UserError

log = logging.getLogger("moecompress")


def collect(model: nn.Module, tokenizer, spec: DataSpec, collectors: list[Collector], batch_size: int | None = None,
            cache: bool | None = None, engine: str = "full") -> tuple[dict[str, Collector], dict[str, Any]]:
    """Fill `collectors` (cache or one pass) over the data `spec` describes; (stats by name, pass facts)."""
    from moecompress.compress.onload import ModelHolder
    from moecompress.methods.base import Pass
    from moecompress.runtime import Runtime

    holder = ModelHolder(model, None, Runtime(torch.device("cpu"), torch.float32))
    kind = "sequential" if engine == "sequential" else (
        "backward" if any(c.needs_grad for c in collectors) else "forward")
    return run_pass(holder, tokenizer, spec, Pass(kind, collectors), batch_size=batch_size, cache=cache)


def holder_fingerprint(holder) -> str:
    """The model's fingerprint for the cache: its weights' digest in memory; for a layer-by-layer holder (weights
    on disk) the config, every tensor's name/shape/dtype and the shard files' sizes and modification times."""
    if not holder.layered:
        return model_fingerprint(holder.model)
    reader = holder.reader
    h = hashlib.sha256(model_fingerprint(holder.model).encode())
    for file in sorted({str(f) for f in reader.files.values()}):
        st = os.stat(file)
        h.update(f"{file}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def run_pass(holder, tokenizer, spec, p, plan: Any = None, after: Callable | None = None,
             batch_size: int | None = None, cache: bool | None = None) -> tuple[dict[str, Collector], dict]:
    """Run pass `p` (see the module docstring); `after(i, layer)` runs while each layer is still real at the end of
    a layer-by-layer pass (the runner writes layers there). Statistics are keyed `p.key(name)`."""
    from moecompress.methods.base import LayerStep

    model = holder.model
    batch_size = batch_size or getattr(spec, "batch_size", 8)
    use_cache = getattr(spec, "cache", True) if cache is None else cache
    if p.changes_model or after is not None:
        use_cache = False  # statistics of a changing model, or a pass that must visit every layer
    data = spec if p.source is None else spec.model_copy(update={"source": p.source})
    if holder.layered and str(data.source).startswith("demos:"):
        raise UserError("demos: calibration generates answers with the whole model; it needs the model in memory "
                        "(--onload memory)")
    calib = build_calibration(tokenizer, data, model=model)
    base = {"source": data.source, "fingerprint": calib.fingerprint, "samples": data.samples,
            "seq_len": data.seq_len, "seed": data.seed, "sequences": len(calib.input_ids),
            "tokens": calib.num_tokens}
    collectors = p.collectors
    store = StatsCache() if use_cache else None
    model_fp = holder_fingerprint(holder) if store else None
    missing, hit_facts = [], {}
    for c in collectors:
        cached = store.load(model_fp, calib.fingerprint, c) if store else None
        if cached is None:
            missing.append(c)
        else:
            hit_facts = hit_facts or cached
    hits = [c.name for c in collectors if c not in missing]
    if hits:
        log.info("statistics cache hit: %s (model %s…, data %s…)", ", ".join(hits), model_fp[:10],
                 calib.fingerprint[:10])
    stats = {c.name: c for c in collectors}
    views = {m.layer_idx: m for m in moe_layers(model)} if (p.on_layer or p.before_layer) else {}

    def step(i, layer, moe=None):
        return LayerStep(i, layer, views.get(i) if moe is None else moe, stats, plan, model)

    callback = None if p.on_layer is None else (lambda i, layer, moe, _: p.on_layer(step(i, layer, moe)))
    before = None if p.before_layer is None else (lambda i, layer: p.before_layer(step(i, layer)))
    if missing or after is not None or (p.kind == "sequential" and not hits):
        facts = _engine_pass(holder, p, calib, missing, batch_size, callback, before, after)
        if store:
            for c in missing:
                store.store(model_fp, calib.fingerprint, c, {**base, **facts})
    else:
        facts = {k: v for k, v in hit_facts.items() if k not in base}
        facts["engine"] = "cache"
        log_routing_report(facts)
    if not missing and (callback or before) and after is None and facts.get("engine") == "cache":
        _visit_layers(holder, before, callback, views)  # cached statistics; the hooks still need each layer's weights
    facts = {**base, **facts, "pass": p.kind, "label": p.label or None, "cache_hits": hits,
             "computed": [c.name for c in missing], "onload": "layers" if holder.layered else "memory"}
    return {p.key(c.name): c for c in collectors}, facts


def _engine_pass(holder, p, calib, collectors, batch_size, callback, before, after) -> dict[str, Any]:
    model = holder.model
    layer_wise = holder.layered or p.kind == "sequential" or callback is not None or before is not None
    if p.kind == "backward":
        if holder.layered:
            raise UserError("this method needs gradients through the whole model (a forward + backward pass), which "
                            "layer-by-layer onloading cannot give; hold the model in memory (--onload memory), "
                            "spread over devices and disk with --device-map auto --max-memory …")
        return run_full(model, calib, collectors, batch_size=batch_size, backward=True, checkpoint=p.checkpoint)
    if not layer_wise:
        return run_full(model, calib, collectors, batch_size=batch_size)
    return run_sequential(model, calib, collectors, batch_size=batch_size, callback=callback, before=before,
                          after=after, layer_access=holder.layer, recompute=p.changes_model,
                          description=p.label or "calibrating (layer-wise)")


def _visit_layers(holder, before, callback, views) -> None:
    for i in range(len(decoder_layers(holder.model))):
        with holder.layer(i) as layer:
            if before is not None:
                before(i, layer)
            if callback is not None:
                callback(i, layer, views.get(i), None)
