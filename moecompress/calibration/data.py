"""Calibration data: text sources → a tokenised, seeded, fingerprinted `CalibrationSet`.

Sources (`DataSpec.source`):
* a `.txt` file (documents separated by blank lines) or a `.jsonl` file (one document per line, `field` key);
* `reference[:domain[:split]]` — the bundled reference corpus (moecompress.reference.reference_texts);
* `hf:name[:config][:split][:field]` — a Hugging Face dataset (needs the hub);
* `demos:PATH.jsonl` — few-shot demonstrations answered by the model itself (EASY-EP): each line holds `prompt`
  (and optionally `max_new_tokens`); the model generates its answer greedily (prompt rendered with the chat
  template when the tokenizer has one) and prompt + answer is the calibration text. Generated texts are cached
  under the statistics cache, keyed by the model fingerprint and the file's content.

Packing concatenates documents (EOS between them) and cuts fixed-length sequences; `packing=False` keeps one
document per sample (right-padded, padding excluded from every statistic through the attention mask).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from moecompress.errors import UserError

log = logging.getLogger("moecompress")


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str = Field("reference", description="file path, reference[:domain], hf:name[:config][:split][:field] "
                                                  "or demos:PATH.jsonl")
    samples: int = Field(64, ge=1, description="number of calibration sequences")
    seq_len: int = Field(256, ge=8, description="tokens per sequence")
    seed: int = 0
    field: str = Field("text", description="JSONL field holding the text (or 'messages' for chat format)")
    packing: bool = True
    max_new_tokens: int = Field(128, ge=1, description="demos: tokens generated per prompt unless the line says")


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


def utf8_text(path: Path) -> str:
    """A calibration file's text, or one line saying it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"calibration file {path} is not UTF-8 text (byte {e.start}); convert it (iconv -t utf-8) "
                        f"or choose another --data") from None


def read_texts(source: str, field: str = "text", tokenizer=None, model=None, max_new_tokens: int = 128,
               cache: bool = True) -> list[str]:
    """The documents of a source, in file order (`demos:` needs the model and tokenizer to generate answers)."""
    if source.startswith("demos:"):
        return demo_texts(source[len("demos:"):], model, tokenizer, max_new_tokens, cache)
    if source == "reference" or source.startswith("reference:"):
        from moecompress.reference import parse_reference_data, reference_texts

        domain, split = parse_reference_data(source)
        return reference_texts(domain, split)
    if source.startswith("hf:"):
        return _hf_texts(source, field)
    path = Path(source).expanduser()
    if not path.is_file():
        raise UserError(f"calibration file {path} does not exist; pass a .txt or .jsonl file, reference, or hf:NAME")
    if path.suffix == ".jsonl":
        texts = _jsonl_texts(path, field, tokenizer)
    elif path.suffix in (".txt", ".md", ""):
        texts = [d.strip() for d in utf8_text(path).split("\n\n") if d.strip()]
    else:
        raise UserError(f"calibration file {path} must be .txt or .jsonl, not '{path.suffix}'")
    if not texts:
        raise UserError(f"calibration file {path} has no text; fill it or choose another --data")
    return texts


def _jsonl_records(path: Path):
    """(line number, parsed JSON) for every non-blank line; a bad line is a UserError naming it."""
    for n, line in enumerate(utf8_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n} is not valid JSON; each line must be one JSON object") from None


def _jsonl_texts(path: Path, field: str, tokenizer) -> list[str]:
    texts = []
    for n, record in _jsonl_records(path):
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


def build_calibration(tokenizer, spec: DataSpec, texts: list[str] | None = None, model=None) -> CalibrationSet:
    """Tokenise, pack or pad, and sample `spec.samples` sequences with `spec.seed`."""
    if tokenizer is None:
        raise UserError("calibration needs a tokenizer; save it next to the model")
    if texts is None:
        texts = read_texts(spec.source, spec.field, tokenizer, model=model, max_new_tokens=spec.max_new_tokens,
                           cache=getattr(spec, "cache", True))
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


# ----- few-shot demonstrations with the model's own answers (EASY-EP) ------------------------------------------
def _demo_prompts(path: Path, default_new_tokens: int) -> list[tuple[str, int]]:
    if not path.is_file():
        raise UserError(f"demonstrations file {path} does not exist; pass demos:PATH.jsonl with a 'prompt' per line")
    prompts = []
    for n, record in _jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise UserError(f"{path}:{n} has no 'prompt' string; each line needs {{\"prompt\": ...}}")
        new = record.get("max_new_tokens", default_new_tokens)
        if not isinstance(new, int) or new < 1:
            raise UserError(f"{path}:{n}: max_new_tokens must be a positive integer, got {new!r}")
        prompts.append((record["prompt"], new))
    if not prompts:
        raise UserError(f"demonstrations file {path} has no prompts")
    return prompts


def render_prompt(prompt: str, tokenizer) -> str:
    """The prompt as the model sees it: the chat template with a generation prompt when there is one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def demo_texts(path: str, model, tokenizer, max_new_tokens: int = 128, cache: bool = True) -> list[str]:
    """Prompt + the model's own greedy answer, per demonstration (cached by model fingerprint and file content)."""
    if model is None or tokenizer is None:
        raise UserError("demos: calibration needs the model and its tokenizer to generate the answers")
    file = Path(path).expanduser()
    prompts = _demo_prompts(file, max_new_tokens)
    cache_file = None
    if cache:
        from moecompress.calibration.cache import model_fingerprint
        from moecompress.paths import subdir

        key = hashlib.sha256(json.dumps([model_fingerprint(model), prompts, "greedy-v1"]).encode()).hexdigest()
        cache_file = subdir("cache") / "demos" / f"{key}.json"
        if cache_file.is_file():
            log.info("demonstrations cache hit: %s (%d answers)", file.name, len(prompts))
            return json.loads(cache_file.read_text())["texts"]
    import torch

    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts = []
    model.eval()
    for prompt, new in prompts:
        rendered = render_prompt(prompt, tokenizer)
        ids = tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False, pad_token_id=pad)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        texts.append(rendered + answer)
    log.info("generated %d demonstration answers (greedy) from %s", len(texts), file.name)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"source": str(file), "texts": texts}))
        tmp.replace(cache_file)
    return texts
