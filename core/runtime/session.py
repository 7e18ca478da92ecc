"""Everything one run needs besides the trainer: registry, data, model, tokenizer front end,
feature caches (:class:`Session`), and its two constructors: :func:`open_session` (a config)
and :func:`session_from_checkpoint` (a trained checkpoint). Shared by ``train``, ``eval``,
``generate``, export, the Python API and the scripts."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from omegaconf import DictConfig

from mmbridge.config import merge_overrides
from mmbridge.config.sections import trainer_arg
from mmbridge.config.validation import validate_config
from mmbridge.data.batcher import Batcher
from mmbridge.data.chat import ChatEncoder
from mmbridge.data.feature_cache import FeatureTable, load_or_compute
from mmbridge.data.sources import Splits, check_media, read_data
from mmbridge.errors import ConfigError, DataError
from mmbridge.model import MultimodalModel, assemble
from mmbridge.registry import Registry
from mmbridge.registry.plugin_manager import load_registry
from mmbridge.runtime.config import RunConfig
from mmbridge.training.checkpoint import load_weights, read_checkpoint
from mmbridge.training.stages import configure_trainable, frozen_encoders
from mmbridge.training.trainer import (
    PrecisionDecision,
    resolve_auto_dtypes,
    resolve_device,
    run_precision,
)

log = logging.getLogger(__name__)


@dataclass
class Session:
    """The assembled pieces of a run."""

    #: The config as composed (or stored): what checkpoints and exports store. Its consumers
    #: read the typed sections, :attr:`run`.
    cfg: DictConfig
    registry: Registry
    model: MultimodalModel
    chat: ChatEncoder
    splits: Splits
    tables: dict[str, FeatureTable] = field(default_factory=dict)
    cache_stats: dict[str, dict] = field(default_factory=dict)
    #: The precision decision of the run and the device its model lives on.
    precision: PrecisionDecision = field(
        default_factory=lambda: PrecisionDecision("32-true", "float32", "default")
    )
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: The data of each scheduled stage that has its own ``stages.<name>.data``.
    stage_splits: dict[str, Splits] = field(default_factory=dict)

    @cached_property
    def run(self) -> RunConfig:
        """The typed sections of :attr:`cfg` (:class:`~mmbridge.runtime.config.RunConfig`), parsed
        once."""
        return RunConfig.parse(self.cfg)

    def data_of(self, stage: str) -> Splits:
        """Stage ``stage``'s data: its own ``stages.<name>.data`` or, without one, the run's."""
        return self.stage_splits.get(stage, self.splits)

    def all_splits(self) -> dict[str, Splits]:
        """Every data set the session read: ``data`` and each ``stages.<name>.data``."""
        return {
            "data": self.splits,
            **{f"stages.{n}.data": v for n, v in self.stage_splits.items()},
        }

    def batcher(
        self, use_cache: bool = True, left_pad: bool = False, stage: str | None = None
    ) -> Batcher:
        """The samples -> batch pipeline of this run's model and chat encoder, on its device;
        with ``use_cache``, media whose features the feature cache holds are read from it; with
        ``stage``, in that stage's conversation format (``stages.<stage>.conversation``)."""
        chat = (
            self.chat.with_conversation(self.run.conversation_of(stage)[0]) if stage else self.chat
        )
        return Batcher.from_model(
            self.model,
            chat,
            tables=self.tables if use_cache else None,
            left_pad=left_pad,
            device=self.device,
        )


def load_splits(run: RunConfig, registry: Registry, run_dir: Path | None = None) -> Splits:
    """The splits of the run's ``data`` (see :func:`mmbridge.data.sources.read_data`)."""
    if run.data is None:
        raise ConfigError("data: missing (expected a mapping with 'name' and arguments)")
    return read_data(
        registry, run.data, "data", Path(run.paths.data_dir), run.seed, run_dir=run_dir
    )


def load_stage_splits(
    run: RunConfig,
    registry: Registry,
    run_dir: Path | None = None,
    stages: Sequence[str] | None = None,
) -> dict[str, Splits]:
    """The data of each stage of ``stages`` (default: the scheduled ones) with its own
    ``stages.<name>.data`` (the others fall back to the run's ``data``)."""
    out = {}
    for name in run.schedule if stages is None else stages:
        node = run.stages[name].data
        if node is not None:
            out[name] = read_data(
                registry,
                node,
                f"stages.{name}.data",
                Path(run.paths.data_dir),
                run.seed,
                run_dir=run_dir,
            )
    return out


def open_session(
    cfg: DictConfig | RunConfig,
    registry: Registry,
    with_data: bool = True,
    cache: bool | None = None,
    device: str | torch.device | None = None,
    run_dir: Path | None = None,
    stage_data: bool = True,
) -> Session:
    """Assemble the model of ``cfg`` (a composed or stored config, or its parsed
    :class:`~mmbridge.runtime.config.RunConfig`) on its device, read the data and fill the
    feature cache.

    The precision and the dtype of ``dtype: auto`` components are decided from the hardware
    (:func:`mmbridge.training.trainer.run_precision`, one log line says what and why);
    ``device`` (else the config's ``device``, else the trainer's accelerator) is where the model is
    evaluated and the features are computed. ``run_dir``: where a ``data.on_error=skip`` read
    lists the records it dropped (see :func:`mmbridge.data.sources.read_source`).
    ``stage_data``: also read each ``stages.<name>.data`` (a training run; an evaluation needs
    the run's ``data`` only).
    """
    run = cfg if isinstance(cfg, RunConfig) else RunConfig.parse(cfg)
    decision = run_precision(run.trainer, run.paths)
    log.info(
        "precision %s, weights %s: %s", decision.precision, decision.weight_dtype, decision.reason
    )
    dev = resolve_device(
        device if device is not None else run.device, str(trainer_arg(run.trainer, "accelerator"))
    )
    # trained components: fp32 (mmbridge.model.precision)
    model = assemble(resolve_auto_dtypes(run.model, run.scheduled, run.trainer, decision), registry)
    model.to(dev)
    tok = model.llm.tokenizer
    prefix = model.prefix
    chat = ChatEncoder(
        tok,
        list(model.branches),
        max_length=run.loader.max_text_tokens,
        prefix_tokens=prefix.n_tokens if prefix is not None else 0,
        meta_keys=prefix.meta_keys if prefix is not None else (),
        conversation=run.conversation_of()[0],
    )
    splits = load_splits(run, registry, run_dir=run_dir) if with_data else {}
    stage_splits = (
        load_stage_splits(run, registry, run_dir=run_dir) if with_data and stage_data else {}
    )
    session = Session(
        run.composed,
        registry,
        model,
        chat,
        splits,
        precision=decision,
        device=dev,
        stage_splits=stage_splits,
    )
    for key, data in session.all_splits().items():
        check_media(
            {f"{key}:{n}" if key != "data" else n: v for n, v in data.items()}, list(model.branches)
        )
    session.run = run  # parsed above: the cached property's value
    use_cache = run.root.cache_features if cache is None else cache
    if use_cache and any(session.all_splits().values()):
        fill_feature_cache(session)
    return session


def fill_feature_cache(session: Session) -> None:
    """Cache the features of every media file of every split, per frozen encoder."""
    run = session.run
    if not frozen_encoders(run.scheduled):
        log.info("an encoder trains in this schedule: the feature cache is not used")
        return
    autocast = "bfloat16" if session.precision.precision.startswith("bf16") else None
    for modality, branch in session.model.branches.items():
        paths = sorted(
            {
                p
                for data in session.all_splits().values()
                for v in data.values()
                for s in v
                for p in s.paths(modality)
            }
        )
        if not paths:
            continue
        try:
            table, stats = load_or_compute(
                branch.encoder,
                paths,
                Path(run.paths.feature_cache_dir),
                autocast=autocast,
                device=session.device,
                num_workers=session.run.loader.num_workers,
            )
        except OSError as exc:
            raise DataError(
                f"feature cache at paths.feature_cache_dir={run.paths.feature_cache_dir}: {exc}"
            ) from exc
        session.tables[modality] = table
        session.cache_stats[modality] = stats
        log.info(
            "%s features: %s (%.1f s) %s",
            modality,
            "cache hit" if stats["hit"] else "computed",
            stats["seconds"],
            stats["path"],
        )


def session_from_checkpoint(
    path: str,
    overrides: list[str] | None = None,
    with_data: bool = True,
    registry: Registry | None = None,
    device: str | torch.device | None = None,
) -> tuple[Session, dict[str, str]]:
    """Rebuild the model a checkpoint was trained with, on ``device`` (see :func:`open_session`),
    and load its weights.

    ``overrides`` are ``key=value`` changes to the stored config (e.g. ``evaluation.batch_size=8``).
    """
    registry = registry or load_registry()
    cfg, weights, meta = read_checkpoint(
        path, registry=registry
    )  # names a missing plugin's package
    if overrides:
        cfg = merge_overrides(cfg, overrides, registry)  # group options too: data=vqa data.path=...
    validate_config(
        cfg, registry
    )  # overrides included: a bad value is an error, not a random model
    session = open_session(cfg, registry, with_data=with_data, device=device, stage_data=False)
    for stage in json.loads(meta.get("stages", "[]")):
        configure_trainable(session.model, session.run.stages[stage])  # re-creates LoRA layers
    load_weights(session.model, weights, str(path))
    session.model.eval()
    return session, meta
