"""Evaluate candidates on the live model without copying it.

`Snapshot` keeps references to every original tensor and module that surgery may replace (router and experts
parameters and buffers, the router and experts modules themselves, the counters and config keys). Surgery never
writes into an existing tensor — it installs new Parameters / modules — so re-installing the references restores
the model bit for bit. A candidate is applied through `apply_plan` with the very ExpertPlan the export writes, so
what was scored is what is saved. Peak memory: the original model plus one candidate's E' experts per layer.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from moecompress.compress.moe import moe_layers
from moecompress.methods.base import ExpertPlan, apply_plan

_SCALARS = ("num_experts", "top_k", "out_features", "in_features", "norm_topk_prob")


def _module_state(module: nn.Module) -> dict:
    return {
        "params": dict(module._parameters),
        "buffers": dict(module._buffers),
        "scalars": {k: module.__dict__[k] for k in _SCALARS if k in module.__dict__},
    }


def _restore_module(module: nn.Module, state: dict) -> None:
    for name in list(module._parameters):
        if name not in state["params"]:
            del module._parameters[name]
    module._parameters.update(state["params"])
    for name in list(module._buffers):
        if name not in state["buffers"]:
            del module._buffers[name]
    module._buffers.update(state["buffers"])
    module.__dict__.update(state["scalars"])


class Snapshot:
    """References to the MoE state of `model` as it is now; `restore()` re-installs them."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers = []
        for layer in moe_layers(model):
            router, experts, block = layer.router, layer.experts, layer.block
            self.layers.append({
                "block": block, "router_attr": layer.spec.router_attr, "router": router, "experts": experts,
                "states": [(m, _module_state(m)) for m in (router, experts, block)],
            })
        spec = moe_layers(model)[0].spec
        keys = [spec.count_key, spec.width_key, "num_experts_per_tok", "shared_expert_intermediate_size"]
        self.config = {k: getattr(model.config, k) for k in keys if hasattr(model.config, k)}
        self.model_attrs = {k: model.__dict__[k] for k in ("num_experts", "num_experts_per_tok") if k in model.__dict__}

    def restore(self) -> None:
        for entry in self.layers:
            block = entry["block"]
            block._modules[entry["router_attr"]] = entry["router"]
            block._modules["experts"] = entry["experts"]
            for module, state in entry["states"]:
                _restore_module(module, state)
        for k, v in self.config.items():
            setattr(self.model.config, k, v)
        self.model.__dict__.update(self.model_attrs)


@contextmanager
def applied(snapshot: Snapshot, plan: ExpertPlan) -> Iterator[nn.Module]:
    """The snapshot's model with `plan` applied; restored on exit (also when applying or scoring fails)."""
    try:
        apply_plan(snapshot.model, plan)
        yield snapshot.model
    finally:
        snapshot.restore()
