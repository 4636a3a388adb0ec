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
* `ODPRouter` — MC's online dynamic pruning of the second expert around a stock router, with the important-token
  protection at prefill (attention column sums captured from the same decoder layer's attention module, run eager
  at prefill). Runtime option; its per-layer threshold is a persisted buffer, the router kind `odp`, threshold,
  renormalisation and protect ratio are recorded in the manifest by compress.checkpoint.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from moecompress.errors import UserError


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

    **Ratio rule.** The inner router routes as usual; then for every token whose top-2 weights w0 ≥ w1 satisfy
    w1/w0 < μ (`threshold`, the layer's calibration median), the second expert's weight is set to 0. With
    `renormalize` (default, as NAEE's dynamic skipping and MC's Mixtral code do) the kept weights are rescaled so
    that the kept ones sum to what the selected ones summed to before (1 for renormalising routers; the family's
    `routed_scaling_factor` is kept). Only the second-ranked expert is ever dropped; with top-k > 2 the rule looks
    at the top two only. Ratios are computed on the weights the inner router returns (renormalisation and
    scaling cancel in the ratio).

    **Important-token protection** (`protect_ratio` τ_h, 0 disables; only at prefill, i.e. when the current forward
    holds more than one token per sequence — decode uses the ratio rule alone). Per sequence, token j gets
    I_j = ‖t_j‖₁ · (Σ_{i≥j} A_{i,j}) / (L − j), with t_j the MoE block input (this router's input), A the block's
    own self-attention probabilities averaged over heads — the **column** sum, the attention token j receives
    (the reference code sums rows, which collapses to 1/(L − j); pmq.md pitfall) — and L the number of real tokens
    of the sequence: padded positions are neither queries nor candidates, and j and L − j count real tokens only
    (L − j = the number of real queries at or after j). The ⌈τ_h·L⌉ tokens with the largest I_j keep both experts.
    The probabilities are captured by `attach(attention)`: at prefill, forward hooks on the decoder layer's
    attention module run it with **eager** attention (sdpa/flash do not return probabilities, pitfall 18) — it gets
    a shallow copy of its config with `_attn_implementation="eager"` for that call and its mask turned into eager's
    additive form — and hand the per-token column term to this router; decode steps keep the model's own
    attention implementation. Other layers are untouched. When the router is called without a captured attention
    map of matching shape (e.g. on block inputs directly), the ratio rule alone applies.

    Deviations: with a KV cache and several new tokens (chunked prefill), A, L and j are those of the tokens of the
    current forward (the columns of the cached tokens are not candidates); sliding-window layers still divide by
    L − j, as the spec writes. The paper's `tau_l` (drop all experts of the least important tokens) is not
    implemented (off in the reference code). The dropped slot keeps its expert index with weight 0, so outputs are
    exact; whether compute is saved depends on the experts kernel.

    `skipped` / `routed_tokens` / `protected_tokens` count, since the last `reset_counts()`, tokens whose second
    expert was dropped, tokens routed, and tokens protected (plain attributes, not persisted). `last_importance`
    [B,S] (−inf at padding) and `last_protected` [B,S] hold the latest prefill's I_j and protected set.
    """

    def __init__(self, inner: nn.Module, threshold: float, renormalize: bool = True, protect_ratio: float = 0.0):
        super().__init__(inner)
        if not 0.0 <= float(protect_ratio) <= 1.0:
            raise ValueError(f"protect_ratio {protect_ratio} must lie in [0, 1]")
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        self.renormalize = bool(renormalize)
        self.protect_ratio = float(protect_ratio)
        self._handles: list = []
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (column term [B,S], real tokens [B,S])
        self._attention_config = None  # the attention module's own config while a prefill runs eager
        self._valid: torch.Tensor | None = None
        self.last_importance: torch.Tensor | None = None
        self.last_protected: torch.Tensor | None = None
        self.reset_counts()

    def reset_counts(self) -> None:
        self.skipped = 0
        self.routed_tokens = 0
        self.protected_tokens = 0

    @property
    def num_experts(self) -> int:
        return self.inner.num_experts

    # ----- attention capture ---------------------------------------------------------------------------------
    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, attention: nn.Module) -> None:
        """Hook the same decoder layer's attention module (see the class docstring); idempotent per module. The
        hooks are bound methods of this router, so `copy.deepcopy(model)` re-binds them to the copy's router."""
        self.detach()
        self._handles = [
            attention.register_forward_pre_hook(self._attention_pre_hook, with_kwargs=True),
            attention.register_forward_hook(self._attention_hook, with_kwargs=True),
        ]

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _attention_pre_hook(self, module: nn.Module, args, kwargs):
        self._pending = None
        if self._attention_config is not None:  # a previous prefill raised inside the attention module
            module.config, self._attention_config = self._attention_config, None
        if self.protect_ratio <= 0:
            return None
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        if hidden.dim() != 3 or hidden.shape[1] < 2:
            return None  # decode: the ratio rule alone, with the model's own attention implementation
        if "attention_mask" not in kwargs:
            raise UserError("ODP token protection: the attention module was called without an `attention_mask` "
                            "keyword; this transformers version is not supported with protect_ratio > 0")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = cache.get_seq_length(module.layer_idx) if cache is not None else 0
        mask, valid = _eager_mask(kwargs["attention_mask"], hidden, past, getattr(module, "sliding_window", None))
        config = copy.copy(module.config)
        config._attn_implementation_internal = "eager"  # this module only: no recursion into shared sub-configs
        self._attention_config, module.config = module.config, config
        self._valid = valid
        return args, {**kwargs, "attention_mask": mask}

    def _attention_hook(self, module: nn.Module, args, kwargs, output):
        if self._attention_config is None:
            return None
        module.config, self._attention_config = self._attention_config, None
        valid, self._valid = self._valid, None
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is None:
            raise UserError("ODP token protection: the attention module returned no probabilities under eager "
                            "attention; this architecture is not supported with protect_ratio > 0")
        self._pending = column_term(weights, valid)
        return None

    # ----- routing -------------------------------------------------------------------------------------------
    def drop_mask(self, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask [T] of tokens whose second expert is dropped, position [T] of that expert among the k slots)."""
        top2 = torch.topk(weights.float(), 2, dim=-1)
        ratio = top2.values[:, 1] / top2.values[:, 0].clamp(min=1e-30)
        return ratio < self.threshold, top2.indices[:, 1]

    def protected(self, hidden_states: torch.Tensor, term: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Mask [B,S] of the ⌈protect_ratio·L⌉ tokens per sequence with the largest I_j = ‖t_j‖₁ · term_j."""
        b, s = term.shape
        norm = hidden_states.detach().reshape(b, s, -1).float().abs().sum(-1)
        importance = (norm * term).masked_fill(~valid, float("-inf"))
        count = torch.ceil(valid.sum(-1).double() * self.protect_ratio - 1e-9).long()  # per sequence
        order = torch.argsort(importance, dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(s, device=order.device).expand(b, s))
        keep = (rank < count[:, None]) & valid
        self.last_importance, self.last_protected = importance, keep
        return keep

    def forward(self, hidden_states: torch.Tensor):
        pending, self._pending = self._pending, None
        logits, weights, index = self.inner(hidden_states)
        if weights.shape[-1] < 2:
            return logits, weights, index
        drop, second = self.drop_mask(weights)
        if pending is not None and self.protect_ratio > 0 and pending[0].numel() == len(weights):
            keep = self.protected(hidden_states, *pending).reshape(-1)
            self.protected_tokens += int(keep.sum())
            drop = drop & ~keep
        keep = torch.ones_like(weights)
        keep[torch.arange(len(weights), device=weights.device), second] = 1.0 - drop.to(weights.dtype)
        new = weights * keep
        if self.renormalize:
            new = new * (weights.sum(-1, keepdim=True) / new.sum(-1, keepdim=True).clamp(min=1e-30))
        self.skipped += int(drop.sum())
        self.routed_tokens += int(len(weights))
        return logits, new.to(weights.dtype), index


def _eager_mask(mask, hidden: torch.Tensor, past: int, window: int | None):
    """The attention mask turned into eager attention's additive float form [B|1,1,q,kv], and the real
    (non-padding) tokens [B,q] of the current forward. Accepts eager (float 4D) and sdpa (bool 4D, or None for a
    plain causal prefill) masks, and flash's 2D padding masks when nothing is cached."""
    b, q = hidden.shape[:2]
    device, dtype = hidden.device, hidden.dtype
    low = torch.finfo(dtype).min
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() in (2, 4)):
        raise UserError(f"ODP token protection: unsupported attention mask {type(mask).__name__} (flex "
                        f"attention?); use attn_implementation='sdpa' or 'eager' with protect_ratio > 0")
    if mask is None or mask.dim() == 2:
        if past:
            raise UserError("ODP token protection: a prefill over cached tokens came without a 4D attention mask "
                            "(flash attention?); use attn_implementation='sdpa' or 'eager' with protect_ratio > 0")
        i = torch.arange(q, device=device)
        allowed = i[None, :] <= i[:, None]
        if window is not None:
            allowed &= i[None, :] > i[:, None] - window
        allowed = allowed[None, None].expand(b, 1, q, q)
        if mask is not None:
            if mask.shape[-1] != q:
                raise UserError(f"ODP token protection: a 2D attention mask of length {mask.shape[-1]} for {q} "
                                f"tokens; use attn_implementation='sdpa' or 'eager' with protect_ratio > 0")
            allowed = allowed & mask.bool()[:, None, None, :]
        mask = allowed
    if mask.dtype == torch.bool:
        mask = torch.where(mask, torch.zeros((), device=mask.device, dtype=dtype), low)
    kv = mask.shape[-1]
    i = torch.arange(q, device=mask.device)
    diagonal = mask[:, 0, i, i + (kv - q)].expand(b, q)  # a real token attends to itself; padding does not
    return mask, diagonal > low / 2


def column_term(weights: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_{i≥j} A_{i,j} / (L − j) [B,S], valid [B,S]) from attention probabilities [B,heads,q,kv] averaged over
    heads: the columns of the current q tokens, real query rows only; L − j = the real queries at or after j."""
    with torch.no_grad():
        q = weights.shape[-2]
        a = weights.detach().float().mean(1)[..., weights.shape[-1] - q:]  # [B, q, q]
        valid = valid.to(a.device)
        a = torch.tril(a) * valid[:, :, None]
        later = valid.flip(-1).cumsum(-1).flip(-1)
        term = torch.where(valid, a.sum(1) / later.clamp(min=1), torch.zeros((), device=a.device))
    return term, valid


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


def install_odp(model: nn.Module, thresholds: dict[int, float], renormalize: bool = True,
                protect_ratio: float = 0.0) -> list[int]:
    """Wrap the routers of the listed MoE layers in `ODPRouter`s (stock routers only), attached to their layers'
    attention modules for the important-token protection; returns the layers."""
    from moecompress.compress.moe import moe_layers

    if not 0.0 <= float(protect_ratio) <= 1.0:
        raise UserError(f"ODP: protect ratio {protect_ratio} must lie in [0, 1] (0 disables the protection)")
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
        wrap_odp(layers[i], mu, renormalize, protect_ratio)
    return sorted(thresholds)


def wrap_odp(layer, threshold: float, renormalize: bool = True, protect_ratio: float = 0.0) -> ODPRouter:
    """Put an `ODPRouter` around the stock router of MoE layer view `layer` and attach it to the attention module
    of the same decoder layer (`self_attn`; needed when protect_ratio > 0). Used by install_odp and the loader."""
    from moecompress.compress.moe import decoder_layers

    router = ODPRouter(layer.router, threshold, renormalize, protect_ratio)
    attention = getattr(decoder_layers(layer.model)[layer.layer_idx], "self_attn", None)
    if attention is not None:
        router.attach(attention)
    elif router.protect_ratio > 0:
        raise UserError(f"ODP: decoder layer {layer.layer_idx} has no `self_attn` module; token protection needs "
                        f"the attention probabilities (set the protect ratio to 0)")
    setattr(layer.block, layer.spec.router_attr, router)
    return router


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
