"""Contract of the Data-Driven family: recipes that turn data into training conversations."""

from __future__ import annotations

import random
from abc import ABC
from collections.abc import Sequence

from mmbridge.types import Sample


class DataRecipe(ABC):
    """Turns raw samples into the conversations one training stage learns from.

    ``annotate`` sees the whole split once before training (AlignGPT scores and buckets every
    pair there); ``__call__`` maps one sample to the sample the stage trains on (or ``None`` to
    drop it) and may draw from ``rng`` (seeded per sample and epoch, so runs are reproducible).
    """

    def annotate(self, samples: Sequence[Sample]) -> list[Sample]:
        """Annotate the whole split (default: unchanged)."""
        return list(samples)

    def __call__(self, sample: Sample, rng: random.Random) -> Sample | None:
        """The stage's version of ``sample`` (default: unchanged)."""
        return sample
