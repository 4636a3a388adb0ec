"""Streaming statistics gathered by the reference forward. One pass fills every collector a method asked for.

A collector keeps O(E) / O(E·I) / O(E·H²) state per layer — never token buffers unless that is its purpose
(`block_io`) — and exposes it as a flat `{"{layer}.{key}": tensor}` dict so the cache can store it as
safetensors. Accumulators are float64 on CPU; per-call reductions run in float32 (float64 when the model is),
so nothing loops over tokens in Python: the only loop is the reference forward's loop over experts.

Padding never reaches a collector (the engine filters it). Every accessor that divides by a token count returns 0
for experts that calibration never routed to (pitfall 1) — each collector's docstring says what its fallback is.

| name            | accessors (layer = decoder layer index)                                                    |
|-----------------|--------------------------------------------------------------------------------------------|
| `routing`       | counts(l) [E], weight_sum(l) [E], prob_sum(l) [E], tokens(l), mean_token_entropy(l)        |
| `reap`          | saliency(l) [E] = mean g·‖f‖, ean(l) [E] = Σ‖f‖, gnorm_sum(l), counts(l)                   |
| `easy_ep`       | score(l) [E] = Σ g·‖f‖·s_t, gnorm_sum(l) [E], counts(l)                                    |
| `channels`      | sum_a2(l,e) [I_e], sum_ga2(l,e), max_ga(l,e), counts(l), shared_sum_a2(l) … (None if none) |
| `channel_grads` | sum_g2(l,e) [I_e], sum_a2(l,e), sum_a2g2(l,e), counts(l), heapr_score(l,e, form)           |
| `shared_channel_grads` | score(l, form, reduction) [I_shared]: HEAPr score of the shared expert's channels     |
| `gram`          | xtx(l,e) [H,H], ata(l,e) [I_e,I_e] (option), counts(l)                                     |
| `block_io`      | inputs(l) [n,H], outputs(l) [n,H], positions(l) [n] (n ≤ max_tokens)                       |
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from moecompress.compress.moe import MoELayer, Routing
from moecompress.errors import UserError

COLLECTORS: dict[str, type["Collector"]] = {}


def register(cls):
    COLLECTORS[cls.name] = cls
    return cls


def make_collector(name: str, **config) -> "Collector":
    """A fresh collector by name (`--collect a,b`); UserError naming the known ones."""
    if name not in COLLECTORS:
        raise UserError(f"unknown collector '{name}'; available: {', '.join(sorted(COLLECTORS))}")
    try:
        return COLLECTORS[name](**config)
    except TypeError as e:
        raise UserError(f"collector '{name}': {e}") from None


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class PassContext:
    """What the engine tells collectors beyond the observer arguments (set per batch).

    `keep`: flat non-padding mask of the batch [B·L] (None = no padding); `offset`: number of valid tokens in the
    batches before this one (a global token index for sampling); `residual[layer]`: the residual stream entering
    the MoE sub-block (input of `post_attention_layernorm`), flat [B·L, H], when a collector asked for it."""

    def __init__(self):
        self.keep: torch.Tensor | None = None
        self.offset = 0
        self.residual: dict[int, torch.Tensor] = {}
        self._row_of: torch.Tensor | None = None

    def set_batch(self, keep: torch.Tensor | None, offset: int) -> None:
        self.keep = keep
        self.offset = offset
        self._row_of = None if keep is None else torch.cumsum(keep.long(), 0) - 1
        self.residual = {}

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """Flat batch positions → row indices of the padding-filtered block tensors given to `on_block`."""
        return tokens if self._row_of is None else self._row_of[tokens]

    def valid_residual(self, layer: int) -> torch.Tensor:
        h = self.residual.get(layer)
        if h is None:
            raise RuntimeError(f"residual stream of layer {layer} was not captured (needs_residual not honoured)")
        return h if self.keep is None else h[self.keep]


class Collector:
    """Base: no-op hooks, a flat tensor state, a config that keys the cache (and rebuilds the collector).

    Class flags the engine reads: `needs_grad` (needs the backward engine: `on_expert_grad` is then called with
    the un-detached intermediate activation), `needs_residual` (fills `ctx.residual`)."""

    name = "base"
    needs_grad = False
    needs_residual = False

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}
        self.ctx = PassContext()

    def config(self) -> dict[str, Any]:
        return {}

    def attach(self, model) -> list:
        """Install extra (zero-cost) hooks on `model`; return their handles. Called once per pass."""
        return []

    def on_expert(self, layer: MoELayer, expert: int, tokens, x, weight, a, y) -> None:
        pass

    def on_expert_grad(self, layer: MoELayer, expert: int, a: torch.Tensor, keep: torch.Tensor | None) -> None:
        pass

    def on_block(self, layer: MoELayer, x, routing: Routing, routed, shared) -> None:
        pass

    # ----- state ----------------------------------------------------------------------------------------------
    def layers(self) -> list[int]:
        return sorted({int(k.partition(".")[0]) for k in self.state})

    def layer_tensor(self, layer: int, key: str) -> torch.Tensor:
        name = f"{layer}.{key}"
        if name not in self.state:
            raise KeyError(f"collector '{self.name}' has no '{key}' for layer {layer} (layers: {self.layers()})")
        return self.state[name]

    def drop_layer(self, layer: int) -> None:
        """Free a layer's state (e.g. a sequential callback that consumed a layer's Gram matrices)."""
        for key in [k for k in self.state if k.partition(".")[0] == str(layer)]:
            del self.state[key]

    def _acc(self, layer: int, key: str, shape, dtype=torch.float64) -> torch.Tensor:
        """The accumulator `{layer}.{key}`, created as zeros on first use."""
        name = f"{layer}.{key}"
        if name not in self.state:
            self.state[name] = torch.zeros(shape, dtype=dtype)
        return self.state[name]

    counts_routed = False  # the engine adds the block's routed-token counts to `{layer}.count` after on_block

    def add_counts(self, layer: int, num_experts: int, counts: torch.Tensor) -> None:
        if self.counts_routed:
            self._acc(layer, "count", num_experts).add_(counts)

    def counts(self, layer: int) -> torch.Tensor:
        """Routed (valid) tokens per expert [E]."""
        return self.layer_tensor(layer, "count")

    def _mean(self, total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """total / count along the expert axis; 0 where count is 0 (never-routed experts)."""
        shape = (-1,) + (1,) * (total.dim() - 1)
        return torch.where(count.reshape(shape) > 0, total / count.clamp(min=1).reshape(shape),
                           torch.zeros_like(total))


@register
class RoutingCounts(Collector):
    """Per layer and expert: routed token count, summed final routing weight (EASY-EP's "gating score"), summed
    router probability over all tokens (EEP's "soft activation"; softmax, or the sigmoid score for
    DeepSeek-V3), the summed per-token router entropy, and the number of valid tokens seen. Never-routed experts:
    count 0, sums 0."""

    name = "routing"

    def on_block(self, layer, x, routing, routed, shared) -> None:
        n = layer.num_experts
        i = layer.layer_idx
        index = routing.index.reshape(-1)
        weight = routing.weights.reshape(-1).detach().double()
        ok = (index >= 0) & (index < n)
        index, weight = index[ok], weight[ok]
        self._acc(i, "count", n).index_add_(0, index, torch.ones_like(weight))
        self._acc(i, "weight_sum", n).index_add_(0, index, weight)
        logits = routing.logits.detach().double()
        probs = torch.sigmoid(logits) if layer.spec.routing == "deepseek_v3" else torch.softmax(logits, dim=-1)
        self._acc(i, "prob_sum", n).add_(probs.sum(dim=0))
        p = probs / probs.sum(dim=-1, keepdim=True).clamp(min=1e-300)
        self._acc(i, "entropy_sum", 1).add_(-(p * torch.log(p.clamp(min=1e-300))).sum())
        self._acc(i, "tokens", 1).add_(len(x))

    def weight_sum(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "weight_sum")

    def prob_sum(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "prob_sum")

    def tokens(self, layer: int) -> int:
        return int(self.layer_tensor(layer, "tokens").item())

    def mean_token_entropy(self, layer: int) -> float:
        """Mean over valid tokens of the entropy (nats) of the router's distribution over experts (DeepSeek-V3's
        sigmoid scores normalised to sum 1); 0 if no token was seen."""
        return float(self.layer_tensor(layer, "entropy_sum").item()) / max(self.tokens(layer), 1)


@register
class ReapSaliency(Collector):
    """REAP (arXiv 2510.13999): saliency S_e = mean over the tokens routed to e of g_e(x)·‖f_e(x)‖₂, with g the
    final routing weight actually applied (after top-k, renormalisation and `routed_scaling_factor`) and f_e the
    expert output before weighting. Also records Σ‖f_e‖ (EAN, expert activation norm: a sum, frequency-aware).
    Never-routed experts: saliency 0, EAN 0."""

    name = "reap"
    counts_routed = True

    def __init__(self):
        super().__init__()
        self._pending: list[tuple[int, torch.Tensor]] = []

    def on_expert(self, layer, expert, tokens, x, weight, a, y) -> None:
        dt = _acc_dtype(y)
        norm = torch.linalg.vector_norm(y.to(dt), dim=1)
        self._pending.append((expert, torch.stack([(weight.to(dt) * norm).sum(), norm.sum()])))

    def on_block(self, layer, x, routing, routed, shared) -> None:
        pending, self._pending = self._pending, []
        if pending:
            i, n = layer.layer_idx, layer.num_experts
            experts = torch.tensor([e for e, _ in pending])
            sums = torch.stack([v for _, v in pending]).double()
            self._acc(i, "gnorm_sum", n).index_add_(0, experts, sums[:, 0])
            self._acc(i, "norm_sum", n).index_add_(0, experts, sums[:, 1])

    def gnorm_sum(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "gnorm_sum")

    def saliency(self, layer: int) -> torch.Tensor:
        return self._mean(self.gnorm_sum(layer), self.counts(layer))

    def ean(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "norm_sum")


@register
class EasyEPScore(Collector):
    """EASY-EP (arXiv 2504.06792): I(e) = Σ_t g_{e,t}·‖f_e(u_t)‖₂ · s_t with s_t = max(0, 1 − cos(h_t, h_t + Σ_e g
    f_e)), a **sum** over tokens (usage frequency counts), routed experts only in the token term (shared experts
    excluded). g is the final routing weight (incl. `routed_scaling_factor`); the clip at 0 follows the reference.

    Choice of h (`hidden`): `"residual"` (default, as the paper and methods/easy_ep.md define it) is the residual
    stream entering the MoE sub-block — the input of the decoder layer's `post_attention_layernorm`, captured by a
    zero-cost pre-hook; `"block_input"` uses the normed MoE input u_t instead (what the observer sees as x).
    Also records Σ g·‖f‖ (the score without the token term) and counts. Never-routed experts score 0."""

    name = "easy_ep"
    counts_routed = True

    def __init__(self, hidden: Literal["residual", "block_input"] = "residual"):
        super().__init__()
        if hidden not in ("residual", "block_input"):
            raise UserError(f"easy_ep hidden must be 'residual' or 'block_input', not '{hidden}'")
        self.hidden = hidden
        self.needs_residual = hidden == "residual"
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def config(self):
        return {"hidden": self.hidden}

    def on_expert(self, layer, expert, tokens, x, weight, a, y) -> None:
        dt = _acc_dtype(y)
        c = weight.to(dt) * torch.linalg.vector_norm(y.to(dt), dim=1)
        self._pending.append((expert, tokens, c))

    def on_block(self, layer, x, routing, routed, shared) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        h = self.ctx.valid_residual(layer.layer_idx) if self.hidden == "residual" else x
        dt = _acc_dtype(routed)
        h = h.to(dt)
        s = (1 - torch.nn.functional.cosine_similarity(h, h + routed.to(dt), dim=-1)).clamp(min=0)
        experts = torch.cat([torch.full_like(t, e) for e, t, _ in pending])
        rows = self.ctx.rows(torch.cat([t for _, t, _ in pending]))
        c = torch.cat([c for _, _, c in pending])
        self._acc(layer.layer_idx, "score", layer.num_experts).index_add_(0, experts, (c * s[rows]).double())
        self._acc(layer.layer_idx, "gnorm_sum", layer.num_experts).index_add_(0, experts, c.double())

    def score(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "score")

    def gnorm_sum(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "gnorm_sum")


def _widths(layer: MoELayer) -> list[int]:
    return layer.widths()


class _PerChannel(Collector):
    """Per-expert per-channel accumulators stored padded as [E, I_max] plus `widths` [E] (variable widths)."""

    def _channels(self, layer: MoELayer, key: str, reduce: str = "sum") -> torch.Tensor:
        i = layer.layer_idx
        name = f"{i}.{key}"
        if name not in self.state:
            widths = _widths(layer)
            self.state[f"{i}.widths"] = torch.tensor(widths, dtype=torch.int64)
            self.state[name] = torch.zeros(layer.num_experts, max(widths + [0]), dtype=torch.float64)
        return self.state[name]

    def _add(self, layer, expert, key, values: torch.Tensor) -> None:
        row = self._channels(layer, key)[expert]
        row[: values.numel()] += values.double()

    def _max(self, layer, expert, key, values: torch.Tensor) -> None:
        row = self._channels(layer, key)[expert]
        torch.maximum(row[: values.numel()], values.double(), out=row[: values.numel()])

    def _get(self, layer: int, expert: int, key: str) -> torch.Tensor:
        width = int(self.layer_tensor(layer, "widths")[expert])
        return self.layer_tensor(layer, key)[expert, :width]

    def widths(self, layer: int) -> list[int]:
        return self.layer_tensor(layer, "widths").tolist()


@register
class ChannelStats(_PerChannel):
    """CAMERA (arXiv 2508.02322) micro-expert statistics per routed expert and channel j over the tokens routed to
    it: Σ a_j², Σ (g·a_j)² and max |g·a_j|, with a = act(x·gateᵀ)⊙(x·upᵀ) and g the final routing weight. Variable
    widths are stored padded to the layer's widest expert ([E, I_max] + `widths`); accessors slice.

    `shared=True` also records the shared expert's channels (CAMERA ranks them jointly): g = 1 (DeepSeek) or
    sigmoid(shared_expert_gate·x) (Qwen2-MoE), over every valid token, captured by hooks on the shared MLP's
    `down_proj` input and gate output — no recomputation. Never-routed experts: all zeros (max over no token = 0)."""

    name = "channels"
    counts_routed = True

    def __init__(self, shared: bool = True):
        super().__init__()
        self.shared = shared
        self._shared_in: dict[int, torch.Tensor] = {}
        self._shared_gate: dict[int, torch.Tensor] = {}

    def config(self):
        return {"shared": self.shared}

    def on_expert(self, layer, expert, tokens, x, weight, a, y) -> None:
        dt = _acc_dtype(a)
        a = a.to(dt)
        ga = a * weight.to(dt)[:, None]
        self._add(layer, expert, "sum_a2", (a * a).sum(0))
        self._add(layer, expert, "sum_ga2", (ga * ga).sum(0))
        if len(ga):
            self._max(layer, expert, "max_ga", ga.abs().amax(0))
        else:
            self._channels(layer, "max_ga")

    def attach(self, model) -> list:
        if not self.shared:
            return []
        from moecompress.compress.moe import moe_layers

        handles = []
        for layer in moe_layers(model):
            mlp = layer.shared_mlp
            if mlp is None or not hasattr(mlp, "down_proj"):
                continue
            idx = layer.layer_idx

            def grab_input(module, args, idx=idx):
                self._shared_in[idx] = args[0].detach()

            handles.append(mlp.down_proj.register_forward_pre_hook(grab_input))
            if layer.spec.shared == "qwen2":
                def grab_gate(module, args, output, idx=idx):
                    self._shared_gate[idx] = output.detach()

                handles.append(layer.block.shared_expert_gate.register_forward_hook(grab_gate))
        return handles

    def on_block(self, layer, x, routing, routed, shared) -> None:
        i = layer.layer_idx
        a = self._shared_in.pop(i, None)
        gate = self._shared_gate.pop(i, None)
        if a is None:
            return
        a = a.reshape(-1, a.shape[-1])
        dt = _acc_dtype(a)
        a = a.to(dt)
        if self.ctx.keep is not None:
            a = a[self.ctx.keep]
        g = torch.ones(len(a), 1, dtype=dt)
        if gate is not None:
            gate = gate.reshape(-1, 1)
            g = torch.sigmoid((gate[self.ctx.keep] if self.ctx.keep is not None else gate).to(dt))
        ga = a * g
        width = a.shape[-1]
        self._acc(i, "shared.sum_a2", width).add_((a * a).sum(0).double())
        self._acc(i, "shared.sum_ga2", width).add_((ga * ga).sum(0).double())
        acc = self._acc(i, "shared.max_ga", width)
        if len(ga):
            torch.maximum(acc, ga.abs().amax(0).double(), out=acc)
        self._acc(i, "shared.tokens", 1).add_(len(a))

    def sum_a2(self, layer: int, expert: int) -> torch.Tensor:
        return self._get(layer, expert, "sum_a2")

    def sum_ga2(self, layer: int, expert: int) -> torch.Tensor:
        return self._get(layer, expert, "sum_ga2")

    def max_ga(self, layer: int, expert: int) -> torch.Tensor:
        return self._get(layer, expert, "max_ga")

    def _shared(self, layer: int, key: str) -> torch.Tensor | None:
        return self.state.get(f"{layer}.shared.{key}")

    def shared_sum_a2(self, layer: int) -> torch.Tensor | None:
        return self._shared(layer, "sum_a2")

    def shared_sum_ga2(self, layer: int) -> torch.Tensor | None:
        return self._shared(layer, "sum_ga2")

    def shared_max_ga(self, layer: int) -> torch.Tensor | None:
        return self._shared(layer, "max_ga")


def _loss_reduction(collector: str, value: str) -> str:
    if value not in ("sum", "mean"):
        raise UserError(f"{collector} loss_reduction must be 'sum' or 'mean', not '{value}'")
    return value


@register
class ChannelGrads(_PerChannel):
    """HEAPr (arXiv 2509.22299) factorised output-space statistics per routed expert and channel j, over the
    tokens routed to it: Σ (∂L/∂a_j)² (B), Σ a_j² (A) and Σ a_j²·(∂L/∂a_j)² (for the per-token score form), with
    L the next-token cross-entropy **summed** over valid tokens (`loss_reduction="sum"`, so gradient scales are
    comparable across batches; "mean" averages per batch like HF's loss). ∂L/∂a already contains the routing
    weight g, because g multiplies the expert output after down_proj. Needs the backward engine (eval mode, grad
    enabled, parameters frozen). Scores: `heapr_score(l, e)` = ½·mean(A)·mean(B) (product of means, the paper's
    form) or ½·mean(a²·g²) (`form="per_token"`). Never-routed experts: all zeros, score 0."""

    name = "channel_grads"
    needs_grad = True
    counts_routed = True

    def __init__(self, loss_reduction: Literal["sum", "mean"] = "sum"):
        super().__init__()
        self.loss_reduction = _loss_reduction("channel_grads", loss_reduction)

    def config(self):
        return {"loss_reduction": self.loss_reduction}

    def on_expert(self, layer, expert, tokens, x, weight, a, y) -> None:
        dt = _acc_dtype(a)
        a = a.to(dt)
        self._add(layer, expert, "sum_a2", (a * a).sum(0))
        self._channels(layer, "sum_g2")
        self._channels(layer, "sum_a2g2")

    def on_expert_grad(self, layer, expert, a, keep) -> None:
        if not a.requires_grad:
            return
        a_kept = a.detach() if keep is None else a.detach()[keep]

        def hook(grad, layer=layer, expert=expert, a_kept=a_kept):
            g = grad if keep is None else grad[keep]
            dt = _acc_dtype(g)
            g = g.to(dt)
            g2 = g * g
            self._add(layer, expert, "sum_g2", g2.sum(0))
            self._add(layer, expert, "sum_a2g2", (a_kept.to(dt) ** 2 * g2).sum(0))

        a.register_hook(hook)

    def sum_g2(self, layer: int, expert: int) -> torch.Tensor:
        return self._get(layer, expert, "sum_g2")

    def sum_a2(self, layer: int, expert: int) -> torch.Tensor:
        return self._get(layer, expert, "sum_a2")

    def sum_a2g2(self, layer: int, expert: int) -> torch.Tensor:
        return self._get(layer, expert, "sum_a2g2")

    def heapr_score(self, layer: int, expert: int,
                    form: Literal["product_of_means", "per_token"] = "product_of_means") -> torch.Tensor:
        n = float(self.counts(layer)[expert])
        if n == 0:
            return torch.zeros_like(self.sum_g2(layer, expert))
        if form == "per_token":
            return 0.5 * self.sum_a2g2(layer, expert) / n
        return 0.5 * (self.sum_a2(layer, expert) / n) * (self.sum_g2(layer, expert) / n)


@register
class SharedChannelGrads(Collector):
    """HEAPr statistics of each MoE layer's shared expert (`heapr include_shared=True`): per channel Σ a², Σ (∂L/∂a)²
    and Σ a²·(∂L/∂a)² over every valid token, with a the input of the shared MLP's `down_proj` (captured by a
    forward pre-hook; its gradient by a tensor hook, so ∂L/∂a contains the Qwen2-MoE shared-expert gate). Needs
    the backward engine."""

    name = "shared_channel_grads"
    needs_grad = True

    def __init__(self, loss_reduction: Literal["sum", "mean"] = "sum"):
        super().__init__()
        self.loss_reduction = _loss_reduction("shared_channel_grads", loss_reduction)

    def config(self):
        return {"loss_reduction": self.loss_reduction}

    def attach(self, model) -> list:
        from moecompress.compress.moe import moe_layers

        handles = []
        for layer in moe_layers(model):
            mlp = layer.shared_mlp
            if mlp is None:
                continue

            def grab(module, args, idx=layer.layer_idx):
                a = args[0]
                flat = a.reshape(-1, a.shape[-1])
                keep = self.ctx.keep
                dt = torch.float64 if a.dtype == torch.float64 else torch.float32
                kept = (flat if keep is None else flat[keep]).detach().to(dt)
                width = flat.shape[-1]
                self._acc(idx, "sum_a2", width).add_((kept * kept).sum(0).double())
                self._acc(idx, "tokens", 1).add_(len(kept))
                self._acc(idx, "sum_g2", width)
                self._acc(idx, "sum_a2g2", width)
                if a.requires_grad:
                    def on_grad(grad, kept=kept, keep=keep, idx=idx):
                        g = grad.reshape(-1, grad.shape[-1])
                        g = (g if keep is None else g[keep]).to(kept.dtype)
                        g2 = g * g
                        self.state[f"{idx}.sum_g2"].add_(g2.sum(0).double())
                        self.state[f"{idx}.sum_a2g2"].add_((kept * kept * g2).sum(0).double())

                    a.register_hook(on_grad)

            handles.append(mlp.down_proj.register_forward_pre_hook(grab))
        return handles

    def score(self, layer: int, form: str, reduction: str) -> torch.Tensor:
        n = float(self.layer_tensor(layer, "tokens"))
        a2, g2, a2g2 = (self.layer_tensor(layer, k) for k in ("sum_a2", "sum_g2", "sum_a2g2"))
        if n == 0:
            return torch.zeros_like(a2)
        s = 0.5 * a2g2 / n if form == "per_token" else 0.5 * (a2 / n) * (g2 / n)
        return s * n if reduction == "sum" else s


@register
class GramStats(Collector):
    """GPTQ statistics per routed expert over the tokens routed to it: the input Gram matrix XᵀX [H,H] (gate/up
    inputs) and, with `intermediate=True`, the Gram of the intermediate activations AᵀA [I_e,I_e] (down_proj
    inputs; padded to [E, I_max, I_max] for variable widths), plus the token count. Memory is E·H² per layer
    (pitfall 4): restrict `layers` or use `dtype="float32"` for large models, or consume and `drop_layer` each
    layer in a sequential callback. Never-routed experts: zero matrices and count 0 (quantizers fall back to a
    data-free method)."""

    name = "gram"
    counts_routed = True

    def __init__(self, intermediate: bool = False, layers: list[int] | None = None,
                 dtype: Literal["float64", "float32"] = "float64"):
        super().__init__()
        if dtype not in ("float64", "float32"):
            raise UserError(f"gram dtype must be 'float64' or 'float32', not '{dtype}'")
        self.intermediate = intermediate
        self.only = None if layers is None else sorted(int(l) for l in layers)
        self.dtype = dtype

    def config(self):
        return {"intermediate": self.intermediate, "layers": self.only, "dtype": self.dtype}

    def on_expert(self, layer, expert, tokens, x, weight, a, y) -> None:
        i = layer.layer_idx
        if self.only is not None and i not in self.only:
            return
        acc_dtype = getattr(torch, self.dtype)
        dt = _acc_dtype(x)
        x = x.to(dt)
        h = x.shape[-1]
        self._acc(i, "xtx", (layer.num_experts, h, h), acc_dtype)[expert] += (x.T @ x).to(acc_dtype)
        if self.intermediate:
            name = f"{i}.ata"
            if name not in self.state:
                widths = _widths(layer)
                w = max(widths + [0])
                self.state[name] = torch.zeros(layer.num_experts, w, w, dtype=acc_dtype)
                self.state[f"{i}.widths"] = torch.tensor(widths, dtype=torch.int64)
            a = a.to(dt)
            n = a.shape[-1]
            self.state[name][expert, :n, :n] += (a.T @ a).to(acc_dtype)

    def add_counts(self, layer: int, num_experts: int, counts: torch.Tensor) -> None:
        if self.only is None or layer in self.only:
            super().add_counts(layer, num_experts, counts)

    def xtx(self, layer: int, expert: int) -> torch.Tensor:
        return self.layer_tensor(layer, "xtx")[expert]

    def ata(self, layer: int, expert: int) -> torch.Tensor:
        if not self.intermediate:
            raise UserError("the gram collector was run without intermediate=True; no down_proj Gram matrices")
        width = int(self.layer_tensor(layer, "widths")[expert])
        return self.layer_tensor(layer, "ata")[expert, :width, :width]


@register
class BlockIO(Collector):
    """Per MoE layer, a uniform sample (without replacement) of at most `max_tokens` valid tokens: the block
    input x [n,H] (normed MoE input), the block output [n,H] (routed + shared, what the block returns) and the
    token's global index among the valid calibration tokens. Streaming priority sampling: every token draws a key
    from a generator seeded with (seed, layer); the `max_tokens` smallest keys are kept — deterministic, and the
    same in the full and the sequential engine. Stored as float32 (float64 for a float64 model) samples for NAEE
    and reconstruction errors."""

    name = "block_io"

    def __init__(self, max_tokens: int = 2048, seed: int = 0):
        super().__init__()
        if max_tokens < 1:
            raise UserError(f"block_io max_tokens must be ≥ 1, got {max_tokens}")
        self.max_tokens = max_tokens
        self.seed = seed
        self._gens: dict[int, torch.Generator] = {}

    def config(self):
        return {"max_tokens": self.max_tokens, "seed": self.seed}

    def on_block(self, layer, x, routing, routed, shared) -> None:
        i = layer.layer_idx
        gen = self._gens.get(i)
        if gen is None:
            gen = self._gens[i] = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n = len(x)
        keys = torch.rand(n, generator=gen, dtype=torch.float64)
        out = routed if shared is None else routed + shared
        pos = torch.arange(self.ctx.offset, self.ctx.offset + n, dtype=torch.int64)
        names = [f"{i}.{k}" for k in ("key", "input", "output", "position")]
        dt = _acc_dtype(x)
        new = [keys, x.detach().to(dt), out.detach().to(dt), pos]
        if names[0] in self.state:
            new = [torch.cat([self.state[k], v]) for k, v in zip(names, new)]
        if len(new[0]) > self.max_tokens:
            keep = torch.topk(new[0], self.max_tokens, largest=False).indices.sort().values
            new = [v[keep] for v in new]
        for k, v in zip(names, new):
            self.state[k] = v

    def inputs(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "input")

    def outputs(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "output")

    def positions(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "position")


def rarely_routed(routing: Collector, threshold: int = 1) -> dict[int, list[int]]:
    """Per layer, the experts routed fewer than `threshold` tokens (threshold 1 = never routed)."""
    out = {}
    for key, counts in routing.state.items():
        layer, _, what = key.partition(".")
        if what == "count":
            low = (counts < threshold).nonzero().flatten().tolist()
            if low:
                out[int(layer)] = low
    return out
