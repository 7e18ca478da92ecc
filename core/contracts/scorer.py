"""Contract of an image-text similarity scorer (AlignGPT's alignment levels)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from mmbridge.contracts.types import Sample

if TYPE_CHECKING:
    from mmbridge.contracts.recipe import RecipeContext


class Scorer(ABC):
    """Scores how well each sample's media matches its text (higher = better aligned).

    The recipe that uses a scorer calls :meth:`setup` with its run's context, then :meth:`fit`
    on the pairs to rank, then :meth:`score` (on those and on later splits).
    """

    def setup(self, context: RecipeContext) -> None:  # noqa: B027 - optional hook
        """Receive the run's context (the model's encoders, cached features, a cache dir)
        before :meth:`fit`. Default: nothing (a scorer that brings its own models)."""

    def fit(self, samples: Sequence[Sample]) -> None:  # noqa: B027 - optional
        """Train on the data set's own pairs, if the scorer learns (default: nothing)."""

    @abstractmethod
    def score(self, samples: Sequence[Sample]) -> torch.Tensor:
        """One similarity per sample, ``[len(samples)]``."""
