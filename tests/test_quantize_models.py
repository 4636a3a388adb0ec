"""Quantized models: packed experts behind the stock block, every family reloads with identical logits."""

import json

import pytest
import torch

from cli_helpers import run_cli
from moecompress.compress.checkpoint import MANIFEST, load, save
from moecompress.compress.experts import ExpertList
from moecompress.compress.moe import instrumented, moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.quantize import expert_bits, other_linears, quantize_experts, quantize_other_linears
from tiny_models import FAMILIES, save_tiny, tiny_model, tokens


def logits(model):
    with torch.no_grad():
        return model(tokens()).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_bits_round_trip_every_family(family, tmp_path):
    model = tiny_model(family)
    bits = {l.layer_idx: [(1, 2, 3, 4, 8, 16, 2, 3)[e % 8] for e in range(l.num_experts)] for l in moe_layers(model)}
    quantize_experts(model, bits, group_size=8)
    quantize_other_linears(model, 4, group_size=8)
    assert expert_bits(model) == bits
    assert not other_linears(model)  # every non-router linear is packed now
    out = save(model, tmp_path / "q")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "native" and manifest["structure"]["packed_modules"]
    reloaded = load(out)
    assert torch.equal(logits(reloaded), logits(model))
    assert all(isinstance(l.experts, ExpertList) for l in moe_layers(reloaded))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_eight_bit_rtn_is_close_to_fp32_and_reference_forward_still_exact(family):
    model = tiny_model(family)
    base = logits(model)
    quantize_experts(model, {l.layer_idx: [8] * l.num_experts for l in moe_layers(model)}, group_size=16)
    q = logits(model)
    assert (q - base).abs().max() < 0.02 * base.abs().max()
    with torch.no_grad(), instrumented(model, type("Nop", (), {"on_expert": lambda *a: None,
                                                               "on_block": lambda *a: None})()):
        assert (model(tokens()).logits - q).abs().max() <= 1e-5


def test_routers_and_embeddings_stay_dense():
    model = tiny_model("qwen2_moe")
    quantize_experts(model, {l.layer_idx: [4] * 8 for l in moe_layers(model)}, group_size=8)
    quantize_other_linears(model, 4, group_size=8)
    for layer in moe_layers(model):
        assert type(layer.router).__name__.endswith("Router")
        assert isinstance(layer.block.shared_expert_gate, torch.nn.Linear)
        assert isinstance(layer.block.shared_expert.gate_proj, PackedLinear)
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, PackedLinear)


def test_quantize_cli_rtn(tmp_path, capsys):
    model_dir = save_tiny("mixtral", tmp_path / "m")
    code, out, err = run_cli(capsys, "quantize", model_dir, "-m", "rtn", "--bits", 3, "--group-size", 8,
                             "--attn-bits", 4, "-o", tmp_path / "q")
    assert code == 0, err
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert manifest["plans"][0]["bits"] == {"0": [3] * 8, "1": [3] * 8}
    model = load(tmp_path / "q")
    assert expert_bits(model) == {0: [3] * 8, 1: [3] * 8}
    code, _, err = run_cli(capsys, "quantize", model_dir, "-m", "rtn", "-o", tmp_path / "q2")
    assert code == 2 and "--bits" in err and not (tmp_path / "q2").exists()
