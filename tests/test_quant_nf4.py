"""bitsandbytes baseline on CPU (baselines.md §12): NF4 and LLM.int8 wrappers, and their native checkpoints."""

import json
import struct

import pytest
import torch

from moecompress.errors import UserError
from tiny_models import FAMILIES, calibration_file, save_tiny, tiny_model, tokens

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bf  # noqa: E402

from moecompress.compress.checkpoint import MANIFEST, WEIGHTS, load, save  # noqa: E402
from moecompress.compress.moe import moe_layers  # noqa: E402
from moecompress.compress.quant.nf4 import BnbLinear, linearise_bnb  # noqa: E402
from moecompress.compress.quantize import expert_bits  # noqa: E402
from moecompress.methods.bnb import quantize_bnb  # noqa: E402


def test_nf4_linear_on_cpu():
    g = torch.Generator().manual_seed(0)
    W, b, x = torch.randn(64, 200, generator=g), torch.randn(64, generator=g), torch.randn(5, 200, generator=g)
    m = linearise_bnb(W, "nf4", bias=b, compute_dtype=torch.float32)
    assert isinstance(m, bnb.nn.Linear4bit) and m.weight.dtype == torch.uint8
    assert m.weight.quant_state.quant_type == "nf4" and m.weight.quant_state.blocksize == 64
    deq = bf.dequantize_4bit(m.weight.data, m.weight.quant_state).float()
    assert 0.05 < float((deq - W).norm() / W.norm()) < 0.12  # 16 NF4 levels, absmax block 64
    y = m(x)
    assert torch.allclose(y, x @ deq.T + b, atol=1e-4)
    assert m(x.bfloat16()).dtype == torch.bfloat16  # default compute dtype path


def test_int8_linear_on_cpu():
    g = torch.Generator().manual_seed(1)
    W, x = torch.randn(32, 96, generator=g), torch.randn(4, 96, generator=g)
    m = linearise_bnb(W, "int8")
    assert isinstance(m, bnb.nn.Linear8bitLt) and m.weight.dtype == torch.int8
    ref = x @ W.T
    assert float((m(x).float() - ref).norm() / ref.norm()) < 2e-2


def test_unknown_kind():
    with pytest.raises(UserError):
        linearise_bnb(torch.randn(4, 8), "nf3")


def test_nf4_eval_mode_keeps_the_canonical_layout():
    """bitsandbytes 0.50's AVX512-BF16 CPU path (bf16 absmax, out_features % 32 == 0 only) is never taken: in eval
    mode too the forward is dequantize + matmul, dense_weight is what it uses, and state_dict changes nothing."""
    g = torch.Generator().manual_seed(2)
    W, x = torch.randn(40, 128, generator=g), torch.randn(3, 128, generator=g)  # 40 rows: not a multiple of 32
    m = BnbLinear.from_weight(W, "nf4").eval()
    before = m.dense_weight().clone()
    y = m(x)
    assert torch.equal(m.dense_weight(), before) and torch.allclose(y, x @ before.T, atol=1e-5)
    m.state_dict()
    assert torch.equal(m(x), y)


# ----- checkpoints ----------------------------------------------------------------------------------------------
def _logits(model):
    with torch.no_grad():
        return model(tokens()).logits


def _expert_linears(model):
    return [getattr(mlp, n) for layer in moe_layers(model) for mlp in layer.experts
            for n in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("kind", ["nf4", "int8"])
@pytest.mark.parametrize("family", FAMILIES)
def test_bnb_checkpoint_reloads_with_identical_logits(family, kind, tmp_path):
    model = quantize_bnb(tiny_model(family), kind)
    before = _logits(model)
    save(model, tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / MANIFEST).read_text())
    assert manifest["format"] == "native"
    linears = next(iter(manifest["structure"]["layers"].values()))["linears"]
    assert {lin["gate_proj"]["kind"] for lin in linears} == {"bnb"}
    reloaded = load(tmp_path / "q")
    assert expert_bits(reloaded) == expert_bits(model)
    assert all(torch.equal(a.dense_weight(), b.dense_weight())
               for a, b in zip(_expert_linears(model), _expert_linears(reloaded)))
    assert torch.equal(_logits(reloaded), before) and torch.equal(_logits(model), before)


def test_bnb_double_quant_checkpoint(tmp_path):
    model = quantize_bnb(tiny_model("mixtral"), "nf4", double_quant=True, compute_dtype="bfloat16")
    before = _logits(model)
    save(model, tmp_path / "q")
    reloaded = load(tmp_path / "q")
    lin = _expert_linears(reloaded)[0]
    assert lin.inner.weight.quant_state.nested and lin.inner.compute_dtype == torch.bfloat16
    assert torch.equal(_logits(reloaded), before)


def _expert_bytes(path) -> tuple[int, dict[str, int]]:
    """Bytes of the routed-expert tensors in a checkpoint's safetensors file (from its header), in all and by name
    within an expert linear ("inner.weight", "inner.SCB", …)."""
    raw = (path / WEIGHTS).read_bytes()
    header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
    total, by_name = 0, {}
    for name, info in header.items():
        if ".experts." in name:
            size = info["data_offsets"][1] - info["data_offsets"][0]
            total += size
            within = name.split(".experts.")[1].split(".", 2)[-1]  # after "{e}.gate_proj."
            by_name[within] = by_name.get(within, 0) + size
    return total, by_name


def test_bnb_checkpoint_stores_the_quantized_bytes(tmp_path):
    """Expert linears of 64 x 64 (4096 weights, 2 layers x 8 experts x 3): NF4 stores 4-bit codes + one fp32 absmax
    per 64 weights (+ a 16-entry code book and a small quant-state record per linear), int8 its codes + fp32 row
    scales; the report's storage bits follow the bytes."""
    from moecompress.evals.report import size_facts

    shape = dict(hidden_size=64, moe_intermediate_size=64)
    n = 2 * 8 * 3 * 64 * 64
    save(tiny_model("qwen3_moe", **shape), tmp_path / "fp")  # stock: fp32 experts
    assert _expert_bytes(tmp_path / "fp")[0] == 4 * n
    for kind, codes, scales, low, high in (("nf4", n // 2, 4 * n // 64, 4.5, 4.8),
                                           ("int8", n, 4 * n // 64, 8.5, 8.51)):
        model = quantize_bnb(tiny_model("qwen3_moe", **shape), kind)
        save(model, tmp_path / kind)
        total, by_name = _expert_bytes(tmp_path / kind)
        assert by_name["inner.weight"] == codes
        assert by_name["inner.weight.absmax" if kind == "nf4" else "inner.SCB"] == scales
        assert low <= 8 * total / n < high, (kind, 8 * total / n)
        facts = size_facts(load(tmp_path / kind), tmp_path / kind)
        assert facts["parameters_routed_experts"] == n and facts["routed_expert_bits"] == (4 if kind == "nf4" else 8)
        assert low <= facts["routed_expert_storage_bits"] < high
        assert facts["expert_bits"] == [[facts["routed_expert_bits"]] * 8] * 2


def test_bnb_checkpoint_missing_tensor_is_one_line_error(tmp_path):
    from safetensors.torch import load_file, save_file

    save(quantize_bnb(tiny_model("olmoe"), "nf4"), tmp_path / "q")
    state = load_file(str(tmp_path / "q" / WEIGHTS))
    del state[next(k for k in state if k.endswith("experts.0.up_proj.inner.weight.absmax"))]
    save_file(state, str(tmp_path / "q" / WEIGHTS))
    with pytest.raises(UserError, match="lacks 'inner.weight.absmax'"):
        load(tmp_path / "q")


def test_prune_then_bnb_recipe_saves_and_reloads(tmp_path):
    from moecompress.recipes.run import run
    from moecompress.recipes.schema import parse_recipe

    save_tiny("deepseek_v3", tmp_path / "m")
    calibration_file(tmp_path / "calib.txt")
    res = run(parse_recipe({
        "model": str(tmp_path / "m"),
        "calibration": {"source": str(tmp_path / "calib.txt"), "samples": 8, "seq_len": 32, "cache": False},
        "stages": [{"method": "frequency", "ratio": 0.5}, {"method": "bnb-int8"}],
        "output": {"path": str(tmp_path / "q")}}))
    reloaded = load(tmp_path / "q")
    assert expert_bits(reloaded) == expert_bits(res.model) == {1: [8] * 4, 2: [8] * 4}
    assert torch.equal(_logits(reloaded), _logits(res.model))


def test_cli_quantize_bnb_then_eval(tiny_reference, reference_env, tmp_path, capsys):
    from cli_helpers import run_cli

    code, out, err = run_cli(capsys, "quantize", tiny_reference, "-m", "bnb-nf4", "-o", tmp_path / "q")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", tmp_path / "q", "--tasks", "reference_facts_ppl", "--limit", 4,
                             "-o", tmp_path / "report")
    assert code == 0, err
    facts = json.loads((tmp_path / "report" / "report.json").read_text())["facts"]
    assert facts["routed_expert_bits"] == 4 and 4.5 <= facts["routed_expert_storage_bits"] < 5
    assert facts["weight_bytes_on_disk"] < (tiny_reference / "model.safetensors").stat().st_size
