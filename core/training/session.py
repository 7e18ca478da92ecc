"""Everything one run needs besides the trainer: registry, data, model, tokenizer front end,
feature caches. Shared by ``train``, ``eval`` and ``generate``."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

import torch
from omegaconf import DictConfig

from mmbridge.build import build
from mmbridge.config import merge_overrides
from mmbridge.data.batcher import Batcher
from mmbridge.data.chat import ChatEncoder
from mmbridge.data.feature_cache import FeatureTable, load_or_compute
from mmbridge.data.llava import ReadReport, read_llava
from mmbridge.errors import AssemblyError, DataError
from mmbridge.io import atomic_write_text
from mmbridge.model import MultimodalModel, assemble
from mmbridge.plugin_manager import load_registry
from mmbridge.registry import Registry
from mmbridge.training.checkpoint import load_weights, read_checkpoint
from mmbridge.training.stages import configure_trainable, frozen_encoders
from mmbridge.training.trainer import (
    PrecisionDecision,
    resolve_auto_dtypes,
    resolve_device,
    run_precision,
)
from mmbridge.types import Sample, check_placeholders
from mmbridge.validation import validate_config

log = logging.getLogger(__name__)


@dataclass
class Session:
    """The assembled pieces of a run."""

    cfg: DictConfig
    registry: Registry
    model: MultimodalModel
    chat: ChatEncoder
    splits: dict[str, list[Sample]]
    tables: dict[str, FeatureTable] = field(default_factory=dict)
    cache_stats: dict[str, dict] = field(default_factory=dict)
    #: The precision decision of the run and the device its model lives on.
    precision: PrecisionDecision = field(default_factory=lambda: PrecisionDecision("32-true", "float32", "default"))
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def batcher(self, use_cache: bool = True, left_pad: bool = False) -> Batcher:
        """The samples -> batch pipeline of this run's model and chat encoder, on its device;
        with ``use_cache``, media whose features the feature cache holds are read from it."""
        return Batcher.from_model(self.model, self.chat, tables=self.tables if use_cache else None,
                                  left_pad=left_pad, device=self.device)


def load_splits(cfg: DictConfig, registry: Registry, run_dir: Path | None = None) -> dict[str, list[Sample]]:
    return read_source(cfg, registry, cfg.data, "data", run_dir=run_dir)


def dropped_records_file(run_dir: Path, key: str) -> Path:
    """Where :func:`read_source` lists the records that ``{key}.on_error=skip`` dropped."""
    return run_dir / ("dropped_records.jsonl" if key == "data" else f"dropped_records.{key}.jsonl")


def read_source(cfg: DictConfig, registry: Registry, data_cfg: DictConfig, key: str,
                run_dir: Path | None = None) -> dict[str, list[Sample]]:
    """Build the data set ``data_cfg`` (config key ``key``), prepare it, read its splits (each
    file parsed once).

    With ``{key}.on_error=skip`` bad records are dropped: one summary line per split that lost
    any, and, when ``run_dir`` is given, every dropped record (``split``, ``file``, ``index``,
    ``line``, ``id``, ``reason``; one JSON object a line) in
    :func:`dropped_records_file` (``run_dir/dropped_records.jsonl`` for ``data``), written
    atomically, empty when nothing was dropped.
    """
    source = build(registry, "dataset", data_cfg, key)
    files = source.prepare(Path(cfg.paths.data_dir))
    # a dataset's on_error option: "raise" or "skip" (read_llava refuses others)
    on_error = cast(Literal["raise", "skip"], getattr(source, "on_error", "raise"))
    splits = {}
    dropped: list[dict] = []
    for name, path in files.splits.items():
        report = ReadReport(Path(path))
        splits[name] = read_llava(path, files.media_root, on_error=on_error, report=report)
        dropped += [{"split": name, **d.as_dict()} for d in report.dropped]
        if report.dropped:
            where = f"; all listed in {dropped_records_file(run_dir, key)}" if run_dir is not None else ""
            log.warning("%s split '%s': %s%s", key, name, report.summary(), where)
            for d in report.dropped:
                log.info("dropped: %s", d.message)
    if on_error == "skip" and run_dir is not None:
        atomic_write_text(dropped_records_file(run_dir, key),
                          "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped))
    return splits


def check_media(splits: dict[str, list[Sample]], model: MultimodalModel) -> None:
    """Media vs the model's encoders, and the placeholder rule against the model's modalities,
    for every sample (cheap string counts, before any training step). Errors name the sample
    and the config keys."""
    have = set(model.branches)
    for split, samples in splits.items():
        for s in samples:
            for modality in s.media:
                if modality not in have:
                    raise AssemblyError(
                        f"data split '{split}' sample {s.id} has {modality} media, but the model "
                        f"encodes only {', '.join(sorted(have))} (config keys: encoder, branches); "
                        f"add a branch: branches.{modality}.encoder / branches.{modality}.connector")
            check_placeholders(((t.get("from", ""), t.get("value", "")) for t in s.conversations),
                               s.media_counts(), have, f"data split '{split}' sample {s.id}")


def open_session(cfg: DictConfig, registry: Registry, with_data: bool = True,
                 cache: bool | None = None, device: str | torch.device | None = None,
                 run_dir: Path | None = None) -> Session:
    """Assemble the model of ``cfg`` on its device, read the data and fill the feature cache.

    The precision and the dtype of ``dtype: auto`` components are decided from the hardware
    (:func:`mmbridge.training.trainer.run_precision`, one log line says what and why);
    ``device`` (else ``cfg.device``, else the trainer's accelerator) is where the model is
    evaluated and the features are computed. ``run_dir``: where a ``data.on_error=skip`` read
    lists the records it dropped (see :func:`read_source`).
    """
    decision = run_precision(cfg)
    log.info("precision %s, weights %s: %s", decision.precision, decision.weight_dtype, decision.reason)
    dev = resolve_device(device if device is not None else cfg.get("device"),
                         str((cfg.get("trainer") or {}).get("accelerator", "auto")))
    model = assemble(resolve_auto_dtypes(cfg, decision.weight_dtype), registry)
    model.to(dev)
    tok = model.llm.tokenizer
    prefix = model.prefix
    chat = ChatEncoder(tok, list(model.branches), max_length=int(cfg.loader.max_text_tokens),
                       prefix_tokens=prefix.n_tokens if prefix is not None else 0,
                       meta_keys=prefix.meta_keys if prefix is not None else ())
    splits = load_splits(cfg, registry, run_dir=run_dir) if with_data else {}
    if splits:
        check_media(splits, model)
    session = Session(cfg, registry, model, chat, splits, precision=decision, device=dev)
    use_cache = bool(cfg.get("cache_features", True)) if cache is None else cache
    if use_cache and splits:
        fill_feature_cache(session)
    return session


def fill_feature_cache(session: Session) -> None:
    """Cache the features of every media file of every split, per frozen encoder."""
    cfg = session.cfg
    if not frozen_encoders(cfg):
        log.info("an encoder trains in this schedule: the feature cache is not used")
        return
    autocast = "bfloat16" if session.precision.precision.startswith("bf16") else None
    for modality, branch in session.model.branches.items():
        paths = sorted({p for v in session.splits.values() for s in v for p in s.paths(modality)})
        if not paths:
            continue
        try:
            table, stats = load_or_compute(branch.encoder, paths, Path(cfg.paths.feature_cache_dir),
                                           autocast=autocast, device=session.device,
                                           num_workers=int(cfg.loader.num_workers))
        except OSError as exc:
            raise DataError(f"feature cache at paths.feature_cache_dir={cfg.paths.feature_cache_dir}: {exc}") from exc
        session.tables[modality] = table
        session.cache_stats[modality] = stats
        log.info("%s features: %s (%.1f s) %s", modality, "cache hit" if stats["hit"] else "computed",
                 stats["seconds"], stats["path"])


def session_from_checkpoint(path: str, overrides: list[str] | None = None, with_data: bool = True,
                            registry: Registry | None = None,
                            device: str | torch.device | None = None) -> tuple[Session, dict[str, str]]:
    """Rebuild the model a checkpoint was trained with, on ``device`` (see :func:`open_session`),
    and load its weights.

    ``overrides`` are ``key=value`` changes to the stored config (e.g. ``evaluation.batch_size=8``).
    """
    registry = registry or load_registry()
    cfg, weights, meta = read_checkpoint(path, registry=registry)  # names a missing plugin's package
    if overrides:
        cfg = merge_overrides(cfg, overrides, registry)  # group options too: data=vqa data.path=...
    validate_config(cfg, registry)  # overrides included: a bad value is an error, not a random model
    session = open_session(cfg, registry, with_data=with_data, device=device)
    for stage in json.loads(meta.get("stages", "[]")):
        configure_trainable(session.model, cfg.stages[stage])  # re-creates LoRA layers
    load_weights(session.model, weights, str(path))
    session.model.eval()
    return session, meta
