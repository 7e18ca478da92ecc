"""Gather the runs of a sweep into tables (``results.csv``, ``results.md``, ``runs.csv``) and
plots; a Hydra callback writes them at the end of every multirun.

A *configuration* is a run's overrides minus ``seed``: its runs (one per seed) make one row,
each metric as mean ± sample standard deviation (n - 1) over them.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mmbridge.runs import Run, atomic_write_text, gather_runs, override_key, unfinished_runs

log = logging.getLogger(__name__)

DEFAULT_METRIC = "test/exact_match"

# Columns of the main table in results.md (visual_tokens/<modality> are added per modality).
MAIN_COLUMNS = ["test/exact_match", "test/no_media/exact_match", "val_loss_last",
                "parameters/trainable", "step_time_s", "samples_per_s", "peak_memory_mb", "wall_s"]
LABELS = {"test/exact_match": "exact match", "test/no_media/exact_match": "no media",
          "test/chance/exact_match": "chance", "val_loss_last": "val loss",
          "val_loss_first": "val loss (start)", "parameters/trainable": "trainable params",
          "parameters/total": "total params", "step_time_s": "step s", "samples_per_s": "samples/s",
          "peak_memory_mb": "peak MB", "wall_s": "wall s"}


def direction(metric: str) -> str | None:
    """``"max"`` or ``"min"`` where a metric has a better direction, ``None`` for descriptive
    ones (sizes, baselines)."""
    if metric == "val_loss_first" or metric.startswith(
            ("test/no_media/", "test/chance/", "parameters/", "visual_tokens/")):
        return None
    if "exact_match" in metric or metric.endswith("samples_per_s"):
        return "max"
    if "loss" in metric or metric.endswith(("_s", "memory_mb")):
        return "min"
    return None


def label(metric: str) -> str:
    if metric in LABELS:
        return LABELS[metric]
    if metric.startswith("visual_tokens/"):
        return f"visual tokens ({metric.split('/', 1)[1]})"
    if metric.startswith("test/exact_match/"):
        return metric.rsplit("/", 1)[1]
    return metric


def flatten(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of one ``metrics.json`` as ``{"test/exact_match": 0.5, ...}``
    (histories, paths and cache details left out)."""
    out: dict[str, float] = {}

    def put(key: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return
        out[key] = float(value)

    for k, v in metrics.get("test", {}).items():
        put(f"test/{k}", v)
    for group in ("parameters", "visual_tokens"):
        for k, v in metrics.get(group, {}).items():
            put(f"{group}/{k}", v)
    for k in ("val_loss_first", "val_loss_last", "step_time_s", "samples_per_s", "peak_memory_mb", "wall_s"):
        put(k, metrics.get(k))
    for name, st in metrics.get("stages", {}).items():
        for k in ("wall_s", "step_time_s", "samples_per_s", "steps"):
            put(f"stages/{name}/{k}", st.get(k))
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


def fmt(x: float, digits: int = 4) -> str:
    """``digits`` significant digits; thousands separators (no decimals) from 1000 up."""
    if math.isnan(x):
        return "nan"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}g}"


def cell(row: Row, metric: str, best_value: float | None) -> str:
    if metric not in row.mean:
        return "—"
    m, s = row.mean[metric], row.std[metric]
    text = fmt(m) if math.isnan(s) or s == 0 else f"{fmt(m)} ± {fmt(s, 2)}"
    return f"**{text}**" if best_value is not None and m == best_value else text


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table(rows: list[Row], metrics: list[str], keys: list[str]) -> str:
    arrows = {"max": " ↑", "min": " ↓", None: ""}
    first = keys or ["configuration"]
    head = [*first, "runs", *(label(m) + arrows[direction(m)] for m in metrics)]
    lines = ["| " + " | ".join(map(_md_escape, head)) + " |",
             "|" + "---|" * len(first) + "---:|" + "---:|" * len(metrics)]
    bests = {m: best(rows, m) for m in metrics}
    for row in rows:
        settings = [row.setting(k) for k in keys] or [" ".join(row.config) or "(defaults)"]
        cells = [*settings, str(len(row.runs)), *(cell(row, m, bests[m]) for m in metrics)]
        lines.append("| " + " | ".join(map(_md_escape, cells)) + " |")
    return "\n".join(lines)


def results_markdown(rows: list[Row], title: str, plots: list[str], unfinished: list[tuple[Path, str]],
                     root: Path) -> str:
    keys = varying_keys(rows)
    cols = metric_columns(rows)
    main = [c for c in cols if c in MAIN_COLUMNS or c.startswith("visual_tokens/")]
    per_type = [c for c in cols if c.startswith("test/exact_match/")]
    n_runs = sum(len(r.runs) for r in rows)
    out = [f"# Results: {title}", "",
           f"{n_runs} runs, {len(rows)} configurations. Mean ± sample std (n − 1) over the runs of a "
           "configuration (its seeds); **bold** = best per column: ↑ higher is better, ↓ lower is "
           "better; columns without an arrow describe the model.", ""]
    command = sweep_command(root)
    if command:
        out += [f"Sweep: `{command}`", ""]
    common = common_overrides(rows)
    if common:
        out += ["Overrides common to every run: " + " ".join(f"`{o}`" for o in common), ""]
    out += [markdown_table(rows, main, keys), ""]
    if per_type:
        out += ["## Test exact match per question type", "", markdown_table(rows, per_type, keys), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if unfinished:
        out += ["## Unfinished runs", ""]
        out += [f"- `{d.relative_to(root)}`: {_md_escape(reason)}" for d, reason in unfinished] + [""]
    return "\n".join(out)


def sweep_command(root: Path) -> str | None:
    """The command line of the sweep in ``root``, from Hydra's ``multirun.yaml``."""
    f = root / "multirun.yaml"
    if not f.is_file():
        return None
    from omegaconf import OmegaConf

    try:
        task = OmegaConf.select(OmegaConf.load(f), "hydra.overrides.task", default=None)
    except Exception:  # a foreign or damaged file only loses this line of the report
        return None
    return None if task is None else " ".join(["mmbridge sweep", *map(str, task)])


def _csv(header: list[str], records: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(records)
    return buf.getvalue()


def _num(x: float | None) -> str:
    return "" if x is None or math.isnan(x) else repr(x)


def results_csv(rows: list[Row]) -> str:
    """One row per configuration: its varying settings, the run count, ``<metric>_mean`` and
    ``<metric>_std`` for every metric (std empty below 2 runs); full precision."""
    keys, cols = varying_keys(rows), metric_columns(rows)
    header = ["configuration", *keys, "runs", *(f"{c}_{s}" for c in cols for s in ("mean", "std"))]
    records = [[" ".join(r.config), *(r.setting(k) for k in keys), len(r.runs),
                *(_num(r.mean.get(c, math.nan) if s == "mean" else r.std.get(c, math.nan))
                  for c in cols for s in ("mean", "std"))] for r in rows]
    return _csv(header, records)


def runs_csv(rows: list[Row], root: Path) -> str:
    """One row per run (the raw values behind ``results.csv``)."""
    cols = metric_columns(rows)
    header = ["run_dir", "configuration", "seed", *cols]
    records = []
    for row in rows:
        for run in row.runs:
            flat = flatten(run.metrics)
            records.append([str(run.path.relative_to(root)), " ".join(row.config), run.seed,
                            *(_num(flat.get(c)) for c in cols)])
    return _csv(header, records)


@dataclass
class Report:
    root: Path
    rows: list[Row]
    unfinished: list[tuple[Path, str]]
    files: list[Path]


def write_report(root: Path, metric: str = DEFAULT_METRIC, out_dir: Path | None = None) -> Report:
    """Gather every ``metrics.json`` under ``root`` and write results.csv, runs.csv, results.md
    and the plots into ``out_dir`` (default ``root``), each atomically."""
    from mmbridge.errors import ConfigError

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"report directory {root} does not exist")
    out_dir = Path(out_dir or root)
    rows = aggregate(gather_runs(root))
    unfinished = unfinished_runs(root)
    files: list[Path] = []
    plots: list[str] = []
    if rows:
        if metric not in metric_columns(rows):
            raise ConfigError(f"--metric {metric}: no run under {root} has it; metrics: "
                              f"{', '.join(metric_columns(rows))}")
        try:
            from mmbridge.plots import write_plots
        except ImportError as exc:  # matplotlib is an optional dependency
            log.warning("no plots (%s): pip install 'mmbridge[sweep]'", exc)
        else:
            plots = [p.name for p in write_plots(rows, metric, out_dir)]
        for name, text in (("results.csv", results_csv(rows)), ("runs.csv", runs_csv(rows, root))):
            atomic_write_text(out_dir / name, text)
            files.append(out_dir / name)
    md = results_markdown(rows, root.name, plots, unfinished, root)
    atomic_write_text(out_dir / "results.md", md)
    files += [out_dir / "results.md", *(out_dir / p for p in plots)]
    return Report(root, rows, unfinished, files)


#: The last report written by :class:`ReportCallback` in this process (for ``mmbridge sweep``).
LAST_REPORT: list[Report] = []


class ReportCallback(Callback):
    """Hydra callback: at the end of a multirun, write the report into the sweep directory.

    ``mmbridge train -m`` and ``mmbridge sweep`` add it as ``hydra.callbacks.report``.
    """

    def __init__(self, metric: str = DEFAULT_METRIC) -> None:
        self.metric = metric

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        try:
            report = write_report(root, self.metric)
        except Exception as exc:  # a failed report must not hide the finished runs
            log.error("report of %s failed: %s (run `mmbridge report %s` again)", root, exc, root)
            return
        LAST_REPORT.append(report)
        log.info("%d runs in %d configurations -> %s", sum(len(r.runs) for r in report.rows),
                 len(report.rows), root / "results.md")
