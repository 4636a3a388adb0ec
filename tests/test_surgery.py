"""Surgery: keep-everything is the identity, slicing equals masking where the family's semantics allow it,
channel slicing is exact, merges with one-hot maps equal selections, every bad request fails before any change."""

import copy

import pytest
import torch

from moecompress.compress.experts import ExpertList
from moecompress.compress.moe import moe_layers
from moecompress.compress.surgery import keep_channels, keep_experts, merge_experts, set_top_k
from moecompress.errors import UserError
from tiny_models import FAMILIES, tiny_model, tokens


def logits(model, ids=None):
    with torch.no_grad():
        return model(tokens() if ids is None else ids).logits


def all_kept(model):
    return {l.layer_idx: list(range(l.num_experts)) for l in moe_layers(model)}


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_experts_is_identity(family):
    model = tiny_model(family)
    before = logits(model)
    keep_experts(model, all_kept(model))
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_channels_is_identity_and_fuses_back(family):
    model = tiny_model(family)
    before = logits(model)
    layers = moe_layers(model)
    experts_cls = type(layers[0].experts)
    channels = {l.layer_idx: {e: list(range(w)) for e, w in enumerate(l.widths())} for l in layers}
    shared = {l.layer_idx: list(range(l.shared_mlp.gate_proj.out_features)) for l in layers if l.shared_mlp}
    keep_channels(model, channels, shared)
    assert all(type(l.experts) is experts_cls for l in moe_layers(model))  # uniform widths → stock module again
    assert torch.allclose(logits(model), before, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_variable_widths_equal_zeroed_channels(family):
    """Dropping channels == zeroing their gate/up rows and down column (SiLU(0)·0 = 0) in the original model."""
    model = tiny_model(family)
    zeroed = copy.deepcopy(model)
    layers = moe_layers(model)
    channels = {}
    for layer in layers:
        per_expert = {}
        for e, width in enumerate(layer.widths()):
            kept = [c for c in range(width) if (c + e) % 3 != 0]
            if e == 1:
                kept = []  # an expert may reach width 0: it stays routable and contributes nothing
            per_expert[e] = kept
        channels[layer.layer_idx] = per_expert
    keep_channels(model, channels)
    assert all(isinstance(l.experts, ExpertList) for l in moe_layers(model))
    with torch.no_grad():
        for layer in moe_layers(zeroed):
            for e, kept in channels[layer.layer_idx].items():
                drop = [c for c in range(layer.widths()[e]) if c not in kept]
                w = layer.expert_weights(e)
                w.gate[drop] = 0
                w.up[drop] = 0
                if w.gate_bias is not None:
                    w.gate_bias[drop] = 0
                    w.up_bias[drop] = 0
                    if family == "gpt_oss":  # (up+1)·glu(gate): glu(0)=0 so the channel is exactly zero
                        pass
                w.down[:, drop] = 0
    assert torch.allclose(logits(model), logits(zeroed), atol=1e-5)
    assert moe_layers(model)[0].widths()[1] == 0


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_slicing_equals_masking_for_renormalised_routers(family):
    """With renormalised top-k, dropping experts == routing the original block with the dropped logits at -inf."""
    extra = {"norm_topk_prob": True} if family == "qwen3_moe" else {}
    model, original = tiny_model(family, **extra), tiny_model(family, **extra)
    keep = [0, 2, 3, 5, 6, 7]
    keep_experts(model, {l.layer_idx: keep for l in moe_layers(model)})
    x = torch.randn(20, model.config.hidden_size)
    for sliced, full in zip(moe_layers(model), moe_layers(original)):
        with torch.no_grad():
            got = sliced.block(x[None])
            got = got[0] if isinstance(got, tuple) else got
            logits = torch.nn.functional.linear(x, full.router.weight, full.router_bias)
            logits[:, [e for e in range(8) if e not in keep]] = float("-inf")
            if family == "gpt_oss":  # top-k on logits, softmax over the selected
                value, index = logits.topk(full.top_k, dim=-1)
                weight = value.softmax(dim=-1)
            else:
                value, index = logits.softmax(dim=-1).topk(full.top_k, dim=-1)
                weight = value / value.sum(dim=-1, keepdim=True)
            want = full.experts(x, index, weight)
        assert torch.allclose(got[0], want, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_experts_bookkeeping_and_output_router_logits(family):
    model = tiny_model(family)
    spec_layers = moe_layers(model)
    keep = [0, 1, 4, 5] if family.startswith("deepseek") else [1, 3, 5, 6]
    keep_experts(model, {l.layer_idx: keep for l in spec_layers})
    for layer in moe_layers(model):
        assert layer.num_experts == 4
        assert layer.widths() == [layer.widths()[0]] * 4
    assert getattr(model.config, spec_layers[0].spec.count_key) == 4
    with torch.no_grad():
        out = model(tokens(), output_router_logits=True, labels=tokens())
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_group_rule_fails_fast(family):
    model = tiny_model(family)
    before = logits(model)
    layers = moe_layers(model)
    with pytest.raises(UserError, match="group"):
        keep_experts(model, {l.layer_idx: [0, 1, 2, 4] for l in layers})  # 3 from group 0, 1 from group 1
    assert torch.equal(logits(model), before)  # nothing changed


@pytest.mark.parametrize("family", FAMILIES)
def test_top_k_above_kept_fails_fast(family):
    model = tiny_model(family)
    with pytest.raises(UserError, match="top_k"):
        keep_experts(model, {moe_layers(model)[0].layer_idx: [4]})
    with pytest.raises(UserError, match="top_k|sparsemixer"):
        set_top_k(model, 9)


@pytest.mark.parametrize("family", FAMILIES)
def test_set_top_k(family):
    model = tiny_model(family)
    if family == "phimoe":  # sparsemixer is hard-wired to top-2
        with pytest.raises(UserError, match="sparsemixer"):
            set_top_k(model, 1)
        return
    set_top_k(model, 1)
    assert model.config.num_experts_per_tok == 1
    assert all(l.top_k == 1 for l in moe_layers(model))
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_one_hot_merge_equals_keep(family):
    a, b = tiny_model(family), tiny_model(family)
    keep = [0, 1, 4, 5]
    keep_experts(a, {l.layer_idx: keep for l in moe_layers(a)})
    for layer in moe_layers(b):
        merge_experts(b, layer.layer_idx, torch.eye(8)[keep])
    assert torch.allclose(logits(a), logits(b), atol=1e-6)


def test_real_valued_merge_uses_mapped_router():
    model = tiny_model("mixtral")
    merge = torch.eye(8)[[0, 1, 2, 3]] * 0.75 + torch.eye(8)[[4, 5, 6, 7]] * 0.25
    for layer in moe_layers(model):
        merge_experts(model, layer.layer_idx, merge)
    layer = moe_layers(model)[0]
    assert type(layer.router).__name__ == "MappedRouter" and layer.num_experts == 4
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_no_reroute_equals_zeroing_pruned_experts(family):
    """no_reroute: route exactly as the full model; pruned experts contribute nothing (their weights zeroed)."""
    from moecompress.compress.surgery import mask_experts

    model, zeroed = tiny_model(family), tiny_model(family)
    keep = [0, 1, 2, 5, 6]
    mask_experts(model, {l.layer_idx: keep for l in moe_layers(model)}, "no_reroute")
    with torch.no_grad():
        for layer in moe_layers(zeroed):
            for e in range(8):
                if e not in keep:
                    w = layer.expert_weights(e)
                    w.down.zero_()
                    if w.down_bias is not None:
                        w.down_bias.zero_()
    assert all(l.num_experts == 5 for l in moe_layers(model))
    assert torch.allclose(logits(model), logits(zeroed), atol=1e-5)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "phimoe"])
@pytest.mark.parametrize("mode", ["masked", "no_reroute"])
def test_masking_nothing_is_identity(family, mode):
    """The masked router's own reimplementation of each family's routing equals the stock router."""
    from moecompress.compress.surgery import mask_experts

    model = tiny_model(family)
    before = logits(model)
    mask_experts(model, {l.layer_idx: list(range(8)) for l in moe_layers(model)}, mode)
    assert torch.allclose(logits(model), before, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "gpt_oss"])
def test_masked_router_equals_slicing_for_renormalised_routers(family):
    from moecompress.compress.surgery import mask_experts

    extra = {"norm_topk_prob": True} if family in ("qwen3_moe", "olmoe", "qwen2_moe") else {}
    masked, sliced = tiny_model(family, **extra), tiny_model(family, **extra)
    keep = [0, 2, 3, 5, 7]
    mask_experts(masked, {l.layer_idx: keep for l in moe_layers(masked)}, "masked")
    keep_experts(sliced, {l.layer_idx: keep for l in moe_layers(sliced)})
    assert torch.allclose(logits(masked), logits(sliced), atol=1e-5)


def test_masked_deepseek_v3_uneven_groups_round_trip(tmp_path):
    """The paper's uniform top-M on a group-limited router: uneven groups, full router masked; native checkpoint."""
    from moecompress.compress.checkpoint import load, save
    from moecompress.compress.surgery import mask_experts

    model = tiny_model("deepseek_v3")
    mask_experts(model, {l.layer_idx: [0, 1, 2, 6] for l in moe_layers(model)}, "masked")  # 3 + 1 per group
    ids = tokens()
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert torch.isfinite(out.logits).all()
    assert torch.equal(load(save(model, tmp_path / "m")).forward(ids).logits, out.logits)
