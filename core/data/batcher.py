"""The samples -> batch pipeline, named: :class:`Batcher`.

One sample becomes a batch row in three steps: its media are read (:class:`MediaReader`: the
encoder's input, or the cached features of a frozen encoder), its conversation is tokenized
with one slot per media token (:class:`~mmbridge.data.chat.ChatEncoder`, through
:func:`encode_sample`), and rows are padded into a batch (:class:`Collator`). Training,
evaluation, tool evaluation, ``mmbridge generate``, the Python API, the lmms-eval backend, the
scripts and the tests all go through a :class:`Batcher`, so the three steps are assembled here
and nowhere else::

    batcher = Batcher.from_model(model, chat, tables=session.tables)
    batch = batcher.batch(samples, generation=True)   # left padded, on the model's device
    new = model.generate(batch, max_new_tokens=12)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mmbridge.contracts.types import Sample
from mmbridge.data.chat import ChatEncoder
from mmbridge.data.dataset import Collator, ConversationDataset, MediaReader, encode_sample
from mmbridge.data.feature_cache import (  # also mmbridge.data.batcher.to_device
    FeatureTable,
    to_device,
)

if TYPE_CHECKING:
    from mmbridge.contracts.recipe import DataRecipe
    from mmbridge.model import Branch, MultimodalModel


class Batcher:
    """Samples -> encoded rows -> a padded batch on a device, for one model's branches and one
    chat encoder. Built once per use (a run's stage, an evaluation, a loaded model); building
    one is cheap (no media is read until a sample is encoded).

    Args:
        branches: Modality -> :class:`~mmbridge.model.Branch` (its encoder reads and collates
            the media, its connector says how many slots a media item fills).
        chat: The tokenizer front end (chat template, labels, slots, ``pad_id``).
        tables: Modality -> cached features; media of other modalities, and files a table does
            not hold, are read and preprocessed live.
        left_pad: The padding side of :meth:`collate` (left for generation; :meth:`batch` with
            ``generation=True`` always pads left).
        device: Where :meth:`batch` puts a batch by default (None: where the collator made it,
            the CPU).

    Batch keys (see :class:`~mmbridge.data.dataset.Collator`): ``input_ids [B, T]``,
    ``attention_mask [B, T]``, ``labels [B, T]``, ``slots[modality] [B, T]`` (bool),
    ``media[modality]`` (``features [B', N, D]`` + ``feature_mask [B', N]``, or ``inputs``),
    ``meta[key] [B]``, ``ids``.
    """

    def __init__(
        self,
        branches: Mapping[str, Branch],
        chat: ChatEncoder,
        tables: Mapping[str, FeatureTable] | None = None,
        left_pad: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        self.branches = dict(branches)
        self.chat = chat
        self.left_pad = left_pad
        self.device = torch.device(device) if device is not None else None
        self.reader = MediaReader(self.branches, tables)
        self._collators = {
            side: Collator(chat.pad_id, self.branches, left_pad=side) for side in (False, True)
        }

    @classmethod
    def from_model(
        cls,
        model: MultimodalModel,
        chat: ChatEncoder,
        tables: Mapping[str, FeatureTable] | None = None,
        left_pad: bool = False,
        device: torch.device | str | None = None,
    ) -> Batcher:
        """The batcher of ``model``'s branches; ``device`` defaults to where the model's
        parameters are."""
        if device is None:
            device = next(model.parameters()).device
        return cls(
            dict(model.branches.items()), chat, tables=tables, left_pad=left_pad, device=device
        )

    @property
    def tables(self) -> dict[str, FeatureTable]:
        """Modality -> the cached features this batcher reads instead of the media."""
        return self.reader.tables

    @property
    def modalities(self) -> list[str]:
        return list(self.branches)

    @property
    def collator(self) -> Collator:
        """The collator of :meth:`collate` (a DataLoader's ``collate_fn``)."""
        return self._collators[self.left_pad]

    def encode(self, sample: Sample, add_generation_prompt: bool = False) -> dict[str, Any]:
        """One sample -> one row: ``id``, ``input_ids [T]``, ``labels [T]``, ``slot_modality
        [T]``, ``media`` (modality -> one ``(item, N, cached)`` per file, in placeholder order)
        and ``meta``.

        Raises:
            DataError: the sample's media modality has no branch, its conversation is
                malformed, or its placeholders do not match its media.
        """
        return encode_sample(
            sample, self.reader, self.chat, add_generation_prompt=add_generation_prompt
        )

    def collate(self, items: list[dict[str, Any]], left_pad: bool | None = None) -> dict[str, Any]:
        """Rows of :meth:`encode` -> one padded batch on the CPU (``left_pad``: default the
        batcher's side)."""
        return self._collators[self.left_pad if left_pad is None else left_pad](items)

    def to_device(
        self, batch: dict[str, Any], device: torch.device | str | None = None
    ) -> dict[str, Any]:
        """``batch`` on ``device`` (default: the batcher's; with neither, as it is)."""
        target = device if device is not None else self.device
        return batch if target is None else to_device(batch, target)

    def batch(
        self,
        samples: Sequence[Sample],
        device: torch.device | str | None = None,
        generation: bool = False,
    ) -> dict[str, Any]:
        """Samples -> a padded batch on ``device`` (default: the batcher's).

        Args:
            samples: The rows, in order.
            device: Where the tensors go.
            generation: Encode each sample as a prompt to answer (the chat template's
                generation prompt after the last turn) and pad left, as
                :meth:`MultimodalModel.generate` expects; else as training does (the answers
                supervised, padded on the batcher's side).
        """
        items = [self.encode(s, add_generation_prompt=generation) for s in samples]
        return self.to_device(self.collate(items, left_pad=True if generation else None), device)

    def dataset(
        self, samples: Sequence[Sample], recipe: DataRecipe, seed: int = 0, split: str = ""
    ) -> ConversationDataset:
        """A training / validation data set of ``samples`` through ``recipe``, whose rows are
        :meth:`encode`'s (collate them with :attr:`collator`)."""
        return ConversationDataset(samples, recipe, self.reader, self.chat, seed=seed, split=split)
