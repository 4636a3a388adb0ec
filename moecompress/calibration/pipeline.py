"""The calibration pipeline the recipes, the CLI and methods share: data → (cache | one pass) → statistics.

`collect(model, tokenizer, spec, collectors)` builds the CalibrationSet, fills every collector it can from the
statistics cache ("statistics cache hit: …"), runs **one** pass for the others ("calibration pass: …"; the
backward engine when any of them needs gradients), stores them, and reports never/rarely-routed experts.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from moecompress.calibration.cache import StatsCache, model_fingerprint
from moecompress.calibration.collectors import Collector
from moecompress.calibration.data import DataSpec, build_calibration
from moecompress.calibration.engine import log_routing_report, run_full, run_sequential

log = logging.getLogger("moecompress")


def collect(model: nn.Module, tokenizer, spec: DataSpec, collectors: list[Collector], batch_size: int | None = None,
            cache: bool | None = None, engine: str = "full") -> tuple[dict[str, Collector], dict[str, Any]]:
    """Fill `collectors` (cache or one pass) over the data `spec` describes; (stats by name, pass facts)."""
    batch_size = batch_size or getattr(spec, "batch_size", 8)
    use_cache = getattr(spec, "cache", True) if cache is None else cache
    calib = build_calibration(tokenizer, spec, model=model)
    base = {"source": spec.source, "fingerprint": calib.fingerprint, "samples": spec.samples,
            "seq_len": spec.seq_len, "seed": spec.seed, "sequences": len(calib.input_ids),
            "tokens": calib.num_tokens}
    store = StatsCache() if use_cache else None
    model_fp = model_fingerprint(model) if store else None
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
    if missing:
        if engine == "sequential":
            facts = run_sequential(model, calib, missing, batch_size=batch_size)
        else:
            facts = run_full(model, calib, missing, batch_size=batch_size)
        if store:
            for c in missing:
                store.store(model_fp, calib.fingerprint, c, {**base, **facts})
    else:
        facts = {k: v for k, v in hit_facts.items() if k not in base}
        facts["engine"] = "cache"
        log_routing_report(facts)
    facts = {**base, **facts, "cache_hits": hits, "computed": [c.name for c in missing]}
    return {c.name: c for c in collectors}, facts
