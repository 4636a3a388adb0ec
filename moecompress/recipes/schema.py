"""The recipe: a validated script of model → calibration → stages → output (→ eval).

YAML is read with `yaml.safe_load`; every model forbids unknown keys. Errors name the key path and the allowed
keys or values, in one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moecompress.calibration.data import DataSpec
from moecompress.errors import UserError
from moecompress.runtime import ModelSpec


class CalibrationSpec(DataSpec):
    batch_size: int = Field(8, ge=1)
    cache: bool = Field(True, description="reuse statistics cached for the same model, data and collectors")


class Stage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    ratio: float | None = Field(None, gt=0, lt=1)
    keep: int | None = Field(None, ge=1)
    scope: Literal["layer", "global"] | None = None  # None: the method's default_scope
    bits: int | None = Field(None, ge=1, le=8)
    avg_bits: float | None = Field(None, gt=0, le=8)
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _target(self) -> "Stage":
        from moecompress.methods.base import get_method

        method = get_method(self.method)
        if method.kind.endswith("pruning") and (self.ratio is None) == (self.keep is None):
            raise ValueError(f"method '{self.method}' needs exactly one of ratio or keep")
        if method.kind == "channel-pruning" and self.keep is not None:
            raise ValueError(f"method '{self.method}' removes channels: give ratio (the fraction of routed-expert "
                             f"channels removed), not keep")
        quantizes = method.kind == "quantization"
        if not quantizes and (self.bits is not None or self.avg_bits is not None):
            raise ValueError(f"method '{self.method}' is a {method.kind} method: drop bits/avg_bits (they set a "
                             f"quantization stage's widths; add one, e.g. method: rtn)")
        if quantizes and (self.ratio is not None or self.keep is not None or self.scope is not None):
            raise ValueError(f"method '{self.method}' quantizes: drop ratio/keep/scope (they set a pruning stage's "
                             f"target; add one, e.g. method: frequency)")
        return self


class OutputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str | None = None
    overwrite: bool = False
    max_shard_size: str | int = Field("5GB", description="largest safetensors shard, e.g. 5GB, 500MB")
    format: Literal["native", "compressed-tensors", "gguf", "hf"] = Field(
        "native", description="native: moecompress's own (stock HF when the result allows); compressed-tensors "
        "(vLLM, SGLang), gguf (llama.cpp), hf (dequantized stock): `moecompress export` applied to it")
    target: Literal["vllm", "sglang", "llamacpp"] | None = Field(
        None, description="serve the result here: quantization stages take a scheme it serves, the output its "
        "format")

    @field_validator("max_shard_size")
    @classmethod
    def _shard_size(cls, v):
        from moecompress.runtime import parse_size

        try:
            parse_size(v, "max_shard_size")
        except UserError as e:
            raise ValueError(str(e)) from None
        return v


class EvalSpec(BaseModel):
    """Evaluate the written checkpoint after the stages (what `moecompress eval OUT --baseline MODEL` does)."""

    model_config = ConfigDict(extra="forbid")

    tasks: str | list[str] = Field("reference", description="reference (the offline suite), reference task names "
                                   "or lm-eval task names, comma-separated or a list")
    limit: int | None = Field(None, ge=1, description="documents per task (default: all)")
    baseline: bool = Field(True, description="also evaluate the recipe's model the same way (recovery columns)")
    output: str | None = Field(None, description="report directory (report.json, report.md, plots); default: "
                               "beside the checkpoint, named after it with '.report' appended (output.path out/m "
                               "→ out/m.report); replaced only with output.overwrite. With an output format "
                               "other than native, the native checkpoint the export was made from is evaluated")

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        names = [t.strip() for t in (v.split(",") if isinstance(v, str) else v)]
        if not any(names):
            raise ValueError("give task names, e.g. tasks: reference (or reference_facts, hellaswag, ...)")
        return v


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: ModelSpec

    @field_validator("model", mode="before")
    @classmethod
    def _model(cls, v):
        return {"id": v} if isinstance(v, str) else v
    calibration: CalibrationSpec = Field(default_factory=CalibrationSpec)
    stages: list[Stage] = Field(min_length=1)
    output: OutputSpec = Field(default_factory=OutputSpec)
    eval: EvalSpec | None = None


def _format(error: ValidationError, prefix: str = "", model: type[BaseModel] | None = None) -> str:
    """The first validation error as one line: key path, what is wrong, what is allowed."""
    errors = error.errors()
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])  # a typo explains the rest
    loc = [prefix] if prefix else []
    loc += [str(p) for p in first["loc"]]
    where = ".".join(loc) or "recipe"
    if first["type"] == "extra_forbidden":
        allowed = _allowed_keys(model or Recipe, [p for p in first["loc"][:-1]])
        return f"unknown key '{first['loc'][-1]}' at {'.'.join(loc[:-1]) or 'top level'}; allowed: {allowed}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{where}: {message}"


def _allowed_keys(model: type[BaseModel], path: list) -> str:
    for part in path:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        inner = getattr(annotation, "__args__", (annotation,))
        nested = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if not nested:
            break
        model = nested[0]
    return ", ".join(model.model_fields)


def parse_recipe(data: dict[str, Any]) -> Recipe:
    """Validate a recipe, including each stage's method options against that method's Config."""
    from moecompress.methods.base import get_method

    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise UserError(f"recipe: {_format(e)}") from None
    for i, stage in enumerate(recipe.stages):
        config = get_method(stage.method).Config
        try:
            config(**stage.options)
        except ValidationError as e:
            raise UserError(f"recipe: {_format(e, f'stages.{i}.options', config)}") from None
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        builtin = Path(__file__).parent / "builtin" / f"{path.name.removesuffix('.yaml')}.yaml"
        if not builtin.is_file():
            raise UserError(f"recipe {path} does not exist (built-in recipes: {', '.join(builtin_recipes())})")
        path = builtin
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"recipe {path} is not UTF-8 text (byte {e.start}); write it as a UTF-8 YAML file") from None
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping with keys: {', '.join(Recipe.model_fields)}")
    return parse_recipe(data)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in (Path(__file__).parent / "builtin").glob("*.yaml"))
