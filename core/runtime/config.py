"""A run's config parsed once into typed sections: the schema's dataclasses
(:mod:`mmbridge.config.schema`: ``Loader``, ``Evaluation``, ``Debug``, ``Paths``, each
``stages.<name>`` as a ``Stage``, the top-level ``Root``), which hold each key's type and
default in one place, the model's component nodes (:class:`~mmbridge.config.model_spec.ModelConfig`)
and the Lightning ``trainer`` arguments.

The run layer reads :class:`RunConfig` (``session.run``) instead of the raw ``DictConfig``:
``run.evaluation.tool_max_new_tokens``, not ``cfg.evaluation.get("tool_max_new_tokens", 64)``;
``run.stages["align"].optimizer.lr``, not ``cfg.stages.align.optimizer.lr``. A key missing from
the config (one stored by an older version, or written by hand) takes the schema's default;
:func:`mmbridge.config.validation.validate_config` has already checked the types and ranges of the
keys that are there. Component nodes (``data``, a stage's ``recipe``, the model's nodes) stay
mappings: they go to their constructors through :func:`mmbridge.config.build.build`.

The entry points and the parser hold the ``DictConfig`` (``tests/unit/test_raw_config.py`` lists
them); this module is where it is read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from mmbridge.config import to_container
from mmbridge.config.model_spec import ModelConfig
from mmbridge.config.schema import Debug, Evaluation, Loader, Paths, Root, Stage
from mmbridge.config.sections import section, stages_of
from mmbridge.data.conversation import ConversationSpec

__all__ = ["RunConfig", "section"]


def _paths(node: Any) -> Paths:
    """The ``paths`` section, resolved: a key the config leaves out takes the schema's default
    with its interpolations (``${oc.env:HOME}``, ``${.cache_dir}``) resolved as at composition."""
    given = {k: v for k, v in (node or {}).items() if v is not None}
    merged = OmegaConf.create({**dataclasses.asdict(Paths()), **given})
    return section(to_container(merged), Paths)


@dataclass(frozen=True)
class RunConfig:
    """The typed sections of one run's config."""

    loader: Loader
    evaluation: Evaluation
    debug: Debug
    #: The top-level keys (``seed``, ``schedule``, ``cache_features``, ``progress_every``, ...).
    root: Root
    paths: Paths
    #: Every ``stages.<name>``; a stage's component nodes (``recipe``, ``data``) are mappings.
    stages: dict[str, Stage]
    #: The ``trainer`` node: Lightning ``Trainer`` arguments as written (the ones mmbridge reads
    #: itself through :func:`mmbridge.config.sections.trainer_arg`).
    trainer: dict[str, Any]
    #: The model's component nodes (``llm``, ``encoder``, ``connector``, ``branches``,
    #: ``alignment``), read-only.
    model: ModelConfig
    #: The run's ``data`` node (a data-set component or a mixture), for ``build``.
    data: dict[str, Any] | None
    #: The run's ``conversation`` node (:meth:`conversation_of` reads it).
    conversation: dict[str, Any] | None
    #: The config as composed (or stored): what a checkpoint and an export store as
    #: ``config.yaml`` (:meth:`to_yaml`). Read the sections above instead.
    composed: DictConfig = field(repr=False, compare=False)

    @classmethod
    def parse(cls, cfg: DictConfig) -> RunConfig:
        """The sections of a composed (or stored) config."""
        data = to_container(cfg)
        return cls(
            loader=section(data.get("loader"), Loader),
            evaluation=section(data.get("evaluation"), Evaluation),
            debug=section(data.get("debug"), Debug),
            root=section(data, Root),
            paths=_paths(data.get("paths")),
            stages=stages_of(data),
            trainer=dict(data.get("trainer") or {}),
            model=ModelConfig.of(data),
            data=data.get("data"),
            conversation=data.get("conversation"),
            composed=cfg,
        )

    # -- the top-level keys the run reads most -------------------------------------------------
    @property
    def schedule(self) -> list[str]:
        """The stages to run, in order (keys of :attr:`stages`)."""
        return [str(n) for n in self.root.schedule]

    @property
    def scheduled(self) -> list[Stage]:
        """The :class:`Stage` of each scheduled stage, in order (one the config does not define
        is left out: validation names it)."""
        return [self.stages[n] for n in self.schedule if n in self.stages]

    @property
    def seed(self) -> int:
        return self.root.seed

    @property
    def device(self) -> str | None:
        """``device``: where the model runs outside the trainer's fit (``None``: the trainer's
        accelerator)."""
        return self.root.device

    @property
    def init_from(self) -> str | None:
        return self.root.init_from

    def conversation_of(self, stage: str | None = None) -> tuple[ConversationSpec, str]:
        """The conversation format of ``stage`` (``stages.<stage>.conversation``, else the run's
        ``conversation``, else native) and the key it came from."""
        own = self.stages[stage].conversation if stage in self.stages else None
        if own is not None:
            key = f"stages.{stage}.conversation"
            return ConversationSpec.from_node(own, key), key
        return ConversationSpec.from_node(self.conversation, "conversation"), "conversation"

    def to_yaml(self) -> str:
        """The config as a checkpoint's ``config.yaml`` holds it (resolved)."""
        return OmegaConf.to_yaml(self.composed, resolve=True)
