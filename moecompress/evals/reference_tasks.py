"""Offline lm-eval tasks on the bundled reference corpus, generated deterministically.

Per domain ``d`` in ``prose, technical, arithmetic, facts``:

``reference_<d>``      4-way multiple choice (chance 0.25). Splits: ``train`` (≥ 200 items, from training text: for
                       few-shot demos), ``validation`` (≥ 200, held out: for search methods), ``test`` (≥ 400, held
                       out: the score). Held-out items never occur verbatim in the training text.
                       - prose / technical: a held-out sentence cut in two (context = its start); the choices are
                         its true ending and three copies of that ending in which the same word is replaced by
                         another word drawn from the domain's training text in proportion to its frequency (so
                         the distractors are common words, not oddities a unigram count would reject): a cloze
                         test of which word the context and the rest of the ending call for. Punctuation and
                         capitalisation of the replaced word are kept.
                         (Version 1 used endings of other held-out sentences as distractors: the 5.6 M-parameter
                         reference models scored 1.4-1.9x chance on it, too close to chance to measure damage.)
                       - arithmetic: ``"37 + 48:"`` → its worked solution (``"7 + 8 = 15, 3 + 4 + 1 = 8, so
                         37 + 48 = 85."``) among three wrong ones, each with one digit step off by ±1 or ±2 (units
                         or tens) and the mistake carried through to a near-miss answer; the (a, op, b) triple
                         never occurs in training.
                       - facts: ``"The capital of Varnia is"`` → the value among others of the same attribute; the
                         fact is in training text, but never in this phrasing.
``reference_<d>_ppl``  held-out documents of the domain, ``loglikelihood_rolling``: word/byte perplexity, bits per byte.

Groups: ``reference`` (all), ``reference_mc``, ``reference_ppl``.

The JSONL files and YAML configs are written under ``home()/evals/`` (absolute ``data_files`` paths, so lm-eval
reads them offline) into a directory named by a hash of the content; writes are atomic.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

from moecompress.paths import subdir
from moecompress.reference import corpus

TASKS_VERSION = 2
MC_SIZES = {"train": 220, "validation": 220, "test": 440}
PPL_MAX_CHARS = 60_000  # per ppl task: enough for a stable number, cheap on CPU
GROUP = "reference"


def mc_task(domain: str) -> str:
    return f"reference_{domain}"


def ppl_task(domain: str) -> str:
    return f"reference_{domain}_ppl"


def mc_task_names() -> list[str]:
    return [mc_task(d) for d in corpus.DOMAINS]


def ppl_task_names() -> list[str]:
    return [ppl_task(d) for d in corpus.DOMAINS]


def group_names() -> list[str]:
    return [GROUP, f"{GROUP}_mc", f"{GROUP}_ppl"]


def all_names() -> list[str]:
    return group_names() + mc_task_names() + ppl_task_names()


# ---------------------------------------------------------------------------------------------- items


_SENT_SPLIT = re.compile(r"(?<=[.;:?!])\s+")


def running_text(doc: str, domain: str) -> str:
    """A document as one whitespace-normalised line; technical documents keep their prose paragraphs only (code,
    grammar and tables are indented or symbol-heavy)."""
    if domain == "technical":
        paras = [p for p in re.split(r"\n\s*\n", doc) if p and not p[0].isspace()]
        return " ".join(" ".join(p.split()) for p in paras)
    return " ".join(doc.split())


def _sentences(doc: str, domain: str) -> list[str]:
    out = []
    for s in _SENT_SPLIT.split(running_text(doc, domain)):
        words = s.split()
        if not 8 <= len(words) <= 60:
            continue
        letters = sum(ch.isalpha() or ch.isspace() for ch in s)
        if letters < 0.75 * len(s):
            continue
        out.append(" ".join(words))
    return out


_WORD = re.compile(r"^(\W*)([A-Za-z]+(?:'[a-z]+)?)(\W*)$")


def _shape(word: str) -> str:
    return "upper" if word.isupper() and len(word) > 1 else "title" if word[0].isupper() else "lower"


@functools.lru_cache(maxsize=None)
def _word_pool(domain: str) -> dict[str, tuple[str, ...]]:
    """Every alphabetic word of the domain's training sentences, with repetition (sampling from it is sampling in
    proportion to frequency), by capitalisation shape (a lower-case slot gets a lower-case word, and so on)."""
    pool: dict[str, list[str]] = {"upper": [], "title": [], "lower": []}
    for doc in corpus.documents(domain, "train"):  # document order: deterministic (a set's order is not)
        for w in " ".join(_sentences(doc, domain)).split():
            m = _WORD.match(w)
            if m:
                pool[_shape(m.group(2))].append(m.group(2))
    return {k: tuple(v) for k, v in pool.items()}


def _cloze_choices(ending: str, rng: random.Random, pool: dict[str, tuple[str, ...]]) -> list[str] | None:
    """[true ending, 3 endings with the same word replaced by frequency-sampled domain words of the same
    capitalisation], or None when the ending has no plain word to replace."""
    words = ending.split()
    slots = [i for i, w in enumerate(words) if _WORD.match(w)]
    if not slots:
        return None
    i = rng.choice(slots)
    lead, core, trail = _WORD.match(words[i]).groups()
    candidates = pool[_shape(core)]
    used = {core.lower()}
    out = [ending]
    for _ in range(200):
        cand = rng.choice(candidates)
        if cand.lower() in used:
            continue
        used.add(cand.lower())
        out.append(" ".join(words[:i] + [lead + cand + trail] + words[i + 1 :]))
        if len(out) == 4:
            return out
    return None


def _text_items(domain: str, split: str, seen: frozenset[str]) -> list[dict]:
    rng = random.Random(f"mc/{TASKS_VERSION}/{domain}/{split}")
    sents: list[str] = []
    for doc in corpus.documents(domain, split):
        sents.extend(s for s in _sentences(doc, domain) if s not in seen)
    sents = list(dict.fromkeys(sents))  # dedupe, keep order
    cut_items = []
    for s in sents:
        words = s.split()
        n_end = min(8, max(4, len(words) // 2))
        cut_items.append((" ".join(words[:-n_end]), " ".join(words[-n_end:])))
        if len(words) >= 14:  # a long sentence also gives a mid-sentence continuation item
            k, m = len(words) // 3, min(8, max(4, len(words) // 4))
            cut_items.append((" ".join(words[:k]), " ".join(words[k : k + m])))
    rng.shuffle(cut_items)
    pool = _word_pool(domain)
    items = []
    for ctx, end in cut_items:
        choices = _cloze_choices(end, rng, pool)
        if choices is None:
            continue
        rng.shuffle(choices)
        items.append({"context": ctx, "choices": choices, "label": choices.index(end)})
        if len(items) >= MC_SIZES[split] + 40:  # a margin for the verbatim filter that follows
            break
    return items


_ARITHMETIC_ERRORS = tuple((step, d) for step in (0, 1) for d in (-2, -1, 1, 2))


def _arithmetic_items(split: str) -> list[dict]:
    rng = random.Random(f"mc/{TASKS_VERSION}/arithmetic/{split}")
    eqs = list(corpus._equations()[split])
    rng.shuffle(eqs)
    items = []
    for eq in eqs[: MC_SIZES[split]]:
        true = eq.solution()
        wrong = [w for w in (eq.solution(e) for e in _ARITHMETIC_ERRORS) if w is not None and w != true]
        choices = [true] + rng.sample(wrong, 3)
        rng.shuffle(choices)
        items.append({"context": eq.prompt, "choices": choices, "label": choices.index(true)})
    return items


def _facts_items(split: str) -> list[dict]:
    rng = random.Random(f"mc/{TASKS_VERSION}/facts/{split}")
    w = corpus.world()
    facts = [f for f in w.facts if w.split[(f.entity, f.attribute)] == split]
    rng.shuffle(facts)
    items = []
    for f in facts[: MC_SIZES[split]]:
        pool = [v for v in w.values[f.attribute] if v != f.value]
        choices = [f.value] + rng.sample(pool, 3)
        rng.shuffle(choices)
        items.append({"context": f.prompt, "choices": choices, "label": choices.index(f.value)})
    return items


@functools.lru_cache(maxsize=None)
def _split_sentences(domain: str, split: str) -> frozenset[str]:
    seen: set[str] = set()
    for doc in corpus.documents(domain, split):
        seen.update(_sentences(doc, domain))
    return frozenset(seen)


@functools.lru_cache(maxsize=None)
def _mc_items_cached(domain: str, split: str) -> tuple[dict, ...]:
    if domain in ("prose", "technical"):
        # held-out items avoid every sentence of the splits before them (train; train + validation)
        earlier = corpus.SPLITS[: corpus.SPLITS.index(split)]
        seen = frozenset().union(*(_split_sentences(domain, s) for s in earlier))
        items = _text_items(domain, split, seen)
        if earlier:  # and no item (context + answer) is a substring of earlier text, even mid-sentence
            text = "\n".join(" ".join(d.split()) for s in earlier for d in corpus.documents(domain, s))
            items = [it for it in items if f"{it['context']} {it['choices'][it['label']]}" not in text]
    elif domain == "arithmetic":
        items = _arithmetic_items(split)
    else:
        items = _facts_items(split)
    items = items[: MC_SIZES[split]]
    return tuple({"id": f"{domain}-{split}-{i}", **it} for i, it in enumerate(items))


def mc_items(domain: str, split: str) -> list[dict]:
    """The multiple-choice items of a domain and split: ``{"id", "context", "choices", "label"}``.

    Score a choice as the log-likelihood of ``" " + choice`` after ``context`` (lm-eval's target delimiter).
    """
    corpus.check_domain(domain)
    corpus.check_split(split)
    return [dict(it) for it in _mc_items_cached(domain, split)]


def ppl_docs(domain: str, split: str = "test") -> list[dict]:
    docs, total = [], 0
    for d in corpus.documents(domain, split):
        if total >= PPL_MAX_CHARS:
            break
        docs.append({"id": f"{domain}-{split}-{len(docs)}", "text": d})
        total += len(d)
    return docs


# ---------------------------------------------------------------------------------------------- writing


def _mc_yaml(domain: str, files: dict[str, str]) -> dict:
    return {
        "task": mc_task(domain),
        "tag": ["reference_tasks"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "output_type": "multiple_choice",
        "training_split": "train",
        "validation_split": "validation",
        "test_split": "test",
        "fewshot_split": "train",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "target_delimiter": " ",
        "fewshot_delimiter": "\n",
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True},
        ],
        "metadata": {"version": float(TASKS_VERSION), "chance": 0.25, "domain": domain},
    }


def _ppl_yaml(domain: str, files: dict[str, str]) -> dict:
    return {
        "task": ppl_task(domain),
        "tag": ["reference_tasks"],
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "output_type": "loglikelihood_rolling",
        "validation_split": "validation",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "byte_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False},
            {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False},
        ],
        "metadata": {"version": float(TASKS_VERSION), "domain": domain},
    }


def _build(dest: Path, final: Path) -> None:
    """Write everything into ``dest``; the YAMLs name data files by their paths once ``dest`` is renamed ``final``."""
    import yaml

    data = dest / "data"
    data.mkdir(parents=True)
    final_data = final / "data"
    stats = {}
    for dom in corpus.DOMAINS:
        mc_files, ppl_files = {}, {}
        for split in corpus.SPLITS:
            items = mc_items(dom, split)
            p = data / f"{dom}_mc_{split}.jsonl"
            p.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
            mc_files[split] = str(final_data / p.name)
            stats[f"{mc_task(dom)}/{split}"] = len(items)
        for split in ("validation", "test"):
            docs = ppl_docs(dom, split)
            p = data / f"{dom}_ppl_{split}.jsonl"
            p.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
            ppl_files[split] = str(final_data / p.name)
            stats[f"{ppl_task(dom)}/{split}"] = len(docs)
        for cfg in (_mc_yaml(dom, mc_files), _ppl_yaml(dom, ppl_files)):
            (dest / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    groups = {
        GROUP: mc_task_names() + ppl_task_names(),
        f"{GROUP}_mc": mc_task_names(),
        f"{GROUP}_ppl": ppl_task_names(),
    }
    for name, tasks in groups.items():
        cfg = {"group": name, "task": tasks, "metadata": {"version": float(TASKS_VERSION)}}
        (dest / f"_{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (dest / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")


def tasks_key() -> str:
    code = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()  # any change to the item logic regenerates
    raw = f"{TASKS_VERSION}/{corpus.CORPUS_VERSION}/{corpus.fingerprint()}/{code}"
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def tasks_dir() -> Path:
    """Write (once) and return the directory of the reference task YAMLs (an lm-eval ``include_path``)."""
    root = subdir("evals")
    final = root / f"reference-tasks-{tasks_key()}"
    if (final / "stats.json").is_file():
        return final
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        _build(tmp, final)
        try:
            os.replace(tmp, final)
        except OSError:  # a concurrent process finished first; its output is identical
            if not (final / "stats.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def task_stats() -> dict[str, int]:
    return json.loads((tasks_dir() / "stats.json").read_text())
