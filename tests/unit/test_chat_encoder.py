"""ChatEncoder: labels on the answers only (end-of-turn token included), slot expansion, the
placeholder rule's one message, and what ``max_length`` (``loader.max_text_tokens``) does."""

from __future__ import annotations

import pytest

from mmbridge.contracts.types import Sample
from mmbridge.data.chat import IGNORE, ChatEncoder, to_messages
from mmbridge.data.llava import validate_conversations
from mmbridge.errors import DataError


def _conv(*values: str) -> list[dict[str, str]]:
    return to_messages(
        [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)]
    )


def test_labels_cover_the_answers_and_their_end_of_turn(chat):
    tok = chat.tokenizer
    enc = chat.encode(_conv("What colour?", "red", "And the shape?", "a blue square"), {})
    assert len(enc.input_ids) == len(enc.labels) == len(enc.slot_modality) == 28
    supervised = [(i, t) for i, t in enumerate(enc.labels) if t != IGNORE]
    # each label is the token at its position (the model shifts), nothing else is supervised
    assert all(enc.input_ids[i] == t for i, t in supervised)
    assert tok.decode([t for _, t in supervised]) == "red<|end|>\na blue square<|end|>\n"
    assert [t for _, t in supervised].count(tok.eos_token_id) == 2  # each answer learns to stop
    assert enc.supervised == 8 and enc.cut_labels == 0
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE
    # the question tokens and the role markers are not supervised
    assert tok.decode(enc.input_ids[: supervised[0][0]]).endswith("<|assistant|>\n")


def test_placeholder_expands_to_its_slots(chat):
    enc = chat.encode(_conv("<image>\nWhat is it?", "two"), {"image": 5})
    where = [i for i, w in enumerate(enc.slot_modality) if w]
    assert where == [3, 4, 5, 6, 7]  # after "<s><|user|>\n" and before the question, contiguous
    assert all(enc.slot_modality[i] == "image" for i in where)
    assert all(enc.input_ids[i] == chat.pad_id and enc.labels[i] == IGNORE for i in where)
    assert chat.tokenizer.decode(enc.input_ids[where[-1] + 1 :]).startswith("\nWhat is it?")
    without = chat.encode(_conv("<image>\nWhat is it?", "two"), {"image": 1})
    assert len(enc.input_ids) - len(without.input_ids) == 4


RULE = r"each image item needs exactly one <image>, in a user turn"


@pytest.mark.parametrize(
    ("values", "slots", "counts"),
    [
        (
            ("What is it?", "two"),
            {"image": 3},
            r"0 <image> placeholder\(s\) in user turns for 1 image",
        ),
        (
            ("<image><image>What?", "two"),
            {"image": 3},
            r"2 <image> placeholder\(s\) in user turns for 1 image",
        ),
        (("<image>What?", "two"), {}, r"1 <image> placeholder\(s\) in user turns for 0 image"),
        (
            ("<image>What?", "two <image>"),
            {"image": 3},
            r"1 <image> placeholder\(s\) in user turns and 1 "
            r"in other turns for 1 image",
        ),
    ],
)
def test_placeholder_rule_one_message_everywhere(chat, values, slots, counts):
    """The chat encoder and the LLaVA reader say the same thing (one function checks)."""
    with pytest.raises(DataError, match=f"^sample s7: {counts} item\\(s\\); {RULE}$"):
        chat.encode(_conv(*values), slots, sample_id="s7")
    sample = Sample(
        "s7",
        dict.fromkeys(slots, "/x.png"),
        [{"from": "human" if k % 2 == 0 else "gpt", "value": v} for k, v in enumerate(values)],
    )
    with pytest.raises(DataError, match=f"^sample s7: {counts} item\\(s\\); {RULE}$"):
        validate_conversations(sample, "sample s7")


def test_truncation_counts_the_answer_tokens_cut(chat):
    short = ChatEncoder(chat.tokenizer, ["image"], max_length=24)
    full = chat.encode(
        _conv("<image>\nWhat is it?", "the green circle is on the left"), {"image": 10}
    )
    enc = short.encode(
        _conv("<image>\nWhat is it?", "the green circle is on the left"), {"image": 10}
    )
    assert len(full.input_ids) == 31 and full.supervised == 9
    assert len(enc.input_ids) == 24
    assert enc.input_ids == full.input_ids[:24]
    assert (enc.supervised, enc.cut_labels) == (2, 7)
    with pytest.raises(
        DataError,
        match=r"sample s1: media slots end at position 28, beyond "
        r"loader.max_text_tokens=24; raise it",
    ):
        short.encode(_conv("<image>\nWhat is it?", "two"), {"image": 25}, sample_id="s1")


def test_a_generation_prompt_over_the_budget_is_refused_not_cut(chat):
    short = ChatEncoder(chat.tokenizer, ["image"], max_length=12)
    ok = short.encode(_conv("What colour?"), {}, add_generation_prompt=True)
    assert len(ok.input_ids) == 10 and chat.tokenizer.decode(ok.input_ids).endswith(
        "<|assistant|>\n"
    )
    with pytest.raises(
        DataError,
        match=r"sample q: the prompt is 24 tokens, longer than "
        r"loader.max_text_tokens=12; cutting it would cut the question away",
    ):
        short.encode(
            _conv("What colour is the circle in the top left corner?" + " Answer." * 3),
            {},
            add_generation_prompt=True,
            sample_id="q",
        )
