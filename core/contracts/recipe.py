"""Contract of the Data-Driven family: recipes that turn data into training conversations."""

from __future__ import annotations

import random
import warnings
from abc import ABC
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmbridge.contracts.types import Sample

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from mmbridge.data.feature_cache import FeatureTable
    from mmbridge.model import MultimodalModel
    from mmbridge.registry import Registry


@dataclass(init=False)
class RecipeContext:
    """What a recipe (or scorer) may use from its run: the registry to resolve names with, the
    assembled model (its encoders), the frozen encoders' cached features per modality, and a
    cache dir for results it wants to keep between runs.

    ``cfg`` (the whole composed config) is deprecated: no recipe reads it, and a recipe's
    settings come from its own config node. The run passes none; until it is removed, a caller
    may, and reading ``context.cfg`` returns it with a :class:`DeprecationWarning`. The old
    positional order ``RecipeContext(cfg, registry, model, tables, cache_dir)`` is still accepted.
    """

    registry: Registry
    model: MultimodalModel
    tables: dict[str, FeatureTable]
    cache_dir: Path
    # the deprecated whole config (a DictConfig), kept for old callers until it is removed
    _cfg: DictConfig | None = field(default=None, repr=False, compare=False)

    def __init__(
        self,
        registry: Registry,
        model: MultimodalModel,
        tables: dict[str, FeatureTable],
        cache_dir: Path,
        *legacy: Any,
        cfg: DictConfig | None = None,
    ) -> None:
        if legacy:  # the old order: RecipeContext(cfg, registry, model, tables, cache_dir)
            if len(legacy) != 1 or cfg is not None:
                raise TypeError(
                    "RecipeContext(registry, model, tables, cache_dir, cfg=None): "
                    f"got {4 + len(legacy)} positional arguments"
                )
            old: tuple[Any, ...] = (registry, model, tables, cache_dir, legacy[0])
            cfg, registry, model, tables, cache_dir = old
        self.registry = registry
        self.model = model
        self.tables = tables
        self.cache_dir = Path(cache_dir)
        self._cfg = cfg

    @property
    def cfg(self) -> DictConfig | None:
        """Deprecated: the run's whole config (``None`` where the caller did not pass it)."""
        warnings.warn(
            "RecipeContext.cfg is deprecated and will be removed: read a recipe's "
            "settings from its own config node (its constructor's arguments), and "
            "use context.registry / model / tables / cache_dir",
            DeprecationWarning,
            stacklevel=2,
        )
        return self._cfg


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
