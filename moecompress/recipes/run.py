"""Execute a Recipe — the single entrypoint shared by the CLI (`prune`, `quantize`, `run`) and the Python API.

Order of work: validate everything cheap first (stage options and targets before the model is even resolved, then
config family and output directory), then load the model, gather the statistics each stage needs (one pass serving
all its collectors), plan, apply, and write once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moecompress.calibration.collectors import Collector
from moecompress.compress.checkpoint import check_output_dir, fingerprint_config, load, load_config, save
from moecompress.compress.moe import moe_layers
from moecompress.errors import UserError
from moecompress.methods.base import Method, Plan, PlanContext, Target, describe_plan, get_method
from moecompress.recipes.schema import CalibrationSpec, Recipe

log = logging.getLogger("moecompress")


@dataclass
class RunResult:
    model: nn.Module
    plans: list[Plan]
    output: Path | None = None
    calibration: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def resolve_model(model_id: str) -> str:
    """`reference:NAME` → the bundled reference model's directory (built on first use); anything else as given."""
    if model_id.startswith("reference:"):
        from moecompress.reference import build_reference

        return str(build_reference(model_id.partition(":")[2]))
    return model_id


def load_tokenizer(model_id: str, required: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise UserError(f"no tokenizer could be loaded from '{model_id}' ({str(e).splitlines()[0][:120]}); "
                            f"calibration needs one: save it next to the model") from None
        return None


def gather_statistics(model: nn.Module, tokenizer, spec: CalibrationSpec,
                      collectors: list[Collector]) -> tuple[dict[str, Collector], dict[str, Any]]:
    """Fill `collectors` from the statistics cache, or with one calibration pass over the data `spec` describes
    (one pass for all the missing ones; `spec.cache=False` (--no-cache) always recomputes). The facts carry the
    routed tokens per expert and the never/rarely-routed experts (also logged)."""
    from moecompress.calibration.pipeline import collect

    return collect(model, tokenizer, spec, collectors, batch_size=spec.batch_size, cache=spec.cache)


def stage_methods(recipe: Recipe) -> list[Method]:
    """Each stage's method with its options, its target checked (`check_target`: the bits / avg-bits a quantization
    method accepts): bad settings fail here with one line, before a model is resolved, built, loaded or written."""
    methods = []
    for stage in recipe.stages:
        cls = get_method(stage.method)
        method = cls(cls.Config(**stage.options))
        method.check_target(stage.bits, stage.avg_bits)
        methods.append(method)
    return methods


def run(recipe: Recipe, dry_run: bool = False) -> RunResult:
    methods = stage_methods(recipe)
    recipe = recipe.model_copy(update={"model": resolve_model(recipe.model)})
    config = load_config(recipe.model)
    model_dir = Path(recipe.model).expanduser()
    out = None
    if not dry_run:
        if not recipe.output.path:
            raise UserError("no output directory; pass -o OUT (or set output.path in the recipe)")
        out = check_output_dir(Path(recipe.output.path), [model_dir] if model_dir.exists() else [],
                               recipe.output.overwrite)
    needs_data = any(m.collectors() or m.needs_tokenizer for m in methods)
    model = load(recipe.model)
    tokenizer = load_tokenizer(recipe.model, required=needs_data)
    result = RunResult(model=model, plans=[])
    for stage, method in zip(recipe.stages, methods):
        collectors = method.collectors()
        stats: dict[str, Collector] = {}
        if collectors:
            stats, facts = gather_statistics(model, tokenizer, recipe.calibration, collectors)
            result.calibration.append(facts)
        target = Target(ratio=stage.ratio, keep=stage.keep, scope=stage.scope or method.default_scope,
                        bits=stage.bits, avg_bits=stage.avg_bits)
        method.context = PlanContext(tokenizer=tokenizer, calibration=recipe.calibration, model_id=recipe.model)
        plan = method.plan(model, stats, target)
        result.plans.append(plan)
        result.lines += [f"stage {stage.method}:"] + ["  " + line for line in describe_plan(plan)]
        method.apply(model, plan, stats)  # = apply_plan unless the method needs its own pass (sequential GPTQ)
    if dry_run or int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch` only rank 0 writes
        return result
    manifest = {
        "base_model": str(recipe.model),
        "base_config_sha256": fingerprint_config(config),
        "method": "+".join(s.method for s in recipe.stages),
        "method_config": [m.config.model_dump() for m in methods],
        "recipe": recipe.model_dump(mode="json"),
        "plans": [p.model_dump(mode="json") for p in result.plans],
        "calibration": result.calibration,
        "routing_semantics": _routing_semantics(model),
    }
    result.output = save(model, out, manifest=manifest, source=model_dir if model_dir.exists() else None,
                         tokenizer=tokenizer, overwrite=recipe.output.overwrite)
    return result


def _routing_semantics(model: nn.Module) -> dict[str, Any]:
    layer = moe_layers(model)[0]
    return {"renormalize_after_prune": layer.norm_topk_prob, "masking": "sliced",
            "n_group": getattr(model.config, "n_group", None), "topk_group": getattr(model.config, "topk_group", None)}

