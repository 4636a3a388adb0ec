"""Byte-level BPE tokenizer of the reference corpus, saved as a standard Hugging Face fast tokenizer.

Digits are split one per token (so arithmetic is learnable), text is byte-level (no unknown characters).
Special tokens: ``<s>`` (bos), ``</s>`` (eos), ``<pad>`` (pad). Training documents are packed as
``<s> doc </s> <s> doc </s> ...``; lm-eval's rolling log-likelihood uses bos as its prefix, which matches.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from moecompress.paths import subdir
from moecompress.reference import corpus

VOCAB_SIZE = 4096
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
_TOKENIZER_VERSION = 1


def _training_iterator():
    # Every domain's training text, in a fixed order. Arithmetic and facts are repetitive: a slice is enough.
    limits = {"prose": None, "technical": None, "arithmetic": 800, "facts": 1500}
    for dom in corpus.DOMAINS:
        docs = corpus.documents(dom, "train")
        yield from docs[: limits[dom]]


def train_tokenizer(vocab_size: int = VOCAB_SIZE, model_max_length: int = 2048):
    """Train the tokenizer from the corpus (deterministic) and return a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_iterator(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def tokenizer_key(vocab_size: int = VOCAB_SIZE) -> str:
    raw = f"{_TOKENIZER_VERSION}/{vocab_size}/{corpus.CORPUS_VERSION}/{corpus.fingerprint()}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def tokenizer_dir(vocab_size: int = VOCAB_SIZE) -> Path:
    """Build (once, cached under ``home()/reference/tokenizers/``) and return the tokenizer's directory."""
    root = subdir("reference") / "tokenizers"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"bpe{vocab_size}-{tokenizer_key(vocab_size)}"
    if (final / "tokenizer.json").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        train_tokenizer(vocab_size).save_pretrained(tmp)
        try:
            os.replace(tmp, final)
        except OSError:  # another process won the race; theirs is identical
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tokenizer(vocab_size: int = VOCAB_SIZE, model_max_length: int | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir(vocab_size))
    if model_max_length is not None:
        tok.model_max_length = model_max_length
    return tok
