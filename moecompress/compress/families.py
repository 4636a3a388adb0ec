"""Everything family-specific in one place: one `FamilySpec` per MoE architecture, keyed by `config.model_type`.

Adding a family = one spec here + one row in the tests' family table. The spec answers: which config keys hold the
expert count / top-k / widths, what the router is called and how it routes, how the fused expert tensors are laid
out, and what the shared expert looks like. `MoELayer` (moe.py) reads only this spec, never `model_type`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from moecompress.errors import UserError


@dataclass(frozen=True)
class FamilySpec:
    model_type: str
    name: str
    count_key: str  # config key holding the routed expert count
    width_key: str  # config key holding the routed expert intermediate size
    router_attr: str  # attribute of the MoE block holding the router ("gate" or "router")
    routing: str  # softmax_topk | deepseek_v2 | deepseek_v3 | sparsemixer | topk_softmax
    layout: str = "fused"  # fused: gate_up [E,2I,H], down [E,H,I]; gpt_oss: [E,H,2I] interleaved, [E,I,H], biases
    shared: str = "none"  # none | qwen2 (shared_expert + sigmoid shared_expert_gate) | deepseek (shared_experts)
    renormalize: str = "flag"  # always | flag (config.norm_topk_prob) | never
    block_returns_tuple: bool = False  # gpt_oss's block returns (hidden, router_scores)
    # How the hub checkpoint names one routed expert's linears: model.layers.{l}.{checkpoint_block}.experts.{e}.{part}
    # with parts (gate, up, down); None where the hub stores the experts fused (gpt_oss)
    checkpoint_block: str = "mlp"
    checkpoint_parts: tuple[str, str, str] | None = ("gate_proj", "up_proj", "down_proj")

    def norm_topk_prob(self, config) -> bool:
        if self.renormalize == "always":
            return True
        if self.renormalize == "never":
            return False
        return bool(getattr(config, "norm_topk_prob", False))


FAMILIES: dict[str, FamilySpec] = {
    spec.model_type: spec
    for spec in [
        FamilySpec("mixtral", "Mixtral", "num_local_experts", "intermediate_size", "gate", "softmax_topk",
                   renormalize="always", checkpoint_block="block_sparse_moe", checkpoint_parts=("w1", "w3", "w2")),
        FamilySpec("qwen2_moe", "Qwen2-MoE", "num_experts", "moe_intermediate_size", "gate", "softmax_topk",
                   shared="qwen2"),
        FamilySpec("qwen3_moe", "Qwen3-MoE", "num_experts", "moe_intermediate_size", "gate", "softmax_topk"),
        FamilySpec("olmoe", "OLMoE", "num_experts", "intermediate_size", "gate", "softmax_topk"),
        FamilySpec("deepseek_v2", "DeepSeek-V2", "n_routed_experts", "moe_intermediate_size", "gate", "deepseek_v2",
                   shared="deepseek", renormalize="never"),
        FamilySpec("deepseek_v3", "DeepSeek-V3", "n_routed_experts", "moe_intermediate_size", "gate", "deepseek_v3",
                   shared="deepseek"),
        FamilySpec("phimoe", "Phi-MoE", "num_local_experts", "intermediate_size", "router", "sparsemixer",
                   renormalize="never", checkpoint_block="block_sparse_moe", checkpoint_parts=("w1", "w3", "w2")),
        FamilySpec("gpt_oss", "GPT-OSS", "num_local_experts", "intermediate_size", "router", "topk_softmax",
                   layout="gpt_oss", renormalize="always", block_returns_tuple=True, checkpoint_parts=None),
    ]
}


def stock_experts_class(block) -> type:
    """The family's fused experts class, found in the modeling module that defines the MoE block."""
    module = sys.modules[type(block).__module__]
    classes = [v for k, v in vars(module).items() if k.endswith("Experts") and isinstance(v, type)]
    if len(classes) != 1:
        raise RuntimeError(f"cannot identify the fused experts class in {module.__name__}: {classes}")
    return classes[0]


def supported_names() -> str:
    return ", ".join(f"{s.name} ({s.model_type})" for s in FAMILIES.values())


def family_of(config) -> FamilySpec:
    """The spec for this config, or a UserError naming the supported families."""
    model_type = getattr(config, "model_type", None)
    spec = FAMILIES.get(model_type)
    if spec is None:
        raise UserError(
            f"model type '{model_type}' is not a supported MoE family; supported: {supported_names()}"
        )
    return spec


def uses_groups(spec: FamilySpec, config) -> bool:
    """Whether routing is group-limited (experts split into `n_group` contiguous groups)."""
    if spec.routing == "deepseek_v3":
        return True  # V3 always reshapes scores by n_group (n_group may be 1) and sums each group's top-2
    if spec.routing == "deepseek_v2":
        return getattr(config, "topk_method", "greedy") == "group_limited_greedy"
    return False
