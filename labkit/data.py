"""LabGPT's world: a deterministic corpus of simple stories and a task suite with exact answers.

No data set can be downloaded, so the kit writes its own. Everything here is a pure
function of a seed and of the word lists in ``data/`` (English->French words, countries
and capitals, sentiment words, story words).

The task suite (``tasks()``): translate, sentiment, arithmetic, capital, string. Each
example is one line ``<input> <sep> <answer>``, and a prompt is an optional header line,
``shots`` demonstration lines, and the query line. Three formats:

- ``vague``: no header, a bare ``->``. Zero-shot this is truly ambiguous: ``cat ->`` could
  ask for French, capitals or backwards; ``12 7 ->`` does not name the operation (though the
  operands hint at it: products use factors up to 12, differences are never negative, so a
  fixed guess from the operands is right about 80% of the time, about what ``tiny`` scores
  zero-shot); a review could be labelled positive/negative or good/bad. Demonstrations
  resolve it.
- ``specific``: a clear instruction header (``Translate each English word into French.``).
- ``contextual``: a scenario that implies the task (``At the market in Lyon, ...``).

Answers are followed by a newline, which is where generation stops.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ._args import check_int

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
FORMATS = ("vague", "specific", "contextual")
MAX_SHOTS = 8
TASKS = ("translate", "sentiment", "arithmetic", "capital", "string")
ARITHMETIC_OPS = ("add", "sub", "mul")
STRING_OPS = ("upper", "reverse", "spell")
SEPARATOR = {"vague": "->", "specific": "=>", "contextual": "=>"}

HEADERS = {
    ("specific", "translate"): [
        "Translate each English word into French.",
        "Give the French word for each English word.",
    ],
    ("contextual", "translate"): [
        "At the market in Lyon, a tourist learns the French words.",
        "Mia keeps a notebook of French words for her trip to Paris.",
    ],
    ("specific", "sentiment"): [
        "Label each review as positive or negative.",
        "Is each review positive or negative?",
    ],
    ("contextual", "sentiment"): [
        "Reviews from a travel site, sorted into positive and negative.",
        "The shop owner reads what customers wrote and marks each positive or negative.",
    ],
    ("specific", "capital"): ["Give the capital city of each country.", "Name the capital of each country."],
    ("contextual", "capital"): [
        "Geography quiz: the teacher names a country, the class names its capital.",
        "On the world map, every country has its capital marked.",
    ],
    ("specific", "add"): ["Add the two numbers.", "Compute each sum."],
    ("specific", "sub"): ["Subtract the second number from the first.", "Compute each difference."],
    ("specific", "mul"): ["Multiply the two numbers.", "Compute each product."],
    ("contextual", "add"): ["Tom counts apples: one basket, then another basket.", "Math homework on sums."],
    ("contextual", "sub"): ["Ava had some coins and spent a few. How many are left?", "Math homework on differences."],
    ("contextual", "mul"): ["Ben learns his times tables.", "Math homework on products."],
    ("specific", "upper"): ["Write each word in capital letters.", "Convert each word to uppercase."],
    ("specific", "reverse"): ["Write each word backwards.", "Reverse the letters of each word."],
    ("specific", "spell"): [
        "Spell each word with dashes between the letters.",
        "Spell out each word letter by letter.",
    ],
    ("contextual", "upper"): [
        "In the shouting game, Max yells every word loudly.",
        "On the big sign, every word is in capitals.",
    ],
    ("contextual", "reverse"): [
        "In the mirror game, Zoe reads every word from the end.",
        "Leo writes secret words backwards.",
    ],
    ("contextual", "spell"): [
        "At the spelling bee, Nora spells every word.",
        "Sam spells each word for his little sister.",
    ],
}
OP_SYMBOL = {"add": "+", "sub": "-", "mul": "*"}
SENTIMENT_LABELS = {"positive": ("positive", "negative"), "good": ("good", "bad")}  # vague training uses both


@dataclass(frozen=True)
class Example:
    """One prompt of the task suite and the answer a correct model writes after it."""

    task: str
    fmt: str
    shots: int
    prompt: str
    answer: str  # without the leading space or the trailing newline

    @property
    def text(self) -> str:
        """The prompt with its answer, as it appears in the training corpus."""
        return f"{self.prompt} {self.answer}\n"


def _read_tsv(name: str) -> list[tuple[str, str]]:
    with open(DATA_DIR / name, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return [(a, b) for a, b in rows[1:]]


@cache
def words() -> dict:
    """The word lists and facts shipped in ``data/``."""
    en_fr = _read_tsv("en_fr.tsv")
    countries = _read_tsv("countries.tsv")
    sentiment = json.loads((DATA_DIR / "sentiment.json").read_text(encoding="utf-8"))
    stories = json.loads((DATA_DIR / "stories.json").read_text(encoding="utf-8"))
    single = sorted({en for en, _ in en_fr if en.isalpha() and 3 <= len(en) <= 8})
    single += sorted({a for a in stories["animals"]} - set(single))
    return {"en_fr": en_fr, "countries": countries, "sentiment": sentiment, "stories": stories, "string_words": single}


def tasks() -> list[str]:
    """The names of the task suite."""
    return list(TASKS)


def _check(task: str, fmt: str, shots: int) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {list(TASKS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; allowed: {list(FORMATS)}")
    if not isinstance(shots, int) or not 0 <= shots <= MAX_SHOTS:
        raise ValueError(f"shots must be an int in 0..{MAX_SHOTS}, got {shots!r}")


def _review(rng: random.Random, positive: bool) -> str:
    s = words()["sentiment"]
    subject = rng.choice(s["subjects"])
    adjective = rng.choice(s["positive" if positive else "negative"])
    intensifier = rng.choice(s["intensifiers"])
    if rng.random() < 0.5:
        return f"{subject} was {intensifier}{adjective}"
    tail = rng.choice(s["positive_tails" if positive else "negative_tails"])
    return f"{adjective} {subject.split()[-1]}, {tail}"


def _item(task: str, op: str | None, fmt: str, rng: random.Random, label_scheme: str) -> tuple[str, str]:
    """One (input, answer) pair of ``task`` (and sub-operation ``op``) in format ``fmt``."""
    w = words()
    if task == "translate":
        return rng.choice(w["en_fr"])
    if task == "capital":
        return rng.choice(w["countries"])
    if task == "sentiment":
        positive = rng.random() < 0.5
        yes, no = SENTIMENT_LABELS[label_scheme]
        return _review(rng, positive), yes if positive else no
    if task == "arithmetic":
        if op == "mul":
            a, b = rng.randint(0, 12), rng.randint(0, 12)
        else:
            a, b = rng.randint(0, 50), rng.randint(0, 50)
            if op == "sub" and b > a:
                a, b = b, a
        result = {"add": a + b, "sub": a - b, "mul": a * b}[op]
        question = f"{a} {b}" if fmt == "vague" else f"{a} {OP_SYMBOL[op]} {b}"
        return question, str(result)
    # string: the word pool includes country names half the time the query could be one
    word = rng.choice(w["string_words"]) if rng.random() < 0.8 else rng.choice(w["countries"])[0].lower()
    if " " in word:
        word = word.split()[0]
    answer = {"upper": word.upper(), "reverse": word[::-1], "spell": "-".join(word)}[op]
    return word, answer


def make_example(
    task: str,
    fmt: str = "specific",
    shots: int = 0,
    rng: random.Random | None = None,
    op: str | None = None,
    label_scheme: str = "positive",
) -> Example:
    """Build one prompt: header (unless vague), ``shots`` demonstrations, the query."""
    _check(task, fmt, shots)
    allowed_ops = {"arithmetic": ARITHMETIC_OPS, "string": STRING_OPS}.get(task, ())
    if op is not None and op not in allowed_ops:
        raise ValueError(f"op {op!r} does not belong to task {task!r}; allowed: "
                         f"{list(allowed_ops) or 'none (only arithmetic and string take an op)'}")  # fmt: skip
    if label_scheme not in SENTIMENT_LABELS:
        raise ValueError(f"label_scheme must be one of {sorted(SENTIMENT_LABELS)}, got {label_scheme!r}")
    rng = rng or random.Random(0)
    if task == "arithmetic":
        op = op or rng.choice(ARITHMETIC_OPS)
    elif task == "string":
        op = op or rng.choice(STRING_OPS)
    pairs: list[tuple[str, str]] = []
    seen = set()
    while len(pairs) < shots + 1:  # distinct inputs, so a demonstration never gives the answer away
        x, y = _item(task, op, fmt, rng, label_scheme)
        if x not in seen:
            seen.add(x)
            pairs.append((x, y))
    sep = SEPARATOR[fmt]
    lines = []
    if fmt != "vague":
        lines.append(rng.choice(HEADERS[(fmt, op or task)]))
    lines += [f"{x} {sep} {y}" for x, y in pairs[:-1]]
    query, answer = pairs[-1]
    lines.append(f"{query} {sep}")
    return Example(task=task, fmt=fmt, shots=shots, prompt="\n".join(lines), answer=answer)


def examples(task: str, fmt: str = "specific", shots: int = 0, n: int = 200, seed: int = 1234) -> list[Example]:
    """``n`` evaluation prompts, a pure function of the arguments."""
    _check(task, fmt, shots)
    check_int("n", n)
    rng = random.Random(f"{seed}-{task}-{fmt}-{shots}")
    return [make_example(task, fmt, shots, rng) for _ in range(n)]


def story(rng: random.Random) -> str:
    """A short story from templates: names, animals, places, weather, a small plot."""
    s = words()["stories"]
    name, friend = rng.sample(s["names"], 2)
    animal, place, thing = rng.choice(s["animals"]), rng.choice(s["places"]), rng.choice(s["objects"])
    sentences = [
        f"One {rng.choice(s['weather'])} day, {name} went to {place} with a {animal}.",
        f"There {name} met {friend}, who felt {rng.choice(s['feelings'])}.",
        f"They {rng.choice(s['actions'])} {thing} together.",
    ]
    if rng.random() < 0.5:
        country, capital = rng.choice(words()["countries"])
        sentences.append(f"{friend} said that {capital} is the capital of {country}.")
    if rng.random() < 0.5:
        en, fr = rng.choice(words()["en_fr"])
        sentences.append(f'"In French, {en} is {fr}," said {name}.')
    sentences.append(f"The {animal} was {rng.choice(s['feelings'])}.")
    sentences.append(rng.choice(s["endings"]))
    return " ".join(sentences) + "\n"


def training_document(rng: random.Random, task_fraction: float = 0.75) -> str:
    """One document of the training mixture: a story, or a task prompt with its answer."""
    if rng.random() >= task_fraction:
        return story(rng)
    task = rng.choice(TASKS)
    fmt = rng.choice(FORMATS)
    shots = rng.randint(0, MAX_SHOTS)
    scheme = rng.choice(list(SENTIMENT_LABELS)) if fmt == "vague" else "positive"
    return make_example(task, fmt, shots, rng, label_scheme=scheme).text


def corpus(n_chars: int, seed: int = 0, task_fraction: float = 0.75) -> str:
    """About ``n_chars`` characters of training text; documents separated by a blank line."""
    check_int("n_chars", n_chars)
    if not 0.0 <= task_fraction <= 1.0:
        raise ValueError(f"task_fraction must be in [0, 1], got {task_fraction}")
    rng = random.Random(seed)
    parts, total = [], 0
    while total < n_chars:
        doc = training_document(rng, task_fraction) + "\n"
        parts.append(doc)
        total += len(doc)
    return "".join(parts)
