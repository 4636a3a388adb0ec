"""Checkpoints: stock results reload in a process without moecompress; native ones reload with moecompress.load;
writes are atomic and refuse to clobber inputs."""

import json

import pytest
import torch

from cli_helpers import assert_same_logits_across_processes, logits_without_moecompress
from moecompress.compress.checkpoint import MANIFEST, WEIGHTS, is_stock, load, save
from moecompress.compress.moe import moe_layers
from moecompress.compress.surgery import keep_channels, keep_experts, merge_experts
from moecompress.errors import UserError
from tiny_models import FAMILIES, tiny_model, tokens


def logits(model):
    with torch.no_grad():
        return model(tokens()).logits


def reload_without_moecompress(path, tmp_path):
    return logits_without_moecompress(path, tokens(), tmp_path)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_uniform_result_is_stock_and_reloads_without_moecompress(family, tmp_path):
    model = tiny_model(family)
    keep_experts(model, {l.layer_idx: [0, 1, 4, 5] for l in moe_layers(model)})
    assert is_stock(model)
    out = save(model, tmp_path / "out")
    assert json.loads((out / MANIFEST).read_text())["format"] == "stock"
    assert_same_logits_across_processes(reload_without_moecompress(out, tmp_path), logits(model))


@pytest.mark.parametrize("family", FAMILIES)
def test_native_checkpoint_round_trip(family, tmp_path):
    model = tiny_model(family)
    layers = moe_layers(model)
    keep_experts(model, {layers[0].layer_idx: [0, 1, 4, 5]})  # non-uniform counts across layers
    channels = {l.layer_idx: {e: list(range(0, w, 1 + e % 3)) for e, w in enumerate(l.widths())}
                for l in moe_layers(model)}
    channels[layers[-1].layer_idx][2] = []  # a width-0 expert
    keep_channels(model, channels)
    assert not is_stock(model)
    out = save(model, tmp_path / "out")
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "native" and (out / WEIGHTS).exists()
    reloaded = load(out)
    assert torch.equal(logits(reloaded), logits(model))
    assert [l.widths() for l in moe_layers(reloaded)] == [l.widths() for l in moe_layers(model)]


def test_mapped_router_round_trip(tmp_path):
    model = tiny_model("mixtral")
    merge = torch.eye(8)[[0, 1, 2, 3]] * 0.7 + torch.eye(8)[[4, 5, 6, 7]] * 0.3
    for layer in moe_layers(model):
        merge_experts(model, layer.layer_idx, merge)
    out = save(model, tmp_path / "out")
    assert torch.equal(logits(load(out)), logits(model))


def test_output_rules(tmp_path):
    model = tiny_model("olmoe")
    src = save(model, tmp_path / "src")
    with pytest.raises(UserError, match="inside the input"):
        save(model, src, source=src)
    with pytest.raises(UserError, match="inside the input"):
        save(model, src / "sub", source=src)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    with pytest.raises(UserError, match="--overwrite"):
        save(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    save(model, tmp_path / "busy", overwrite=True)
    assert not (tmp_path / "busy" / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model("olmoe")
    monkeypatch.setattr("moecompress.compress.shards._Shard.close", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError("boom")))  # the shard's data is on disk, its header never written
    with pytest.raises(RuntimeError):
        save(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_safetensors_is_a_user_error(tmp_path):
    model = tiny_model("mixtral")
    keep_channels(model, {l.layer_idx: {0: [0, 1]} for l in moe_layers(model)})
    out = save(model, tmp_path / "out")
    data = (out / WEIGHTS).read_bytes()
    (out / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt|cannot read"):
        load(out)
    stock = save(tiny_model("mixtral"), tmp_path / "stock")
    weights = next(stock.glob("*.safetensors"))
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="corrupt|cannot read"):
        load(stock)
