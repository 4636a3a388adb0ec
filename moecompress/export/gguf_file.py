"""GGUF export (llama.cpp): one `model.gguf` holding the weights, the hyperparameters and the tokenizer.

Families and llama.cpp architectures (names, metadata and tensor layout as llama.cpp's `convert_hf_to_gguf.py`
writes them for the same Hugging Face checkpoint):

* `qwen3_moe` → `qwen3moe`, `qwen2_moe` → `qwen2moe` (shared expert + its sigmoid gate), `olmoe` → `olmoe`,
  `mixtral` → `llama` (with experts; Q/K rows permuted to llama.cpp's rotary layout, as the converter does).
* Refused, one line: DeepSeek-V2/V3 (llama.cpp splits MLA's kv_b and reads group-limited routing from keys this
  exporter does not write), Phi-MoE, GPT-OSS (fused MXFP4 layout). Also refused, because llama.cpp's graph for the
  architecture cannot express it: top-k renormalisation other than the architecture's fixed one (qwen3moe and
  llama renormalise, qwen2moe and olmoe do not), dense (non-MoE) decoder layers, sliding-window attention, OLMoE
  with grouped-query attention (llama.cpp normalises K over the full width), QKV clipping, RoPE scaling other than
  linear/YaRN, and everything `layout.refuse_nonstock` refuses (EEP/masked/ODP routers, per-layer expert counts,
  non-uniform expert or shared-expert widths, bitsandbytes).

Routed experts are merged per layer into 3-D `blk.N.ffn_{gate,up,down}_exps.weight` tensors, expert-major
(PyTorch shape [E, out, in], GGUF ne {in, out, E}), as the converter stacks them.

Weights. moecompress stores b-bit codes q ∈ [0, 2^b − 1] with a scale s and zero z per (row, group of g input
columns), ŵ = s·(q − z); symmetric schemes have z = 2^(b−1). GGUF's legacy block types hold 32 consecutive
values of a row with an fp16 d (and m): Q4_0/Q5_0 ŵ = d·(q − 8 | 16), Q8_0 ŵ = d·(q − 128) (stored as int8),
Q4_1/Q5_1 ŵ = d·q + m. So, when every 32-block of a row lies in one group (g a multiple of 32, or one group per
row, and the row a whole number of blocks) and a tensor's sources all share one scheme:

* symmetric 4 / 5 / 8 bit → Q4_0 / Q5_0 / Q8_0 with d = s and the codes copied (nibbles: value j of a block in
  the low nibble of byte j, value j+16 in the high nibble; Q5's fifth bits in a little-endian uint32, bit j for
  value j) — exact: d·(q − z) is the same float product;
* asymmetric 4 / 5 bit → Q4_1 / Q5_1 with d = s, m = −s·z — exact when m is an fp16 number.

d and m are fp16: scales held in bf16/fp32 (or a −s·z outside fp16) round. Every written tensor is dequantized
back (gguf-py's `dequantize`) and compared with the source's own dequantized values; the blocks that differ are
counted ("rounded_blocks") and the largest difference reported — nothing rounds silently.

Everything else is *requantized* from the dequantized weights with gguf-py's `quantize` to option `requantize`
(default Q8_0; F32, F16, BF16, Q8_0, Q5_1, Q5_0, Q4_1, Q4_0): other bit widths (1, 2, 3, 6, 7), asymmetric 8 bit
(Q8_1 is not a storage type), group sizes that split a 32-block, act-order (g_idx) codes, rows not a multiple of
32, and experts of one layer in different schemes or partly dense (a merged tensor has one type). Where the
requested block type cannot hold a row (width not a multiple of its block) the tensor falls back to F16, as the
converter does. Each requantized tensor is counted in `summary()` with its reason and error, and one warning is
logged.

Unquantized weights keep the model's dtype (F32 / F16 / BF16); 1-D tensors, norms, routers
(`ffn_gate_inp`, `ffn_gate_inp_shexp`) and biases are F32, as the converter writes them.

Tokenizer: a Hugging Face byte-level BPE `tokenizer.json` is written as llama.cpp's `gpt2` model — tokens
(padded with `[PADi]` UNUSED entries to the config's vocab size), token types (added special tokens and
`<|…|>` CONTROL, other added tokens USER_DEFINED, the rest NORMAL), merges, bos/eos/unk/pad ids, add-bos/eos
flags and chat template (gguf-py's `SpecialVocab`). `tokenizer.ggml.pre` names llama.cpp's pre-tokenizer; the
converter recognises it by hashing the tokenization of a probe text against its table, which a project's own
tokenizer is not in. Here it is read from the `pre_tokenizer` structure:

* `Sequence[Digits(individual_digits), ByteLevel(use_regex)]` — moecompress's reference tokenizer
  (reference/tokenizer.py), also SmolLM's — → `smollm`: llama.cpp first isolates every `\\p{N}` then applies the
  GPT-2 regex, which is what the HF pipeline does (Digits, then ByteLevel's GPT-2 regex), and it does not clean up
  spaces on decoding (`clean_up_tokenization_spaces=False`). Known differences: HF's `Digits` tests Rust's
  `char::is_numeric` and llama.cpp its own Unicode `\\p{N}` table, which may disagree on rare numeric code points
  of Unicode versions the two tables do not share; HF's GPT-2 regex ends in `|\\s+` where llama.cpp emits the
  unmatched whitespace as its own piece (the same split). Checked with llama.cpp's `llama-tokenize`: the same
  ids as the HF tokenizer over the reference corpus (~10⁵ tokens) and a text of digits, Unicode, emoji, tabs and
  blank lines. `qwen2`, also one digit per piece, differs more: it attaches one leading non-letter to a word
  ("(normal" is one piece), matches contractions case-insensitively ("HE'S") and ends punctuation runs with
  their newlines;
* `ByteLevel(use_regex)` alone → `gpt-2`; `Split(<Qwen2 regex>) + ByteLevel` → `qwen2`; `Split(<Llama-3
  regex>) + ByteLevel` → `llama-bpe`.

Anything else is refused unless option `pre=NAME` names the llama.cpp pre-tokenizer to record (taken as given).
A `tokenizer.json` that is not byte-level BPE (SentencePiece-style byte-fallback BPE, WordPiece, Unigram, a BPE
over whitespace-split words) is refused: llama.cpp's `gpt2` model would mis-tokenize it; convert such a tokenizer
with llama.cpp's own `convert_hf_to_gguf.py`. An NFC normalizer is accepted and not recorded (the converter does
the same: llama.cpp does not normalize).

The file is planned from the meta skeleton (names, shapes, types) and its header and tensor infos written first;
the data follow decoder layer by decoder layer (`holder.layer(i)`), so memory stays about one layer plus one
merged tensor's blocks.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moecompress.compress.moe import decoder_layers, moe_layers
from moecompress.compress.quant.linear import PackedLinear
from moecompress.compress.quant.packing import unpack_codes
from moecompress.errors import UserError
from moecompress.export.layout import LayerTensors, PARTS, other_tensors, refuse_nonstock, split_layer

log = logging.getLogger("moecompress")

FORMAT = "gguf"
FILENAME = "model.gguf"

# model_type → llama.cpp architecture name (gguf.MODEL_ARCH_NAMES)
ARCHS = {"qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "olmoe": "olmoe", "mixtral": "llama"}
# llama.cpp's MoE graphs renormalise the top-k weights or not, fixed per architecture (build_moe_ffn's norm_w)
RENORMALIZES = {"qwen3moe": True, "qwen2moe": False, "olmoe": False, "llama": True}
# where llama.cpp requires `output.weight` (no fallback to the tied embedding)
OUTPUT_REQUIRED = {"qwen2moe", "olmoe"}
EXPERT_TENSORS = {"gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps"}
OPTIONS = ("requantize", "pre")
REQUANTIZE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
BLOCK = 32  # values per block of every legacy GGUF block type

# Hugging Face's Qwen2 / Llama-3 pre-tokenizer regexes (their tokenizer.json `Split` patterns)
_QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_KNOWN_SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _gguf():
    import gguf

    return gguf


def _qtypes() -> dict[str, Any]:
    q = _gguf().GGMLQuantizationType
    return {name: getattr(q, name) for name in REQUANTIZE_TYPES}


# (bits, symmetric) → the block type with the same arithmetic
def _exact_types() -> dict[tuple[int, bool], Any]:
    q = _gguf().GGMLQuantizationType
    return {(4, True): q.Q4_0, (5, True): q.Q5_0, (8, True): q.Q8_0, (4, False): q.Q4_1, (5, False): q.Q5_1}


@dataclass
class _Entry:
    """One GGUF tensor as planned (and, after writing, how close it came to its source)."""

    name: str
    shape: tuple[int, ...]  # PyTorch order; GGUF's ne is the reverse
    qtype: Any  # gguf.GGMLQuantizationType
    kind: str  # dense (unquantized, kept) | mapped (codes copied into a block type) | requantized
    layer: int | None  # decoder layer the sources live in; None: outside the layers
    sources: list[tuple[str, str]]  # (plain | packed | bias | other, checkpoint name); one per expert when merged
    merged: bool = False
    heads: int | None = None  # llama: permute rows for llama.cpp's rotary layout over this many heads
    reason: str | None = None  # why requantized
    rounded: int = 0  # blocks (values, for float types) that differ from the source
    error: float = 0.0  # max |written − source|
    written: bool = False

    def nbytes(self) -> int:
        block, size = _gguf().GGML_QUANT_SIZES[self.qtype]
        rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return rows * (self.shape[-1] // block) * size


class GGUFWriter:
    """`moecompress export --format gguf` (see the module docstring). Options: `requantize` (the type for
    weights without an exact block type, default Q8_0), `pre` (llama.cpp pre-tokenizer name, overriding the one
    read from tokenizer.json)."""

    def __init__(self, holder, dtype: torch.dtype, options: dict[str, Any] | None = None):
        self.holder, self.dtype = holder, dtype
        self.model = holder.model
        self.options = dict(options or {})
        self.plan: list[_Entry] = []
        self.arch: str | None = None
        self.vocab: dict[str, Any] | None = None
        self.requantize = None

    # ----- check + plan (meta skeleton) -----------------------------------------------------------------------
    def check(self) -> None:
        """Refuse (one line) what GGUF / llama.cpp cannot hold, and plan every tensor; reads no weights."""
        unknown = sorted(set(self.options) - set(OPTIONS))
        if unknown:
            raise UserError(f"unknown gguf option {unknown[0]!r}: use --set requantize=TYPE or --set pre=NAME")
        self.requantize = _requantize_type(self.options.get("requantize", "Q8_0"))
        config = self.model.config
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHS:
            supported = ", ".join(sorted(ARCHS))
            raise UserError(f"model type '{model_type}' has no GGUF export here; supported families: {supported} "
                            f"(export with --format hf and use llama.cpp's convert_hf_to_gguf.py)")
        self.arch = ARCHS[model_type]
        refuse_nonstock(self.model, "GGUF")
        self._check_config()
        self.vocab = _vocab(self.holder.path, config.vocab_size, self.options.get("pre"))
        self.plan = self._plan()
        requantized = [e for e in self.plan if e.kind == "requantized"]
        if requantized:
            reasons = Counter(e.reason for e in requantized)
            types = Counter(e.qtype.name for e in requantized)
            log.warning("GGUF: %d tensor(s) have no exact GGUF block type and are requantized (%s): %s",
                        len(requantized), ", ".join(f"{n} to {t}" for t, n in sorted(types.items())),
                        "; ".join(f"{n}× {r}" for r, n in sorted(reasons.items())))

    def _check_config(self) -> None:
        config, arch = self.model.config, self.arch
        layers = moe_layers(self.model)
        n_layers = len(decoder_layers(self.model))
        if len(layers) != n_layers:
            dense = sorted(set(range(n_layers)) - {l.layer_idx for l in layers})
            raise UserError(f"decoder layer {dense[0]} is a dense MLP layer: llama.cpp's {arch} needs an MoE block "
                            f"in every layer; keep the moecompress checkpoint or export with --format hf")
        norm = layers[0].norm_topk_prob
        if norm != RENORMALIZES[arch]:
            raise UserError(f"the model {'renormalises' if norm else 'does not renormalise'} its top-k routing "
                            f"weights (norm_topk_prob={norm}) but llama.cpp's {arch} "
                            f"{'always does' if RENORMALIZES[arch] else 'never does'}: GGUF cannot express it; "
                            f"keep the moecompress checkpoint")
        if getattr(config, "use_sliding_window", False) or (
                arch == "llama" and getattr(config, "sliding_window", None) is not None
                and config.sliding_window < config.max_position_embeddings):
            raise UserError(f"the model uses sliding-window attention, which llama.cpp's {arch} does not: "
                            f"export with --format hf")
        if arch == "olmoe":
            if getattr(config, "clip_qkv", None) is not None:
                raise UserError("OLMoE with clip_qkv: llama.cpp's olmoe does not clip Q/K/V; export with --format hf")
            if config.num_key_value_heads != config.num_attention_heads:
                raise UserError(f"OLMoE with grouped-query attention ({config.num_key_value_heads} KV heads of "
                                f"{config.num_attention_heads}): llama.cpp's olmoe normalises K over the full "
                                f"width; export with --format hf")
        rope = _rope(config)
        if rope.get("rope_type", "default") not in ("default", "linear", "yarn"):
            raise UserError(f"RoPE type {rope['rope_type']!r} has no GGUF form in this exporter (default, linear, "
                            f"yarn): export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py")

    def _plan(self) -> list[_Entry]:
        gguf = _gguf()
        names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[_arch_enum(self.arch)], len(decoder_layers(self.model)))
        outside = other_tensors(self.model)
        head = [self._plain_entry(names, name, t, None, "other") for name, t in outside.items()
                if name.startswith("model.embed_tokens")]
        tail = [self._plain_entry(names, name, t, None, "other") for name, t in outside.items()
                if not name.startswith("model.embed_tokens")]
        if not any(e.name == "output.weight" for e in tail) and self.arch in OUTPUT_REQUIRED:
            embed = head[0]  # tied embeddings: llama.cpp's arch needs its own output tensor, so write the copy
            tail.append(_Entry("output.weight", embed.shape, embed.qtype, embed.kind, None, embed.sources))
        plan = list(head)
        for index in range(len(decoder_layers(self.model))):
            plan.extend(self._plan_layer(names, index, split_layer(self.model, index)))
        plan.extend(tail)
        return plan

    def _plan_layer(self, names, index: int, parts: LayerTensors) -> list[_Entry]:
        spec = moe_layers(self.model)[0].spec
        hub_part = dict(zip(spec.checkpoint_parts, PARTS))
        pattern = re.compile(rf"^model\.layers\.{index}\.{re.escape(spec.checkpoint_block)}\.experts\.(\d+)\.(\w+)$")
        experts: dict[str, dict[int, tuple[str, str, Any]]] = defaultdict(dict)
        out: list[_Entry] = []
        for name, t in parts.plain.items():
            module, _, suffix = name.rpartition(".")
            found = pattern.match(module)
            if found is None:
                out.append(self._plain_entry(names, name, t, index, "plain"))
                continue
            if suffix != "weight":
                raise UserError(f"{name}: routed-expert biases have no tensor in llama.cpp's {self.arch}")
            experts[hub_part[found.group(2)]][int(found.group(1))] = ("plain", name, t)
        for name, linear in parts.packed.items():
            found = pattern.match(name)
            if found is not None:
                if linear.bias is not None:
                    raise UserError(f"{name}: routed-expert biases have no tensor in llama.cpp's {self.arch}")
                experts[hub_part[found.group(2)]][int(found.group(1))] = ("packed", name, linear)
                continue
            out.extend(self._packed_entries(names, name, linear, index))
        for part in PARTS:
            if part in experts:
                out.append(self._experts_entry(index, part, experts[part]))
        return out

    def _gguf_name(self, names, name: str) -> str:
        base, _, suffix = name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise UserError(f"tensor {name} has no counterpart in llama.cpp's {self.arch} architecture; export "
                            f"with --format hf")
        return f"{mapped}.{suffix}"

    def _plain_entry(self, names, name: str, t: torch.Tensor, index: int | None, kind: str) -> _Entry:
        gname = self._gguf_name(names, name)
        shape = tuple(t.shape)
        qtype = _float_type(t.dtype) if not _forced_f32(gname, shape) else _qtypes()["F32"]
        return _Entry(gname, shape, qtype, "dense", index, [(kind, name)], heads=self._heads(gname))

    def _packed_entries(self, names, name: str, linear: PackedLinear, index: int) -> list[_Entry]:
        gname = self._gguf_name(names, f"{name}.weight")
        shape = (linear.out_features, linear.in_features)
        entries = [self._quantized_entry(gname, shape, [linear], [("packed", name)], index, merged=False)]
        if linear.bias is not None:
            entries.append(_Entry(gname.removesuffix(".weight") + ".bias", (linear.out_features,),
                                  _qtypes()["F32"], "dense", index, [("bias", name)], heads=self._heads(gname)))
        return entries

    def _experts_entry(self, index: int, part: str, by_expert: dict[int, tuple[str, str, Any]]) -> _Entry:
        count = len(by_expert)
        if sorted(by_expert) != list(range(count)):
            raise RuntimeError(f"layer {index}: experts {sorted(by_expert)} are not numbered 0..{count - 1}")
        sources = [by_expert[e] for e in range(count)]
        gname = f"blk.{index}.{EXPERT_TENSORS[part]}.weight"
        kinds = {kind for kind, _, _ in sources}
        if kinds == {"plain"}:
            t = sources[0][2]
            dtypes = {s[2].dtype for s in sources}
            qtype = _float_type(t.dtype) if len(dtypes) == 1 else _qtypes()["F32"]
            return _Entry(gname, (count, *t.shape), qtype, "dense", index, [(k, n) for k, n, _ in sources],
                          merged=True)
        if kinds == {"packed"}:
            linear = sources[0][2]
            return self._quantized_entry(gname, (count, linear.out_features, linear.in_features),
                                         [s[2] for s in sources], [(k, n) for k, n, _ in sources], index, True)
        rows, cols = _rows_cols(sources[0])
        entry = _Entry(gname, (count, rows, cols), None, "requantized", index, [(k, n) for k, n, _ in sources],
                       merged=True, reason="experts of a layer partly quantized, partly dense")
        return self._requantized(entry)

    def _quantized_entry(self, gname: str, shape, linears: list[PackedLinear], sources, index, merged) -> _Entry:
        entry = _Entry(gname, tuple(shape), None, "mapped", index, sources, merged=merged, heads=self._heads(gname))
        qtype, reason = _exact_type(linears)
        if _forced_f32(gname, shape):
            entry.qtype, entry.kind, entry.reason = _qtypes()["F32"], "requantized", "a router is always F32"
            return entry
        if qtype is None:
            entry.kind, entry.reason = "requantized", reason
            return self._requantized(entry)
        entry.qtype = qtype
        return entry

    def _requantized(self, entry: _Entry) -> _Entry:
        entry.kind = "requantized"
        block, _ = _gguf().GGML_QUANT_SIZES[self.requantize]
        entry.qtype = self.requantize
        if entry.shape[-1] % block:
            entry.qtype = _qtypes()["F16"]
            entry.reason += f"; rows of {entry.shape[-1]} values are not whole {self.requantize.name} blocks (F16)"
        return entry

    def _heads(self, gname: str) -> int | None:
        if self.arch != "llama":
            return None
        config = self.model.config
        if re.fullmatch(r"blk\.\d+\.attn_q\.(weight|bias)", gname):
            return config.num_attention_heads
        if re.fullmatch(r"blk\.\d+\.attn_k\.(weight|bias)", gname):
            return config.num_key_value_heads
        return None

    # ----- write ----------------------------------------------------------------------------------------------
    def write(self, directory: Path) -> None:
        from moecompress.export.writers import PROVENANCE, _provenance

        gguf = _gguf()
        if not self.plan:
            self.check()
        with _quiet("gguf"):
            self._write(gguf, directory)
        (Path(directory) / PROVENANCE).write_text(json.dumps(_provenance(self.holder.path, FORMAT, self.summary()),
                                                             indent=2, default=str))

    def _write(self, gguf, directory: Path) -> None:
        path = Path(directory) / FILENAME
        writer = gguf.GGUFWriter(None, self.arch)
        self._metadata(writer)
        for entry in self.plan:
            writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32), entry.nbytes(),
                                   raw_dtype=entry.qtype)
        try:
            writer.write_header_to_file(path)  # header, metadata and tensor infos first; the data follow
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            outside = other_tensors(self.model)
            plan, i = self.plan, 0
            while i < len(plan):  # the plan's order: embeddings, layer 0 … N−1, final norm and head
                layer = plan[i].layer
                if layer is None:
                    writer.write_tensor_data(self._encode(plan[i], None, outside))
                    i += 1
                    continue
                with self.holder.layer(layer):
                    parts = split_layer(self.model, layer)
                    while i < len(plan) and plan[i].layer == layer:
                        writer.write_tensor_data(self._encode(plan[i], parts, outside))
                        i += 1
        finally:
            writer.close()

    def _encode(self, entry: _Entry, parts: LayerTensors | None, outside: dict[str, torch.Tensor]) -> np.ndarray:
        """The bytes of `entry`, checked against the source values (counts and error recorded on the entry)."""
        data = None
        for e, (kind, name) in enumerate(entry.sources):
            one, values = self._encode_one(entry, kind, name, parts, outside)
            self._compare(entry, one, values)
            if not entry.merged:
                data = one
                continue
            if data is None:  # one merged tensor's blocks, filled expert by expert
                data = np.empty((len(entry.sources), *one.shape), dtype=one.dtype)
            data[e] = one
        entry.written = True
        if data.nbytes != entry.nbytes():
            raise RuntimeError(f"{entry.name}: {data.nbytes} bytes encoded, {entry.nbytes()} planned")
        return data

    def _encode_one(self, entry: _Entry, kind: str, name: str, parts, outside):
        gguf = _gguf()
        if kind == "other":
            values = outside[name].detach().float()
        elif kind == "plain":
            values = parts.plain[name].detach().float()
        elif kind == "bias":
            values = parts.packed[name].bias.detach().float()
        else:
            values = parts.packed[name].dense_weight(torch.float32)
        values = values.cpu().contiguous().numpy()
        if entry.kind == "mapped":
            data = _blocks(parts.packed[name], entry.qtype)
        else:
            data = gguf.quants.quantize(values, entry.qtype)
        if entry.heads is not None:
            index = _rotary_rows(values.shape[0], entry.heads)
            data, values = data[index], values[index]
        return np.ascontiguousarray(data), values

    def _compare(self, entry: _Entry, data: np.ndarray, values: np.ndarray) -> None:
        gguf = _gguf()
        got = gguf.quants.dequantize(data, entry.qtype).reshape(values.shape)
        differ = got != values
        if not differ.any():
            return
        block, _ = gguf.GGML_QUANT_SIZES[entry.qtype]
        entry.rounded += int(differ.reshape(-1, block).any(axis=1).sum())
        entry.error = max(entry.error, float(np.abs(got.astype(np.float64) - values).max()))

    def _metadata(self, w) -> None:
        gguf = _gguf()
        config = self.model.config
        hp = config.to_dict()
        spec = moe_layers(self.model)[0].spec
        w.add_type(gguf.GGUFType.MODEL)
        if self.holder.path is not None:
            w.add_name(Path(self.holder.path).name)
        if any(e.kind != "dense" for e in self.plan):
            w.add_quantized_by("moecompress")
        w.add_block_count(len(decoder_layers(self.model)))
        if hp.get("max_position_embeddings") is not None:
            w.add_context_length(int(hp["max_position_embeddings"]))
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        rope = _rope(config)
        if rope.get("rope_type") == "linear":
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(rope["factor"])
        elif rope.get("rope_type") == "yarn":
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(rope["factor"])
            w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
            for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                             ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                             ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                             ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
                if rope.get(key) is not None:
                    add(rope[key])
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if theta is not None:
            w.add_rope_freq_base(float(theta))
        w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        w.add_expert_count(int(getattr(config, spec.count_key)))
        w.add_expert_used_count(int(config.num_experts_per_tok))
        if hp.get("head_dim") is not None:
            w.add_key_length(int(hp["head_dim"]))
            w.add_value_length(int(hp["head_dim"]))
        if self.arch in ("qwen2moe", "qwen3moe"):
            w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if self.arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
        if self.arch == "llama":
            w.add_vocab_size(int(config.vocab_size))
            w.add_rope_dimension_count(int(hp.get("head_dim") or config.hidden_size // config.num_attention_heads))
        w.add_file_type(self._file_type())
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab = self.vocab
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab["pre"])
        w.add_token_list(vocab["tokens"])
        w.add_token_types(vocab["types"])
        special = gguf.SpecialVocab(self.holder.path, load_merges=True, n_vocab=len(vocab["tokens"]))
        special.add_to_gguf(w, quiet=True)

    def _file_type(self):
        """general.file_type: the type holding most of the weights (2-D and larger tensors)."""
        gguf = _gguf()
        weights = Counter()
        for e in self.plan:
            if len(e.shape) >= 2:
                weights[e.qtype.name] += int(np.prod(e.shape))
        name = weights.most_common(1)[0][0] if weights else "F32"
        return gguf.LlamaFileType.ALL_F32 if name == "F32" else getattr(gguf.LlamaFileType, f"MOSTLY_{name}")

    # ----- summary --------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        plan = self.plan
        mapped = [e for e in plan if e.kind == "mapped"]
        requantized = [e for e in plan if e.kind == "requantized"]
        inexact = [e for e in plan if e.error > 0 or e.rounded]
        out: dict[str, Any] = {
            "file": FILENAME,
            "gguf_architecture": self.arch,
            "tensors": len(plan),
            "types": dict(sorted(Counter(e.qtype.name for e in plan).items())),
            "dense_tensors": sum(e.kind == "dense" for e in plan),
            "mapped_exactly": sum(e.written and not e.rounded for e in mapped),
            "mapped_rounded": sum(bool(e.rounded) for e in mapped),
            "rounded_blocks": sum(e.rounded for e in mapped),
            "requantized": dict(sorted(Counter(e.qtype.name for e in requantized).items())),
            "requantize_reasons": dict(sorted(Counter(e.reason for e in requantized).items())),
            "max_abs_error": max((e.error for e in inexact), default=0.0),
            "inexact_tensors": sorted(e.name for e in inexact),
        }
        if self.vocab is not None:
            out["tokenizer_pre"] = self.vocab["pre"]
            out["tokens"] = len(self.vocab["tokens"])
        return out


# ----- helpers ------------------------------------------------------------------------------------------------
@contextmanager
def _quiet(name: str):
    """gguf-py logs every step at INFO (file plan, endianness); keep its warnings only while writing."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _arch_enum(arch: str) -> str:
    gguf = _gguf()
    return next(k.name for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)


def _rope(config) -> dict:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope)
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def _requantize_type(value) -> Any:
    name = str(value).strip().upper()
    types = _qtypes()
    if name not in types:
        raise UserError(f"requantize={value!r} is not a type this export can write: use one of "
                        f"{', '.join(t.lower() for t in REQUANTIZE_TYPES)}")
    return types[name]


def _float_type(dtype: torch.dtype):
    types = _qtypes()
    return {torch.float16: types["F16"], torch.bfloat16: types["BF16"]}.get(dtype, types["F32"])


def _forced_f32(gname: str, shape) -> bool:
    """The tensors the converter always writes as F32: 1-D ones, norms, biases, routers."""
    base, _, suffix = gname.rpartition(".")
    return (len(shape) <= 1 or gname.endswith("_norm.weight") or suffix != "weight"
            or base.endswith((".ffn_gate_inp", ".ffn_gate_inp_shexp")))


def _rows_cols(source) -> tuple[int, int]:
    kind, _, obj = source
    if kind == "packed":
        return obj.out_features, obj.in_features
    return tuple(obj.shape)


def _exact_type(linears: list[PackedLinear]) -> tuple[Any, str | None]:
    """The GGUF block type whose arithmetic equals these linears' one scheme, or None and why not."""
    schemes = {(m.bits, m.group_size, m.sym, m.weight_g_idx is not None, m.in_features) for m in linears}
    labels = sorted({_label(*s[:4]) for s in schemes})
    if len(labels) > 1:
        return None, f"experts of a layer in different schemes ({', '.join(labels)})"
    bits, group, sym, g_idx, cols = schemes.pop()
    label = labels[0]
    if g_idx:
        return None, f"{label}: act-order (g_idx) column groups"
    qtype = _exact_types().get((bits, sym))
    if qtype is None:
        return None, f"{label}: no GGUF block type with this arithmetic"
    if group != -1 and group % BLOCK:
        return None, f"{label}: group size {group} splits GGUF's 32-value blocks"
    if cols % BLOCK:
        return None, f"{label}: rows of {cols} values are not whole 32-value blocks"
    return qtype, None


def _label(bits: int, group: int, sym: bool, g_idx: bool) -> str:
    return f"{bits}-bit {'sym' if sym else 'asym'} {'channel' if group == -1 else f'g{group}'}" + \
        (" act-order" if g_idx else "")


def _fp16(x: torch.Tensor, what: str) -> np.ndarray:
    out = x.double().cpu().numpy().astype(np.float16)
    if not np.isfinite(out).all():
        raise UserError(f"a quantization {what} exceeds the fp16 range GGUF stores it in: re-quantize with "
                        f"fp16 scales (the default)")
    return out


def _blocks(linear: PackedLinear, qtype) -> np.ndarray:
    """The GGUF blocks [out, n_blocks·block_bytes] of `linear`'s codes: Q4_0/Q5_0/Q8_0 (symmetric, d = s) or
    Q4_1/Q5_1 (m = −s·z); the layouts of ggml-common.h (see the module docstring)."""
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    rows, cols, bits = linear.out_features, linear.in_features, linear.bits
    nb = cols // BLOCK
    codes = unpack_codes(linear.weight_packed, bits, cols).cpu().numpy().reshape(rows, nb, BLOCK)
    group = linear.group_size
    gi = torch.zeros(nb, dtype=torch.long) if group == -1 else torch.arange(nb) * BLOCK // group
    scale = linear.weight_scale.double().cpu().index_select(1, gi)
    fields = [_fp16(scale, "scale").view(np.uint8).reshape(rows, nb, 2)]
    if qtype in (q.Q4_1, q.Q5_1):
        zero = linear.weight_zero_point.double().cpu().index_select(1, gi)
        fields.append(_fp16(-scale * zero, "offset (−scale·zero)").view(np.uint8).reshape(rows, nb, 2))
    if qtype == q.Q8_0:
        fields.append((codes.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        low = codes & 0x0F
        if qtype in (q.Q5_0, q.Q5_1):
            high = ((codes >> 4) & 1).astype(np.uint32) << np.arange(BLOCK, dtype=np.uint32)
            qh = high.sum(axis=-1, dtype=np.uint32).astype("<u4")
            fields.append(qh.view(np.uint8).reshape(rows, nb, 4))
        half = BLOCK // 2
        fields.append((low[..., :half] | (low[..., half:] << 4)).astype(np.uint8))
    return np.concatenate(fields, axis=-1).reshape(rows, -1)


def _rotary_rows(rows: int, heads: int) -> np.ndarray:
    """Row order llama.cpp's llama architecture expects for Q/K: per head, the two rotary halves interleaved
    (the inverse of Hugging Face's permutation of Meta's layout, as the converter applies it)."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(rows)


# ----- tokenizer ----------------------------------------------------------------------------------------------
def _vocab(path: Path | None, vocab_size: int, pre_override: str | None) -> dict[str, Any]:
    """tokens, token types and `tokenizer.ggml.pre` from a byte-level BPE tokenizer.json (module docstring)."""
    gguf = _gguf()
    file = Path(path) / "tokenizer.json" if path is not None else None
    if file is None or not file.is_file():
        raise UserError(f"{path} has no tokenizer.json, which a GGUF file embeds: copy the model's Hugging Face "
                        f"tokenizer (tokenizer.json, tokenizer_config.json) into the checkpoint directory")
    tj = json.loads(file.read_text(encoding="utf-8"))
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = "SentencePiece-style byte-fallback BPE" if model.get("byte_fallback") else model.get("type")
        raise UserError(f"{file} is a {kind} tokenizer, not byte-level BPE: this export writes llama.cpp's gpt2 "
                        f"tokenizer only; convert the tokenizer with llama.cpp's convert_hf_to_gguf.py")
    if pre_override and not _byte_level(tj):
        raise UserError(f"{file} is not byte-level BPE (no ByteLevel pre-tokenizer or decoder): llama.cpp's gpt2 "
                        f"tokenizer would mis-tokenize it, whatever pre= says; convert the tokenizer with "
                        f"llama.cpp's convert_hf_to_gguf.py")
    pre = pre_override if pre_override else _pre_name(tj, file)
    if not isinstance(pre, str) or not pre.strip():
        raise UserError(f"pre={pre_override!r} is not a llama.cpp pre-tokenizer name (e.g. smollm, qwen2, gpt-2)")
    normalizer = tj.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise UserError(f"{file} normalizes text ({normalizer.get('type')}), which llama.cpp's gpt2 tokenizer does "
                        f"not: convert the tokenizer with llama.cpp's convert_hf_to_gguf.py")
    if not model.get("merges"):
        raise UserError(f"{file} has no BPE merges: llama.cpp's gpt2 tokenizer needs them")
    by_id: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        by_id[i] = a["content"]
    if by_id and max(by_id) >= vocab_size:
        raise UserError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}: the "
                        f"tokenizer does not belong to this model")
    tokens, types = [], []
    T = gguf.TokenType
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        token = by_id[i]
        tokens.append(token)
        if i in added:
            special = added[i].get("special") or (token.startswith("<|") and token.endswith("|>"))
            types.append(T.CONTROL if special else T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
    return {"tokens": tokens, "types": types, "pre": pre.strip()}


def _byte_level(tj: dict) -> bool:
    def kinds(component) -> list:
        if not component:
            return []
        inner = component.get("pretokenizers") or component.get("decoders") or []
        return [component.get("type")] + [k for c in inner for k in kinds(c)]

    return "ByteLevel" in kinds(tj.get("pre_tokenizer")) + kinds(tj.get("decoder"))


def _pre_name(tj: dict, file: Path) -> str:
    pre = tj.get("pre_tokenizer") or {}
    items = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else ([pre] if pre else [])
    kinds = [p.get("type") for p in items]
    fix = ("pass --set pre=NAME (a llama.cpp tokenizer.ggml.pre value, e.g. smollm, qwen2, llama-bpe, gpt-2), "
           "or convert the tokenizer with llama.cpp's convert_hf_to_gguf.py")
    if not kinds or kinds[-1] != "ByteLevel":
        shown = "+".join(str(k) for k in kinds) or "none"
        raise UserError(f"{file}: the pre-tokenizer ({shown}) is not byte-level, so llama.cpp's gpt2 tokenizer "
                        f"would mis-tokenize it; use a byte-level BPE tokenizer or convert the tokenizer with "
                        f"llama.cpp's convert_hf_to_gguf.py")
    byte_level = items[-1]
    if byte_level.get("add_prefix_space"):
        raise UserError(f"{file}: ByteLevel(add_prefix_space=true) has no llama.cpp pre-tokenizer; {fix}")
    regex = byte_level.get("use_regex", True)
    if kinds == ["ByteLevel"] and regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and items[0].get("individual_digits") and regex:
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not regex:
        pattern = (items[0].get("pattern") or {}).get("Regex")
        if pattern in _KNOWN_SPLITS and items[0].get("behavior") == "Isolated":
            return _KNOWN_SPLITS[pattern]
    raise UserError(f"{file}: the pre-tokenizer ({'+'.join(kinds)}) matches no llama.cpp pre-tokenizer this "
                    f"export recognises; {fix}")


__all__ = ["GGUFWriter", "FILENAME"]
