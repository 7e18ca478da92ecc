"""Contract of the Data-Driven family: recipes that turn data into training conversations."""

from __future__ import annotations

import random
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mmbridge.types import Sample

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from mmbridge.data.feature_cache import FeatureTable
    from mmbridge.model import MultimodalModel
    from mmbridge.registry import Registry


@dataclass
class RecipeContext:
    """What a recipe may use from its run: the composed config, the registry, the assembled
    model (its encoders), the frozen encoders' cached features per modality, a cache dir."""

    cfg: DictConfig
    registry: Registry
    model: MultimodalModel
    tables: dict[str, FeatureTable]
    cache_dir: Path


class DataRecipe(ABC):
    """Turns raw samples into the conversations one training stage learns from.

    ``annotate`` sees the whole split once before training (AlignGPT scores and buckets every
    pair there); ``__call__`` maps one sample to the sample the stage trains on, or ``None`` to
    drop it. It runs once per sample when the stage's data set is built
    (:class:`~mmbridge.data.dataset.ConversationDataset`), so dropped samples are left out of
    the split (counted in the log) and indices stay dense; ``rng`` is seeded per sample (run
    seed, index, id), so runs are reproducible.
    """

    def setup(self, context: RecipeContext) -> None:  # noqa: B027 - optional hook
        """Receive the run's context before :meth:`annotate` (a recipe that scores samples
        with the model's encoders, or caches results, uses it). Default: nothing."""

    def annotate(self, samples: Sequence[Sample]) -> list[Sample]:
        """Annotate the whole split (default: unchanged)."""
        return list(samples)

    def __call__(self, sample: Sample, rng: random.Random) -> Sample | None:
        """The stage's version of ``sample`` (default: unchanged); ``None`` drops it."""
        return sample
