"""Contract of a data source: something that yields LLaVA-format files for each split."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal


@dataclass(frozen=True)
class DatasetFiles:
    """Where a prepared data set lives: one LLaVA JSON/JSONL file per split and the media root
    that its relative ``image`` / ``audio`` paths are resolved against."""

    splits: dict[str, Path]
    media_root: Path


class DatasetSource(ABC):
    """A data set: an existing LLaVA file, or a generator (``shapes``) that writes one.

    Constructor arguments come from the ``data`` config group.
    """

    #: What a read does with an invalid record: ``raise`` (the first one stops the run) or
    #: ``skip`` (dropped, listed in the run's ``dropped_records.jsonl``). A source whose
    #: constructor takes ``on_error`` sets it; others always raise.
    on_error: Literal["raise", "skip"] = "raise"

    @abstractmethod
    def prepare(self, cache_dir: Path) -> DatasetFiles:
        """Make the files exist (generate them once into ``cache_dir`` if needed) and say where."""

    def identity(self) -> dict[str, Any]:
        """What determines the content (part of the feature-cache key)."""
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "args": getattr(self, "init_args", {}),
        }
