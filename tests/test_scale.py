"""Real scale on tiny models: the checkpoint's own dtype, sharded streaming checkpoints, layer-by-layer onloading
(statistics, plans and weights equal to the in-memory path), lazy native loading with device maps, the runner
owning every pass, and the bad-input contract of the new flags."""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path

import pytest
import torch

import moecompress
from cli_helpers import run_cli
from moecompress.calibration.engine import run_full, run_sequential
from moecompress.compress.checkpoint import load
from moecompress.compress.onload import layered, materialized_layers
from moecompress.compress.shards import CheckpointReader, to_checkpoint_names
from moecompress.runtime import Runtime
from test_collectors import all_forward, calib_set
from tiny_models import FAMILIES, calibration_file, save_tiny, tokens

CPU32 = Runtime(torch.device("cpu"), torch.float32)


def saved(tmp_path, family, dtype=torch.float32, name="m", **overrides) -> Path:
    path = save_tiny(family, tmp_path / name, **overrides)
    if dtype != torch.float32:
        model = load(path, dtype=torch.float32).to(dtype)
        model.save_pretrained(path)
    return path


def tensors(path: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(path)
    return reader.read(list(reader.files))


def untimed(value):
    """A manifest fragment without wall-time entries (they differ between any two runs)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items() if "seconds" not in k}
    return [untimed(v) for v in value] if isinstance(value, list) else value


def recipe(path, out, method, onload, calib, **stage) -> dict:
    return {"model": {"id": str(path), "onload": onload},
            "calibration": {"source": str(calib), "samples": 6, "seq_len": 24, "cache": False},
            "stages": [{"method": method, **stage}], "output": {"path": str(out)}}


# ----- the layer-by-layer engine ------------------------------------------------------------------------------
class LayerCount:
    """A collector that records the most decoder layers holding real weights while any MoE block runs."""

    name = "layer_count"
    needs_grad = needs_residual = False

    def __init__(self, model):
        self.model, self.most, self.state, self.ctx = model, 0, {}, None

    def attach(self, model):
        return []

    def on_expert(self, *args):
        pass

    def on_block(self, layer, *args):
        self.most = max(self.most, materialized_layers(self.model))

    def add_counts(self, *args):
        pass


@pytest.mark.parametrize("family", FAMILIES)
def test_layered_pass_equals_in_memory_pass(tmp_path, family):
    """Every forward collector, read layer by layer from the shards, equals the whole-model pass (fp32, ≤ 1e-6);
    at most one decoder layer is real at any time, none after the pass."""
    path = saved(tmp_path, family)
    in_memory = load(path, dtype=torch.float32)
    holder = layered(path, CPU32)
    assert materialized_layers(holder.model) == 0
    calib = calib_set()
    full, streamed = all_forward(), all_forward()
    counter = LayerCount(holder.model)
    facts_full = run_full(in_memory, calib, full, batch_size=2)
    facts_layers = run_sequential(holder.model, calib, streamed + [counter], batch_size=2,
                                  layer_access=holder.layer)
    for a, b in zip(full, streamed):
        assert sorted(a.state) == sorted(b.state), a.name
        for key in a.state:
            assert torch.allclose(a.state[key].double(), b.state[key].double(), rtol=1e-6, atol=1e-6), \
                f"{a.name} {key}: {(a.state[key].double() - b.state[key].double()).abs().max()}"
    assert facts_layers["routed_tokens"] == facts_full["routed_tokens"]
    assert counter.most == 1 and materialized_layers(holder.model) == 0
    assert holder.reads == len(holder.model.model.layers)


def test_skeleton_holds_no_decoder_weights(tmp_path):
    path = saved(tmp_path, "qwen2_moe")
    holder = layered(path, CPU32)
    real = [n for n, p in holder.model.named_parameters() if p.device.type != "meta"]
    assert real and not any(n.startswith("model.layers.") for n in real)
    with holder.layer(1) as layer:
        assert materialized_layers(holder.model) == 1 and all(p.device.type == "cpu" for p in layer.parameters())
    assert materialized_layers(holder.model) == 0


# ----- dtype, bytes and shards --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("onload", ["memory", "layers"])
def test_pruned_output_keeps_dtype_bytes_and_shards(tmp_path, family, dtype, onload):
    """A half-precision model pruned by frequency stays in its dtype, its tensor bytes are exactly the input's
    minus the dropped experts', it is sharded under a tiny --max-shard-size, and it round-trips (stock:
    `from_pretrained`) with the logits of the in-memory result."""
    path = saved(tmp_path, family, dtype)
    calib = calibration_file(tmp_path / "calib.txt")
    r = recipe(path, tmp_path / "out", "frequency", onload, calib, ratio=0.25)
    r["output"]["max_shard_size"] = "40KB"
    result = moecompress.run(r)
    out = result.output
    manifest = json.loads((out / "moecompress.json").read_text())
    assert manifest["format"] == "stock" and json.loads((out / "config.json").read_text())["dtype"] == str(
        dtype).removeprefix("torch.")
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    got = tensors(out)
    base_model = load(path)  # the dtype plan transformers loads with (DeepSeek-V3 keeps its router in fp32)
    base = to_checkpoint_names(base_model, base_model.state_dict())
    assert {t.dtype for t in got.values() if t.is_floating_point()} <= {dtype, torch.float32}
    keep = {int(k): v for k, v in manifest["plans"][0]["keep"].items()}
    assert sum(t.numel() * t.element_size() for t in got.values()) == pruned_bytes(base, keep)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    assert reloaded.dtype == dtype
    with torch.no_grad():
        ids = tokens()
        if onload == "memory":
            assert torch.equal(reloaded(ids).logits, result.model(ids).logits)
        else:
            memory = moecompress.run(recipe(path, tmp_path / "mem", "frequency", "memory", calib, ratio=0.25))
            assert torch.equal(reloaded(ids).logits, memory.model(ids).logits)


def pruned_bytes(base: dict[str, torch.Tensor], keep: dict[int, list[int]]) -> int:
    """Tensor bytes of `base` (checkpoint names) with the experts outside `keep` removed: per-expert tensors
    dropped, fused expert tensors and router rows (weight, bias, score-correction bias) cut to the kept share."""
    total = 0
    for name, t in base.items():
        size = t.numel() * t.element_size()
        layer = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if layer in keep:
            per_expert = re.search(r"\.experts\.(\d+)\.", name)
            if per_expert:
                size = size if int(per_expert.group(1)) in keep[layer] else 0
            elif ".experts." in name or re.search(r"\.(gate|router)\.(weight|bias|e_score_correction_bias)$", name):
                size = size * len(keep[layer]) // t.shape[0]
        total += size
    return total


@pytest.mark.parametrize("family", FAMILIES)
def test_native_sharded_round_trip_and_device_maps(tmp_path, family):
    """A native (packed 4-bit) bf16 checkpoint in many shards reloads with the logits of the run's model, plain,
    with device_map='cpu', and with decoder layer 1 offloaded to disk."""
    path = saved(tmp_path, family, torch.bfloat16)
    r = recipe(path, tmp_path / "out", "rtn", "memory", calibration_file(tmp_path / "c.txt"), bits=4)
    r["output"]["max_shard_size"] = "30KB"
    result = moecompress.run(r)
    assert len(list(result.output.glob("model-*.safetensors"))) > 1
    ids = tokens()
    with torch.no_grad():
        want = result.model(ids).logits
        plain = load(result.output)
        assert plain.dtype == torch.bfloat16 and torch.equal(plain(ids).logits, want)
        assert torch.equal(load(result.output, device_map="cpu")(ids).logits, want)
        disk = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
                "model.rotary_emb": "cpu", "lm_head": "cpu"}
        for i in range(2, len(plain.model.layers)):
            disk[f"model.layers.{i}"] = "cpu"
        offloaded = load(result.output, device_map=disk, offload_folder=str(tmp_path / "offload"))
        assert torch.equal(offloaded(ids).logits, want)


# ----- the same plans and weights either way ------------------------------------------------------------------
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "qwen2_moe"])
@pytest.mark.parametrize("method,stage", [("gptq", {"bits": 4, "options": {"group_size": 16, "attn_bits": 8}}),
                                          ("pmq", {"avg_bits": 2.5, "options": {"group_size": 16}}),
                                          ("camera_p", {"ratio": 0.25}),
                                          ("reap", {"ratio": 0.25}), ("naee", {"ratio": 0.25}),
                                          ("rtn", {"bits": 3, "options": {"group_size": 16}})])
def test_layered_run_equals_in_memory_run(tmp_path, family, method, stage):
    """GPTQ, PMQ, CAMERA-P (sequential: they change each layer before the next is calibrated), REAP, NAEE and
    RTN give the same plans and bit-identical tensors whether the model is in memory or read layer by layer."""
    path = saved(tmp_path, family)
    calib = calibration_file(tmp_path / "calib.txt")
    mem = moecompress.run(recipe(path, tmp_path / "mem", method, "memory", calib, **stage))
    lay = moecompress.run(recipe(path, tmp_path / "lay", method, "layers", calib, **stage))
    plans = [untimed(json.loads((r.output / "moecompress.json").read_text())["plans"]) for r in (mem, lay)]
    assert plans[0] == plans[1]
    a, b = tensors(mem.output), tensors(lay.output)
    assert sorted(a) == sorted(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert materialized_layers(lay.model) == 0


def test_multi_stage_layered_recipe_equals_in_memory(tmp_path):
    """prune → quantize with layer-by-layer onloading chains the stages through an intermediate checkpoint,
    removed at the end, and writes what the in-memory run writes."""
    path = saved(tmp_path, "olmoe")
    calib = calibration_file(tmp_path / "calib.txt")
    outs = {}
    for onload in ("memory", "layers"):
        r = recipe(path, tmp_path / onload, "reap", onload, calib, ratio=0.25)
        r["stages"].append({"method": "rtn", "bits": 4, "options": {"group_size": 16}})
        outs[onload] = moecompress.run(r).output
    a, b = tensors(outs["memory"]), tensors(outs["layers"])
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_layered_refusals_are_one_line(tmp_path, capsys):
    path = saved(tmp_path, "qwen3_moe")
    calib = calibration_file(tmp_path / "calib.txt")
    for args in (["prune", path, "-m", "heapr", "--ratio", "0.2"], ["quantize", path, "-m", "bnb-nf4"],
                 ["prune", path, "-m", "eep", "--keep", "6", "--set", "task=reference_mc"]):
        code, out, err = run_cli(capsys, *args, "--data", calib, "--onload", "layers", "-o", tmp_path / "x")
        assert code == 2 and "layer by layer" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x").exists()


# ----- the runner owns every pass ------------------------------------------------------------------------------
def test_no_method_imports_the_runner():
    methods = Path(moecompress.__file__).parent / "methods"
    for file in methods.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.startswith("moecompress.recipes") for n in names), f"{file.name} imports {names}"
            if isinstance(node, ast.Name):
                assert node.id not in ("build_calibration", "run_sequential", "run_full"), file.name


@pytest.mark.parametrize("method,stage,passes", [
    ("pmq", {"avg_bits": 2.5, "options": {"group_size": 16}}, ["sequential", "sequential"]),
    ("gptq", {"bits": 4, "options": {"group_size": 16}}, ["sequential"]),
    ("camera_p", {"ratio": 0.25}, ["sequential"]),
    ("frequency", {"ratio": 0.25}, ["forward"]),
    ("easy_ep", {"ratio": 0.25, "options": {"domains": ["CALIB", "CALIB2"]}}, ["forward", "forward"]),
    ("rtn", {"bits": 4}, []),
])
def test_every_pass_is_in_the_manifest(tmp_path, monkeypatch, method, stage, passes):
    from moecompress.calibration import pipeline

    calls = []
    real = pipeline.run_pass
    monkeypatch.setattr(pipeline, "run_pass", lambda *a, **k: calls.append(a[3].kind) or real(*a, **k))
    path = saved(tmp_path, "qwen3_moe")
    calib, calib2 = calibration_file(tmp_path / "a.txt"), calibration_file(tmp_path / "b.txt")
    options = stage.get("options", {})
    if "domains" in options:
        stage = {**stage, "options": {**options, "domains": [str(calib), str(calib2)]}}
    result = moecompress.run(recipe(path, tmp_path / "out", method, "memory", calib, **stage))
    manifest = json.loads((result.output / "moecompress.json").read_text())
    assert calls == passes and [c["pass"] for c in manifest["calibration"]] == passes
    assert manifest["runtime"]["dtype"] == "float32" and manifest["runtime"]["onload"] == "memory"


def test_output_modes_follow_the_umask(tmp_path):
    path = saved(tmp_path, "qwen3_moe")
    old = os.umask(0o022)
    try:
        out = moecompress.run(recipe(path, tmp_path / "out", "rtn", "memory", "reference", bits=4)).output
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644}


# ----- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags,needle", [
    (["--dtype", "int3"], "dtype 'int3'"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "tpu"], "device 'tpu'"),
    (["--max-memory", "lots"], "--max-memory 'lots'"),
    (["--max-memory", "0=many"], "is not a size"),
    (["--max-shard-size", "big"], "max_shard_size"),
    (["--device-map", "{oops"], "--device-map is not valid JSON"),
    (["--onload", "sometimes"], "onload"),
])
def test_bad_runtime_flags(tmp_path, capsys, flags, needle):
    if flags == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path = saved(tmp_path, "qwen3_moe")
    before = {p: p.read_bytes() for p in path.iterdir()}
    code, out, err = run_cli(capsys, "prune", path, "-m", "frequency", "--ratio", "0.25", "--data",
                             calibration_file(tmp_path / "c.txt"), "-o", tmp_path / "out", *flags)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
    assert {p: p.read_bytes() for p in path.iterdir()} == before


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_activation_checkpointing_gives_the_same_gradient_statistics(family):
    """HEAPr's backward pass with each decoder layer recomputed (activation checkpointing) observes every expert
    once and gives the statistics of the plain backward (float64)."""
    from moecompress.calibration.collectors import ChannelGrads
    from test_collectors import f64_model

    model = f64_model(family)
    plain, recomputed = [ChannelGrads()], [ChannelGrads()]
    facts = run_full(model, calib_set(), plain, batch_size=2, backward=True)
    facts_ckpt = run_full(model, calib_set(), recomputed, batch_size=2, backward=True, checkpoint=True)
    assert facts["routed_tokens"] == facts_ckpt["routed_tokens"] and sorted(plain[0].state) == sorted(
        recomputed[0].state)
    for key, value in plain[0].state.items():
        assert torch.allclose(value, recomputed[0].state[key], rtol=1e-10, atol=1e-12), key
