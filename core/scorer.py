"""Contract of an image-text similarity scorer (AlignGPT's alignment levels)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from mmbridge.types import Sample


class Scorer(ABC):
    """Scores how well each sample's media matches its text (higher = better aligned)."""

    def fit(self, samples: Sequence[Sample]) -> None:  # noqa: B027 - optional
        """Train on the data set's own pairs, if the scorer learns (default: nothing)."""

    @abstractmethod
    def score(self, samples: Sequence[Sample]) -> torch.Tensor:
        """One similarity per sample, ``[len(samples)]``."""
