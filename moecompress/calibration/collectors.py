"""Streaming statistics gathered by the reference forward. One pass fills every collector a method asked for.

A collector keeps O(E) / O(E·I) / O(E·H²) state per layer — never token buffers unless that is its purpose —
and exposes its state as a flat `{name: tensor}` dict so the cache can store it as safetensors.
"""

from __future__ import annotations

import torch

from moecompress.compress.moe import MoELayer, Routing

COLLECTORS: dict[str, type["Collector"]] = {}


def register(cls):
    COLLECTORS[cls.name] = cls
    return cls


class Collector:
    """Base: no-op hooks, a flat tensor state, a config that keys the cache."""

    name = "base"

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def config(self) -> dict:
        return {}

    def on_expert(self, layer: MoELayer, expert: int, tokens, x, weight, a, y) -> None:
        pass

    def on_block(self, layer: MoELayer, x, routing: Routing, routed, shared) -> None:
        pass

    def layer_tensor(self, layer: int, key: str) -> torch.Tensor:
        return self.state[f"{layer}.{key}"]

    def _acc(self, layer: int, key: str, shape) -> torch.Tensor:
        """The float64 accumulator `{layer}.{key}`, created as zeros on first use."""
        name = f"{layer}.{key}"
        if name not in self.state:
            self.state[name] = torch.zeros(shape, dtype=torch.float64)
        return self.state[name]


@register
class RoutingCounts(Collector):
    """Per layer and expert: routed token count, summed final routing weight (EASY-EP's "gating score"), summed
    router probability over all tokens (EEP's "soft activation"; softmax, or the sigmoid score for
    DeepSeek-V3), and the number of valid tokens seen."""

    name = "routing"

    def on_block(self, layer, x, routing, routed, shared) -> None:
        n = layer.num_experts
        i = layer.layer_idx
        index = routing.index.reshape(-1)
        weight = routing.weights.reshape(-1).detach().double()
        self._acc(i, "count", n).index_add_(0, index, torch.ones_like(weight))
        self._acc(i, "weight_sum", n).index_add_(0, index, weight)
        logits = routing.logits.detach().double()
        probs = torch.sigmoid(logits) if layer.spec.routing == "deepseek_v3" else torch.softmax(logits, dim=-1)
        self._acc(i, "prob_sum", n).add_(probs.sum(dim=0))
        self._acc(i, "tokens", 1).add_(len(x))

    def counts(self, layer: int) -> torch.Tensor:
        return self.layer_tensor(layer, "count")


def rarely_routed(routing: RoutingCounts, threshold: int = 1) -> dict[int, list[int]]:
    """Per layer, the experts routed fewer than `threshold` tokens (threshold 1 = never routed)."""
    out = {}
    for key, counts in routing.state.items():
        layer, _, what = key.partition(".")
        if what == "count":
            low = (counts < threshold).nonzero().flatten().tolist()
            if low:
                out[int(layer)] = low
    return out
