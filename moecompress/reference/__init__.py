"""The embedded default: a bundled public-domain corpus, its tokenizer, and small real MoE models trained on it.

    from moecompress.reference import build_reference, reference_path, reference_texts
    path = build_reference("tiny")          # trains once (~1 min on 2 cores), then cached under home()/reference/
    texts = reference_texts("facts", "train")

Nothing here needs a network or a model hub.
"""

from __future__ import annotations

from moecompress.reference.build import (
    REFERENCE_NAMES,
    SPECS,
    build_reference,
    get_spec,
    is_built,
    reference_dir,
    reference_info,
    reference_path,
)
from moecompress.reference.corpus import DOMAINS, SPLITS, check_domain, check_split, documents
from moecompress.reference.tokenizer import load_tokenizer, tokenizer_dir


def reference_texts(domain: str | None = None, split: str = "train") -> list[str]:
    """Documents of the bundled corpus for calibration (``--data reference[:domain]``).

    ``domain=None`` mixes all domains (interleaved round-robin, so any prefix is balanced); ``split`` is
    ``train`` (default; what the reference models saw), ``validation`` or ``test`` (held out).
    """
    check_domain(domain)
    check_split(split)
    if domain is not None:
        return documents(domain, split)
    per = [documents(d, split) for d in DOMAINS]
    out: list[str] = []
    for i in range(max(len(p) for p in per)):
        out.extend(p[i] for p in per if i < len(p))
    return out


def parse_reference_data(spec: str) -> tuple[str | None, str]:
    """``"reference"`` → (None, "train"); ``"reference:facts"`` → ("facts", "train");
    ``"reference:facts:validation"`` → ("facts", "validation"). For the CLI's ``--data``."""
    from moecompress.errors import UserError

    parts = spec.split(":")
    if parts[0] != "reference" or len(parts) > 3:
        raise UserError(f"bad reference data spec {spec!r}: use reference, reference:<domain> or reference:<domain>:<split>")
    domain = parts[1] if len(parts) > 1 and parts[1] not in ("", "all") else None
    split = parts[2] if len(parts) > 2 else "train"
    check_domain(domain)
    check_split(split)
    return domain, split


def load_reference(name: str):
    """(model, tokenizer) of a built reference model (fp32, eval mode). UserError if it is not built."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = reference_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype="float32")
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


__all__ = [
    "DOMAINS",
    "REFERENCE_NAMES",
    "SPECS",
    "SPLITS",
    "build_reference",
    "documents",
    "get_spec",
    "is_built",
    "load_reference",
    "load_tokenizer",
    "parse_reference_data",
    "reference_dir",
    "reference_info",
    "reference_path",
    "reference_texts",
    "tokenizer_dir",
]
