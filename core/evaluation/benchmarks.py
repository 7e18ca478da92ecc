"""The official scoring of the field's benchmark formats (VQAv2 / TextVQA, GQA, POPE, multiple
choice), chosen per question by ``Sample.meta["benchmark"]``.

A benchmark data source (``plugins/datasets/{vqa,gqa,pope,multiple_choice}.py``) writes the
name of its scorer and what that scorer needs into each sample's ``meta``; evaluation
(:func:`mmbridge.evaluation.qa.exact_match`) calls :func:`score` on the answers, so any
data set (a LLaVA file too) can ask for a benchmark metric by setting those keys. Samples
without ``meta["benchmark"]`` get exact match only, as before.

=====================  =========================================================================
``benchmark``          ``meta`` keys it reads
=====================  =========================================================================
``vqa``                ``answers``: the ten human answers
``gqa``                (the reference answer of the turn)
``pope``               ``label``: ``yes`` / ``no``; ``category`` (random / popular / adversarial)
``multiple_choice``    ``options`` {letter: text}, ``letter`` (the right one); ``circular``
                       (group id of the rotations of one question, for MMBench's CircularEval)
=====================  =========================================================================
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmbridge.errors import DataError

# -- VQA answer normalisation (the VQA challenge's vqaEval.py / EvalAI answer processor) ----------
CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _digits_articles(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalisation (EvalAI's answer processor): lowercase, ``,`` ``?``
    dropped and ``'s`` split off, punctuation removed (or replaced by a space), periods not
    between digits removed, number words as digits, articles dropped, contractions restored.

    ``"Two dogs."`` -> ``"2 dogs"``; ``"dont know"`` -> ``"don't know"``.
    """
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one answer: ``min(#matches / 3, 1)`` against each leave-one-out subset of
    the human answers (nine of the ten), averaged over the subsets, after
    :func:`normalize_vqa_answer` on both sides.

    With ten answers of which ``k`` match: ``k >= 4`` -> 1; ``k == 3`` -> 0.9 (seven subsets
    keep 3 matches, three keep 2); ``k == 1`` -> 0.3.
    """
    if not answers:
        raise DataError("VQA accuracy needs the human answers (meta.answers); got none")
    pred = normalize_vqa_answer(prediction)
    gts = [normalize_vqa_answer(a) for a in answers]
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, g in enumerate(gts) if j != i and g == pred)
        accs.append(min(1.0, matches / 3))
    return sum(accs) / len(accs)


# -- POPE: the yes/no reading of a free answer -----------------------------------------------------
def pope_answer(text: str) -> str:
    """``yes`` or ``no`` as POPE's evaluate.py reads a free answer: the first sentence, commas
    removed; ``no`` when it contains the word ``No``, ``no`` or ``not``, else ``yes``."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in words for w in ("No", "not", "no")) else "yes"


def binary_metrics(
    predictions: Sequence[str], labels: Sequence[str], positive: str = "yes"
) -> dict[str, float]:
    """Accuracy, precision, recall and F1 of ``positive`` against ``labels``, and the share of
    ``positive`` predictions (POPE's yes-ratio). A ratio with an empty denominator is 0."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == positive and y == positive for p, y in pairs)
    fp = sum(p == positive and y != positive for p, y in pairs)
    tn = sum(p != positive and y != positive for p, y in pairs)
    fn = sum(p != positive and y == positive for p, y in pairs)
    n = max(1, len(pairs))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": (tp + tn) / n,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": (tp + fp) / n,
    }


# -- multiple choice: the letter of a free answer --------------------------------------------------
def extract_choice(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free answer chooses, or None when it cannot be told (MMBench's
    rule-based matching before its LLM fallback).

    In order: the answer is a letter (``"B"``, ``"(B)"``, ``"B."``); it starts with one
    (``"B. a cat"``, ``"(B) cat"``); it says ``answer is B`` / ``option B``; exactly one option's
    text occurs in it; exactly one letter of the options stands alone in it (an ``A``
    followed by a word is read as the article).
    """
    s = text.strip()
    letters = [k.upper() for k in options]
    m = re.fullmatch(r"[(\[]?([A-Z])[)\].:]?", s)
    if m and m.group(1) in letters:
        return m.group(1)
    m = re.match(r"[(\[]([A-Z])[)\]]|([A-Z])[.:)]\s", s)
    if m and (m.group(1) or m.group(2)) in letters:
        return m.group(1) or m.group(2)
    m = re.search(r"(?i:answer|option|choice)\s*(?i:is|:)?\s*[(\[]?([A-Z])\b", s)
    if m and m.group(1) in letters:
        return m.group(1)
    low = normalize_vqa_answer(s)
    hits = [
        k
        for k, v in options.items()
        if v and re.search(rf"\b{re.escape(normalize_vqa_answer(v))}\b", low)
    ]
    if len(hits) == 1:
        return hits[0].upper()
    alone = {t for t in re.findall(r"\b([A-Z])\b(?!\s+[a-z])", s) if t in letters}
    return alone.pop() if len(alone) == 1 else None


# -- scorers per benchmark -------------------------------------------------------------------------
@dataclass
class Scored:
    """What a scorer returns: the metrics (keys without prefix) and one score per question
    (written to the predictions file)."""

    metrics: dict[str, float]
    per_item: list[float]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / max(1, len(values))


def _by_type(metric: str, values: Sequence[float], qtypes: Sequence[str]) -> dict[str, float]:
    groups: dict[str, list[float]] = defaultdict(list)
    for v, q in zip(values, qtypes, strict=True):
        groups[q].append(v)
    out = {metric: _mean(values)}
    if len(groups) > 1:
        out.update({f"{metric}/{q}": _mean(v) for q, v in sorted(groups.items())})
    return out


def score_vqa(
    metas: Sequence[dict],
    references: Sequence[str],
    predictions: Sequence[str],
    qtypes: Sequence[str],
) -> Scored:
    """VQA accuracy (:func:`vqa_accuracy`), overall and per answer type."""
    accs = [
        vqa_accuracy(p, m.get("answers") or [r])
        for m, r, p in zip(metas, references, predictions, strict=True)
    ]
    return Scored(_by_type("vqa_accuracy", accs, qtypes), accs)


def score_gqa(
    metas: Sequence[dict],
    references: Sequence[str],
    predictions: Sequence[str],
    qtypes: Sequence[str],
) -> Scored:
    """GQA accuracy: exact match after :func:`normalize_vqa_answer`, overall and per structural
    type."""
    ok = [
        float(normalize_vqa_answer(p) == normalize_vqa_answer(r))
        for r, p in zip(references, predictions, strict=True)
    ]
    return Scored(_by_type("gqa_accuracy", ok, qtypes), ok)


def score_pope(
    metas: Sequence[dict],
    references: Sequence[str],
    predictions: Sequence[str],
    qtypes: Sequence[str],
) -> Scored:
    """POPE: accuracy, precision, recall, F1 and yes-ratio, overall and per category."""
    read = [pope_answer(p) for p in predictions]
    labels = [
        str(m.get("label", r)).strip().lower() for m, r in zip(metas, references, strict=True)
    ]
    for m, label in zip(metas, labels, strict=True):
        if label not in ("yes", "no"):
            raise DataError(
                f"POPE question {m.get('question_id', '?')}: label {label!r} is not yes or no "
                f"(meta.label, else the reference answer)"
            )
    out = {f"pope/{k}": v for k, v in binary_metrics(read, labels).items()}
    cats: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(metas):
        cats[str(m.get("category", "all"))].append(i)
    if len(cats) > 1:
        for cat, idx in sorted(cats.items()):
            got = binary_metrics([read[i] for i in idx], [labels[i] for i in idx])
            out.update({f"pope/{k}/{cat}": v for k, v in got.items()})
    return Scored(out, [float(r == y) for r, y in zip(read, labels, strict=True)])


def score_multiple_choice(
    metas: Sequence[dict],
    references: Sequence[str],
    predictions: Sequence[str],
    qtypes: Sequence[str],
) -> Scored:
    """Accuracy of the extracted letter (:func:`extract_choice`), per category, the share of
    answers whose letter could not be told, and with ``meta.circular`` MMBench's CircularEval
    (a question counts only when every rotation of its options is answered right)."""
    ok, unknown = [], 0
    groups: dict[str, list[float]] = defaultdict(list)
    for m, r, p in zip(metas, references, predictions, strict=True):
        letter = extract_choice(p, m.get("options") or {})
        unknown += letter is None
        ok.append(float(letter is not None and letter == str(m.get("letter", r)).strip().upper()))
        if m.get("circular") is not None:
            groups[str(m["circular"])].append(ok[-1])
    out = _by_type("mc_accuracy", ok, qtypes)
    out["mc_unmatched"] = unknown / max(1, len(ok))
    if groups:
        out["mc_circular_accuracy"] = _mean([float(all(v)) for v in groups.values()])
    return Scored(out, ok)


Scorer = Callable[[Sequence[dict], Sequence[str], Sequence[str], Sequence[str]], Scored]
#: ``meta["benchmark"]`` -> its scorer ``(metas, references, predictions, qtypes) -> Scored``.
SCORERS: dict[str, Scorer] = {
    "vqa": score_vqa,
    "gqa": score_gqa,
    "pope": score_pope,
    "multiple_choice": score_multiple_choice,
}


def score(
    metas: Sequence[dict],
    references: Sequence[str],
    predictions: Sequence[str],
    qtypes: Sequence[str],
    prefix: str = "",
) -> tuple[dict[str, float], list[float | None]]:
    """The benchmark metrics of the questions whose ``meta`` names a benchmark (keys prefixed
    with ``prefix``), and each question's score (None for questions without one).

    Raises:
        DataError: for a ``meta.benchmark`` that is not one of :data:`SCORERS`.
    """
    groups: dict[str, list[int]] = defaultdict(list)
    for i, m in enumerate(metas):
        name = m.get("benchmark")
        if name is None:
            continue
        if name not in SCORERS:
            raise DataError(
                f"meta.benchmark={name!r} is not a known scorer; available: {', '.join(SCORERS)}"
            )
        groups[name].append(i)
    out: dict[str, float] = {}
    per_item: list[float | None] = [None] * len(metas)
    for name, idx in groups.items():
        got = SCORERS[name](
            [metas[i] for i in idx],
            [references[i] for i in idx],
            [predictions[i] for i in idx],
            [qtypes[i] for i in idx],
        )
        out.update({f"{prefix}{k}": v for k, v in got.metrics.items()})
        for i, v in zip(idx, got.per_item, strict=True):
            per_item[i] = v
    return out, per_item


def benchmark_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The benchmark metrics of an evaluation's output (no baselines' keys), for tables."""
    heads = ("vqa_accuracy", "gqa_accuracy", "pope/", "mc_")
    return sorted(k for k in metrics if k.startswith(heads))
