"""The reference (instrumented) forward equals the stock forward on every family — what every statistic rests on."""

import pytest
import torch

from moecompress.compress.moe import instrumented, moe_layers
from tiny_models import FAMILIES, tiny_model, tokens


class Recorder:
    def __init__(self):
        self.expert_tokens = {}
        self.blocks = 0

    def on_expert(self, layer, expert, tokens, x, weight, a, y):
        self.expert_tokens[(layer.layer_idx, expert)] = self.expert_tokens.get((layer.layer_idx, expert), 0) + len(tokens)

    def on_block(self, layer, x, routing, routed, shared):
        self.blocks += 1


def _norm_variants(family):
    if family in ("qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"):
        return [dict(norm_topk_prob=True), dict(norm_topk_prob=False)]
    if family == "deepseek_v2":
        return [dict(topk_method="greedy"), dict(topk_method="group_limited_greedy")]
    return [dict()]


CASES = [(f, o) for f in FAMILIES for o in _norm_variants(f)]


@pytest.mark.parametrize("family,overrides", CASES, ids=[f"{f}-{o}" for f, o in CASES])
def test_reference_forward_equals_stock(family, overrides):
    model = tiny_model(family, **overrides)
    ids = tokens()
    with torch.no_grad():
        stock = model(ids).logits
        rec = Recorder()
        with instrumented(model, rec) as layers:
            ref = model(ids).logits
    assert (ref - stock).abs().max().item() <= 1e-5
    assert rec.blocks == len(layers)
    # coverage: every valid token was routed to exactly top_k experts in every layer
    for layer in layers:
        routed = sum(n for (l, _), n in rec.expert_tokens.items() if l == layer.layer_idx)
        assert routed == ids.numel() * layer.top_k
    # the swap is undone
    with torch.no_grad():
        assert torch.equal(model(ids).logits, stock)


@pytest.mark.parametrize("family", FAMILIES)
def test_view_reassembles_expert_outputs(family):
    """Per-expert weights from the view reproduce the stock experts module on one-hot routing."""
    model = tiny_model(family)
    layer = moe_layers(model)[0]
    x = torch.randn(5, model.config.hidden_size)
    for e in range(layer.num_experts):
        idx = torch.full((5, 1), e)
        w = torch.ones(5, 1)
        with torch.no_grad():
            stock = layer.experts(x, idx, w)
            ew = layer.expert_weights(e)
            ref = torch.nn.functional.linear(layer.expert_intermediate(ew, x), ew.down, ew.down_bias)
        assert torch.allclose(stock, ref, atol=1e-5)
