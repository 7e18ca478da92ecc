"""A sweep's results as rows: the runs of one configuration (its overrides minus ``seed``)
grouped together, each scalar metric of their ``metrics.json`` as mean ± sample standard
deviation (n - 1) over them; metric labels and better directions.

The tables (:mod:`mmbridge.reporting.tables`), the plots (:mod:`mmbridge.reporting.plots`) and the
paired comparisons (:mod:`mmbridge.reporting.significance`) all read these rows.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from mmbridge.reporting.run_metrics import RunMetrics
from mmbridge.reporting.runs import Run, override_key

DEFAULT_METRIC = "test/exact_match"

# Columns of the main table in results.md (visual_tokens/<modality> are added per modality).
MAIN_COLUMNS = [
    "test/exact_match",
    "test/no_media/exact_match",
    "val_loss_last",
    "parameters/trainable",
    "step_time_s",
    "samples_per_s",
    "peak_memory_mb",
    "wall_s",
]
LABELS = {
    "test/exact_match": "exact match",
    "test/no_media/exact_match": "no media",
    "test/chance/exact_match": "chance",
    "val_loss_last": "val loss",
    "val_loss_first": "val loss (start)",
    "parameters/trainable": "trainable params",
    "parameters/total": "total params",
    "step_time_s": "step s",
    "samples_per_s": "samples/s",
    "peak_memory_mb": "peak MB",
    "wall_s": "wall s",
}


def direction(metric: str) -> str | None:
    """``"max"`` or ``"min"`` where a metric has a better direction, ``None`` for descriptive
    ones (sizes, baselines)."""
    if metric == "val_loss_first" or metric.startswith(
        ("test/no_media/", "test/chance/", "parameters/", "visual_tokens/")
    ):
        return None
    if "exact_match" in metric or metric.endswith("samples_per_s"):
        return "max"
    if "loss" in metric or metric.endswith(("_s", "memory_mb")):
        return "min"
    return None


def label(metric: str) -> str:
    """A metric's column title: ``test/exact_match`` -> ``exact match``, a question type's
    exact match -> the type's name."""
    if metric in LABELS:
        return LABELS[metric]
    if metric.startswith("visual_tokens/"):
        return f"visual tokens ({metric.split('/', 1)[1]})"
    if metric.startswith("test/exact_match/"):
        return metric.rsplit("/", 1)[1]
    return metric


def flatten(metrics: dict[str, Any] | RunMetrics) -> dict[str, float]:
    """The scalar metrics of one ``metrics.json`` (its object, read as a
    :class:`~mmbridge.reporting.run_metrics.RunMetrics`) as ``{"test/exact_match": 0.5, ...}``
    (histories, paths and cache details left out)."""
    m = metrics if isinstance(metrics, RunMetrics) else RunMetrics.from_dict(metrics)
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        out[key] = float(value)

    for k, v in m.test.items():
        put(f"test/{k}", v)
    for k, n in m.parameters.items():
        put(f"parameters/{k}", n)
    for k, t in m.visual_tokens.items():
        put(f"visual_tokens/{k}", t)
    for k in (
        "val_loss_first",
        "val_loss_last",
        "step_time_s",
        "samples_per_s",
        "peak_memory_mb",
        "wall_s",
    ):
        put(k, getattr(m, k))
    for name, st in m.stages.items():
        for k in ("wall_s", "step_time_s", "samples_per_s", "steps"):
            put(f"stages/{name}/{k}", getattr(st, k))
    return out


def _natural(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


@dataclass
class Row:
    """One configuration: its runs and the mean/std of each metric over them."""

    config: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)
    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)  # NaN with fewer than 2 values

    def setting(self, key: str) -> str:
        return next((o.split("=", 1)[1] for o in self.config if override_key(o) == key), "—")


def aggregate(runs: Iterable[Run]) -> list[Row]:
    """Group runs by configuration (first appearance order); mean and sample std per metric."""
    rows: dict[tuple[str, ...], Row] = {}
    for run in sorted(runs, key=lambda r: _natural(str(r.path))):
        rows.setdefault(run.config, Row(run.config)).runs.append(run)
    for row in rows.values():
        values: dict[str, list[float]] = {}
        for run in row.runs:
            for k, v in flatten(run.metrics).items():
                values.setdefault(k, []).append(v)
        for k, vs in values.items():
            row.mean[k] = statistics.fmean(vs)
            row.std[k] = statistics.stdev(vs) if len(vs) > 1 else math.nan
    return list(rows.values())


def varying_keys(rows: list[Row]) -> list[str]:
    """Override keys whose value differs between configurations (the table's first columns)."""
    keys: list[str] = []
    for row in rows:
        keys += [override_key(o) for o in row.config if override_key(o) not in keys]
    return [k for k in keys if len({row.setting(k) for row in rows}) > 1]


def common_overrides(rows: list[Row]) -> list[str]:
    varying = set(varying_keys(rows))
    return [o for o in rows[0].config if override_key(o) not in varying] if rows else []


def row_name(row: Row, keys: list[str]) -> str:
    """A short name of ``row`` for plots: its settings of ``keys`` (last key component), or
    its overrides when nothing varies."""
    if not keys:
        return " ".join(row.config) or "(defaults)"
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={row.setting(k)}" for k in keys)


def metric_columns(rows: list[Row]) -> list[str]:
    """Every metric of any row: the main ones first, then the rest sorted."""
    present = {k for row in rows for k in row.mean}
    main: list[str] = []
    for c in MAIN_COLUMNS:
        main += [c] if c in present else []
        if c == "parameters/trainable":
            main += sorted(k for k in present if k.startswith("visual_tokens/"))
    return main + sorted(present - set(main))


def best(rows: list[Row], metric: str) -> float | None:
    """The best mean of ``metric`` over rows; ``None`` when the metric has no direction or
    nothing to choose (fewer than two rows, or every row equal)."""
    d = direction(metric)
    vals = [r.mean[metric] for r in rows if metric in r.mean and not math.isnan(r.mean[metric])]
    if d is None or len(vals) < 2 or len(set(vals)) == 1:
        return None
    return max(vals) if d == "max" else min(vals)
