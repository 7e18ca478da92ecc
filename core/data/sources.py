"""Reading a run's data: a ``data`` node (a data-set component) into its splits of samples,
the records a ``skip`` read dropped, and the check of the samples' media against a model.

Shared by training (the run's ``data`` and each ``stages.<name>.data``), evaluation
(``evaluation.extra_data``) and the tools that look at a run's data.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmbridge.config import to_container
from mmbridge.config.build import build
from mmbridge.config.mixture import is_mixture
from mmbridge.contracts.dataset import DatasetSource
from mmbridge.contracts.types import Sample, check_placeholders
from mmbridge.data.llava import ReadReport, read_llava
from mmbridge.data.mixture import mix_splits
from mmbridge.errors import AssemblyError
from mmbridge.registry import Registry
from mmbridge.utils.io import atomic_write_text

log = logging.getLogger(__name__)

#: A data set's splits: split name -> its samples.
Splits = dict[str, list[Sample]]


def dropped_records_file(run_dir: Path, key: str) -> Path:
    """Where :func:`read_source` lists the records that ``{key}.on_error=skip`` dropped:
    ``dropped_records.jsonl`` for the run's ``data``, ``dropped_records.<key>.jsonl`` else."""
    return run_dir / ("dropped_records.jsonl" if key == "data" else f"dropped_records.{key}.jsonl")


def read_source(
    registry: Registry,
    data_cfg: Mapping[str, Any],
    key: str,
    data_dir: Path,
    run_dir: Path | None = None,
) -> Splits:
    """Build the data set ``data_cfg`` (config key ``key``), prepare it under ``data_dir``, read
    its splits (each file parsed once).

    With ``{key}.on_error=skip`` (:attr:`~mmbridge.contracts.dataset.DatasetSource.on_error`) bad
    records are dropped: one summary line per split that lost any, and, when ``run_dir`` is given,
    every dropped record (``split``, ``file``, ``index``, ``line``, ``id``, ``reason``; one JSON
    object a line) in :func:`dropped_records_file`, written atomically, empty when nothing was
    dropped.
    """
    source: DatasetSource = build(registry, "dataset", data_cfg, key)
    files = source.prepare(Path(data_dir))
    on_error = source.on_error
    splits: Splits = {}
    dropped: list[dict] = []
    for name, path in files.splits.items():
        report = ReadReport(Path(path))
        splits[name] = read_llava(path, files.media_root, on_error=on_error, report=report)
        dropped += [{"split": name, **d.as_dict()} for d in report.dropped]
        if report.dropped:
            where = f"; all listed in {dropped_records_file(run_dir, key)}" if run_dir else ""
            log.warning("%s split '%s': %s%s", key, name, report.summary(), where)
            for d in report.dropped:
                log.info("dropped: %s", d.message)
    if on_error == "skip" and run_dir is not None:
        atomic_write_text(
            dropped_records_file(run_dir, key),
            "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dropped),
        )
    return splits


def read_data(
    registry: Registry,
    data_cfg: Mapping[str, Any],
    key: str,
    data_dir: Path,
    seed: int,
    run_dir: Path | None = None,
) -> Splits:
    """The splits of a ``data`` node: one data set (:func:`read_source`) or a mixture of
    several (:mod:`mmbridge.data.mixture`; its sources read as ``{key}.sources.<i>``, their
    training splits drawn by weight with ``seed``)."""
    if not is_mixture(data_cfg):
        return read_source(registry, data_cfg, key, data_dir, run_dir=run_dir)
    parts, weights = [], []
    for i, src in enumerate(to_container(data_cfg)["sources"]):
        node = {k: v for k, v in src.items() if k != "weight"}
        parts.append(read_source(registry, node, f"{key}.sources.{i}", data_dir, run_dir=run_dir))
        weights.append(float(src["weight"]))
    size = data_cfg.get("size")
    splits = mix_splits(parts, weights, int(size) if size is not None else None, seed)
    log.info(
        "%s: a mixture of %d sources (weights %s): %s",
        key,
        len(parts),
        ", ".join(f"{w:g}" for w in weights),
        ", ".join(f"{n} {len(v)}" for n, v in splits.items()),
    )
    return splits


def check_media(splits: Splits, modalities: list[str] | tuple[str, ...]) -> None:
    """Media vs the model's encoders (``modalities``, its branches), and the placeholder rule
    against them, for every sample (cheap string counts, before any training step). Errors
    name the sample and the config keys."""
    have = set(modalities)
    for split, samples in splits.items():
        for s in samples:
            for modality in s.media:
                if modality not in have:
                    raise AssemblyError(
                        f"data split '{split}' sample {s.id} has {modality} media, but the model "
                        f"encodes only {', '.join(sorted(have))} (config keys: encoder, "
                        f"branches); add a branch: branches.{modality}.encoder / "
                        f"branches.{modality}.connector"
                    )
            check_placeholders(
                ((t.get("from", ""), t.get("value", "")) for t in s.conversations),
                s.media_counts(),
                have,
                f"data split '{split}' sample {s.id}",
            )
