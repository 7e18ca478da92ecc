"""A run's config parsed once into typed sections: the schema's dataclasses
(:mod:`mmbridge.config.schema`: ``Loader``, ``Evaluation``, ``Debug``, the top-level ``Root``),
which hold each key's type and default in one place.

The run layer reads :class:`RunConfig` (``session.run``) instead of the raw ``DictConfig``:
``run.evaluation.tool_max_new_tokens``, not ``cfg.evaluation.get("tool_max_new_tokens", 64)``.
A key missing from the config (one stored by an older version, or written by hand) takes the
schema's default; :func:`mmbridge.config.validation.validate_config` has already checked the types
and ranges of the keys that are there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from omegaconf import DictConfig

from mmbridge.config import to_container
from mmbridge.config.schema import Debug, Evaluation, Loader, Root

T = TypeVar("T")


def section(node: DictConfig | Mapping[str, Any] | None, schema: type[T]) -> T:
    """``node`` (resolved) as an instance of the dataclass ``schema``: each field the node sets,
    the schema's default for each it does not; keys the schema does not know are left out
    (validation reports them)."""
    data = to_container(node) if node is not None else {}
    names = {f.name for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    return schema(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class RunConfig:
    """The typed sections of one run's config."""

    loader: Loader
    evaluation: Evaluation
    debug: Debug
    #: The top-level keys (``seed``, ``schedule``, ``cache_features``, ``progress_every``, ...).
    root: Root

    @classmethod
    def parse(cls, cfg: DictConfig) -> RunConfig:
        """The sections of a composed (or stored) config."""
        data = to_container(cfg)
        return cls(
            loader=section(data.get("loader"), Loader),
            evaluation=section(data.get("evaluation"), Evaluation),
            debug=section(data.get("debug"), Debug),
            root=section(data, Root),
        )
