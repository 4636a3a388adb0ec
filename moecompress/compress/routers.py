"""Routers the stock architecture cannot express, with the stock router's call contract
`router(x) -> (logits, top_k_weights [T,k], top_k_index [T,k])`. All need the native checkpoint format.

* `MappedRouter` — EEP's real-valued router mapping over the softmax of all original experts.
* `MaskedRouter` — the full original router restricted to a kept set (EASY-EP's deployments):
  - `mode="masked"`: pruned experts are excluded *before* top-k (and before group selection), with the family's
    own semantics; the weights of kept experts are the original ones (for `norm_topk_prob=False` the softmax
    denominator still covers all E experts — the exact "mask after softmax" of easy_ep.md);
  - `mode="no_reroute"`: routing is exactly the full model's; selections of pruned experts get weight 0 (they
    contribute nothing, and the surviving weights are not renormalised — EASY-EP appendix F.3).
  Selected ids are mapped to the compact indices of the stored experts.
* `ODPRouter` — MC's online dynamic pruning of the second expert around a stock router (runtime option; its
  per-layer threshold is a persisted buffer, the router kind `odp` is recorded by compress.checkpoint).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MappedRouter(nn.Module):
    """EEP's router mapping: p' = W_RM · softmax(W_G x) over all E original experts, top-k of p', renormalised.

    Keeps the original router weight [E,H] and `mapping` [E',E]. With one-hot distinct rows this equals slicing the
    router rows (the renormalisation cancels the softmax denominator), which `merge_experts` then does instead.
    """

    def __init__(self, weight: torch.Tensor, mapping: torch.Tensor, top_k: int):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        self.mapping = nn.Parameter(mapping.detach().clone().to(weight.dtype), requires_grad=False)
        self.top_k = top_k
        self.num_experts = mapping.shape[0]
        self.hidden_dim = weight.shape[1]

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        probs = torch.softmax(F.linear(hidden_states, self.weight).float(), dim=-1)
        mapped = probs @ self.mapping.float().T  # [T, E']
        top_value, top_index = torch.topk(mapped, self.top_k, dim=-1)
        top_value = top_value / top_value.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return mapped.to(hidden_states.dtype), top_value.to(hidden_states.dtype), top_index


class WrappedRouter(nn.Module):
    """A router that wraps the stock one (`inner`): top-k and the full router weight are the inner router's."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    @property
    def top_k(self) -> int:
        return self.inner.top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self.inner.top_k = value

    @property
    def weight(self) -> torch.Tensor:
        """The inner router's weight [E, H] (all original experts)."""
        return self.inner.weight


class MaskedRouter(WrappedRouter):
    """The original router (all E rows, `inner`) restricted to `kept` experts; see the module docstring."""

    MODES = ("masked", "no_reroute")

    def __init__(self, inner: nn.Module, kept: list[int], mode: str, routing: str, norm_topk_prob: bool):
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}")
        super().__init__(inner)
        self.mode = mode
        self.routing = routing
        self.norm_topk_prob = norm_topk_prob
        n = inner.weight.shape[0]
        compact = torch.full((n,), -1, dtype=torch.long)
        compact[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        self.register_buffer("compact", compact)
        self.num_experts = len(kept)

    @property
    def full_experts(self) -> int:
        return self.compact.shape[0]

    def forward(self, hidden_states: torch.Tensor):
        if self.mode == "no_reroute":
            logits, weights, index = self.inner(hidden_states)
        else:
            logits, weights, index = self._masked(hidden_states.reshape(-1, self.inner.weight.shape[1]))
        compact = self.compact[index]
        weights = weights * (compact >= 0).to(weights.dtype)  # a pruned expert contributes nothing
        return logits, weights, compact.clamp(min=0)

    def _masked(self, x: torch.Tensor):
        """The family's routing with pruned experts excluded before top-k (and before group selection)."""
        r = self.inner
        pruned = self.compact < 0
        logits = F.linear(x.float(), r.weight.float(), getattr(r, "bias", None))
        if self.routing == "deepseek_v3":
            scores = logits.sigmoid()
            choice = (scores + r.e_score_correction_bias).masked_fill(pruned, float("-inf"))
            n_group = r.num_group
            grouped = choice.view(-1, n_group, choice.shape[-1] // n_group)
            top2 = grouped.topk(2, dim=-1)[0]  # a group's score sums its best two *kept* experts
            group_scores = top2.masked_fill(top2.isneginf(), 0.0).sum(dim=-1)
            group_scores = group_scores.masked_fill(top2[..., 0].isneginf(), float("-inf"))  # nothing kept
            group_idx = torch.topk(group_scores, k=r.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1).bool()
            choice = choice.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), float("-inf"))
            index = torch.topk(choice, k=r.top_k, dim=-1, sorted=False)[1]
            weights = scores.gather(1, index)
            if self.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
            return logits, weights * r.routed_scaling_factor, index
        if self.routing == "deepseek_v2":
            scores = logits.softmax(dim=-1).masked_fill(pruned, 0.0)
            if r.topk_method == "group_limited_greedy":
                grouped = scores.view(-1, r.num_group, scores.shape[-1] // r.num_group)
                group_idx = torch.topk(grouped.max(dim=-1).values, k=r.topk_group, dim=-1, sorted=False)[1]
                group_mask = torch.zeros(grouped.shape[:2], device=x.device).scatter_(1, group_idx, 1).bool()
                scores = scores.masked_fill(~group_mask.repeat_interleave(grouped.shape[-1], dim=1), 0.0)
            weights, index = torch.topk(scores, k=r.top_k, dim=-1, sorted=False)
            return logits, weights * r.routed_scaling_factor, index
        if self.routing == "topk_softmax":  # GPT-OSS: top-k logits, softmax over the selected
            value, index = torch.topk(logits.masked_fill(pruned, float("-inf")), r.top_k, dim=-1)
            return logits, torch.softmax(value, dim=-1).to(x.dtype), index
        if self.routing == "softmax_topk":
            probs = torch.softmax(logits, dim=-1).masked_fill(pruned, 0.0)
            weights, index = torch.topk(probs, r.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
            return logits, weights.to(x.dtype), index
        raise ValueError(f"masked routing is not available for '{self.routing}' routers; slice the experts instead")


class ODPRouter(WrappedRouter):
    """MC's online dynamic pruning (ODP, arXiv 2410.06270 §3.3; pmq.md "Algorithm — ODP") around a stock router.

    The inner router routes as usual; then for every token whose top-2 weights w0 ≥ w1 satisfy w1/w0 < μ
    (`threshold`, the layer's calibration median), the second expert's weight is set to 0. With `renormalize`
    (default, as NAEE's dynamic skipping and MC's Mixtral code do) the kept weights are rescaled so that the kept
    ones sum to what the selected ones summed to before (1 for renormalising routers; the family's
    `routed_scaling_factor` is kept). Only the second-ranked expert is ever dropped; with top-k > 2 the rule looks
    at the top two only. Ratios are computed on the weights the inner router returns (renormalisation and
    scaling cancel in the ratio).

    Deviations: the important-token protection (top 2% of tokens by ‖t‖₁ · attention column sum, kept at
    top-2) is **not implemented** — it needs the attention probabilities, which sdpa/flash attention do not
    return (pitfall 18); skipping is applied at every position (prefill and decode). The dropped slot keeps its
    expert index with weight 0, so outputs are exact; whether compute is saved depends on the experts kernel.

    `skipped` / `routed_tokens` count, since the last `reset_counts()`, tokens whose second expert was dropped
    and tokens routed (plain attributes, not persisted).
    """

    def __init__(self, inner: nn.Module, threshold: float, renormalize: bool = True):
        super().__init__(inner)
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.renormalize = bool(renormalize)
        self.reset_counts()

    def reset_counts(self) -> None:
        self.skipped = 0
        self.routed_tokens = 0

    @property
    def num_experts(self) -> int:
        return self.inner.num_experts

    def drop_mask(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [T] of tokens whose second expert is dropped, position [T] of that expert among the k slots)."""
        top2 = torch.topk(weights.float(), 2, dim=-1)
        ratio = top2.values[:, 1] / top2.values[:, 0].clamp(min=1e-30)
        return ratio < self.threshold, top2.indices[:, 1]

    def forward(self, hidden_states: torch.Tensor):
        logits, weights, index = self.inner(hidden_states)
        if weights.shape[-1] < 2:
            return logits, weights, index
        drop, second = self.drop_mask(weights)
        keep = torch.ones_like(weights)
        keep[torch.arange(len(weights), device=weights.device), second] = 1.0 - drop.to(weights.dtype)
        new = weights * keep
        if self.renormalize:
            new = new * (weights.sum(-1, keepdim=True) / new.sum(-1, keepdim=True).clamp(min=1e-30))
        self.skipped += int(drop.sum())
        self.routed_tokens += int(len(weights))
        return logits, new.to(weights.dtype), index


def odp_thresholds(layers, inputs: dict[int, torch.Tensor]) -> dict[int, float]:
    """μ_ℓ = median over the given MoE-block inputs [n,H] of w1/w0 (the top-2 routing weights), per layer."""
    out = {}
    with torch.no_grad():
        for layer in layers:
            x = inputs.get(layer.layer_idx)
            if x is None or not len(x) or layer.top_k < 2:
                continue
            weights = layer.route(x.to(layer.router_weight.dtype)).weights.float()
            top2 = torch.topk(weights, 2, dim=-1).values
            out[layer.layer_idx] = float(torch.median(top2[:, 1] / top2[:, 0].clamp(min=1e-30)))
    return out


def install_odp(model: nn.Module, thresholds: dict[int, float], renormalize: bool = True) -> list[int]:
    """Wrap the routers of the listed MoE layers in `ODPRouter`s (stock routers only); returns the layers."""
    from moecompress.compress.moe import moe_layers
    from moecompress.errors import UserError

    layers = {l.layer_idx: l for l in moe_layers(model)}
    for i in thresholds:
        if i not in layers:
            raise UserError(f"ODP: layer {i} is not an MoE layer (MoE layers: {sorted(layers)})")
        router = layers[i].router
        if isinstance(router, (MappedRouter, MaskedRouter, ODPRouter)):
            raise UserError(f"ODP: layer {i} already has a {type(router).__name__}; ODP wraps stock routers only")
        if layers[i].spec.routing == "sparsemixer":
            raise UserError("ODP: Phi-MoE's sparsemixer router is not supported (its weights are not top-2 probabilities)")
        if layers[i].top_k < 2:
            raise UserError(f"ODP: layer {i} routes top-{layers[i].top_k}; dropping the second expert needs top-k ≥ 2")
    for i, mu in thresholds.items():
        layer = layers[i]
        setattr(layer.block, layer.spec.router_attr, ODPRouter(layer.router, mu, renormalize))
    return sorted(thresholds)


def odp_counts(model: nn.Module, reset: bool = False) -> dict[int, tuple[int, int]]:
    """Per ODP layer: (tokens whose second expert was skipped, tokens routed) since the last reset."""
    from moecompress.compress.moe import moe_layers

    out = {}
    for layer in moe_layers(model):
        if isinstance(layer.router, ODPRouter):
            out[layer.layer_idx] = (layer.router.skipped, layer.router.routed_tokens)
            if reset:
                layer.router.reset_counts()
    return out
