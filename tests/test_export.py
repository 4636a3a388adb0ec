"""Deployable exports (compressed-tensors, hf), serving targets, and native checkpoints that say what they are."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from cli_helpers import run_cli
from tiny_models import FAMILIES, FAMILY_CONFIGS, save_tiny, tokens

from moecompress.compress.checkpoint import load

# Hidden 32 and an expert width of 32 so that group size 32 (a size vLLM serves) divides every linear.
WIDE = {"moe_intermediate_size": 32, "intermediate_size": 32, "shared_expert_intermediate_size": 32,
        "kv_lora_rank": 32, "q_lora_rank": 32}
CT_FAMILIES = [f for f in FAMILIES if f != "gpt_oss"]  # gpt_oss checkpoints store experts fused: refused


def _tiny(tmp_path, family, **overrides):
    kwargs = {k: v for k, v in WIDE.items() if FAMILY_CONFIGS[family].get(k, 0) is not None and
              k in FAMILY_CONFIGS[family]}
    return save_tiny(family, tmp_path / f"{family}-base", **{**kwargs, **overrides})


def _stock_logits(path, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(ids).logits


def _logits(path, ids):
    with torch.no_grad():
        return load(path)(ids).logits


def _files(path):
    return sorted(p.relative_to(path) for p in path.rglob("*")) if path.exists() else []


# ----- compressed-tensors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", CT_FAMILIES)
def test_compressed_tensors_loads_in_transformers_with_the_same_logits(family, tmp_path, capsys):
    base = _tiny(tmp_path, family)
    native = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", base, "-m", "rtn", "--bits", "4", "--group-size", "32",
                           "--attn-bits", "8", "--set", "sym=true", "-o", native)
    assert code == 0, err
    out = tmp_path / "ct"
    code, _, err = run_cli(capsys, "export", native, "--format", "compressed-tensors", "-o", out)
    assert code == 0, err
    ids = tokens()
    # transformers dequantizes the experts while loading, computes in fp32 like moecompress: equal to fp32 rounding
    torch.testing.assert_close(_stock_logits(out, ids), _logits(native, ids), rtol=1e-4, atol=1e-5)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == family
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    assert "lm_head" in q["ignore"]


def test_compressed_tensors_tensors_match_the_library_packer(tmp_path, capsys):
    """weight_packed / weight_scale are what compressed-tensors' own compressor writes for the same codes."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    base = _tiny(tmp_path, "qwen3_moe")
    native, out = tmp_path / "q", tmp_path / "ct"
    assert run_cli(capsys, "quantize", base, "-m", "rtn", "--bits", "3", "--group-size", "32", "--set", "sym=true",
                   "-o", native)[0] == 0
    assert run_cli(capsys, "export", native, "--format", "compressed-tensors", "-o", out)[0] == 0
    model = load(native)
    linear = model.model.layers[1].mlp.experts[5].down_proj
    with safe_open(out / "model.safetensors", "pt") as f:
        name = "model.layers.1.mlp.experts.5.down_proj"
        packed, scale = f.get_tensor(f"{name}.weight_packed"), f.get_tensor(f"{name}.weight_scale")
        assert f.get_tensor(f"{name}.weight_shape").tolist() == [32, 32]
        assert f"{name}.weight_zero_point" not in f.keys()  # symmetric
    signed = unpack_from_int32(packed, 3, torch.Size([32, 32]))
    dense = scale.float().repeat_interleave(32, dim=1) * signed.float()
    assert torch.equal(dense, linear.dense_weight())


def test_one_scheme_targets_linear_and_several_get_expert_regexes(tmp_path, capsys):
    base = _tiny(tmp_path, "mixtral")
    one, two = tmp_path / "one", tmp_path / "two"
    assert run_cli(capsys, "quantize", base, "-m", "rtn", "--bits", "4", "--group-size", "32", "--set", "sym=true",
                   "--format", "compressed-tensors", "-o", one)[0] == 0
    q = json.loads((one / "config.json").read_text())["quantization_config"]
    assert [g["targets"] for g in q["config_groups"].values()] == [["Linear"]]
    assert r"re:.*\.self_attn\.q_proj$" in q["ignore"]  # unquantized attention is named, not assumed
    assert run_cli(capsys, "quantize", base, "-m", "rtn", "--bits", "4", "--group-size", "32", "--attn-bits", "8",
                   "--set", "sym=true", "--format", "compressed-tensors", "-o", two)[0] == 0
    q = json.loads((two / "config.json").read_text())["quantization_config"]
    groups = list(q["config_groups"].values())
    assert groups[0]["targets"][0].startswith("re:") and "experts" in groups[0]["targets"][0]
    assert groups[0]["weights"]["num_bits"] == 4 and groups[1] == {**groups[1], "targets": ["Linear"]}
    assert groups[1]["weights"]["num_bits"] == 8
    with safe_open(two / "model.safetensors", "pt") as f:  # Mixtral's hub names: w1 / w3 / w2
        assert "model.layers.0.block_sparse_moe.experts.3.w1.weight_packed" in f.keys()


@pytest.mark.parametrize("args, says", [
    (["-m", "rtn", "--bits", "4", "--group-size", "32"], "asymmetric"),
    (["-m", "rtn", "--bits", "1", "--group-size", "32"], "1-bit"),
    (["-m", "rtn", "--bits", "4", "--group-size", "64", "--set", "sym=true"], "does not divide"),
    (["-m", "pmq", "--avg-bits", "2.5", "--group-size", "32", "--set", "sym=true"], "several schemes"),
])
def test_compressed_tensors_refusals_write_nothing(args, says, tmp_path, capsys):
    base = _tiny(tmp_path, "qwen3_moe")
    native, out = tmp_path / "q", tmp_path / "ct"
    code, _, err = run_cli(capsys, "quantize", base, *args, "--data", "reference", "--samples", "4", "--seq-len",
                           "32", "-o", native)
    assert code == 0, err
    before = {p: p.read_bytes() for p in native.iterdir()}
    code, stdout, err = run_cli(capsys, "export", native, "--format", "compressed-tensors", "-o", out)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".ct*"))
    assert {p: p.read_bytes() for p in native.iterdir()} == before


def test_export_never_overwrites_its_source(tmp_path, capsys):
    base = _tiny(tmp_path, "qwen3_moe")
    before = _files(base)
    code, _, err = run_cli(capsys, "export", base, "--format", "hf", "-o", base, "--overwrite")
    assert code == 2 and "input model" in err
    assert _files(base) == before


# ----- hf (dequantized stock) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_hf_export_of_quantized_model_is_stock_with_the_same_logits(family, tmp_path, capsys):
    base = _tiny(tmp_path, family)
    native, out = tmp_path / "q", tmp_path / "hf"
    assert run_cli(capsys, "quantize", base, "-m", "rtn", "--bits", "3", "--group-size", "32", "-o", native)[0] == 0
    code, _, err = run_cli(capsys, "export", native, "--format", "hf", "-o", out)
    assert code == 0, err
    ids = tokens()
    torch.testing.assert_close(_stock_logits(out, ids), _logits(native, ids), rtol=1e-5, atol=1e-6)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_hf_export_zero_pads_variable_widths_exactly(tmp_path, capsys):
    base = _tiny(tmp_path, "qwen3_moe")
    native, out = tmp_path / "p", tmp_path / "hf"
    code, _, err = run_cli(capsys, "prune", base, "-m", "camera_p", "--ratio", "0.4", "--samples", "4",
                           "--seq-len", "32", "-o", native)
    assert code == 0, err
    assert json.loads((native / "moecompress.json").read_text())["format"] == "native"
    assert run_cli(capsys, "export", native, "--format", "hf", "-o", out)[0] == 0
    ids = tokens()
    torch.testing.assert_close(_stock_logits(out, ids), _logits(native, ids), rtol=1e-5, atol=1e-6)


# ----- native checkpoints say what they are --------------------------------------------------------------------
def test_native_checkpoint_is_refused_by_stock_transformers_naming_moecompress(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    base = _tiny(tmp_path, "qwen3_moe")
    native = tmp_path / "q"
    assert run_cli(capsys, "quantize", base, "-m", "rtn", "--bits", "4", "--group-size", "32", "-o", native)[0] == 0
    config = json.loads((native / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "moecompress"
    assert "moecompress export" in config["quantization_config"]["export_with"]
    with pytest.raises(ValueError, match="moecompress"):
        AutoModelForCausalLM.from_pretrained(native)
    assert load(native).config.model_type == "qwen3_moe"  # moecompress reads it back as the base family


# ----- targets -------------------------------------------------------------------------------------------------
def test_target_vllm_writes_a_servable_compressed_tensors_checkpoint(tmp_path, capsys):
    base = _tiny(tmp_path, "qwen3_moe")
    out = tmp_path / "served"
    code, stdout, err = run_cli(capsys, "quantize", base, "-m", "rtn", "--bits", "4", "--group-size", "32",
                                "--target", "vllm", "-o", out)
    assert code == 0, err
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    weights = q["config_groups"]["group_0"]["weights"]
    assert weights["symmetric"] is True and weights["num_bits"] == 4 and weights["group_size"] == 32
    assert not list(tmp_path.glob(".served*"))  # the intermediate native checkpoint is gone
    assert _stock_logits(out, tokens()).isfinite().all()


@pytest.mark.parametrize("args, says", [
    (["-m", "rtn", "--bits", "3", "--target", "vllm"], "4/8-bit"),
    (["-m", "pmq", "--avg-bits", "2.5", "--target", "sglang"], "different widths"),
    (["-m", "bnb-nf4", "--target", "vllm"], "cannot serve"),
    (["-m", "rtn", "--bits", "4", "--target", "vllm", "--set", "sym=false"], "symmetric"),
    (["-m", "rtn", "--bits", "4", "--target", "llamacpp", "--group-size", "128"], "group sizes"),
    (["-m", "rtn", "--bits", "4", "--target", "vllm", "--format", "gguf"], "drop one"),
    (["-m", "rtn", "--bits", "4", "--target", "tgi"], "target"),
])
def test_target_refusals_are_one_line_and_write_nothing(args, says, tmp_path, capsys):
    base = _tiny(tmp_path, "qwen3_moe")
    out = tmp_path / "served"
    code, _, err = run_cli(capsys, "quantize", base, *args, "-o", out)
    assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not list(tmp_path.glob(".served*"))
