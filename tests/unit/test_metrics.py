"""Shared text metrics: exact match's normalisation, and corpus-level WER (jiwer after
Whisper's English normaliser) against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from mmbridge.utils.metrics import english_normalizer, exact_match, normalize_text, word_error_rate


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  The RED ball, please! ", "the red ball please"),
        ("Don't stop.", "dont stop"),
        ("ice-cream\tand\n cake", "ice cream and cake"),
        ("“Quoted” — text…", "quoted text"),
        ("", ""),
    ],
)
def test_normalize_text(text, expected):
    assert normalize_text(text) == expected


def test_exact_match_ignores_case_punctuation_and_spacing():
    assert exact_match("Red.", "red")
    assert exact_match("  top   LEFT ", "top left")
    assert not exact_match("red ball", "red")
    assert not exact_match("3", "three")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Mr. Smith has twenty five apples.", "mister smith has 25 apples"),
        ("I don't know", "i do not know"),
        ("The colour is grey.", "the color is gray"),
        ("Uh, the ball [noise] is red", "the ball is red"),
        ("  The RED ball, please! ", "the red ball please"),
    ],
)
def test_whisper_english_normalizer(text, expected):
    assert english_normalizer()(text) == expected


def test_word_error_rate_single_and_corpus_level():
    # hyp "a b c" vs ref "a x c d": one substitution + one deletion over 4 reference words
    assert word_error_rate("a b c", "a x c d") == pytest.approx(0.5)
    # corpus level: (2 + 1) edits / (4 + 1) words = 0.6, not the mean of 0.5 and 1.0
    assert word_error_rate(["a b c", "hello world"], ["a x c d", "hello"]) == pytest.approx(0.6)
    # insertions can push WER above 1
    assert word_error_rate("a b c", "a") == pytest.approx(2.0)
    # normalised by default; exact comparison on request
    assert word_error_rate("The Ball, is red!", "the ball is red") == 0.0
    assert word_error_rate("The Ball", "the ball", normalize=False) == pytest.approx(1.0)


def test_word_error_rate_normaliser_effects():
    hyp, ref = "Mr. Smith has twenty five apples.", "mister smith has 25 apples"
    assert word_error_rate(hyp, ref) == 0.0
    # unnormalised: Mr./mister, Smith/smith, twenty/25, apples./apples substituted, "five"
    # inserted: 5 edits / 5 words
    assert word_error_rate(hyp, ref, normalize=False) == pytest.approx(1.0)
    assert word_error_rate("I don't like the colour grey", "i do not like the color gray") == 0.0
    # numbers compare as numbers: "26" against "twenty five" is one substitution in 4 words
    assert word_error_rate("he is 26 today", "he is twenty five today") == pytest.approx(0.25)


def test_word_error_rate_edge_cases():
    assert word_error_rate([], []) == 0.0
    assert word_error_rate(["", ""], ["", ""]) == 0.0
    assert math.isinf(word_error_rate("words", ""))
    assert word_error_rate("", "two words") == pytest.approx(1.0)
    # an empty reference's hypothesis words count as insertions: (0 + 2) / 2
    assert word_error_rate(["x y", "a b"], ["x y", ""]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        word_error_rate(["a", "b"], ["a"])
