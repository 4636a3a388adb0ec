"""Routers the stock architecture cannot express, with the stock router's call contract
`router(x) -> (logits, top_k_weights [T,k], top_k_index [T,k])`. Both need the native checkpoint format.

* `MappedRouter` — EEP's real-valued router mapping over the softmax of all original experts.
* `MaskedRouter` — the full original router restricted to a kept set (EASY-EP's deployments):
  - `mode="masked"`: pruned experts are excluded *before* top-k (and before group selection), with the family's
    own semantics; the weights of kept experts are the original ones (for `norm_topk_prob=False` the softmax
    denominator still covers all E experts — the exact "mask after softmax" of easy_ep.md);
  - `mode="no_reroute"`: routing is exactly the full model's; selections of pruned experts get weight 0 (they
    contribute nothing, and the surviving weights are not renormalised — EASY-EP appendix F.3).
  Selected ids are mapped to the compact indices of the stored experts.
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


class MaskedRouter(nn.Module):
    """The original router (all E rows, `inner`) restricted to `kept` experts; see the module docstring."""

    MODES = ("masked", "no_reroute")

    def __init__(self, inner: nn.Module, kept: list[int], mode: str, routing: str, norm_topk_prob: bool):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}")
        self.inner = inner
        self.mode = mode
        self.routing = routing
        self.norm_topk_prob = norm_topk_prob
        n = inner.weight.shape[0]
        compact = torch.full((n,), -1, dtype=torch.long)
        compact[torch.tensor(kept, dtype=torch.long)] = torch.arange(len(kept))
        self.register_buffer("compact", compact)
        self.num_experts = len(kept)

    @property
    def top_k(self) -> int:
        return self.inner.top_k

    @top_k.setter
    def top_k(self, value: int) -> None:
        self.inner.top_k = value

    @property
    def weight(self) -> torch.Tensor:
        """The full router weight [E, H] (all original experts)."""
        return self.inner.weight

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
