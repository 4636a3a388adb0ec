"""Compressing an MoE checkpoint larger than RAM, layer by layer, through the `moecompress` CLI (`--onload layers`).

    python benchmarks/bench_scale.py                         # everything: ~2 h on 2 cores, needs ~70 GB of free disk
    python benchmarks/bench_scale.py --only reap,depth       # a subset of: reap, frequency, rtn, gptq, depth
    python benchmarks/bench_scale.py --quick                 # tiny widths, the whole script as a smoke test: ~5 min
    python benchmarks/bench_scale.py --json scale.json       # also write every number to a JSON file
    python benchmarks/bench_scale.py --self-test             # only this script's own checks (below): ~1 min

What it does, top to bottom:

1. Writes a synthetic bf16 **Qwen3-MoE** checkpoint with Qwen3-30B-A3B's widths (hidden 2048, 128 experts of width
   768, top-8, 32 query / 4 key-value heads of 128; 1.25 GB per decoder layer) and the fewest decoder layers that
   reach 36 GB on disk (29 layers, 36.2 GB; the machine this was written on has 24 GiB of RAM). It is written one
   decoder layer at a time, never whole in memory: one safetensors shard per decoder layer plus one for the
   embeddings / final norm / lm_head, the hub's per-expert tensor names, an index, `config.json` and the project's
   byte-level BPE tokenizer (`moecompress.reference`). Weights are seeded random normals: 4-6 s to generate and 3-4 s
   to write per layer on 2 cores.
2. Runs the CLI on it, each run a subprocess with a cold page cache and its own empty `MOECOMPRESS_HOME`:
   REAP 50 % and frequency 25 % pruning, RTN 4-bit, GPTQ 4-bit (on a 6-layer model), and REAP 50 % on 4-, 8- and
   16-layer models (is the peak memory flat in depth?). Each model is deleted once its runs are done, each output
   once it is checked.
3. Measures per run: the wall time; the peak RSS of the CLI process (ru_maxrss, through a small wrapper process, so
   that this script's own memory does not leak into it; also split into anonymous and file-mapped pages by
   sampling); output bytes ÷ theoretical bytes (pruning: the input minus the dropped experts' tensors and router
   rows; 4-bit: codes plus an fp16 scale and zero point per 128 weights for every routed-expert linear, the rest
   as stored); for pruning, the logits of the output against the input with the same experts sliced by hand (4 × 64
   tokens, through this script's own layer-streaming forward of stock transformers modules) and wall ÷ (reading the
   input once + one plain layer-by-layer bf16 forward of the same calibration tokens).
4. Prints a Markdown table with pass/fail per row against the targets, and deletes everything it wrote (also on
   failure or Ctrl-C) unless `--keep`.

Before any of it, a self-test (seconds, on a 3-layer model of small widths) checks what the verdicts rest on: the
writer's files load with `AutoModelForCausalLM.from_pretrained` (no missing or unexpected weights); the streaming
forward equals from_pretrained's logits (fp32 and bf16, both experts implementations, whole and with experts sliced
by hand; one swapped expert is well outside the tolerance); per-expert and fused tensor names both load; the
pruning theory equals the bytes of a hand-sliced `save_pretrained` checkpoint; the RSS wrapper measures a child
holding 400 MiB as ~410 MiB.

Targets: peak RSS ≤ 6 GiB (pruning, RTN), ≤ 10 GiB (GPTQ); output ÷ theory ≤ 1.02; pruned logits = hand-sliced
logits (max|Δ| ≤ 1 % of max|logit|); peak RSS flat in depth within 10 %; pruning wall ÷ (read + forward) ≤ 1.3.
Times depend on what else runs on the machine: the JSON records the load average after each measurement. With
`--quick`, wall ÷ (read + forward) and output ÷ theory are reported but not judged (the CLI's start-up and fixed
per-file overheads dominate a 10 MB checkpoint).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).parent / "moecompress")  # the venv's entry point, next to its python
DEFAULT_WORK = REPO / ".bench-scale"
ONLOAD_FLAGS = ["--onload", "layers"]  # how every run asks the CLI to stream the model

GB, GiB = 1e9, 2**30
MAIN_MODEL_MIN_BYTES = 36 * GB  # the main model: the fewest layers reaching this on disk
DEPTHS = (4, 8, 16)
GPTQ_LAYERS = 6

# Targets.
RSS_LIMIT = {"prune": 6 * GiB, "rtn": 6 * GiB, "gptq": 10 * GiB}
OUT_THEORY_MAX = 1.02
RSS_FLATNESS_MAX = 0.10  # (max - min) / min of the depth runs' peak RSS
WALL_RATIO_MAX = 1.3
LOGITS_REL_MAX = 0.01  # max|Δ| / max|logit|: a few bf16 roundings (2^-8); one wrong expert in one layer gives ~0.06

# Widths. FULL = Qwen3-30B-A3B's; QUICK = a smoke test.
FULL = dict(hidden=2048, experts=128, moe_intermediate=768, top_k=8, heads=32, kv_heads=4, head_dim=128)
QUICK = dict(hidden=256, experts=16, moe_intermediate=64, top_k=4, heads=4, kv_heads=2, head_dim=64)
SELF_TEST = dict(hidden=256, experts=16, moe_intermediate=64, top_k=4, heads=4, kv_heads=2, head_dim=64)


# ================================================================================================================
# 1. The synthetic checkpoint
# ================================================================================================================
def reference_tokenizer(vocab: int | None = None):
    """The project's byte-level BPE tokenizer, trained on its bundled public-domain corpus (cached after once)."""
    from moecompress.reference.tokenizer import VOCAB_SIZE, load_tokenizer

    return load_tokenizer(vocab or VOCAB_SIZE)


def synthetic_config(num_layers: int, vocab_size: int, tokenizer=None, *, hidden, experts, moe_intermediate, top_k,
                     heads, kv_heads, head_dim):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=6144, moe_intermediate_size=moe_intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        num_experts=experts, num_experts_per_tok=top_k, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, dtype="bfloat16",
        bos_token_id=getattr(tokenizer, "bos_token_id", None), eos_token_id=getattr(tokenizer, "eos_token_id", None),
        pad_token_id=getattr(tokenizer, "pad_token_id", None),
    )
    config.architectures = ["Qwen3MoeForCausalLM"]
    return config


def layer_shapes(config, i: int) -> dict[str, tuple[int, ...]]:
    """Decoder layer i's tensors in the hub's naming (per-expert), in the order they are generated and written."""
    H, I, E, hd = config.hidden_size, config.moe_intermediate_size, config.num_experts, config.head_dim
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    p = f"model.layers.{i}."
    shapes = {
        p + "input_layernorm.weight": (H,),
        p + "self_attn.q_proj.weight": (q, H),
        p + "self_attn.k_proj.weight": (kv, H),
        p + "self_attn.v_proj.weight": (kv, H),
        p + "self_attn.o_proj.weight": (H, q),
        p + "self_attn.q_norm.weight": (hd,),
        p + "self_attn.k_norm.weight": (hd,),
        p + "post_attention_layernorm.weight": (H,),
        p + "mlp.gate.weight": (E, H),
    }
    for e in range(E):
        shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (I, H)
        shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (I, H)
        shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (H, I)
    return shapes


def outer_shapes(config) -> dict[str, tuple[int, ...]]:
    V, H = config.vocab_size, config.hidden_size
    return {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}


def checkpoint_bytes(config) -> int:
    """Bytes of all tensors (bf16) of a checkpoint with this config, without writing it."""
    shapes = dict(outer_shapes(config))
    per_layer = sum(math.prod(s) for s in layer_shapes(config, 0).values())
    return 2 * (sum(math.prod(s) for s in shapes.values()) + config.num_hidden_layers * per_layer)


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """bf16 tensors: norms = 1; linears and embeddings ~ N(0, 0.02); router row e ~ N(0, σ_e²), σ_e log-normal around
    0.05 (experts with larger rows reach the top-k more often: usage is skewed, so frequency and REAP make real
    choices). Generated directly in bf16 from one seeded generator, tensor by tensor (the fastest way measured:
    3-6 s per 1.2 GB layer on 2 cores, against 5 s via fp32 chunks and 8 s for one big normal_)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            out[name] = torch.ones(shape, dtype=torch.bfloat16)
        elif name.endswith("mlp.gate.weight"):
            spread = torch.exp(0.5 * torch.randn(shape[0], 1, generator=gen))
            out[name] = (torch.randn(shape, generator=gen) * (0.05 * spread)).to(torch.bfloat16)
        else:
            out[name] = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
    return out


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def write_synthetic(path, num_layers, *, hidden=2048, experts=128, moe_intermediate=768, top_k=8, heads=32,
                    kv_heads=4, head_dim=128, vocab=None, seed=0, log=print) -> dict[str, Any]:
    """Write a bf16 Qwen3-MoE checkpoint of random weights to `path`, one decoder layer at a time.

    Shard k (1-based) holds decoder layer k-1; the last shard holds embed_tokens, the final norm and lm_head.
    `vocab`: the BPE vocabulary to train the tokenizer with (None: the project's default, 4096); the config's
    vocab_size is len(tokenizer). Layer i is generated from seed `seed * 1_000_003 + i`, so any layer can be
    regenerated alone. Returns {"bytes", "layers", "seconds", "seconds_per_layer"}."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = reference_tokenizer(vocab)
    widths = dict(hidden=hidden, experts=experts, moe_intermediate=moe_intermediate, top_k=top_k, heads=heads,
                  kv_heads=kv_heads, head_dim=head_dim)
    config = synthetic_config(num_layers, len(tokenizer), tokenizer, **widths)
    n_shards = num_layers + 1
    weight_map: dict[str, str] = {}
    total = 0
    start = time.perf_counter()
    shards = [(layer_shapes(config, i), seed * 1_000_003 + i) for i in range(num_layers)]
    shards.append((outer_shapes(config), seed * 1_000_003 + 999_999))
    for k, (shapes, shard_seed) in enumerate(shards, start=1):
        t0 = time.perf_counter()
        tensors = random_tensors(shapes, shard_seed)  # one decoder layer: 1.2 GB at full width
        t1 = time.perf_counter()
        save_file(tensors, str(path / shard_name(k, n_shards)), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: shard_name(k, n_shards) for name in tensors})
        del tensors
        if k <= num_layers and (k == 1 or k == num_layers or k % 8 == 0):
            log(f"  layer {k - 1:>3}/{num_layers}: generated in {t1 - t0:.1f} s, written in "
                f"{time.perf_counter() - t1:.1f} s")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    seconds = time.perf_counter() - start
    return {"bytes": total, "layers": num_layers, "seconds": seconds, "seconds_per_layer": seconds / n_shards}


def layers_for(min_bytes: float, widths: dict, vocab_size: int) -> int:
    """The fewest decoder layers whose checkpoint reaches `min_bytes`."""
    n = 1
    while checkpoint_bytes(synthetic_config(n, vocab_size, **widths)) < min_bytes:
        n += 1
    return n


# ================================================================================================================
# 2. Reading a checkpoint by tensor name (sharded or not, any dtype)
# ================================================================================================================
# The safetensors format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
# data_offsets: [begin, end]}} and the raw data. Tensors are read here with plain seek + readinto straight into
# their destination: safe_open's get_tensor maps the file and faults it in 4 KiB pages, which measured 5-8x slower
# than reading (1.2 GB: 8 s cold, 3.5 s warm, against 0.8 s cold with readinto).
ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
             "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
             "BOOL": torch.bool}
DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "I32": 4, "I64": 8, "BOOL": 1}


def safetensors_header(file: Path) -> tuple[dict[str, dict], int]:
    """({name: {"dtype", "shape", "data_offsets"}}, offset of the data section) of one safetensors file."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class Checkpoint:
    """The tensors of a safetensors checkpoint directory (every `*.safetensors` file in it, sharded or not) and its
    config. Only the headers are read up front; `read` reads the tensors asked for."""

    def __init__(self, path):
        from transformers import AutoConfig

        self.path = Path(path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.entries: dict[str, tuple[Path, str, list[int], int, int]] = {}  # name: (file, dtype, shape, start, end)
        for file in sorted(self.path.glob("*.safetensors")):
            header, data = safetensors_header(file)
            for name, e in header.items():
                begin, end = e["data_offsets"]
                self.entries[name] = (file, e["dtype"], e["shape"], data + begin, data + end)

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def specs(self) -> dict[str, tuple[list[int], str]]:
        """{name: (shape, safetensors dtype)}."""
        return {name: (shape, dt) for name, (_, dt, shape, _, _) in self.entries.items()}

    def shape(self, name: str) -> list[int]:
        return self.entries[name][2]

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` into `out` (same shape; converted when `out` has another dtype)."""
        file, dt, shape, start, end = self.entries[name]
        if list(out.shape) != list(shape):
            raise ValueError(f"{name}: shape {shape} in {file.name}, asked into {list(out.shape)}")
        direct = out.dtype == ST_DTYPES[dt] and out.is_contiguous()
        buf = out if direct else torch.empty(shape, dtype=ST_DTYPES[dt])
        view = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        with open(file, "rb", buffering=0) as f:
            f.seek(start)
            done = 0
            while done < end - start:  # one read() returns at most ~2 GiB on Linux
                got = f.readinto(view[done:])
                if not got:
                    raise OSError(f"{file}: truncated at {name}")
                done += got
        if not direct:
            out.copy_(buf)
        return out

    def read(self, names, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, as stored or converted to `dtype`."""
        return {name: self.read_into(name, torch.empty(self.shape(name),
                                                       dtype=dtype or ST_DTYPES[self.entries[name][1]]))
                for name in names}


def read_everything(path) -> float:
    """Seconds to read every byte of every safetensors file once (the I/O floor of one pass over the input)."""
    buf = bytearray(64 << 20)
    start = time.perf_counter()
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - start


# ================================================================================================================
# 3. An independent layer-streaming forward (stock transformers modules, one decoder layer in memory at a time)
# ================================================================================================================
DENSE_PARTS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
               "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
               "self_attn.q_norm.weight", "self_attn.k_norm.weight")


def decoder_layer(ckpt: Checkpoint, i: int, dtype: torch.dtype, keep: list[int] | None = None,
                  top_k: int | None = None, experts_impl: str = "grouped_mm"):
    """A stock `Qwen3MoeDecoderLayer` holding layer i's tensors, optionally with only the experts `keep` (in that
    order: router rows and expert tensors). The checkpoint may use the hub's per-expert names
    (`mlp.experts.{e}.gate_proj.weight`) or transformers' fused in-memory ones (`mlp.experts.gate_up_proj`
    [E, 2I, H], `mlp.experts.down_proj` [E, H, I]); the expert count and width come from the tensors' shapes."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

    p = f"model.layers.{i}."
    if p + "mlp.gate.weight" not in ckpt:
        raise ValueError(f"{ckpt.path}: layer {i} has no router (mlp.gate.weight); only all-MoE layers are handled")
    state = {k.removeprefix(p): v for k, v in ckpt.read([p + n for n in DENSE_PARTS + ("mlp.gate.weight",)],
                                                        dtype).items()}
    ids = list(range(state["mlp.gate.weight"].shape[0])) if keep is None else list(keep)
    state["mlp.gate.weight"] = state["mlp.gate.weight"][ids].contiguous()
    if p + "mlp.experts.gate_up_proj" in ckpt:
        fused = ckpt.read([p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"], dtype)
        state["mlp.experts.gate_up_proj"] = fused[p + "mlp.experts.gate_up_proj"][ids].contiguous()
        state["mlp.experts.down_proj"] = fused[p + "mlp.experts.down_proj"][ids].contiguous()
        del fused
    else:
        I, H = ckpt.shape(p + f"mlp.experts.{ids[0]}.gate_proj.weight")
        gate_up, down = torch.empty(len(ids), 2 * I, H, dtype=dtype), torch.empty(len(ids), H, I, dtype=dtype)
        for j, e in enumerate(ids):  # the fused in-memory layout: gate_up_proj[j] = cat(gate, up)
            ckpt.read_into(p + f"mlp.experts.{e}.gate_proj.weight", gate_up[j, :I])
            ckpt.read_into(p + f"mlp.experts.{e}.up_proj.weight", gate_up[j, I:])
            ckpt.read_into(p + f"mlp.experts.{e}.down_proj.weight", down[j])
        state["mlp.experts.gate_up_proj"], state["mlp.experts.down_proj"] = gate_up, down

    config = copy.deepcopy(ckpt.config)
    config.num_experts = len(ids)
    config.moe_intermediate_size = state["mlp.experts.down_proj"].shape[2]
    config.mlp_only_layers, config.decoder_sparse_step = [], 1
    if top_k is not None:
        config.num_experts_per_tok = top_k
    config._attn_implementation = "sdpa"
    config._experts_implementation = experts_impl
    with torch.device("meta"):
        layer = Qwen3MoeDecoderLayer(config, i)
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.eval()


@torch.no_grad()
def streaming_forward(path, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                      keep: dict[int, list[int]] | None = None, top_k: int | None = None,
                      dtype: torch.dtype = torch.bfloat16, logits: bool = True, batch_size: int = 8,
                      experts_impl: str = "grouped_mm", timings: dict | None = None) -> torch.Tensor | None:
    """Logits [N, L, V] (fp32) of a Qwen3-MoE checkpoint, built one decoder layer at a time from its shards, the way
    `Qwen3MoeModel.forward` computes them (embedding, rotary position embeddings, the causal mask of
    `create_causal_mask`, the stock decoder layers, final norm, lm_head). `keep`: per layer, run the input with only
    those experts (sliced by hand); `top_k` overrides the router's. `logits=False` stops after the last layer and
    returns None (a timing pass). `timings` receives {"load_s", "compute_s"}: reading/building the layers vs running
    them."""
    from transformers.masking_utils import create_causal_mask
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm, Qwen3MoeRotaryEmbedding

    ckpt = Checkpoint(path)
    config = copy.deepcopy(ckpt.config)
    config._attn_implementation = "sdpa"
    load_s = compute_s = 0.0

    t0 = time.perf_counter()
    embed = ckpt.read(["model.embed_tokens.weight"], dtype)["model.embed_tokens.weight"]
    rotary = Qwen3MoeRotaryEmbedding(config)
    load_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    batches = []  # per batch: [hidden, mask, position_ids, position embeddings]
    for s in range(0, len(input_ids), batch_size):
        hidden = torch.nn.functional.embedding(input_ids[s:s + batch_size], embed)
        position_ids = torch.arange(hidden.shape[1]).unsqueeze(0)
        mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask[s:s + batch_size],
                                  cache=None, position_ids=position_ids)
        batches.append([hidden, mask, position_ids, rotary(hidden, position_ids)])
    del embed
    compute_s += time.perf_counter() - t0

    for i in range(config.num_hidden_layers):
        t0 = time.perf_counter()
        layer = decoder_layer(ckpt, i, dtype, None if keep is None else keep.get(i), top_k, experts_impl)
        t1 = time.perf_counter()
        for b in batches:
            b[0] = layer(b[0], attention_mask=b[1], position_ids=b[2], position_embeddings=b[3])
        compute_s += time.perf_counter() - t1
        load_s += t1 - t0
        del layer

    out = None
    if logits:
        t0 = time.perf_counter()
        head = "lm_head.weight" if "lm_head.weight" in ckpt else "model.embed_tokens.weight"  # tied embeddings
        tensors = ckpt.read(["model.norm.weight", head], dtype)
        norm = Qwen3MoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(tensors["model.norm.weight"])
        load_s += time.perf_counter() - t0
        t0 = time.perf_counter()
        out = torch.cat([torch.nn.functional.linear(norm(b[0]), tensors[head]).float() for b in batches])
        compute_s += time.perf_counter() - t0
    if timings is not None:
        timings.update(load_s=load_s, compute_s=compute_s)
    return out


_CALIBRATION: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def calibration_tokens(model_dir, samples: int, seq_len: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) exactly as the CLI's `--data reference --samples S --seq-len L --seed SEED` builds
    them, with the checkpoint's own tokenizer. Memoised by the tokenizer files' content: tokenising the corpus takes
    seconds, and every synthetic model has the same tokenizer."""
    from transformers import AutoTokenizer

    from moecompress.calibration.data import DataSpec, build_calibration

    files = b"".join(p.read_bytes() for p in sorted(Path(model_dir).glob("tokenizer*.json")))
    key = (hashlib.sha256(files).hexdigest(), samples, seq_len, seed)
    if key not in _CALIBRATION:
        tok = AutoTokenizer.from_pretrained(model_dir)
        tok.model_max_length = 10**9  # documents are longer than the context before packing: no warning
        calib = build_calibration(tok, DataSpec(source="reference", samples=samples, seq_len=seq_len, seed=seed))
        _CALIBRATION[key] = (calib.input_ids, calib.attention_mask)
    return _CALIBRATION[key]


def compare_logits(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    return {"max_abs_diff": diff, "max_abs_logit": scale, "rel": diff / scale if scale else float("nan"),
            "argmax_agree": (out.argmax(-1) == ref.argmax(-1)).float().mean().item()}


# ================================================================================================================
# 4. Bytes: what was written vs what the compression should cost
# ================================================================================================================
def safetensors_bytes(path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


EXPERT_LINEAR = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
ROUTER = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


def theory_pruned(specs: dict[str, tuple[list[int], str]], keep: dict[int, list[int]]) -> int:
    """Bytes of the input's tensors (as stored, bf16) without the dropped experts' tensors and router rows."""
    total = 0
    for name, (shape, dt) in specs.items():
        nbytes = math.prod(shape) * DTYPE_BYTES[dt]
        if (m := EXPERT_LINEAR.match(name)) and int(m[1]) in keep and int(m[2]) not in keep[int(m[1])]:
            continue
        if (m := ROUTER.match(name)) and int(m[1]) in keep:
            nbytes = nbytes * len(keep[int(m[1])]) // shape[0]
        total += nbytes
    return total


def theory_quantized(specs: dict[str, tuple[list[int], str]], bits: int, group_size: int = 128) -> int:
    """Every routed-expert linear [out, in] at out·in·bits/8 bytes of codes plus out·⌈in/group⌉ groups of a 2-byte
    scale and a 2-byte zero point; everything else at its input bytes."""
    total = 0
    for name, (shape, dt) in specs.items():
        if EXPERT_LINEAR.match(name):
            out_f, in_f = shape
            total += math.ceil(out_f * in_f * bits / 8) + out_f * math.ceil(in_f / group_size) * 4
        else:
            total += math.prod(shape) * DTYPE_BYTES[dt]
    return total


# ================================================================================================================
# 5. Measuring a child process
# ================================================================================================================
def drop_page_cache() -> bool:
    """sync + drop the page cache (root only), so every run reads its input from disk. False if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


# The measured command runs under this small wrapper rather than as a direct child of the benchmark: a child's
# ru_maxrss starts from the high-water mark of the process it was forked (or vfork'ed) from, so a direct child of
# this script would report this script's own peak (gigabytes, after a logits check) as its own. The wrapper is a
# bare Python of ~10 MiB; its RUSAGE_CHILDREN is the command's peak alone. It also samples the command's
# /proc/PID/status every 0.2 s, to split the peak into anonymous memory and mapped file pages (safetensors mmaps
# count in RSS while mapped, though the kernel can drop them at will).
RSS_WRAPPER = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[2:])
peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0, "RssShmem": 0}
while proc.poll() is None:
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in peak:
                    peak[key] = max(peak[key], int(value.split()[0]))
    except (OSError, ValueError):
        pass
    time.sleep(0.2)
wall = time.perf_counter() - start
with open(sys.argv[1], "w") as f:
    json.dump({"rc": proc.returncode, "wall_s": wall, "sampled_kib": peak,
               "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}, f)
"""


def end_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group this script started for `proc` (the wrapper and the CLI), SIGKILL after 30 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=30)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def run_measured(cmd: list[str], env: dict[str, str], log_path: Path) -> dict[str, Any]:
    """Run cmd; its exit code, wall time and peak RSS: Linux's ru_maxrss of the command, the largest resident set
    of it or of any descendant it waited for (per process, not summed), plus the sampled peaks of its VmRSS, RssAnon
    and RssFile (the command's own process only). stdout and stderr go to `log_path`."""
    facts = log_path.with_suffix(".rusage.json")
    with open(log_path, "wb") as log:  # its own process group: on Ctrl-C (or any error) here, it is ended with us
        wrapper = subprocess.Popen([sys.executable, "-c", RSS_WRAPPER, str(facts), *cmd], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wrapper.wait()
        except BaseException:
            end_group(wrapper)
            raise
    if wrapper.returncode != 0 or not facts.exists():
        return {"cmd": cmd, "rc": wrapper.returncode or -1, "wall_s": None, "peak_rss_bytes": None}
    got = json.loads(facts.read_text())
    return {"cmd": cmd, "rc": got["rc"], "wall_s": got["wall_s"], "peak_rss_bytes": got["maxrss_kib"] * 1024,
            "sampled_peak_bytes": {k: v * 1024 for k, v in got["sampled_kib"].items()},
            "loadavg_1min_after": os.getloadavg()[0]}


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ================================================================================================================
# 6. The self-test of the streaming forward, byte accounting and RSS measurement (small, seconds)
# ================================================================================================================
def slice_experts_in_memory(model, keep: dict[int, list[int]]) -> None:
    """Keep only experts `keep[i]` (in that order) in every layer of a loaded transformers Qwen3-MoE model."""
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        mlp.gate.weight = torch.nn.Parameter(mlp.gate.weight[keep[i]])
        mlp.experts.gate_up_proj = torch.nn.Parameter(mlp.experts.gate_up_proj[keep[i]])
        mlp.experts.down_proj = torch.nn.Parameter(mlp.experts.down_proj[keep[i]])
        mlp.gate.num_experts = mlp.experts.num_experts = len(keep[i])
    model.config.num_experts = len(keep[0])


def self_test(folder: Path, log=print) -> dict[str, Any]:
    """Checks what the benchmark's verdicts rest on, on a 3-layer model of small widths:
    * the synthetic writer: shards, index, byte count = formula, loadable by from_pretrained with no missing or
      unexpected weights;
    * the streaming forward = `from_pretrained` logits, fp32 and bf16, both experts implementations, whole and with
      experts sliced by hand (a non-ascending order); one swapped expert is far outside the logits tolerance;
    * the fused-name path (`mlp.experts.gate_up_proj` checkpoints) = the per-expert path;
    * theory_pruned = the bytes of a hand-sliced `save_pretrained` checkpoint;
    * run_measured's peak RSS of a child that touches 400 MiB.
    Raises AssertionError on a failure."""
    from transformers import AutoModelForCausalLM

    res: dict[str, Any] = {}
    src = folder / "selftest"
    info = write_synthetic(src, 3, **SELF_TEST, log=lambda *_: None)
    ckpt = Checkpoint(src)
    assert len(list(src.glob("model-*.safetensors"))) == 4
    assert info["bytes"] == checkpoint_bytes(ckpt.config) == sum(math.prod(s) * 2 for s, _ in ckpt.specs().values())
    index = json.loads((src / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == info["bytes"] and set(index["weight_map"]) == set(ckpt.specs())
    ids, mask = calibration_tokens(src, 4, 64)
    res["writer"] = {"bytes": info["bytes"], "shards": 4}

    # experts kept per layer, in an order that is not ascending (on purpose); and the same with one expert swapped
    keep = {i: [int(e) for e in torch.randperm(16, generator=torch.Generator().manual_seed(i))[:8]] for i in range(3)}
    wrong = {**keep, 1: [e for e in range(16) if e not in keep[1]][:1] + keep[1][1:]}
    checks = {}
    stock, fused = folder / "selftest-stock", folder / "selftest-fused"
    with torch.no_grad():
        for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            model, loading = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, output_loading_info=True)
            assert not any(loading.values()), f"from_pretrained: {loading}"
            for sliced in (False, True):
                if sliced:
                    slice_experts_in_memory(model, keep)
                for impl in ("eager", "grouped_mm"):
                    model.set_experts_implementation(impl)
                    ours = streaming_forward(src, ids, mask, keep=keep if sliced else None, dtype=dtype,
                                             experts_impl=impl)
                    checks[f"{dname} {impl}" + (" sliced" if sliced else "")] = compare_logits(
                        ours, model(input_ids=ids, attention_mask=mask).logits.float())
        # the bf16 sliced model written two ways: stock save_pretrained (per-expert names) and raw fused names
        model.save_pretrained(stock)
        fused.mkdir()
        model.config.save_pretrained(fused)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(fused / "model.safetensors"))
        del model
        # the writer's names and shapes are exactly what save_pretrained writes (for the same 8-expert config)
        config8 = copy.deepcopy(ckpt.config)
        config8.num_experts = 8
        written = {**outer_shapes(config8), **{n: s for i in range(3) for n, s in layer_shapes(config8, i).items()}}
        assert {n: tuple(s) for n, (s, _) in Checkpoint(stock).specs().items()} == written
        assert "model.layers.0.mlp.experts.gate_up_proj" in Checkpoint(fused)
        sliced_bf16 = streaming_forward(src, ids, mask, keep=keep)
        checks["bf16 stock output vs sliced input"] = compare_logits(streaming_forward(stock, ids, mask), sliced_bf16)
        checks["bf16 fused output vs sliced input"] = compare_logits(streaming_forward(fused, ids, mask), sliced_bf16)
        res["wrong_expert_rel"] = compare_logits(streaming_forward(src, ids, mask, keep=wrong), sliced_bf16)["rel"]
    res["theory_pruned_ratio"] = safetensors_bytes(stock) / theory_pruned(ckpt.specs(), keep)
    res["logits"] = checks
    for name, c in checks.items():
        log(f"  streaming forward, {name:<34} max|Δ| {c['max_abs_diff']:.2e}  (÷ max|logit| {c['rel']:.2e}, "
            f"argmax agree {c['argmax_agree']:.3f})")
        assert c["rel"] < (1e-5 if name.startswith("fp32") else 1e-3), f"streaming forward {name}: {c}"
    log(f"  negative control, one expert of one layer swapped: max|Δ| ÷ max|logit| {res['wrong_expert_rel']:.2e} "
        f"(the check's tolerance: {LOGITS_REL_MAX})")
    assert res["wrong_expert_rel"] > 2 * LOGITS_REL_MAX, res["wrong_expert_rel"]
    log(f"  stock save_pretrained of the hand-sliced model ÷ theory_pruned: {res['theory_pruned_ratio']:.5f}")
    assert 1.0 <= res["theory_pruned_ratio"] < 1.01, res["theory_pruned_ratio"]

    # (this process holds hundreds of MiB by now: a direct child would report those too)
    rss = run_measured([sys.executable, "-c", "x = b'1' * (400 * 2**20)"], dict(os.environ),
                       folder / "selftest-rss.log")
    res["rss_400MiB_child"] = rss["peak_rss_bytes"] / 2**20
    assert rss["rc"] == 0 and 400 <= res["rss_400MiB_child"] < 440, rss
    assert rss["wall_s"] > 0 and set(rss["sampled_peak_bytes"]) >= {"RssAnon", "RssFile"}, rss
    log(f"  peak RSS of a child holding 400 MiB: {res['rss_400MiB_child']:.0f} MiB")
    for d in (src, stock, fused):
        shutil.rmtree(d)
    for f in folder.glob("selftest-rss.*"):
        f.unlink()
    return res


# ================================================================================================================
# 7. The runs
# ================================================================================================================
@dataclass
class Run:
    name: str
    command: str  # prune | quantize
    method: str
    model: str  # key of the synthetic model it runs on
    flags: list[str]
    target: str  # prune | rtn | gptq (which RSS limit applies)
    bits: int | None = None
    result: dict[str, Any] = field(default_factory=dict)


def plan_runs(only: set[str], samples: int, seq_len: int, depths=DEPTHS) -> list[Run]:
    data = ["--data", "reference", "--samples", str(samples), "--seq-len", str(seq_len)]
    runs = []
    if "reap" in only:
        runs.append(Run("reap", "prune", "reap", "main", ["--ratio", "0.5", *data], "prune"))
    if "frequency" in only:
        runs.append(Run("frequency", "prune", "frequency", "main", ["--ratio", "0.25", *data], "prune"))
    if "rtn" in only:
        runs.append(Run("rtn", "quantize", "rtn", "main", ["--bits", "4"], "rtn", bits=4))
    if "gptq" in only:
        runs.append(Run("gptq", "quantize", "gptq", "gptq", ["--bits", "4", *data], "gptq", bits=4))
    if "depth" in only:
        runs += [Run(f"depth-{n}", "prune", "reap", f"depth-{n}", ["--ratio", "0.5", *data], "prune") for n in depths]
    return runs


def cli_command(run: Run, model_dir: Path, out_dir: Path) -> list[str]:
    extra = ["--no-cache"] if run.command == "prune" else []
    return [CLI, run.command, str(model_dir), "-m", run.method, *run.flags, *ONLOAD_FLAGS, *extra, "-o", str(out_dir)]


def manifest_plan(out_dir: Path, kind: str) -> dict[str, Any] | None:
    """The output's first plan of this kind ("experts", "bits") from its `moecompress.json` manifest."""
    manifest = json.loads((out_dir / "moecompress.json").read_text())
    return next((p for p in manifest.get("plans", []) if p.get("kind") == kind), None)


def check_output(run: Run, model_dir: Path, out_dir: Path, specs, samples_logits: tuple[int, int], log) -> None:
    """Output ÷ theory, and for pruning the logits of the output vs the hand-sliced input."""
    r = run.result
    r["output_bytes"] = safetensors_bytes(out_dir)
    if run.command == "quantize":
        r["theory_bytes"] = theory_quantized(specs, run.bits, 128)
        r["out_over_theory"] = r["output_bytes"] / r["theory_bytes"]
        if plan := manifest_plan(out_dir, "bits"):  # for the record: what the CLI says it did
            counts: dict[int, int] = {}
            for bits in plan.get("bits", {}).values():
                for b in bits:
                    counts[b] = counts.get(b, 0) + 1
            r["plan"] = {k: plan.get(k) for k in ("quantizer", "group_size", "sym", "other_bits")}
            r["plan"]["expert_bits_histogram"] = counts
        return
    plan = manifest_plan(out_dir, "experts")
    if plan is None:
        r["error"] = "moecompress.json has no plan of kind 'experts'"
        return
    keep = {int(layer): list(ids) for layer, ids in plan["keep"].items()}
    r["kept_per_layer"] = sorted({len(v) for v in keep.values()})
    r["theory_bytes"] = theory_pruned(specs, keep)
    r["out_over_theory"] = r["output_bytes"] / r["theory_bytes"]
    if plan.get("merge") or plan.get("routing", "sliced") != "sliced":
        r["logits"] = None  # merged or masked experts: not a slice of the input
        return
    t0 = time.perf_counter()
    ids, mask = calibration_tokens(model_dir, *samples_logits, seed=1)
    ref = streaming_forward(model_dir, ids, mask, keep=keep, top_k=plan.get("top_k"))
    out = streaming_forward(out_dir, ids, mask)
    r["logits"] = compare_logits(out, ref)
    log(f"    logits vs hand-sliced input: max|Δ| {r['logits']['max_abs_diff']:.3g} (÷ max|logit| "
        f"{r['logits']['rel']:.2e}), {time.perf_counter() - t0:.0f} s")


def baseline(model_dir: Path, samples: int, seq_len: int, log) -> dict[str, float]:
    """Cold read of every byte of the input once + the compute of one plain layer-by-layer bf16 forward of the
    calibration tokens (the CLI's: same source, count, length and seed; transformers' default grouped_mm experts,
    the faster of its two on this CPU). The forward's own reading is timed apart and not counted, so the sum is one
    read plus one forward."""
    drop_page_cache()
    read_s = read_everything(model_dir)
    ids, mask = calibration_tokens(model_dir, samples, seq_len)
    drop_page_cache()
    t: dict[str, float] = {}
    streaming_forward(model_dir, ids, mask, logits=False, timings=t)
    out = {"read_s": read_s, "forward_s": t["compute_s"], "forward_load_s": t["load_s"],
           "loadavg_1min_after": os.getloadavg()[0]}  # other work on the machine inflates every time here
    out["sum_s"] = read_s + t["compute_s"]
    log(f"  baseline: read {read_s:.1f} s + forward {t['compute_s']:.1f} s = {out['sum_s']:.1f} s "
        f"(the forward's own layer loading: {t['load_s']:.1f} s, not counted)")
    return out


def verdicts(run: Run, full_size: bool = True) -> dict[str, bool]:
    """Pass/fail per target that applies to the run. `full_size=False` (--quick) judges neither the wall ratio (the
    CLI's start-up is most of a run) nor output ÷ theory (fixed per-file overheads, such as a safetensors header
    padded to 2 MiB, are a large part of a 10 MB checkpoint)."""
    r = run.result
    v: dict[str, bool] = {"ran": r.get("rc") == 0 and "error" not in r}
    if r.get("peak_rss_bytes") is not None:
        v["rss"] = r["peak_rss_bytes"] <= RSS_LIMIT[run.target]
    if v["ran"]:
        if full_size:
            v["out_over_theory"] = r.get("out_over_theory", math.inf) <= OUT_THEORY_MAX
        if run.command == "prune":
            if r.get("logits") is not None:
                v["logits"] = r["logits"]["rel"] <= LOGITS_REL_MAX
            if r.get("wall_ratio") is not None and full_size:
                v["wall_ratio"] = r["wall_ratio"] <= WALL_RATIO_MAX
    return v


def fmt(x, spec: str, missing: str = "–") -> str:
    return missing if x is None else format(x, spec)


def report(runs: list[Run], models: dict[str, dict], flatness: dict | None, cache_dropped: bool, quick: bool) -> str:
    lines = ["| run | layers | input GB | wall s | peak RSS GiB | out ÷ theory | logits max\\|Δ\\| (÷ max\\|logit\\|) "
             "| wall ÷ (read + fwd) | verdict |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for run in runs:
        r, m = run.result, models.get(run.model, {})
        lg = r.get("logits")
        v = r.get("verdicts", {})
        failed = [k for k, ok in v.items() if not ok]
        if not v:
            verdict = "not run"
        elif not v["ran"]:
            verdict = f"FAIL: CLI exit {r.get('rc')}" if r.get("rc") else "FAIL: " + r.get("error", "?")[:60]
        else:
            verdict = "pass" if not failed else "FAIL: " + ", ".join(failed)
        lines.append(
            f"| {run.name} | {m.get('layers', '–')} | {fmt(m.get('bytes') and m['bytes'] / GB, '.2f')} "
            f"| {fmt(r.get('wall_s'), '.0f')} | {fmt(r.get('peak_rss_bytes') and r['peak_rss_bytes'] / GiB, '.2f')} "
            f"| {fmt(r.get('out_over_theory'), '.4f')} "
            f"| {'–' if not lg else format(lg['max_abs_diff'], '.3g') + ' (' + format(lg['rel'], '.1e') + ')'} "
            f"| {fmt(r.get('wall_ratio'), '.2f')} | {verdict} |")
    lines += ["", f"Targets: peak RSS ≤ {RSS_LIMIT['prune'] / GiB:.0f} GiB (pruning, RTN), ≤ "
                  f"{RSS_LIMIT['gptq'] / GiB:.0f} GiB (GPTQ); output ÷ theory ≤ {OUT_THEORY_MAX}; logits max|Δ| ÷ "
                  f"max|logit| ≤ {LOGITS_REL_MAX} (pruning); wall ÷ (read + forward) ≤ {WALL_RATIO_MAX} (pruning); "
                  f"peak RSS flat in depth within {RSS_FLATNESS_MAX:.0%}."]
    if flatness:
        lines.append(f"RSS in depth ({', '.join(f'{k} layers: {v / GiB:.2f} GiB' for k, v in flatness['rss'].items())})"
                     f": spread {flatness['spread']:.1%} — {'pass' if flatness['pass'] else 'FAIL'}.")
    if quick:
        lines.append("--quick: tiny widths; neither the wall ratio (the CLI's start-up dominates) nor output ÷ theory "
                     "(fixed per-file overheads dominate) is judged, and the memory targets are trivially met.")
    if not cache_dropped:
        lines.append("The page cache could not be dropped (not root): runs after the first may read from cache.")
    return "\n".join(lines)


# ================================================================================================================
# 8. main
# ================================================================================================================
def say(*args) -> None:
    print(*args, flush=True)


def run_one(run: Run, model_dir: Path, model_info: dict, specs, root: Path, quick: bool, keep: bool,
            logits_tokens: tuple[int, int]) -> None:
    """One CLI run on a cold page cache, in its own MOECOMPRESS_HOME; then its output checked and deleted."""
    out_dir, log_path, home = root / f"out-{run.name}", root / "logs" / f"{run.name}.log", root / "home" / run.name
    home.mkdir(parents=True)
    cmd = cli_command(run, model_dir, out_dir)
    say(f"\n[{run.name}] {' '.join(cmd)}")
    drop_page_cache()
    run.result = r = run_measured(cmd, {**os.environ, "MOECOMPRESS_HOME": str(home), "TQDM_DISABLE": "1"}, log_path)
    if r["rc"] != 0 or r["wall_s"] is None:
        r["log_tail"] = log_tail(log_path)
        say(f"  the CLI failed (exit {r['rc']}):\n    " + r["log_tail"].replace("\n", "\n    "))
    else:
        sampled = r["sampled_peak_bytes"]
        say(f"  {r['wall_s']:.0f} s, peak RSS {r['peak_rss_bytes'] / GiB:.2f} GiB (sampled peaks: anonymous "
            f"{sampled['RssAnon'] / GiB:.2f} GiB, mapped files {sampled['RssFile'] / GiB:.2f} GiB)")
        try:
            check_output(run, model_dir, out_dir, specs, logits_tokens, say)
        except Exception as e:  # a malformed output is a failed run, not a crashed benchmark
            r["error"] = f"{type(e).__name__}: {e}"
            say(f"  checking the output failed: {r['error']}")
        if "baseline" in model_info and run.command == "prune":
            r["wall_ratio"] = r["wall_s"] / model_info["baseline"]["sum_s"]
        if "out_over_theory" in r:
            say(f"  output {r['output_bytes'] / GB:.3f} GB ÷ theory {r['theory_bytes'] / GB:.3f} GB = "
                f"{r['out_over_theory']:.4f}" + (f"; wall ÷ (read + forward) {r['wall_ratio']:.2f}"
                                                 if r.get("wall_ratio") else ""))
    r["verdicts"] = verdicts(run, full_size=not quick)
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, help="decoder layers of the main model (default: the fewest giving "
                                                   "≥ 36 GB; --quick: 4)")
    parser.add_argument("--quick", action="store_true", help="tiny widths, calibration 8 × 64: a smoke test")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help=f"scratch directory (default {DEFAULT_WORK})")
    parser.add_argument("--only", default="reap,frequency,rtn,gptq,depth", help="comma-separated subset of runs")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints and outputs")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    parser.add_argument("--self-test", action="store_true", help="only check the streaming forward etc., and exit")
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if unknown := only - {"reap", "frequency", "rtn", "gptq", "depth"}:
        parser.error(f"--only: unknown runs {sorted(unknown)}")

    widths = QUICK if args.quick else FULL
    samples, seq_len = (8, 64) if args.quick else (32, 256)
    logits_tokens = (4, 64)
    depths = (2, 4, 8) if args.quick else DEPTHS
    runs = plan_runs(only, samples, seq_len, depths)

    # a plain `kill` ends Python without running `finally` blocks: make SIGTERM unwind like Ctrl-C, so the children
    # are ended and the checkpoints deleted either way
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    work_existed = args.work.exists()
    args.work.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="run-", dir=args.work))  # everything this run writes; deleted at the end
    (root / "logs").mkdir()
    results: dict[str, Any] = {
        "settings": {"quick": args.quick, "widths": widths, "calibration": [samples, seq_len],
                     "logits_tokens": list(logits_tokens), "only": sorted(only), "work": str(root),
                     "cli_flags": ONLOAD_FLAGS},
        "environment": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, "cli": CLI},
        "models": {},
    }
    try:
        say("self-test of the streaming forward, byte accounting and RSS measurement:")
        results["self_test"] = self_test(root, log=say)
        if args.self_test:
            return 0

        cache_dropped = drop_page_cache()
        results["environment"]["page_cache_dropped"] = cache_dropped
        if not cache_dropped:
            say("note: cannot drop the page cache (needs root); runs may read their input from the cache")

        vocab_size = len(reference_tokenizer())
        model_layers = {"main": args.layers or (4 if args.quick else layers_for(MAIN_MODEL_MIN_BYTES, widths,
                                                                                 vocab_size)),
                        "gptq": 2 if args.quick else GPTQ_LAYERS, **{f"depth-{n}": n for n in depths}}
        for key in dict.fromkeys(r.model for r in runs):  # each model: write it, time the baseline, run, delete it
            n_layers = model_layers[key]
            size = checkpoint_bytes(synthetic_config(n_layers, vocab_size, **widths))
            need = size * (2.6 if args.keep else 1.8) + 2 * GB  # the input and its largest output (or all of them)
            if (free := shutil.disk_usage(root).free) < need:
                raise SystemExit(f"{root}: {free / GB:.0f} GB free, the {key} model ({size / GB:.1f} GB) and its "
                                 f"outputs need about {need / GB:.0f} GB; free some space or pass --work elsewhere")
            model_dir = root / f"syn-{key}"
            say(f"\nwriting the {key} model: {n_layers} layers, {size / GB:.2f} GB ({size / GiB:.2f} GiB), "
                f"to {model_dir}")
            info = results["models"][key] = write_synthetic(model_dir, n_layers, **widths, log=say)
            say(f"  written in {info['seconds']:.0f} s ({info['seconds_per_layer']:.1f} s per shard)")
            model_runs = [r for r in runs if r.model == key]
            if any(r.command == "prune" for r in model_runs):
                info["baseline"] = baseline(model_dir, samples, seq_len, say)
            specs = Checkpoint(model_dir).specs()
            for run in model_runs:
                run_one(run, model_dir, info, specs, root, args.quick, args.keep, logits_tokens)
            if not args.keep:
                shutil.rmtree(model_dir, ignore_errors=True)

        depth = [r for r in runs if r.name.startswith("depth-") and r.result.get("rc") == 0]
        flatness = None
        if len(depth) >= 2:
            rss = {r.name.removeprefix("depth-"): r.result["peak_rss_bytes"] for r in depth}
            spread = (max(rss.values()) - min(rss.values())) / min(rss.values())
            flatness = {"rss": rss, "spread": spread, "pass": spread <= RSS_FLATNESS_MAX}
        results["depth_flatness"] = flatness
        say("\n" + report(runs, results["models"], flatness, cache_dropped, args.quick))
        failed = any(not r.result.get("verdicts") or not all(r.result["verdicts"].values()) for r in runs)
        return 1 if failed or (flatness and not flatness["pass"]) else 0
    finally:
        results["runs"] = [{"name": r.name, "model": r.model, "layers": results["models"].get(r.model, {}).get("layers"),
                             **r.result} for r in runs if r.result]
        if args.json:
            args.json.write_text(json.dumps(results, indent=2, default=str))
            say(f"wrote {args.json}")
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
            if not work_existed:
                try:
                    args.work.rmdir()  # only if nothing else was put there meanwhile
                except OSError:
                    pass


if __name__ == "__main__":
    sys.exit(main())
