"""Text metrics shared by evaluation, tools and tests: normalised exact match and word error
rate (corpus level, as speech benchmarks report it)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

# Apostrophes inside words are dropped rather than split on, so "don't" -> "dont" on both sides.
_APOSTROPHES = re.compile(r"['\u2019]")


def normalize_text(text: str) -> str:
    """Lowercase, replace punctuation by spaces and collapse whitespace.

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


def edit_distance(hyp: Sequence[str], ref: Sequence[str]) -> int:
    """Levenshtein distance (substitutions + insertions + deletions, each cost 1)."""
    prev = list(range(len(ref) + 1))
    for i, h in enumerate(hyp, start=1):
        cur = [i] + [0] * len(ref)
        for j, r in enumerate(ref, start=1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (h != r))
        prev = cur
    return prev[-1]


def word_error_rate(hyps: Sequence[str] | str, refs: Sequence[str] | str,
                    normalize: bool = True) -> float:
    """Corpus-level WER: total word edits / total reference words.

    Args:
        hyps: Hypotheses (one string, or one per reference).
        refs: References, same count as ``hyps``.
        normalize: Apply :func:`normalize_text` to both sides first.

    Returns:
        The WER (can exceed 1 with many insertions); 0.0 when every reference and hypothesis
        is empty, ``inf`` when the references are empty but some hypothesis is not.
    """
    if isinstance(hyps, str):
        hyps = [hyps]
    if isinstance(refs, str):
        refs = [refs]
    if len(hyps) != len(refs):
        raise ValueError(f"word_error_rate: {len(hyps)} hypotheses for {len(refs)} references")
    prep = normalize_text if normalize else (lambda s: s)
    edits = words = 0
    for h, r in zip(hyps, refs):
        hw, rw = prep(h).split(), prep(r).split()
        edits += edit_distance(hw, rw)
        words += len(rw)
    if words == 0:
        return 0.0 if edits == 0 else float("inf")
    return edits / words
