"""The named samples -> batch pipeline (:class:`mmbridge.data.batcher.Batcher`): the same batches
as the hand-assembled ``encode_sample`` + ``MediaReader`` + ``Collator`` path it replaces, for
training (right padded), generation (prompt + left padded) and cached features; pinned on the
seeded tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.types import Sample
from mmbridge.data.batcher import Batcher, to_device
from mmbridge.data.dataset import Collator, ConversationDataset, MediaReader, encode_sample
from mmbridge.data.feature_cache import load_or_compute

pytestmark = pytest.mark.usefixtures("one_thread")

#: forward's loss on the four image samples of conftest (as tests/unit/test_collator_and_loss.py).
PINNED_LOSS = 7.184994


def assert_same_batch(a: dict, b: dict) -> None:
    """Equal keys, equal tensors (nested), equal ids."""
    assert a.keys() == b.keys()
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b[key]), key
        elif isinstance(value, dict):
            assert_same_batch(value, b[key])
        else:
            assert value == b[key], key


def hand_batch(model, chat, samples, generation: bool = False, tables=None) -> dict:
    """The path the Batcher replaces, as evaluation/generate assembled it by hand."""
    reader = MediaReader(model, tables)
    items = [encode_sample(s, reader, chat, add_generation_prompt=generation) for s in samples]
    return Collator(chat.pad_id, model, left_pad=generation)(items)


def prompts(samples: list[Sample]) -> list[Sample]:
    return [s.replace(conversations=s.conversations[:1]) for s in samples]


def test_training_batch_equals_the_hand_path_and_its_loss_is_pinned(
    tiny_model, chat, image_samples
):
    batcher = Batcher.from_model(tiny_model, chat)
    batch = batcher.batch(image_samples)
    assert_same_batch(batch, hand_batch(tiny_model, chat, image_samples))
    assert batch["attention_mask"].sum(1).tolist() == [81, 85, 85, 93]
    assert batch["attention_mask"][:, 0].tolist() == [1, 1, 1, 1]  # right padded
    assert batch["slots"]["image"].sum(1).tolist() == [64] * 4
    with torch.no_grad():
        assert tiny_model(batch).item() == pytest.approx(PINNED_LOSS, abs=1e-4)


def test_generation_batch_is_the_prompt_left_padded(tiny_model, chat, image_samples):
    batcher = Batcher.from_model(tiny_model, chat)
    asked = prompts(image_samples)
    batch = batcher.batch(asked, generation=True)
    assert_same_batch(batch, hand_batch(tiny_model, chat, asked, generation=True))
    lengths = batch["attention_mask"].sum(1).tolist()
    assert batch["attention_mask"][:, -1].tolist() == [1, 1, 1, 1]  # left padded
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
    assert (batch["labels"] == -100).all()  # nothing supervised in a prompt
    # the prompt is the training row up to the answer, plus the generation prompt: the rows
    # hold the same ids up to there
    train = batcher.batch(image_samples)
    n0 = len(batcher.encode(image_samples[0])["input_ids"])
    prompt0 = batcher.encode(asked[0], add_generation_prompt=True)["input_ids"]
    assert train["input_ids"][0, : len(prompt0)].tolist() == prompt0 and len(prompt0) < n0
    # greedy generation is the same through both paths
    with torch.no_grad():
        new = tiny_model.generate(batch, max_new_tokens=3)
        ref = tiny_model.generate(
            hand_batch(tiny_model, chat, asked, generation=True), max_new_tokens=3
        )
    assert torch.equal(new, ref)


def test_collate_side_and_encode_are_the_parts_of_batch(tiny_model, chat, image_samples):
    right = Batcher.from_model(tiny_model, chat)
    left = Batcher.from_model(tiny_model, chat, left_pad=True)
    items = [right.encode(s) for s in image_samples]
    assert (
        items[2]["input_ids"]
        == encode_sample(image_samples[2], MediaReader(tiny_model), chat)["input_ids"]
    )
    assert_same_batch(left.collate(items), Collator(chat.pad_id, tiny_model, left_pad=True)(items))
    assert_same_batch(right.collate(items, left_pad=True), left.collate(items))
    assert_same_batch(left.batch(image_samples), left.collate(items))
    assert right.collator.left_pad is False and left.collator.left_pad is True


def test_cached_features_go_into_the_batch_as_features(tiny_model, chat, image_samples, tmp_path):
    encoder = tiny_model.branches["image"].encoder
    paths = [s.media["image"] for s in image_samples]
    table, _ = load_or_compute(encoder, paths, tmp_path / "cache")
    cached = Batcher.from_model(tiny_model, chat, tables={"image": table})
    batch = cached.batch(image_samples)
    assert_same_batch(batch, hand_batch(tiny_model, chat, image_samples, tables={"image": table}))
    assert set(batch["media"]["image"]) == {"features", "feature_mask"}
    assert batch["media"]["image"]["features"].shape == (4, 64, encoder.out_dim)
    assert cached.tables == {"image": table}
    # the cached features are the live encoder's output: the same loss
    with torch.no_grad():
        assert tiny_model(batch).item() == pytest.approx(PINNED_LOSS, abs=1e-4)


def test_dataset_rows_are_encode_rows(tiny_model, chat, image_samples):
    batcher = Batcher.from_model(tiny_model, chat)
    ds = batcher.dataset(image_samples, DataRecipe(), seed=3, split="train")
    old = ConversationDataset(
        image_samples, DataRecipe(), MediaReader(tiny_model), chat, seed=3, split="train"
    )
    assert isinstance(ds, ConversationDataset) and len(ds) == len(old) == 4 and ds.split == "train"
    assert_same_batch(
        batcher.collator([ds[i] for i in range(4)]),
        Collator(chat.pad_id, tiny_model)([old[i] for i in range(4)]),
    )
    assert (
        ds[1]["input_ids"]
        == batcher.encode(DataRecipe()(image_samples[1], random.Random(0)))["input_ids"]
    )


def test_device_defaults_and_to_device(tiny_model, chat, image_samples):
    assert Batcher.from_model(tiny_model, chat).device == torch.device("cpu")  # where the model is
    plain = Batcher(dict(tiny_model.branches.items()), chat)
    assert plain.device is None and plain.modalities == ["image"]
    batch = plain.batch(image_samples[:1])
    assert plain.to_device(batch) is batch  # no device: as it is
    meta = torch.device("meta")
    moved = plain.to_device(batch, meta)
    assert moved["input_ids"].device == meta and moved["slots"]["image"].device == meta
    assert moved["media"]["image"]["inputs"].device == meta and moved["ids"] == batch["ids"]
    assert to_device({"a": [torch.ones(1)], "b": torch.ones(2)}, meta)["a"][0].device.type == "cpu"
    assert plain.batch(image_samples[:1], device=meta)["input_ids"].device == meta


def test_a_media_modality_without_a_branch_names_the_sample(tiny_model, chat, image_samples):
    from mmbridge.errors import DataError

    odd = image_samples[0].replace(id="odd", media={"audio": "x.wav"})
    with pytest.raises(
        DataError,
        match=r"media 'audio' \(x.wav\) but the model has no audio encoder; modalities: image",
    ):
        Batcher.from_model(tiny_model, chat).encode(odd)


def test_evaluation_through_the_batcher_gives_the_hand_paths_answers(
    tiny_model, chat, image_samples
):
    """qa.exact_match (now through a Batcher) answers as the hand-assembled loop it replaced:
    the same predictions, so the same figures."""
    from mmbridge.evaluation.qa import exact_match, qa_items

    items = qa_items(image_samples)
    records: list[dict] = []
    out = exact_match(
        tiny_model,
        items,
        Batcher.from_model(tiny_model, chat),
        records=records,
        batch_size=3,
        max_new_tokens=4,
        progress=False,
    )
    reader, collate, hand = (
        MediaReader(tiny_model),
        Collator(chat.pad_id, tiny_model, left_pad=True),
        [],
    )
    with torch.no_grad():
        for i in range(0, len(items), 3):  # the loop of evaluation/qa.py before the Batcher
            encoded = [
                encode_sample(
                    it.sample.replace(conversations=it.sample.conversations[:-1]),
                    reader,
                    chat,
                    add_generation_prompt=True,
                )
                for it in items[i : i + 3]
            ]
            new = tiny_model.generate(collate(encoded), max_new_tokens=4)
            hand += [chat.tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    assert [r["prediction"] for r in records] == hand and len(hand) == 4
    assert out["exact_match"] == sum(r["correct"] for r in records) / 4
