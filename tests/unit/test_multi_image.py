"""Multi-image records end to end: a batch that mixes a two-image record, a text-only record
and a one-image record gets each image's connector tokens in its own placeholder's slots, labels
on the answers only, the same loss as its rows alone, live or from the feature cache, padded
right (training) or left (generation). The seeded tiny model of ``conftest`` (64 px ViT, 64
patches -> MLP -> 64 slots per image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmbridge.config import compose
from mmbridge.contracts.recipe import DataRecipe
from mmbridge.contracts.types import Sample
from mmbridge.data.chat import IGNORE
from mmbridge.data.dataset import (
    Collator,
    ConversationDataset,
    MediaReader,
    encode_sample,
    strip_media,
    truncation_report,
)
from mmbridge.data.feature_cache import load_or_compute
from mmbridge.data.llava import read_llava
from mmbridge.errors import DataError
from mmbridge.runtime.session import Session, fill_feature_cache

pytestmark = pytest.mark.usefixtures("one_thread")

SLOTS = 64  # 64 patches through the MLP
#: Row lengths of the mixed batch: two images (2 x 64 slots + text), text only, one image.
LENGTHS = [147, 16, 81]
#: ``[start, end)`` of each placeholder's slots, per row (right padding).
SLOT_RUNS = [[(3, 67), (71, 135)], [], [(3, 67)]]
#: The supervised tokens of each row, decoded: the answer and its end-of-turn tokens.
ANSWERS = ["no<|end|>\n", "hi there<|end|>\n", "noise<|end|>\n"]
#: forward's loss on the mixed batch with the seeded tiny model (fp32, CPU).
PINNED_LOSS = 7.102015


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, str]:
    root: Path = tmp_path_factory.mktemp("multi")
    rng = np.random.default_rng(7)
    out = {}
    for name in ("a", "b", "c"):
        path = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def mixed(images) -> list[Sample]:
    """Row 0: two images (b before a: the placeholder order, not the name order, decides);
    row 1: text only; row 2: one image."""
    return [
        Sample(
            "two",
            {"image": [images["b"], images["a"]]},
            [
                {"from": "human", "value": "<image>\nFirst. <image>\nSecond. Same?"},
                {"from": "gpt", "value": "no"},
            ],
        ),
        Sample(
            "text",
            {},
            [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "hi there"}],
        ),
        Sample(
            "one",
            {"image": images["c"]},
            [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "noise"}],
        ),
    ]


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """``[start, end)`` of each run of True in a 1-D mask."""
    idx = mask.nonzero().flatten().tolist()
    runs: list[list[int]] = []
    for i in idx:
        if runs and runs[-1][1] == i:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def _alone(model, path: str) -> torch.Tensor:
    """One image's connector tokens ``[M, D_llm]``, encoded alone (no batch around it)."""
    branch = model.branches["image"]
    enc = branch.encoder
    with torch.no_grad():
        feats, fmask = enc(enc.collate([enc.preprocess(enc.load(path))]))
        tok, _ = branch.connector(feats, fmask)
    return tok[0]


def _batch(model, chat, samples, tables=None, generation=False):
    reader = MediaReader(model.branches, tables)
    items = [encode_sample(s, reader, chat, add_generation_prompt=generation) for s in samples]
    return items, Collator(chat.pad_id, model.branches, left_pad=generation)(items)


def test_mixed_batch_slots_labels_and_feature_rows(tiny_model, chat, mixed, images):
    items, batch = _batch(tiny_model, chat, mixed)
    # each encoded row carries one (item, N, cached) per file, in placeholder order
    assert [len(x["media"].get("image", [])) for x in items] == [2, 0, 1]
    assert [[n for _, n, _ in x["media"].get("image", [])] for x in items] == [[64, 64], [], [64]]
    slots = batch["slots"]["image"]
    lengths = [len(x["input_ids"]) for x in items]
    assert lengths == LENGTHS and batch["input_ids"].shape == (3, max(LENGTHS))
    assert slots.sum(1).tolist() == [2 * SLOTS, 0, SLOTS]
    assert [_runs(slots[r]) for r in range(3)] == SLOT_RUNS
    # slots hold the pad id, carry no label, and sit inside the row
    assert (batch["input_ids"][slots] == chat.pad_id).all() and (
        batch["labels"][slots] == IGNORE
    ).all()
    # labels: the answers only (with the end-of-turn tokens), nothing of the prompt
    tok = tiny_model.llm.tokenizer
    answers = [tok.decode(batch["labels"][r][batch["labels"][r] != IGNORE]) for r in range(3)]
    assert answers == ANSWERS
    # one media row per image: b, a (row 0's placeholder order), then c (row 2)
    pixels = batch["media"]["image"]["inputs"]
    enc = tiny_model.branches["image"].encoder
    want = enc.collate([enc.preprocess(enc.load(images[k])) for k in ("b", "a", "c")])
    assert pixels.shape[0] == 3 and torch.equal(pixels, want)
    # the embeddings at each placeholder's slots are the connector tokens of its own image
    with torch.no_grad():
        embeds = tiny_model.embed(batch)
    for (row, k), name in zip([(0, 0), (0, 1), (2, 0)], ["b", "a", "c"], strict=True):
        a, b = SLOT_RUNS[row][k]
        torch.testing.assert_close(
            embeds[row, a:b], _alone(tiny_model, images[name]), atol=1e-5, rtol=1e-5
        )
    # the text-only row is its text embeddings, untouched
    torch.testing.assert_close(embeds[1], tiny_model.llm.embed(batch["input_ids"][1:2])[0])


def test_mixed_batch_loss_is_its_rows_loss(tiny_model, chat, mixed):
    """The batch's loss is pinned and equals the answer-token-weighted mean of each row's loss
    computed alone: no row's media leaks into another row."""
    _, batch = _batch(tiny_model, chat, mixed)
    with torch.no_grad():
        loss = tiny_model(batch).item()
        alone = [tiny_model(_batch(tiny_model, chat, [s])[1]).item() for s in mixed]
    counts = (batch["labels"][:, 1:] != IGNORE).sum(1).tolist()
    assert loss == pytest.approx(PINNED_LOSS, abs=1e-4)
    assert loss == pytest.approx(
        sum(a * n for a, n in zip(alone, counts, strict=True)) / sum(counts), abs=1e-5
    )
    # the two images in the other order: another input, another loss
    swapped = mixed[0].replace(media={"image": list(reversed(mixed[0].media["image"]))})
    with torch.no_grad():
        other = tiny_model(_batch(tiny_model, chat, [swapped])[1]).item()
    assert other != pytest.approx(alone[0], abs=1e-4)


def test_loss_trains_the_connector_through_both_images(tiny_model, chat, mixed):
    """A backward pass through the two-image row reaches the connector: finite, nonzero
    gradients."""
    _, batch = _batch(tiny_model, chat, mixed[:1])
    params = list(tiny_model.branches["image"].connector.parameters())
    before = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        tiny_model(batch).backward()
        grads = [p.grad.clone() for p in params]
        assert all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    finally:
        for p, flag in zip(params, before, strict=True):
            p.grad = None
            p.requires_grad_(flag)


def test_cached_features_fill_the_same_slots(tiny_model, chat, mixed, images, tmp_path):
    """From the feature cache: one feature row per image, in placeholder order, and the same
    embeddings (float16 cache: close, not equal)."""
    enc = tiny_model.branches["image"].encoder
    table, _ = load_or_compute(enc, [images[k] for k in ("a", "b", "c")], tmp_path / "fc")
    items, batch = _batch(tiny_model, chat, mixed, tables={"image": table})
    assert [[c for _, _, c in x["media"].get("image", [])] for x in items] == [
        [True, True],
        [],
        [True],
    ]
    feats, fmask = batch["media"]["image"]["features"], batch["media"]["image"]["feature_mask"]
    assert feats.shape[:2] == (3, 64) and fmask.all()
    for k, name in enumerate(["b", "a", "c"]):
        assert torch.equal(feats[k], table.lookup(images[name]).float())
    _, live = _batch(tiny_model, chat, mixed)
    assert torch.equal(batch["slots"]["image"], live["slots"]["image"])
    assert torch.equal(batch["labels"], live["labels"])
    with torch.no_grad():
        cached, direct = tiny_model.embed(batch), tiny_model.embed(live)
    torch.testing.assert_close(cached, direct, atol=2e-2, rtol=2e-2)


def test_generation_batch_left_padded(tiny_model, chat, mixed, images):
    """Prompts padded on the left: each image still lands in its own placeholder's slots, and
    generate answers every row."""
    prompts = [s.replace(conversations=s.conversations[:-1]) for s in mixed]  # the questions
    items, batch = _batch(tiny_model, chat, prompts, generation=True)
    t = batch["input_ids"].shape[1]
    slots = batch["slots"]["image"]
    assert slots.sum(1).tolist() == [2 * SLOTS, 0, SLOTS]
    assert batch["attention_mask"][:, -1].all()  # every prompt ends at the right edge
    assert (batch["labels"] == IGNORE).all()
    with torch.no_grad():
        embeds = tiny_model.embed(batch)
    runs = [_runs(slots[r]) for r in range(3)]
    for (row, k), name in zip([(0, 0), (0, 1), (2, 0)], ["b", "a", "c"], strict=True):
        a, b = runs[row][k]
        assert b - a == SLOTS and b <= t
        torch.testing.assert_close(
            embeds[row, a:b], _alone(tiny_model, images[name]), atol=1e-5, rtol=1e-5
        )
    new = tiny_model.generate(batch, max_new_tokens=3, do_sample=False)
    assert new.shape[0] == 3


def test_placeholder_count_and_stripping(tiny_model, chat, mixed):
    reader = MediaReader(tiny_model.branches)
    short = mixed[0].replace(
        conversations=[{"from": "human", "value": "<image>\nSame?"}, {"from": "gpt", "value": "no"}]
    )
    with pytest.raises(
        DataError,
        match=r"sample two: 1 <image> placeholder\(s\) in user turns for 2 image item\(s\)",
    ):
        encode_sample(short, reader, chat)
    bare = strip_media(mixed[0])
    assert bare.media == {} and bare.conversations[0]["value"] == "First. Second. Same?"
    assert "<image>" not in chat.tokenizer.decode(encode_sample(bare, reader, chat)["input_ids"])


def test_truncation_report_reads_no_feature_row(
    tiny_model, chat, mixed, images, tmp_path, monkeypatch
):
    """Slot counts of cached files come from the table's stored lengths, not from its rows."""
    enc = tiny_model.branches["image"].encoder
    table, _ = load_or_compute(enc, [images[k] for k in ("a", "b", "c")], tmp_path / "fc")

    def no_read(path):
        raise AssertionError(f"feature row of {path} read")

    monkeypatch.setattr(table, "lookup", no_read)
    reader = MediaReader(tiny_model.branches, {"image": table})
    assert [reader.slots("image", images[k]) for k in "abc"] == [SLOTS] * 3
    rep = truncation_report(ConversationDataset(mixed, DataRecipe(), reader, chat, split="train"))
    # the same supervised count as the collated batch's labels (nothing cut at 256 tokens)
    _, batch = _batch(tiny_model, chat, mixed)
    assert (rep.samples, rep.truncated, rep.cut) == (3, 0, 0)
    assert rep.supervised == int((batch["labels"] != IGNORE).sum())


def test_feature_cache_fill_covers_every_file_of_a_list(
    registry, tiny_model, chat, mixed, images, tmp_path
):
    cfg = compose(["experiment=tiny", f"paths.cache_dir={tmp_path / 'cache'}"], registry)
    session = Session(cfg, registry, tiny_model, chat, {"train": mixed})
    fill_feature_cache(session)
    table = session.tables["image"]
    assert sorted(table.index) == sorted(images.values()) and table.lengths.tolist() == [SLOTS] * 3


def test_reader_to_batch_from_a_llava_file(tiny_model, chat, images, tmp_path):
    """The same mix read from a LLaVA JSONL file (relative paths, a list for two images)."""
    root = Path(images["a"]).parent
    records = [
        {
            "id": "two",
            "image": ["b.png", "a.png"],
            "conversations": [
                {"from": "human", "value": "<image>\nFirst. <image>\nSecond. Same?"},
                {"from": "gpt", "value": "no"},
            ],
        },
        {
            "id": "text",
            "conversations": [
                {"from": "human", "value": "Say hi."},
                {"from": "gpt", "value": "hi there"},
            ],
        },
        {
            "id": "one",
            "image": "c.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is it?"},
                {"from": "gpt", "value": "noise"},
            ],
        },
    ]
    path = tmp_path / "mix.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    samples = read_llava(path, root)
    assert [s.media for s in samples] == [
        {"image": [images["b"], images["a"]]},
        {},
        {"image": images["c"]},
    ]
    _, batch = _batch(tiny_model, chat, samples)
    assert [_runs(batch["slots"]["image"][r]) for r in range(3)] == SLOT_RUNS


def test_several_files_need_an_in_sequence_connector(tiny_model, chat, mixed):
    """A cross-attention connector (not in the sequence) reads one media item per sample: a
    two-image record is refused by name, a one-image record passes."""
    from types import SimpleNamespace

    from mmbridge.plugins.perceivers.gated_xattn import GatedCrossAttention

    encoder = tiny_model.branches["image"].encoder
    xattn = GatedCrossAttention(encoder.out_dim, tiny_model.llm.hidden_size, num_latents=4, depth=1)
    reader = MediaReader({"image": SimpleNamespace(encoder=encoder, connector=xattn)})
    assert not reader.in_sequence("image")
    with pytest.raises(
        DataError,
        match=r"sample two: 2 image files, but the image connector is not in the sequence",
    ):
        encode_sample(mixed[0], reader, chat)
    one = encode_sample(mixed[2], reader, chat)  # one image: its latents are context, no slots
    assert len(one["media"]["image"]) == 1 and "image" not in one["slot_modality"]
    assert reader.slots("image", mixed[2].paths("image")[0]) == 0
