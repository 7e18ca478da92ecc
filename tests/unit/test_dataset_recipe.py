"""``DataRecipe.__call__`` returning None drops the sample (dense indices, counted, logged),
and the truncation report / check of ``loader.max_text_tokens``."""

from __future__ import annotations

import logging
import random

import pytest
from torch.utils.data import DataLoader

from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.types import Sample
from mmbridge.data.chat import ChatEncoder
from mmbridge.data.dataset import (
    Collator,
    ConversationDataset,
    MediaReader,
    TruncationReport,
    check_truncation,
    truncation_report,
)
from mmbridge.errors import DataError


class EveryOther(DataRecipe):
    """Drops the samples whose id ends in an odd digit; marks the answer of the others."""

    def __call__(self, sample: Sample, rng: random.Random) -> Sample | None:
        if int(sample.id[-1]) % 2:
            return None
        turns = [
            *sample.conversations[:-1],
            {"from": "gpt", "value": "kept " + sample.conversations[-1]["value"]},
        ]
        return sample.replace(conversations=turns)


@pytest.fixture(scope="module")
def eight(image_samples) -> list[Sample]:
    return [s.replace(id=f"x{i}") for i, s in enumerate(image_samples + image_samples)]


def test_a_recipe_returning_none_drops_the_sample(tiny_model, chat, eight, caplog):
    with caplog.at_level(logging.INFO, logger="mmbridge.data.dataset"):
        ds = ConversationDataset(
            eight, EveryOther(), MediaReader(tiny_model), chat, seed=3, split="train"
        )
    assert len(ds) == 4 and ds.dropped == ["x1", "x3", "x5", "x7"]
    assert [s.id for s in ds.samples] == ["x0", "x2", "x4", "x6"]
    assert (
        "recipe EveryOther dropped 4 of 8 samples of split 'train' (first: x1, x3, x5)"
        in caplog.text
    )
    # what trains: the recipe's version of the kept samples, never a raw dropped one
    loader = DataLoader(
        ds, batch_size=3, shuffle=True, collate_fn=Collator(chat.pad_id, tiny_model)
    )
    seen = [i for batch in loader for i in batch["ids"]]
    assert sorted(seen) == ["x0", "x2", "x4", "x6"]
    tok = chat.tokenizer
    first = ds[0]
    assert tok.decode([t for t in first["labels"] if t != -100]) == "kept red<|end|>\n"


def test_the_recipe_sees_the_same_seeded_rng_as_before(tiny_model, chat, eight):
    """The recipe runs once per sample with rng ``seed:index:id`` (index in the input list)."""
    drawn = {}

    class Record(DataRecipe):
        def __call__(self, sample, rng):
            drawn[sample.id] = rng.random()
            return sample

    ConversationDataset(eight, Record(), MediaReader(tiny_model), chat, seed=3)
    assert drawn == {s.id: random.Random(f"3:{i}:{s.id}").random() for i, s in enumerate(eight)}


def test_truncation_report_counts_samples_and_tokens(tiny_model, chat, image_samples):
    reader = MediaReader(tiny_model)
    full = truncation_report(
        ConversationDataset(image_samples, DataRecipe(), reader, chat, split="train")
    )
    assert (full.samples, full.truncated, full.supervised, full.cut) == (4, 0, 20, 0)
    # lengths 81 / 85 / 85 / 93 with 3 / 5 / 3 / 9 answer tokens at the end
    short = ChatEncoder(chat.tokenizer, ["image"], max_length=84)
    rep = truncation_report(
        ConversationDataset(image_samples, DataRecipe(), reader, short, split="val")
    )
    assert (rep.samples, rep.truncated, rep.supervised, rep.cut) == (4, 3, 9, 11)
    assert rep.truncated_ids == ["s1", "s2", "s3"] and rep.share == 0.75
    assert rep.as_dict()["share"] == 0.75 and rep.as_dict()["cut_tokens"] == 11
    check_truncation([full], max_share=0.0)  # nothing cut: passes at any share
    with pytest.raises(
        DataError,
        match=r"stages.align: split 'val': 3 of 4 samples \(75.0%\) lose answer "
        r"tokens to loader.max_text_tokens \(11 cut, 9 kept\), above "
        r"loader.max_truncated_share=0.5; raise loader.max_text_tokens",
    ):
        check_truncation([full, rep], max_share=0.5, stage="align")
    check_truncation([rep], max_share=0.8)


def test_a_stage_left_without_supervised_tokens_is_an_error(tiny_model, chat, image_samples):
    short = ChatEncoder(chat.tokenizer, ["image"], max_length=78)  # every answer starts later
    rep = truncation_report(
        ConversationDataset(
            image_samples, DataRecipe(), MediaReader(tiny_model), short, split="train"
        )
    )
    assert (rep.truncated, rep.supervised) == (4, 0)
    with pytest.raises(
        DataError,
        match=r"stages.instruct: split 'train' has no supervised \(answer\) token "
        r"left: .*raise loader.max_text_tokens",
    ):
        check_truncation([rep], max_share=1.0, stage="instruct")
    with pytest.raises(
        DataError,
        match=r"split 'train' has no sample to train on \(the recipe dropped all 3; "
        r"see the stage's recipe\)",
    ):
        check_truncation([TruncationReport("train", 0, 0, 0, 0, dropped=3)])
    check_truncation([TruncationReport("val", 0, 0, 0, 0)])  # an empty val split is allowed
