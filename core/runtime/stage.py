"""One stage's data, set up once: its recipe (built and set up against the run's model and
feature caches), the split it trains on through that recipe, and the validation split.

The one place that does "build the recipe -> ``setup`` -> ``annotate`` -> data set"; the run
(:mod:`mmbridge.runtime.train`) and the scripts call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmbridge.config.build import build
from mmbridge.contracts.recipe import DataRecipe, RecipeContext
from mmbridge.contracts.types import Sample
from mmbridge.data.batcher import Batcher
from mmbridge.data.dataset import ConversationDataset, check_truncation, truncation_report
from mmbridge.data.sources import Splits
from mmbridge.errors import ConfigError
from mmbridge.runtime.session import Session


@dataclass
class StageData:
    """What one stage trains and validates on."""

    #: The stage's recipe, set up.
    recipe: DataRecipe
    #: Samples -> batches on the run's device (the feature cache included where it is used).
    batcher: Batcher
    #: The stage's data: its own ``stages.<name>.data`` or, without one, the run's ``data``.
    splits: Splits
    #: ``stages.<name>.split`` through the recipe.
    train_ds: ConversationDataset
    #: The ``val`` split of the stage's data through the recipe (empty where there is none).
    val_ds: ConversationDataset

    @property
    def val_samples(self) -> list[Sample]:
        """The stage's raw validation samples (the questions its evaluator asks)."""
        return self.splits.get("val", [])


def stage_recipe(session: Session, name: str, batcher: Batcher | None = None) -> DataRecipe:
    """Build ``stages.<name>.recipe`` and set it up against the session's model, the feature
    tables of ``batcher`` (default: the session's) and ``paths.cache_dir``."""
    run = session.run
    node = run.stages[name].recipe
    if node is None:
        raise ConfigError(
            f"stages.{name}.recipe: missing (expected a mapping with 'name' and arguments)"
        )
    recipe = build(session.registry, "recipe", node, f"stages.{name}.recipe")
    tables = (batcher or session.batcher()).tables
    recipe.setup(
        RecipeContext(session.registry, session.model, dict(tables), Path(run.paths.cache_dir))
    )
    return recipe


def prepare_stage(
    session: Session,
    name: str,
    samples: Sequence[Sample] | None = None,
    batcher: Batcher | None = None,
    check: bool = True,
) -> StageData:
    """Stage ``name``'s recipe and data sets.

    Args:
        session: The run.
        name: A key of ``stages``.
        samples: Train on these instead of the stage's split (benchmarks draw their own).
        batcher: The samples -> batch pipeline (default: the session's, feature cache on).
        check: Refuse the stage when ``loader.max_text_tokens`` cuts too many answers
            (:func:`mmbridge.data.dataset.check_truncation`).

    Raises:
        ConfigError: ``stages.<name>.split`` is not a split of the stage's data.
    """
    stage = session.run.stages[name]
    splits = session.data_of(name)
    if samples is None and stage.split not in splits:
        key = f"stages.{name}.data" if name in session.stage_splits else "data"
        raise ConfigError(
            f"stages.{name}.split: '{stage.split}' is not a split of {key}; "
            f"splits: {', '.join(splits)}"
        )
    batcher = batcher or session.batcher(stage=name)  # in the stage's conversation format
    recipe = stage_recipe(session, name, batcher)
    seed = session.run.seed
    train = recipe.annotate(list(samples) if samples is not None else splits[stage.split])
    val = recipe.annotate(splits["val"]) if "val" in splits and samples is None else []
    train_ds = batcher.dataset(train, recipe, seed=seed, split=stage.split)
    val_ds = batcher.dataset(val, recipe, seed=seed + 1, split="val")
    if check:
        reports = [truncation_report(d) for d in (train_ds, val_ds) if d is train_ds or len(d)]
        check_truncation(reports, max_share=session.run.loader.max_truncated_share, stage=name)
    return StageData(recipe, batcher, splits, train_ds, val_ds)
