"""Calibration data: text sources → a tokenised, seeded, fingerprinted `CalibrationSet`.

Sources (`DataSpec.source`):
* a `.txt` file (documents separated by blank lines) or a `.jsonl` file (one document per line, `field` key);
* `reference[:domain]` — the bundled reference corpus (moecompress.reference);
* `hf:name[:config][:split][:field]` — a Hugging Face dataset (needs the hub).

Packing concatenates documents (EOS between them) and cuts fixed-length sequences; `packing=False` keeps one
document per sample (right-padded, padding excluded from every statistic through the attention mask).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from moecompress.errors import UserError


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field("reference", description="file path, reference[:domain] or hf:name[:config][:split][:field]")
    samples: int = Field(64, ge=1, description="number of calibration sequences")
    seq_len: int = Field(256, ge=8, description="tokens per sequence")
    seed: int = 0
    field: str = Field("text", description="JSONL field holding the text (or 'messages' for chat format)")
    packing: bool = True


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L], 0 on padding
    source: str
    fingerprint: str  # sha256 over the token ids and mask

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self, batch_size: int):
        for i in range(0, len(self.input_ids), batch_size):
            yield self.input_ids[i:i + batch_size], self.attention_mask[i:i + batch_size]


def read_texts(source: str, field: str = "text", tokenizer=None) -> list[str]:
    """The documents of a source, in file order."""
    if source == "reference" or source.startswith("reference:"):
        from moecompress.reference import reference_texts

        domain = source.partition(":")[2] or None
        return reference_texts(domain, "train")
    if source.startswith("hf:"):
        return _hf_texts(source, field)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist; pass a .txt or .jsonl file, reference, or hf:NAME")
    if path.suffix == ".jsonl":
        texts = _jsonl_texts(path, field, tokenizer)
    elif path.suffix in (".txt", ".md", ""):
        texts = [d.strip() for d in path.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    else:
        raise UserError(f"calibration file {path} must be .txt or .jsonl, not '{path.suffix}'")
    if not texts:
        raise UserError(f"calibration file {path} has no text; fill it or choose another --data")
    return texts


def _jsonl_texts(path: Path, field: str, tokenizer) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON; each line must be one JSON object") from None
        value = record.get(field) if isinstance(record, dict) else None
        if value is None:
            raise UserError(f"{path}:{n} has no '{field}' field; set the field name with --set data.field=NAME")
        if isinstance(value, list):  # chat messages
            value = _render_chat(value, tokenizer)
        texts.append(str(value))
    return [t for t in texts if t.strip()]


def _render_chat(messages: list[dict], tokenizer) -> str:
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def _hf_texts(source: str, field: str) -> list[str]:
    parts = source[3:].split(":")
    name, config, split = parts[0], (parts[1] or None) if len(parts) > 1 else None, parts[2] if len(parts) > 2 else "train"
    field = parts[3] if len(parts) > 3 else field
    try:
        from datasets import load_dataset

        dataset = load_dataset(name, config, split=split)
    except Exception as e:  # the hub is unreachable or the name is wrong
        raise UserError(f"cannot load Hugging Face dataset '{name}': {str(e).splitlines()[0]}") from None
    return [str(r[field]) for r in dataset if str(r[field]).strip()]


def build_calibration(tokenizer, spec: DataSpec, texts: list[str] | None = None) -> CalibrationSet:
    """Tokenise, pack or pad, and sample `spec.samples` sequences with `spec.seed`."""
    texts = read_texts(spec.source, spec.field, tokenizer) if texts is None else texts
    rng = random.Random(spec.seed)
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if spec.packing:
        eos = tokenizer.eos_token_id
        stream = [tok for ids in encoded for tok in ids + ([eos] if eos is not None else [])]
        if not stream:
            raise UserError(f"calibration source {spec.source} produced no tokens")
        chunks = [stream[i:i + spec.seq_len] for i in range(0, max(len(stream) - spec.seq_len, 0) + 1, spec.seq_len)]
        chosen = sorted(rng.sample(range(len(chunks)), min(spec.samples, len(chunks))))
        rows = [chunks[i] for i in chosen]
    else:
        docs = [ids[: spec.seq_len] for ids in encoded if ids]
        chosen = sorted(rng.sample(range(len(docs)), min(spec.samples, len(docs))))
        rows = [docs[i] for i in chosen]
    length = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    digest = hashlib.sha256(input_ids.numpy().tobytes() + mask.numpy().tobytes()).hexdigest()
    return CalibrationSet(input_ids, mask, spec.source, digest)
