"""What each serving target can serve, and how a recipe is made to fit it (`--target vllm|sglang|llamacpp`).

| target   | output format       | routed-expert schemes it serves                                              |
|----------|---------------------|------------------------------------------------------------------------------|
| vllm     | compressed-tensors  | symmetric int 4 or 8 bits, group 32/64/128 or per channel, one per layer     |
| sglang   | compressed-tensors  | as vLLM (SGLang serves compressed-tensors MoE through the same WNA16 kernels) |
| llamacpp | gguf                | symmetric int 4 / 5 / 8 bits in groups of 32 (Q4_0 / Q5_0 / Q8_0), per layer |

Every target: stock routers (sliced, no masked / mapped / ODP), one expert count, width and top-k per layer.
Quantization stages get the target's scheme as defaults (`sym`, `group_size`, `scale_dtype: auto` = the model's
dtype, `act_order: false`); an explicit option or width the target cannot serve is refused in one line before
the model is loaded. Mixed-precision methods (PMQ: per-expert widths) and bitsandbytes are refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from moecompress.errors import UserError


@dataclass(frozen=True)
class Target:
    name: str
    server: str
    format: str
    bits: tuple[int, ...]
    group_sizes: tuple[int, ...]
    default_group_size: int
    methods: tuple[str, ...] = ("rtn", "gptq")


TARGETS = {
    "vllm": Target("vllm", "vLLM", "compressed-tensors", (4, 8), (-1, 32, 64, 128), 128),
    "sglang": Target("sglang", "SGLang", "compressed-tensors", (4, 8), (-1, 32, 64, 128), 128),
    "llamacpp": Target("llamacpp", "llama.cpp", "gguf", (4, 5, 8), (32,), 32),
}


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UserError(f"unknown target {name!r}: use one of {', '.join(TARGETS)}")
    return TARGETS[name]


def output_format(target: str | None, fmt: str) -> str:
    """The output format a recipe asks for, given its target (a target implies its format)."""
    if target is None:
        return fmt
    wanted = get_target(target).format
    if fmt not in ("native", wanted):
        raise UserError(f"--target {target} serves {wanted} checkpoints, not --format {fmt}: drop one of them")
    return wanted


def fit_stage(target_name: str, method: str, kind: str, bits: int | None, avg_bits: float | None,
              options: dict) -> dict:
    """A stage's options with the target's scheme as defaults; refuses (one line) what the target cannot serve."""
    target = get_target(target_name)
    if kind != "quantization":
        return options
    if method not in target.methods:
        why = ("gives experts different widths; " if avg_bits is not None or method == "pmq" else "")
        raise UserError(f"{target.server} cannot serve -m {method} checkpoints ({why}its fused MoE kernels take one "
                        f"int scheme per layer): use -m gptq or -m rtn with --bits "
                        f"{'/'.join(map(str, target.bits))}")
    if bits is not None and bits not in target.bits:
        raise UserError(f"{target.server} serves {'/'.join(map(str, target.bits))}-bit experts, not {bits}-bit: "
                        f"use --bits {target.bits[0]}")
    attn_bits = options.get("attn_bits")
    if attn_bits is not None and attn_bits not in target.bits:
        raise UserError(f"{target.server} serves {'/'.join(map(str, target.bits))}-bit linears, not "
                        f"--attn-bits {attn_bits}")
    fitted = {"sym": True, "group_size": target.default_group_size, "scale_dtype": "auto", **options}
    if method == "gptq":
        fitted.setdefault("act_order", False)
    if fitted["sym"] is not True:
        raise UserError(f"{target.server}: the target's scheme is symmetric; drop --set sym=false")
    if fitted["group_size"] not in target.group_sizes:
        raise UserError(f"{target.server} serves group sizes {', '.join(map(str, target.group_sizes))} "
                        f"(-1: per channel), not {fitted['group_size']}: use --group-size "
                        f"{target.default_group_size}")
    if fitted.get("act_order"):
        raise UserError(f"{target.server}: act-order GPTQ (g_idx) is not exported for this target; drop "
                        f"--set act_order=true")
    return fitted
