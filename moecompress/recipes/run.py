"""Execute a Recipe — the single entrypoint shared by the CLI (`prune`, `quantize`, `run`) and the Python API.

Order of work: validate everything cheap first (stage options and targets before the model is even resolved, then
config family, runtime (dtype, device) and output directory), then hold the model (`compress.onload`: whole in
memory, or a skeleton read layer by layer), and per stage: run the passes the method asks for (the runner owns
every pass: cache, engine, manifest record), plan, run the passes that need the plan, apply, and write.

With layer-by-layer onloading nothing is ever whole in memory: each layer is applied and written (shard by shard)
as the last pass over the model reaches it; a multi-stage recipe chains stages through intermediate checkpoints
beside the output, removed at the end.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from moecompress.calibration.collectors import Collector
from moecompress.compress.checkpoint import (
    CheckpointWriter,
    check_output_dir,
    describe,
    describe_routers,
    empty_model,
    fingerprint_config,
    is_stock,
    load_config,
    rebuild,
    save,
)
from moecompress.compress.moe import decoder_layers
from moecompress.compress.onload import ModelHolder, hold, layered
from moecompress.errors import UserError
from moecompress.methods.base import Method, Plan, PlanContext, Target, apply_plan, describe_plan, get_method
from moecompress.paths import atomic_directory
from moecompress.recipes.schema import CalibrationSpec, Recipe, Stage
from moecompress.runtime import Runtime, parse_size

log = logging.getLogger("moecompress")


@dataclass
class RunResult:
    model: nn.Module
    plans: list[Plan]
    output: Path | None = None
    calibration: list[dict[str, Any]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)
    holder: ModelHolder | None = None


def resolve_model(model_id: str) -> str:
    """`reference:NAME` → the bundled reference model's directory (built on first use); anything else as given."""
    if model_id.startswith("reference:"):
        from moecompress.reference import build_reference

        return str(build_reference(model_id.partition(":")[2]))
    return model_id


def load_tokenizer(model_id: str, required: bool):
    from transformers import AutoTokenizer

    from moecompress.calibration.commands import check_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_id)
    except (OSError, ValueError, TypeError) as e:
        if required:
            raise UserError(f"no tokenizer could be loaded from '{model_id}' ({str(e).splitlines()[0][:120]}); "
                            f"calibration needs one: save it next to the model") from None
        return None
    try:  # transformers 5 builds an empty tokenizer from a directory without tokenizer files
        return check_tokenizer(tokenizer, model_id)
    except UserError:
        if required:
            raise
        return None


def gather_statistics(model: nn.Module, tokenizer, spec: CalibrationSpec,
                      collectors: list[Collector]) -> tuple[dict[str, Collector], dict[str, Any]]:
    """Fill `collectors` from the statistics cache, or with one calibration pass over the data `spec` describes
    (one pass for all the missing ones; `spec.cache=False` (--no-cache) always recomputes)."""
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


def stage_target(stage: Stage, method: Method) -> Target:
    return Target(ratio=stage.ratio, keep=stage.keep, scope=stage.scope or method.default_scope,
                  bits=stage.bits, avg_bits=stage.avg_bits)


def check_layered(methods: list[Method], recipe: Recipe, runtime: Runtime) -> None:
    """Refuse, in one line, what layer-by-layer onloading cannot do (before anything is read or written)."""
    if runtime.world_size > 1:
        raise UserError("layer-by-layer onloading runs in one process; use --onload memory under accelerate launch")
    for stage, method in zip(recipe.stages, methods):
        why = method.layered_refusal(stage_target(stage, method))
        if why:
            raise UserError(f"{method.name} cannot run with the model onloaded layer by layer: {why}; use "
                            f"--onload memory (with --device-map auto --max-memory … --offload-folder DIR to "
                            f"spread it over GPU, CPU and disk)")


def fit_to_target(recipe: Recipe) -> Recipe:
    """The recipe with its quantization stages given the output target's scheme (export/targets.py)."""
    from moecompress.export.targets import fit_stage, output_format

    target = recipe.output.target
    fmt = output_format(target, recipe.output.format)
    if target is None:
        return recipe
    stages = [stage.model_copy(update={"options": fit_stage(target, stage.method, get_method(stage.method).kind,
                                                             stage.bits, stage.avg_bits, stage.options)})
              for stage in recipe.stages]
    return recipe.model_copy(update={"stages": stages, "output": recipe.output.model_copy(update={"format": fmt})})


def eval_report_dir(recipe: Recipe) -> Path | None:
    """Where the recipe's `eval:` report goes (None without an eval block or an output path): `eval.output`, else
    beside the checkpoint, named after it with `.report` appended (out/m → out/m.report)."""
    if recipe.eval is None or not recipe.output.path:
        return None
    if recipe.eval.output:
        return Path(recipe.eval.output).expanduser()
    out = Path(recipe.output.path).expanduser().resolve()
    return out.parent / f"{out.name}.report"


def check_eval(recipe: Recipe) -> Path | None:
    """The `eval:` block checked before any model is loaded: its tasks exist, and its report directory is neither
    the output nor inside (or above) it or the input model, and is empty or may be overwritten."""
    report = eval_report_dir(recipe)
    if report is None:
        return None
    from moecompress.evals.lmeval import check_tasks

    out = Path(recipe.output.path).expanduser().resolve()
    resolved = report.resolve()
    if resolved == out or out in resolved.parents or resolved in out.parents:
        raise UserError(f"eval.output {report} overlaps the checkpoint's output {out}; choose a directory beside it")
    source = Path(resolve_model(recipe.model.id)).expanduser()
    report = check_output_dir(report, [source] if source.exists() else [], recipe.output.overwrite)
    check_tasks(recipe.eval.tasks)
    return report


def evaluate_output(recipe: Recipe, checkpoint: Path, report: Path, result: RunResult, label: Path) -> None:
    """Run the recipe's `eval:` block on the written checkpoint (the `moecompress eval` pipeline) and add the
    report's path to the result's lines."""
    from moecompress.evals.pipeline import eval_to_report

    spec = recipe.eval
    baseline = resolve_model(recipe.model.id) if spec.baseline else None
    eval_to_report(str(checkpoint), report, tasks=spec.tasks, limit=spec.limit, baseline=baseline,
                   overwrite=recipe.output.overwrite, label=str(label))
    result.lines.append(f"eval report: {report}")


def run(recipe: Recipe, dry_run: bool = False) -> RunResult:
    """Run the recipe; with an output format other than native, the compressed checkpoint is exported to it (from
    an intermediate native checkpoint beside the output, removed afterwards). With an `eval:` block the written
    checkpoint is then evaluated (`eval_report_dir`; the native one when exporting); a dry run evaluates nothing."""
    recipe = fit_to_target(recipe)
    report = None if dry_run else check_eval(recipe)
    if recipe.output.format == "native" or dry_run or not recipe.output.path:
        result = _run(recipe, dry_run)
        if report is not None and result.output is not None:
            evaluate_output(recipe, result.output, report, result, result.output)
        return result
    from moecompress.export import export

    final = Path(recipe.output.path)
    source = Path(resolve_model(recipe.model.id)).expanduser()
    check_output_dir(final, [source] if source.exists() else [], recipe.output.overwrite)
    native = final.parent / f".{final.name}.native"
    shutil.rmtree(native, ignore_errors=True)
    inner = recipe.model_copy(update={"output": recipe.output.model_copy(
        update={"path": str(native), "overwrite": True, "format": "native"})})
    try:
        result = _run(inner, dry_run)
        if result.output is not None:
            try:
                summary = export(native, recipe.output.format, final, overwrite=recipe.output.overwrite,
                                 max_shard_size=parse_size(recipe.output.max_shard_size, "max_shard_size"))
            except UserError as e:  # name the user's model, not the intermediate checkpoint
                raise UserError(str(e).replace(str(native), recipe.model.id)) from None
            result.lines.append(f"exported {recipe.output.format}: " + ", ".join(
                f"{k} {v}" for k, v in summary.items() if k not in ("format", "source", "output")))
            result.output = final
            if report is not None:
                evaluate_output(recipe, native, report, result, final)
    finally:
        shutil.rmtree(native, ignore_errors=True)
    return result


def _run(recipe: Recipe, dry_run: bool = False) -> RunResult:
    methods = stage_methods(recipe)
    spec = recipe.model
    path = resolve_model(spec.id)
    config = load_config(path)
    runtime = Runtime.create(spec, config)
    shard_size = parse_size(recipe.output.max_shard_size, "max_shard_size")
    model_dir = Path(path).expanduser()
    source = model_dir if model_dir.exists() else None
    out = None
    if not dry_run:
        if not recipe.output.path:
            raise UserError("no output directory; pass -o OUT (or set output.path in the recipe)")
        out = check_output_dir(Path(recipe.output.path), [source] if source else [], recipe.output.overwrite)
    needs_data = any(m.passes(stage_target(s, m)) or m.needs_tokenizer for s, m in zip(recipe.stages, methods))
    tokenizer = load_tokenizer(path, required=needs_data)
    holder = hold(spec, path, config, runtime)
    if holder.layered:
        check_layered(methods, recipe, runtime)
    result = RunResult(model=holder.model, plans=[], holder=holder)
    context = PlanContext(tokenizer=tokenizer, calibration=recipe.calibration, model_id=path,
                          world_size=runtime.world_size)
    manifest = {"base_model": str(path), "base_config_sha256": fingerprint_config(config),
                "method": "+".join(s.method for s in recipe.stages),
                "method_config": [m.config.model_dump() for m in methods],
                "recipe": recipe.model_dump(mode="json"), "runtime": holder.facts()}

    def finish_manifest() -> dict[str, Any]:
        return {**manifest, "plans": [p.model_dump(mode="json") for p in result.plans],
                "calibration": result.calibration, "routing_semantics": _routing_semantics(holder.model)}

    if not holder.layered or dry_run:
        for stage, method in zip(recipe.stages, methods):
            _run_stage(holder, stage.method, stage_target(stage, method), method, context, result,
                       plan_only=dry_run and holder.layered)
        if not dry_run and runtime.is_main:  # under `accelerate launch` only the main process writes
            result.output = save(holder.model, out, manifest=finish_manifest(), source=source,
                                 tokenizer=tokenizer, overwrite=recipe.output.overwrite, max_shard_size=shard_size)
        return result

    intermediates: list[Path] = []
    try:
        for k, (stage, method) in enumerate(zip(recipe.stages, methods)):
            last = k == len(methods) - 1
            target = out if last else out.parent / f".{out.name}.stage-{k}"

            def write(tmp: Path, stage=stage, method=method, last=last) -> None:
                writer = _run_stage(holder, stage.method, stage_target(stage, method), method, context, result,
                                    directory=tmp, shard_size=shard_size)
                extra = finish_manifest() if last else {**manifest, "intermediate_stage": stage.method}
                writer.finish(extra, source=source, tokenizer=tokenizer)

            atomic_directory(target, write)
            if not last:
                intermediates.append(target)
                holder = layered(target, runtime)
                result.holder, result.model = holder, holder.model
    finally:
        for d in intermediates:
            shutil.rmtree(d, ignore_errors=True)
    result.output = out
    return result


def run_method(model: nn.Module, tokenizer, method: Method, target: Target, calibration: CalibrationSpec,
               plan_only: bool = False) -> tuple[Plan, RunResult]:
    """One method on a model in memory, through the runner (its passes, plan, later passes, apply): what a
    recipe stage does, for code that holds a model already (tests, benchmarks). `plan_only` stops after plan."""
    import torch

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    holder = ModelHolder(model, None, Runtime(device, next(model.parameters()).dtype))
    result = RunResult(model=model, plans=[], holder=holder)
    context = PlanContext(tokenizer=tokenizer, calibration=calibration)
    _run_stage(holder, method.name, target, method, context, result, plan_only=plan_only)
    return result.plans[-1], result


def _run_stage(holder: ModelHolder, name: str, target: Target, method: Method, context: PlanContext,
               result: RunResult, directory: Path | None = None, shard_size: int | None = None,
               plan_only: bool = False):
    """Passes → plan → passes after the plan → apply (→ write, when `directory` is given: layered mode)."""
    from moecompress.calibration.pipeline import run_pass

    model = holder.model
    method.context = context
    passes = method.passes(target)
    stats: dict[str, Collector] = {}

    def record(p, facts) -> None:
        result.calibration.append({"stage": name, **facts})

    for p in (p for p in passes if not p.after_plan):
        got, facts = run_pass(holder, context.tokenizer, context.calibration, p)
        stats.update(got)
        record(p, facts)
    plan = method.plan(model, stats, target)
    result.lines += [f"stage {name}:"] + ["  " + line for line in describe_plan(plan)]
    if plan_only:
        result.plans.append(plan)
        return None
    later = [p for p in passes if p.after_plan]
    writer = None
    if directory is not None:
        stock = predict_stock(holder, plan) and not any(p.changes_model for p in later)
        writer = CheckpointWriter(directory, model, stock, shard_size)
    write_in_pass = writer is not None and bool(later) and later[-1].changes_model

    def apply_and_write(i: int, layer) -> None:
        method.apply_layer(model, plan, stats, i)
        writer.write_layer(i)

    for j, p in enumerate(later):
        hook = apply_and_write if write_in_pass and j == len(later) - 1 else None
        got, facts = run_pass(holder, context.tokenizer, context.calibration, p, plan=plan, after=hook)
        stats.update(got)
        record(p, facts)
    if writer is None:
        method.apply(model, plan, stats)
    elif not write_in_pass:
        for i in range(len(decoder_layers(model))):
            with holder.layer(i):
                apply_and_write(i, None)
    result.plans.append(method.finish(model, plan))
    return writer


def predict_stock(holder: ModelHolder, plan: Plan) -> bool:
    """Whether applying `plan` gives a stock-format model, decided before any layer is written (layer-by-layer
    onloading writes stock and native outputs under different names): the plan is applied to a structure-only
    copy of the model on the meta device. Anything that cannot be predicted so is written native (always
    loadable by `moecompress.load`)."""
    import copy

    if plan.kind == "bits":
        return False
    shadow = empty_model(copy.deepcopy(holder.model.config), holder.runtime.dtype, include_buffers=True)
    try:
        rebuild(shadow, describe(holder.model))
        apply_plan(shadow, plan)
        return is_stock(shadow)
    except Exception as e:  # an operation that needs real values: write native
        log.debug("stock format not predictable (%s); writing native", e)
        return False


def _routing_semantics(model: nn.Module) -> dict[str, Any]:
    from moecompress.compress.moe import moe_layers

    layer = moe_layers(model)[0]
    return {"renormalize_after_prune": layer.norm_topk_prob, "masking": describe_routers(model),
            "n_group": getattr(model.config, "n_group", None), "topk_group": getattr(model.config, "topk_group", None)}


