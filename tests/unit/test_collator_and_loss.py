"""Collator padding (right for training, left for generation: the same rows, the same loss)
and ``MultimodalModel.forward``'s loss on a seeded tiny model, pinned."""

from __future__ import annotations

import pytest
import torch

from mmbridge.data.chat import IGNORE
from mmbridge.data.dataset import Collator, MediaReader, encode_sample

#: forward's loss on the four image samples of conftest with the seeded tiny model (fp32, CPU).
PINNED_LOSS = 7.184994


@pytest.fixture(scope="module")
def items(tiny_model, chat, image_samples):
    return [encode_sample(s, MediaReader(tiny_model), chat) for s in image_samples]


def test_right_and_left_padding_hold_the_same_rows(tiny_model, chat, items):
    right = Collator(chat.pad_id, tiny_model)(items)
    left = Collator(chat.pad_id, tiny_model, left_pad=True)(items)
    lengths = [len(x["input_ids"]) for x in items]
    assert lengths == [81, 85, 85, 93] and right["input_ids"].shape == left["input_ids"].shape == (
        4,
        93,
    )
    assert (
        right["attention_mask"].sum(1).tolist() == left["attention_mask"].sum(1).tolist() == lengths
    )
    for r, n in enumerate(lengths):
        for key in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(right[key][r, :n], left[key][r, -n:])
        assert torch.equal(right["slots"]["image"][r, :n], left["slots"]["image"][r, -n:])
        # the padding: pad id, no attention, no label, no slot
        assert (right["input_ids"][r, n:] == chat.pad_id).all() and (
            left["input_ids"][r, : 93 - n] == chat.pad_id
        ).all()
        assert (right["labels"][r, n:] == IGNORE).all() and not right["slots"]["image"][r, n:].any()
    # every row has its connector's 64 slots (64 patches through the MLP), one image row each
    assert right["slots"]["image"].sum(1).tolist() == [64] * 4
    assert right["media"]["image"]["inputs"].shape[0] == 4
    assert right["ids"] == left["ids"] == ["s0", "s1", "s2", "s3"]


def test_forward_loss_is_pinned_and_padding_side_free(tiny_model, chat, items):
    right = Collator(chat.pad_id, tiny_model)(items)
    left = Collator(chat.pad_id, tiny_model, left_pad=True)(items)
    with torch.no_grad():
        loss_right, loss_left = tiny_model(right), tiny_model(left)
    assert loss_right.item() == pytest.approx(PINNED_LOSS, abs=1e-4)
    assert loss_left.item() == pytest.approx(loss_right.item(), abs=1e-5)
    # the mean over supervised positions: one sample alone gives its own figure
    with torch.no_grad():
        alone = tiny_model(Collator(chat.pad_id, tiny_model)(items[:1]))
    assert alone.item() != pytest.approx(loss_right.item(), abs=1e-3)


def test_a_batch_without_answers_gives_zero_loss_and_a_graph(tiny_model, chat, items):
    batch = Collator(chat.pad_id, tiny_model)(items[:2])
    batch["labels"] = torch.full_like(batch["labels"], IGNORE)
    connector = next(iter(tiny_model.branches.values())).connector
    params = list(connector.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    loss = tiny_model(batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()  # no signal: the gradients exist and are zero
    assert all(p.grad is not None and not p.grad.any() for p in params)
    for p, flag in zip(params, before, strict=True):  # the model is shared by the module's tests
        p.grad = None
        p.requires_grad_(flag)
