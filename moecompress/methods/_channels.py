"""Shared logic of the channel-pruning methods (HEAPr, CAMERA-P): rank per-channel scores, keep the best, round
widths, and account for what is removed.

Scores are keyed `(layer, expert)` for routed experts and `(layer, SHARED)` for a layer's shared expert; each value
is a float64 vector over that expert's intermediate channels (higher = more important).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Union

import torch
from torch import nn

from moecompress.compress.moe import MoELayer, moe_layers
from moecompress.errors import UserError
from moecompress.methods.base import ChannelPlan

log = logging.getLogger("moecompress")

SHARED = "shared"
Key = tuple[int, Union[int, str]]


def _order_key(key: Key) -> tuple[int, int, int]:
    layer, expert = key
    return (layer, 1, 0) if expert == SHARED else (layer, 0, int(expert))


def select_channels(scores: dict[Key, torch.Tensor], ratio: float, scope: str,
                    min_width: int = 0) -> dict[Key, list[int]]:
    """Drop the round(ratio·N) lowest-scoring channels of each ranking group — all keys (`scope=global`) or one
    layer's keys (`scope=layer`) — and return the kept channel indices per key (ascending). Ties break by
    position (layer, expert, channel), so the result is deterministic. `min_width` channels of every expert (its
    best ones) are never dropped. NaN/inf scores count as 0."""
    if not 0 <= ratio < 1:
        raise UserError(f"the channel pruning ratio must be in [0, 1), got {ratio}")
    if scope not in ("global", "layer"):
        raise UserError(f"scope must be 'global' or 'layer', not '{scope}'")
    keys = sorted(scores, key=_order_key)
    groups: dict[Any, list[Key]] = {}
    for key in keys:
        groups.setdefault("all" if scope == "global" else key[0], []).append(key)
    kept: dict[Key, list[int]] = {}
    for group in groups.values():
        parts = [torch.nan_to_num(scores[k].double().flatten(), nan=0.0, posinf=0.0, neginf=0.0) for k in group]
        for k, part in zip(group, parts):
            if min_width > 0 and part.numel():
                protect = torch.argsort(part, descending=True, stable=True)[:min_width]
                part[protect] = math.inf
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        n_remove = int(round(ratio * flat.numel()))
        n_remove = min(n_remove, int((flat != math.inf).sum()))
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[torch.argsort(flat, stable=True)[:n_remove]] = False
        start = 0
        for k, part in zip(group, parts):
            kept[k] = keep[start:start + part.numel()].nonzero().flatten().tolist()
            start += part.numel()
    return kept


def round_widths(kept: dict[Key, list[int]], scores: dict[Key, torch.Tensor], round_to: int | None
                 ) -> dict[Key, list[int]]:
    """Round every kept width up to a multiple of `round_to` (capped at the expert's full width) by re-adding that
    expert's best-scoring dropped channels. Width 0 stays 0 (a multiple of every N)."""
    if not round_to or round_to <= 1:
        return kept
    out = {}
    for key, channels in kept.items():
        full = scores[key].numel()
        want = min(full, -(-len(channels) // round_to) * round_to)
        chosen = set(channels)
        if want > len(chosen):
            score = torch.nan_to_num(scores[key].double(), nan=0.0, posinf=0.0, neginf=0.0)
            for c in torch.argsort(score, descending=True, stable=True).tolist():
                if len(chosen) >= want:
                    break
                chosen.add(c)
        out[key] = sorted(chosen)
    return out


def _routed_cost(layer: MoELayer, e: int) -> tuple[int, int]:
    """(parameters per intermediate channel, width) of routed expert e: gate row + up row + down column (+ the
    gate/up bias entries where the family has them)."""
    w = layer.expert_weights(e)
    per = w.gate.shape[1] + w.up.shape[1] + w.down.shape[0]
    per += (w.gate_bias is not None) + (w.up_bias is not None)
    return per, w.gate.shape[0]


def _shared_cost(layer: MoELayer) -> tuple[int, int]:
    mlp = layer.shared_mlp
    per = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    per += (mlp.gate_proj.bias is not None) + (mlp.up_proj.bias is not None)
    return per, mlp.gate_proj.out_features


def channel_costs(model: nn.Module) -> tuple[dict[Key, tuple[int, int]], int]:
    """(parameters per channel, width) of every routed and shared expert, and the model's parameter count — what
    `plan_facts` counts on, taken before surgery (methods that prune during their pass take it first)."""
    costs: dict[Key, tuple[int, int]] = {}
    for layer in moe_layers(model):
        for e in range(layer.num_experts):
            costs[(layer.layer_idx, e)] = _routed_cost(layer, e)
        if layer.shared_mlp is not None:
            costs[(layer.layer_idx, SHARED)] = _shared_cost(layer)
    return costs, sum(p.numel() for p in model.parameters())


def plan_facts(model: nn.Module | tuple, kept: dict[Key, list[int]], ratio: float) -> dict[str, Any]:
    """What keeping `kept` removes, counted on the model before surgery (or on its `channel_costs`): routed-expert
    channels, shared-expert channels, and parameters (fraction of all model parameters and of routed-expert
    parameters)."""
    costs, total_params = model if isinstance(model, tuple) else channel_costs(model)
    routed_ch = routed_removed = shared_ch = shared_removed = 0
    routed_params = params_removed = routed_params_removed = 0
    zero = 0
    for key, (per, width) in costs.items():
        if key[1] == SHARED:
            if key in kept:
                gone = width - len(kept[key])
                shared_ch += width
                shared_removed += gone
                params_removed += per * gone
            continue
        routed_ch += width
        routed_params += per * width
        if key in kept:
            gone = width - len(kept[key])
            routed_removed += gone
            routed_params_removed += per * gone
            zero += len(kept[key]) == 0
    params_removed += routed_params_removed
    return {
        "target_ratio": ratio,
        "routed_channels": routed_ch,
        "routed_channels_removed": routed_removed,
        "routed_channel_fraction_removed": routed_removed / max(routed_ch, 1),
        "shared_channels": shared_ch,
        "shared_channels_removed": shared_removed,
        "zero_width_experts": zero,
        "params_total": total_params,
        "params_removed": params_removed,
        "param_fraction_removed": params_removed / max(total_params, 1),
        "routed_param_fraction_removed": routed_params_removed / max(routed_params, 1),
    }


def make_plan(model: nn.Module | tuple, kept: dict[Key, list[int]], ratio: float, method: str,
              extra: dict[str, Any] | None = None) -> ChannelPlan:
    channels: dict[int, dict[int, list[int]]] = {}
    shared: dict[int, list[int]] = {}
    for (layer, expert), chans in sorted(kept.items(), key=lambda kv: _order_key(kv[0])):
        if expert == SHARED:
            shared[layer] = chans
        else:
            channels.setdefault(layer, {})[int(expert)] = chans
    facts = {**plan_facts(model, kept, ratio), **(extra or {})}
    log.info("%s: removes %.1f%% of routed-expert channels (target %.1f%%)%s, %.2f%% of all parameters "
             "(%s of %s); %d experts at width 0 (routable, output 0)", method,
             100 * facts["routed_channel_fraction_removed"], 100 * ratio,
             f", {facts['shared_channels_removed']}/{facts['shared_channels']} shared-expert channels"
             if facts["shared_channels"] else "", 100 * facts["param_fraction_removed"],
             f"{facts['params_removed']:,}", f"{facts['params_total']:,}", facts["zero_width_experts"])
    return ChannelPlan(channels=channels, shared=shared or None, facts=facts)


def check_channel_target(target, method: str) -> float:
    """The channel ratio of a Target; UserError for a `keep` target (counts experts, not channels)."""
    if target.keep is not None:
        raise UserError(f"{method} removes channels: give --ratio (the fraction of routed-expert channels removed), "
                        f"not --keep")
    if target.ratio is None:
        raise UserError(f"{method} needs --ratio (the fraction of routed-expert channels removed)")
    return float(target.ratio)
