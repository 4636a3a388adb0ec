"""`moecompress export --format gguf`: the file gguf-py reads back holds the source's values (bit-exact where the
block arithmetic is the same, within the reported error where not), llama.cpp's names and metadata, the tokenizer,
and what GGUF cannot express is refused in one line before anything is written.

The expected tensors are built here from the reloaded checkpoint through the MoE view (`MoELayer.expert_weights`,
dequantized), not through the exporter's own layout code, under llama.cpp's tensor names written out by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_helpers import run_cli
from tiny_models import CORPUS, calibration_file, save_tiny

gguf = pytest.importorskip("gguf")

from moecompress.compress.checkpoint import load  # noqa: E402
from moecompress.compress.experts import dense_weight  # noqa: E402
from moecompress.compress.moe import decoder_layers, moe_layers  # noqa: E402

ARCH = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "mixtral": "llama"}
FAMILIES = sorted(ARCH)
VOCAB = 320
# expert (and shared-expert) widths of 32 so that down_proj rows are whole 32-value blocks; OLMoE without GQA
# (llama.cpp's olmoe normalises K over the full width)
WIDE = {"qwen3_moe": dict(moe_intermediate_size=32), "mixtral": dict(intermediate_size=32),
        "qwen2_moe": dict(moe_intermediate_size=32, shared_expert_intermediate_size=32),
        "olmoe": dict(intermediate_size=32, num_key_value_heads=4)}


def byte_level_tokenizer():
    """A small byte-level BPE like moecompress's reference tokenizer: single digits, then ByteLevel."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   clean_up_tokenization_spaces=False)


def make(family, path, **overrides):
    save_tiny(family, path, vocab_size=VOCAB, **{**WIDE[family], **overrides})
    byte_level_tokenizer().save_pretrained(path)
    return path


def export(capsys, src, out, *sets):
    code, stdout, err = run_cli(capsys, "export", src, "--format", "gguf", "-o", out,
                                *[a for s in sets for a in ("--set", s)])
    assert code == 0, err
    return json.loads((out / "moecompress-export.json").read_text())


def read(out):
    """{name: (type name, dequantized float32 array in PyTorch order)}, and the reader (metadata)."""
    reader = gguf.GGUFReader(out / "model.gguf")
    tensors = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = (t.tensor_type.name, values.reshape(tuple(int(n) for n in reversed(t.shape))))
    return tensors, reader


def field(reader, key):
    f = reader.fields[key]
    if len(f.types) > 1 or f.types[0] == gguf.GGUFValueType.ARRAY:
        return [f.contents(i) for i in range(len(f.data))]
    return f.contents()


def permute(w, heads):
    """llama.cpp's Q/K row order for the llama architecture (HF's rotary halves interleaved per head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected(ckpt, arch):
    """llama.cpp tensor name → the source's float32 values (packed weights dequantized)."""
    model = load(ckpt).float()
    config = model.config

    def w(module):
        return dense_weight(module).detach().float().numpy()

    out = {"token_embd.weight": model.model.embed_tokens.weight, "output_norm.weight": model.model.norm.weight}
    out = {k: v.detach().numpy() for k, v in out.items()}
    out["output.weight"] = w(model.lm_head)
    views = {l.layer_idx: l for l in moe_layers(model)}
    for i, block in enumerate(decoder_layers(model)):
        attn, b = block.self_attn, f"blk.{i}."
        out[b + "attn_norm.weight"] = block.input_layernorm.weight.detach().numpy()
        out[b + "ffn_norm.weight"] = block.post_attention_layernorm.weight.detach().numpy()
        for ours, theirs in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"),
                             ("attn_output", "o_proj")):
            linear = getattr(attn, theirs)
            out[b + ours + ".weight"] = w(linear)
            if getattr(linear, "bias", None) is not None:
                out[b + ours + ".bias"] = linear.bias.detach().float().numpy()
        for ours, theirs in (("attn_q_norm", "q_norm"), ("attn_k_norm", "k_norm")):
            if hasattr(attn, theirs):
                out[b + ours + ".weight"] = getattr(attn, theirs).weight.detach().numpy()
        layer = views[i]
        out[b + "ffn_gate_inp.weight"] = layer.router_weight.detach().float().numpy()
        experts = [layer.expert_weights(e) for e in range(layer.num_experts)]
        for ours, part in (("ffn_gate_exps", "gate"), ("ffn_up_exps", "up"), ("ffn_down_exps", "down")):
            out[b + ours + ".weight"] = np.stack([getattr(x, part).detach().float().numpy() for x in experts])
        if arch == "qwen2moe":
            shared = layer.shared_mlp
            for ours, theirs in (("ffn_gate_shexp", "gate_proj"), ("ffn_up_shexp", "up_proj"),
                                 ("ffn_down_shexp", "down_proj")):
                out[b + ours + ".weight"] = w(getattr(shared, theirs))
            out[b + "ffn_gate_inp_shexp.weight"] = layer.block.shared_expert_gate.weight.detach().numpy()
        if arch == "llama":
            for key, heads in (("attn_q", config.num_attention_heads), ("attn_k", config.num_key_value_heads)):
                out[b + key + ".weight"] = permute(out[b + key + ".weight"], heads)
    return out


def assert_metadata(reader, arch, ckpt, experts=8):
    config = json.loads((ckpt / "config.json").read_text())
    assert field(reader, "general.architecture") == arch
    assert field(reader, f"{arch}.block_count") == config["num_hidden_layers"]
    assert field(reader, f"{arch}.expert_count") == experts
    assert field(reader, f"{arch}.expert_used_count") == config["num_experts_per_tok"]
    assert field(reader, f"{arch}.context_length") == config["max_position_embeddings"]
    assert field(reader, f"{arch}.embedding_length") == config["hidden_size"]
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "smollm"
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == VOCAB == len(field(reader, "tokenizer.ggml.token_type"))
    assert tokens[:3] == ["<s>", "</s>", "<pad>"]
    assert field(reader, "tokenizer.ggml.token_type")[:4] == [3, 3, 3, 1]  # CONTROL ×3, NORMAL
    assert len(field(reader, "tokenizer.ggml.merges")) > 0
    assert field(reader, "tokenizer.ggml.eos_token_id") == 1


def assert_equal(tensors, want, exact=True, atol=0.0):
    assert sorted(tensors) == sorted(want)
    for name, (_, got) in tensors.items():
        assert got.shape == want[name].shape, name
        if exact:
            assert np.array_equal(got, want[name]), name
        else:
            np.testing.assert_allclose(got, want[name], rtol=0, atol=atol, err_msg=name)


# ----- quantized exports: exact block mappings ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_sym4_g32_is_q4_0_bit_exact(family, tmp_path, capsys):
    src = make(family, tmp_path / "model")
    code, _, err = run_cli(capsys, "quantize", src, "-m", "rtn", "--bits", 4, "--group-size", 32,
                           "--set", "sym=true", "-o", tmp_path / "q")
    assert code == 0, err
    summary = export(capsys, tmp_path / "q", tmp_path / "g")
    tensors, reader = read(tmp_path / "g")
    arch = ARCH[family]
    assert_metadata(reader, arch, tmp_path / "q")
    want = expected(tmp_path / "q", arch)
    assert_equal(tensors, want)
    for name, (kind, _) in tensors.items():
        assert kind == ("Q4_0" if "_exps." in name else "F32"), name
    assert summary["mapped_exactly"] == 6 and summary["requantized"] == {} and summary["max_abs_error"] == 0
    assert summary["types"] == dict(sorted({"Q4_0": 6, "F32": len(tensors) - 6}.items()))


# a group of 64 (or a whole row) spans whole 32-value blocks: each block takes its group's scale
@pytest.mark.parametrize("bits,sym,group,qtype", [(8, True, 64, "Q8_0"), (5, True, 64, "Q5_0"),
                                                  (4, True, -1, "Q4_0"), (4, False, 64, "Q4_1"),
                                                  (5, False, 32, "Q5_1")])
def test_other_exact_block_types(bits, sym, group, qtype, tmp_path, capsys):
    src = make("qwen3_moe", tmp_path / "model")
    code, _, err = run_cli(capsys, "quantize", src, "-m", "rtn", "--bits", bits, "--group-size", group,
                           "--set", f"sym={str(sym).lower()}", "-o", tmp_path / "q")
    assert code == 0, err
    summary = export(capsys, tmp_path / "q", tmp_path / "g")
    tensors, _ = read(tmp_path / "g")
    want = expected(tmp_path / "q", "qwen3moe")
    rounded, worst = 0, 0.0
    for name, (kind, got) in tensors.items():
        if "_exps." not in name:
            assert kind == "F32" and np.array_equal(got, want[name]), name
            continue
        assert kind == qtype, name
        differ = (got != want[name]).reshape(-1, 32).any(axis=1)
        rounded += int(differ.sum())
        worst = max(worst, float(np.abs(got - want[name]).max()))
    if sym:  # d = s: the same product
        assert rounded == 0 and summary["mapped_exactly"] == 6 and summary["max_abs_error"] == 0
    else:  # m = −s·z in fp16: rounds where s·z needs more than fp16's 11 bits; counted and measured
        assert summary["rounded_blocks"] == rounded and summary["max_abs_error"] == pytest.approx(worst)
        assert worst < 1e-3
    assert summary["requantized"] == {}


@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_scale_dtype_rounding_is_counted(scale_dtype, tmp_path, capsys):
    """GGUF's d is fp16: bf16 scales of these magnitudes are fp16 numbers (8 ≤ 11 mantissa bits), fp32 ones round
    — the export counts the blocks that changed and reports the largest change."""
    src = make("qwen3_moe", tmp_path / "model")
    q = tmp_path / "q"
    code, _, err = run_cli(capsys, "quantize", src, "-m", "rtn", "--bits", 4, "--group-size", 32,
                           "--set", "sym=true", "--set", f"scale_dtype={scale_dtype}", "-o", q)
    assert code == 0, err
    summary = export(capsys, q, tmp_path / "g")
    tensors, _ = read(tmp_path / "g")
    want = expected(q, "qwen3moe")
    for name in tensors:
        if "_exps." not in name:
            assert np.array_equal(tensors[name][1], want[name]), name
    experts = [n for n in tensors if "_exps." in n]
    rounded = sum(int((tensors[n][1] != want[n]).reshape(-1, 32).any(axis=1).sum()) for n in experts)
    worst = max(float(np.abs(tensors[n][1] - want[n]).max()) for n in experts)
    assert summary["rounded_blocks"] == rounded and summary["max_abs_error"] == pytest.approx(worst)
    assert {tensors[n][0] for n in tensors if "_exps." in n} == {"Q4_0"}
    if scale_dtype == "bfloat16":
        assert rounded == 0 and summary["mapped_exactly"] == 6
    else:
        assert rounded > 0 and summary["mapped_rounded"] == 6 and worst < 1e-3


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_quantized_attention_and_shared_expert(family, tmp_path, capsys):
    """Packed linears outside the experts map the same way: Mixtral's Q/K rows permuted as blocks (llama
    architecture), Qwen2-MoE's attention biases beside them and its shared expert."""
    src = make(family, tmp_path / "model")
    code, _, err = run_cli(capsys, "quantize", src, "-m", "rtn", "--bits", 4, "--group-size", 32, "--attn-bits", 8,
                           "--set", "sym=true", "-o", tmp_path / "q")
    assert code == 0, err
    summary = export(capsys, tmp_path / "q", tmp_path / "g")
    tensors, _ = read(tmp_path / "g")
    assert_equal(tensors, expected(tmp_path / "q", ARCH[family]))
    assert tensors["blk.0.attn_q.weight"][0] == "Q8_0" and tensors["blk.1.attn_k.weight"][0] == "Q8_0"
    if family == "qwen2_moe":
        assert tensors["blk.0.attn_q.bias"][0] == "F32" and tensors["blk.0.ffn_down_shexp.weight"][0] == "Q8_0"
    assert summary["requantized"] == {} and summary["max_abs_error"] == 0


# ----- requantized --------------------------------------------------------------------------------------------
def test_requantized_is_reported(tmp_path, capsys):
    src = make("qwen3_moe", tmp_path / "model", moe_intermediate_size=16)  # down_proj rows of 16: no 32-blocks
    code, _, err = run_cli(capsys, "quantize", src, "-m", "rtn", "--bits", 3, "--group-size", 16,
                           "-o", tmp_path / "q")
    assert code == 0, err
    summary = export(capsys, tmp_path / "q", tmp_path / "g")
    tensors, _ = read(tmp_path / "g")
    want = expected(tmp_path / "q", "qwen3moe")
    kinds = {name: kind for name, (kind, _) in tensors.items() if "_exps." in name}
    # gate/up: 3 bits → the default requantize type; down: rows of 16 cannot be Q8_0 → F16, as the converter does
    assert {k for n, k in kinds.items() if "down" not in n} == {"Q8_0"}
    assert {k for n, k in kinds.items() if "down" in n} == {"F16"}
    assert summary["requantized"] == {"F16": 2, "Q8_0": 4} and summary["mapped_exactly"] == 0
    assert any("3-bit" in r for r in summary["requantize_reasons"])
    worst = 0.0
    for name, (kind, got) in tensors.items():
        if "_exps." not in name:
            assert np.array_equal(got, want[name]), name
            continue
        err_ = np.abs(got - want[name])
        blocks = np.abs(want[name]).reshape(-1, 16 if kind == "F16" else 32).max(axis=1, keepdims=True)
        bound = blocks / (2048 if kind == "F16" else 127)  # half a step of the new grid, with margin
        assert (err_.reshape(blocks.shape[0], -1) <= bound + 1e-7).all(), name
        worst = max(worst, float(err_.max()))
    assert summary["max_abs_error"] == pytest.approx(worst) and worst > 0

    summary = export(capsys, tmp_path / "q", tmp_path / "g32", "requantize=f32")
    tensors, _ = read(tmp_path / "g32")
    assert_equal(tensors, want)  # F32 holds the dequantized values exactly
    assert summary["requantized"] == {"F32": 6}


def test_act_order_and_mixed_schemes_are_requantized(tmp_path, capsys):
    src = make("qwen3_moe", tmp_path / "model")
    code, _, err = run_cli(capsys, "quantize", src, "-m", "gptq", "--bits", 4, "--group-size", 32, "--set", "sym=true",
                           "--set", "act_order=true", "--data", calibration_file(tmp_path / "calib.txt"),
                           "--samples", 6, "--seq-len", 24, "-o", tmp_path / "q")
    assert code == 0, err
    summary = export(capsys, tmp_path / "q", tmp_path / "g", "requantize=Q8_0")
    tensors, _ = read(tmp_path / "g")
    want = expected(tmp_path / "q", "qwen3moe")
    assert summary["requantized"] == {"Q8_0": 6}
    assert all("act-order" in reason for reason in summary["requantize_reasons"])  # GPTQ's own RTN fallback too
    worst = max(float(np.abs(tensors[n][1] - want[n]).max()) for n in tensors if "_exps." in n)
    assert summary["max_abs_error"] == pytest.approx(worst) and 0 < worst < 0.01


# ----- stock checkpoints --------------------------------------------------------------------------------------
def test_pruned_stock_checkpoint_exports_f32(tmp_path, capsys):
    src = make("qwen2_moe", tmp_path / "model")
    code, _, err = run_cli(capsys, "prune", src, "-m", "frequency", "--ratio", 0.25, "--data",
                           calibration_file(tmp_path / "calib.txt"), "--samples", 8, "--seq-len", 32,
                           "-o", tmp_path / "p")
    assert code == 0, err
    summary = export(capsys, tmp_path / "p", tmp_path / "g")
    tensors, reader = read(tmp_path / "g")
    assert_metadata(reader, "qwen2moe", tmp_path / "p", experts=6)
    assert_equal(tensors, expected(tmp_path / "p", "qwen2moe"))
    assert {kind for kind, _ in tensors.values()} == {"F32"}
    assert tensors["blk.0.ffn_gate_exps.weight"][1].shape == (6, 32, 32)
    assert summary["dense_tensors"] == len(tensors) and summary["requantized"] == {}


@pytest.mark.parametrize("dtype,kind", [(torch.float16, "F16"), (torch.bfloat16, "BF16")])
def test_half_models_keep_their_dtype(dtype, kind, tmp_path, capsys):
    from tiny_models import tiny_model

    model = tiny_model("mixtral", vocab_size=VOCAB, **WIDE["mixtral"]).to(dtype)
    model.config.eos_token_id = 1
    model.save_pretrained(tmp_path / "model")
    byte_level_tokenizer().save_pretrained(tmp_path / "model")
    export(capsys, tmp_path / "model", tmp_path / "g")
    tensors, reader = read(tmp_path / "g")
    assert field(reader, "llama.rope.dimension_count") == 8 and field(reader, "llama.vocab_size") == VOCAB
    for name, (got, _) in tensors.items():
        assert got == ("F32" if name.endswith("norm.weight") or "ffn_gate_inp" in name else kind), name
    assert_equal(tensors, expected(tmp_path / "model", "llama"))


def test_tied_embeddings(tmp_path, capsys):
    src = make("qwen2_moe", tmp_path / "model", tie_word_embeddings=True)
    export(capsys, src, tmp_path / "g")
    tensors, _ = read(tmp_path / "g")  # qwen2moe needs output.weight: the embedding, written again
    assert np.array_equal(tensors["output.weight"][1], tensors["token_embd.weight"][1])


# ----- refusals -----------------------------------------------------------------------------------------------
def assert_refused(capsys, src, out, pattern, *sets):
    code, stdout, err = run_cli(capsys, "export", src, "--format", "gguf", "-o", out,
                                *[a for s in sets for a in ("--set", s)])
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2, (code, stdout, err)
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert pattern.lower() in lines[0].lower(), lines[0]
    assert not out.exists()


def test_refusals(tmp_path, capsys):
    deepseek = tmp_path / "deepseek"
    save_tiny("deepseek_v3", deepseek)
    byte_level_tokenizer().save_pretrained(deepseek)
    assert_refused(capsys, deepseek, tmp_path / "o1", "supported families: mixtral, olmoe, qwen2_moe, qwen3_moe")

    src = make("qwen3_moe", tmp_path / "model")
    data = calibration_file(tmp_path / "calib.txt")
    common = ["--data", data, "--samples", 6, "--seq-len", 24]
    code, _, err = run_cli(capsys, "prune", src, "-m", "easy_ep", "--ratio", 0.25, *common,
                           "--set", "deploy=masked", "-o", tmp_path / "masked")
    assert code == 0, err
    assert_refused(capsys, tmp_path / "masked", tmp_path / "o2", "masked router")
    code, _, err = run_cli(capsys, "prune", src, "-m", "heapr", "--ratio", 0.3, *common, "--set", "round_to=4",
                           "-o", tmp_path / "widths")
    assert code == 0, err
    assert_refused(capsys, tmp_path / "widths", tmp_path / "o3", "one expert width")

    assert_refused(capsys, src, tmp_path / "o5", "requantize='q3_k'", "requantize=q3_k")
    assert_refused(capsys, src, tmp_path / "o6", "unknown gguf option", "bogus=1")
    norm = make("qwen3_moe", tmp_path / "nonorm", norm_topk_prob=False)
    assert_refused(capsys, norm, tmp_path / "o7", "renormalise")
    gqa = make("olmoe", tmp_path / "gqa", num_key_value_heads=2)
    assert_refused(capsys, gqa, tmp_path / "o8", "grouped-query")

    whitespace = tmp_path / "whitespace"
    save_tiny("qwen3_moe", whitespace)  # the tiny models' BPE over whitespace-split words
    assert_refused(capsys, whitespace, tmp_path / "o9", "not byte-level")
    assert_refused(capsys, whitespace, tmp_path / "o9", "not byte-level", "pre=gpt-2")  # no override makes it so
    summary = export(capsys, src, tmp_path / "o10", "pre=qwen2")  # the recorded pre-tokenizer can be overridden
    assert summary["tokenizer_pre"] == "qwen2"


def test_never_overwrites_the_source(tmp_path, capsys):
    src = make("qwen3_moe", tmp_path / "model")
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    code, _, err = run_cli(capsys, "export", src, "--format", "gguf", "-o", src, "--overwrite")
    assert code == 2 and "choose another -o path" in err and "Traceback" not in err
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before


def test_memory_is_one_layer_at_a_time(tmp_path, capsys, monkeypatch):
    """The data are read layer by layer: never more than one decoder layer real while the file is written."""
    from moecompress.compress import onload
    from moecompress.export import gguf_file

    src = make("qwen3_moe", tmp_path / "model", num_hidden_layers=3)
    seen = []
    encode = gguf_file.GGUFWriter._encode

    def spy(self, entry, parts, outside):
        seen.append(onload.materialized_layers(self.model))
        return encode(self, entry, parts, outside)

    monkeypatch.setattr(gguf_file.GGUFWriter, "_encode", spy)
    export(capsys, src, tmp_path / "g")
    assert seen and max(seen) <= 1
    tensors, _ = read(tmp_path / "g")
    assert sum(name.endswith("ffn_up_exps.weight") for name in tensors) == 3


def test_target_llamacpp_quantizes_to_an_exact_q4_0_gguf(tmp_path, capsys):
    """`quantize --target llamacpp` picks symmetric 4-bit groups of 32 and writes the GGUF (Q4_0, exact)."""
    src = make("qwen3_moe", tmp_path / "model")
    code, _, err = run_cli(capsys, "quantize", src, "-m", "rtn", "--bits", 4, "--target", "llamacpp",
                           "-o", tmp_path / "g")
    assert code == 0, err
    tensors, _ = read(tmp_path / "g")
    assert {kind for name, (kind, _) in tensors.items() if "_exps." in name} == {"Q4_0"}
    summary = json.loads((tmp_path / "g" / "moecompress-export.json").read_text())
    assert summary["requantized"] == {} and summary["max_abs_error"] == 0
    assert not list(tmp_path.glob(".g*"))  # the intermediate native checkpoint is gone
