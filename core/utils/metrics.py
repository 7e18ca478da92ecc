"""Text metrics shared by evaluation, tools and tests: normalised exact match, and word error
rate (corpus level, as speech benchmarks report it) computed by ``jiwer`` after Whisper's
English text normaliser, the pairing the speech literature reports its WERs with."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from functools import cache

import jiwer

# Apostrophes inside words are dropped rather than split on, so "don't" -> "dont" on both sides.
_APOSTROPHES = re.compile(r"['\u2019]")


def normalize_text(text: str) -> str:
    """Lowercase, replace punctuation by spaces and collapse whitespace (exact match's
    normalisation).

    ``"  The RED ball, please! "`` -> ``"the red ball please"``. Unicode punctuation and
    symbols count as punctuation; letters and digits of any script are kept.
    """
    text = unicodedata.normalize("NFKC", text).lower()
    text = _APOSTROPHES.sub("", text)
    chars = [" " if unicodedata.category(c)[0] in "PSZC" else c for c in text]
    return " ".join("".join(chars).split())


def exact_match(pred: str, ref: str) -> bool:
    """Whether ``pred`` and ``ref`` are equal after :func:`normalize_text`."""
    return normalize_text(pred) == normalize_text(ref)


@cache
def english_normalizer() -> Callable[[str], str]:
    """Whisper's ``EnglishTextNormalizer`` (one instance: it loads a spelling table).

    It lowercases, drops punctuation, bracketed noise and fillers ("uh", "hmm"), expands
    contractions and titles ("don't" -> "do not", "Mr." -> "mister"), writes spelled-out
    numbers as digits ("twenty five" -> "25") and uses American spellings ("colour" -> "color").
    """
    # Imported here: ``whisper/__init__`` loads the model code and torch, which reports and
    # exact match do not need.
    from whisper.normalizers import EnglishTextNormalizer

    return EnglishTextNormalizer()


def word_error_rate(
    hyps: Sequence[str] | str, refs: Sequence[str] | str, normalize: bool = True
) -> float:
    """Corpus-level WER: total word edits / total reference words (``jiwer``).

    Args:
        hyps: Hypotheses (one string, or one per reference).
        refs: References, same count as ``hyps``.
        normalize: Apply Whisper's English normaliser (:func:`english_normalizer`) to both
            sides first; otherwise words are split on whitespace as given.

    Returns:
        The WER (can exceed 1 with many insertions); 0.0 when every reference and hypothesis
        is empty, ``inf`` when the references are empty but some hypothesis is not.

    Raises:
        ValueError: ``hyps`` and ``refs`` differ in length.
    """
    if isinstance(hyps, str):
        hyps = [hyps]
    if isinstance(refs, str):
        refs = [refs]
    if len(hyps) != len(refs):
        raise ValueError(f"word_error_rate: {len(hyps)} hypotheses for {len(refs)} references")
    prep = english_normalizer() if normalize else str
    pairs = [(prep(h), prep(r)) for h, r in zip(hyps, refs)]
    # An empty reference is scored here (its words are all insertions): jiwer 3 refuses one.
    scored = [(h, r) for h, r in pairs if r.split()]
    edits = sum(len(h.split()) for h, r in pairs if not r.split())
    words = 0
    if scored:
        out = jiwer.process_words([r for _, r in scored], [h for h, _ in scored])
        edits += out.substitutions + out.deletions + out.insertions
        words = out.hits + out.substitutions + out.deletions
    if words == 0:
        return 0.0 if edits == 0 else float("inf")
    return edits / words
