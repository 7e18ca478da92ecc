"""Contract of a modality encoder: media file -> features ``[B, N, D_enc]``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn


class ModalityEncoder(nn.Module, ABC):
    """Turns media of one modality into a sequence of feature vectors.

    The pipeline is split so that the cheap parts run in data-loader workers and the frozen
    encoder's output can be cached per sample:

    ``load(path) -> raw`` -> ``preprocess(raw) -> x`` (one sample) -> ``collate([x, ...]) -> batch``
    -> ``forward(batch) -> (features [B, N, D_enc], mask [B, N])``.

    Subclasses set :attr:`modality` and implement the abstract members. ``num_tokens(x)`` must
    give the ``N`` that ``forward`` will produce for that sample *before* running it, so that the
    collator can reserve the right number of placeholder slots.
    """

    #: Which placeholder this encoder fills: ``"image"`` -> ``<image>``.
    modality: ClassVar[str] = ""

    @classmethod
    def for_testing(cls, tmp_dir: Path) -> ModalityEncoder:
        """A small instance for the contract suite (:mod:`mmbridge.testing`); ``tmp_dir`` is
        where it may save weights to load them back through the real loading code."""
        return cls()

    def example_media(self, tmp_dir: Path, index: int = 0) -> str:
        """Write one example media file (for the contract suite) and return its path."""
        raise NotImplementedError(f"{type(self).__name__} does not provide example media")

    @property
    @abstractmethod
    def out_dim(self) -> int:
        """``D_enc``: width of each feature vector."""

    @abstractmethod
    def load(self, path: str) -> Any:
        """Read one media file (an image, a wav/flac clip) into a raw object."""

    @abstractmethod
    def preprocess(self, raw: Any) -> Any:
        """Raw object -> model input of one sample (a tensor or a dict of tensors)."""

    @abstractmethod
    def num_tokens(self, x: Any) -> int:
        """``N``, the number of feature vectors ``forward`` yields for the preprocessed ``x``."""

    def collate(self, items: list[Any]) -> Any:
        """Batch preprocessed samples; fixed-size tensors are stacked."""
        return torch.stack(items)

    @abstractmethod
    def forward(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode a batch.

        Returns:
            ``features [B, N, D_enc]`` and ``mask [B, N]`` (bool, True = real token).
        """

    def cache_identity(self) -> dict[str, Any]:
        """What determines this encoder's features (feature-cache key): class, arguments,
        preprocessing. Subclasses that load weights should add a fingerprint of them."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "args": getattr(self, "init_args", {}),
        }
