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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from mmbridge.errors import ConfigError
from mmbridge.reporting.results import (
    DEFAULT_METRIC,
    MAIN_COLUMNS,
    Row,
    aggregate,
    best,
    common_overrides,
    direction,
    flatten,
    label,
    metric_columns,
    varying_keys,
)
from mmbridge.reporting.runs import atomic_write_text, gather_runs, unfinished_runs
from mmbridge.reporting.significance import N_RESAMPLES, Comparison, compare, select_baseline
from mmbridge.reporting.sweep_report import write_sweep_report

# Re-exported: callers and tests read the rows through this module too.
__all__ = [
    "DEFAULT_METRIC",
    "Report",
    "ReportCallback",
    "Row",
    "aggregate",
    "direction",
    "flatten",
    "fmt",
    "label",
    "write_report",
]

log = logging.getLogger(__name__)


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
    lines = [
        "| " + " | ".join(map(_md_escape, head)) + " |",
        "|" + "---|" * len(first) + "---:|" + "---:|" * len(metrics),
    ]
    bests = {m: best(rows, m) for m in metrics}
    for row in rows:
        settings = [row.setting(k) for k in keys] or [" ".join(row.config) or "(defaults)"]
        cells = [*settings, str(len(row.runs)), *(cell(row, m, bests[m]) for m in metrics)]
        lines.append("| " + " | ".join(map(_md_escape, cells)) + " |")
    return "\n".join(lines)


def diff_cell(c: Comparison | None, with_n: bool = False) -> str:
    """``+0.125 [+0.050, +0.200] *``: the difference, its interval, ``*`` when it excludes 0."""
    if c is None:
        return "—"
    text = f"{c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}]" + (" *" if c.significant else "")
    return text + (f" (n={c.n_questions})" if with_n else "")


def comparison_markdown(
    rows: list[Row],
    baseline: Row,
    comparisons: dict[tuple[str, ...], list[Comparison]],
    keys: list[str],
    n_resamples: int,
) -> list[str]:
    """The section of results.md on the paired differences against ``baseline``."""
    name = " ".join(f"{k}={baseline.setting(k)}" for k in keys) or " ".join(baseline.config)
    by_row = {cfg: {c.metric: c for c in cs} for cfg, cs in comparisons.items()}
    metrics = list(dict.fromkeys(m for cs in by_row.values() for m in cs))
    per_type = [m for m in metrics if m.startswith("test/exact_match/")]
    first = keys or ["configuration"]

    def settings(row: Row) -> list[str]:
        return [row.setting(k) for k in keys] or [" ".join(row.config) or "(defaults)"]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(map(_md_escape, cells)) + " |"

    out = [
        f"## Paired difference against the baseline `{name}`",
        "",
        f"Test exact match of each configuration minus the baseline's, on the held-out questions "
        f"both answered (each run's `predictions.jsonl`, the answers with media): the difference "
        f"of the means over seeds and questions, and its 95 % bootstrap interval ({n_resamples:,} "
        f"resamples of the questions, paired, and of each configuration's seeds; numpy seed 0). "
        f"**\\*** = the interval excludes 0.",
        "",
        line([*first, "seeds", "questions", "exact match Δ"]),
        "|" + "---|" * len(first) + "---:|---:|---:|",
    ]
    for row in rows:
        if row is baseline:
            out.append(line([*settings(row), str(len(row.runs)), "", "baseline"]))
            continue
        c = by_row.get(row.config, {}).get("test/exact_match")
        out.append(
            line(
                [
                    *settings(row),
                    f"{len(row.runs)} vs {len(baseline.runs)}",
                    str(c.n_questions) if c else "0",
                    diff_cell(c),
                ]
            )
        )
    if per_type:
        ns = {m: {cs[m].n_questions for cs in by_row.values() if m in cs} for m in per_type}
        head = [
            label(m) + (f" (n={next(iter(ns[m]))})" if len(ns[m]) == 1 else "") for m in per_type
        ]
        out += [
            "",
            "Per question type:",
            "",
            line([*first, *head]),
            "|" + "---|" * len(first) + "---:|" * len(per_type),
        ]
        for row in rows:
            if row is not baseline:
                cs = by_row.get(row.config, {})
                out.append(
                    line(
                        [*settings(row), *(diff_cell(cs.get(m), len(ns[m]) > 1) for m in per_type)]
                    )
                )
    return out + [""]


def results_markdown(
    rows: list[Row],
    title: str,
    plots: list[str],
    unfinished: list[tuple[Path, str]],
    root: Path,
    comparison: list[str] | None = None,
) -> str:
    keys = varying_keys(rows)
    cols = metric_columns(rows)
    main = [c for c in cols if c in MAIN_COLUMNS or c.startswith("visual_tokens/")]
    per_type = [c for c in cols if c.startswith("test/exact_match/")]
    n_runs = sum(len(r.runs) for r in rows)
    out = [
        f"# Results: {title}",
        "",
        f"{n_runs} runs, {len(rows)} configurations. Mean ± sample std (n − 1) over the runs of a "
        "configuration (its seeds); **bold** = best per column: ↑ higher is better, ↓ lower is "
        "better; columns without an arrow describe the model.",
        "",
    ]
    command = sweep_command(root)
    if command:
        out += [f"Sweep: `{command}`", ""]
    common = common_overrides(rows)
    if common:
        out += ["Overrides common to every run: " + " ".join(f"`{o}`" for o in common), ""]
    out += [markdown_table(rows, main, keys), ""]
    if per_type:
        out += [
            "## Test exact match per question type",
            "",
            markdown_table(rows, per_type, keys),
            "",
        ]
    out += comparison or []
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    if unfinished:
        out += ["## Unfinished runs", ""]
        out += [f"- `{d.relative_to(root)}`: {_md_escape(reason)}" for d, reason in unfinished] + [
            ""
        ]
    return "\n".join(out)


def sweep_command(root: Path) -> str | None:
    """The command line of the sweep in ``root``, from Hydra's ``multirun.yaml``."""
    f = root / "multirun.yaml"
    if not f.is_file():
        return None
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


DIFF_FIELDS = ("diff", "diff_low", "diff_high", "diff_significant", "diff_questions")


def _diff_values(c: Comparison | None) -> list[str]:
    if c is None:
        return [""] * len(DIFF_FIELDS)
    return [_num(c.diff), _num(c.low), _num(c.high), str(int(c.significant)), str(c.n_questions)]


def results_csv(
    rows: list[Row],
    baseline: Row | None = None,
    comparisons: dict[tuple[str, ...], list[Comparison]] | None = None,
) -> str:
    """One row per configuration: its varying settings, the run count, ``<metric>_mean`` and
    ``<metric>_std`` for every metric (std empty below 2 runs); full precision.

    With a baseline, also ``baseline`` (1 on its row), ``diff_seeds`` / ``diff_baseline_seeds``
    and, for ``test/exact_match`` and each ``test/exact_match/<qtype>``: ``<metric>_diff``,
    ``_diff_low``, ``_diff_high`` (the 95 % interval), ``_diff_significant`` (1 when the
    interval excludes 0) and ``_diff_questions`` (empty on the baseline's row).
    """
    keys, cols = varying_keys(rows), metric_columns(rows)
    header = ["configuration", *keys, "runs", *(f"{c}_{s}" for c in cols for s in ("mean", "std"))]
    records = [
        [
            " ".join(r.config),
            *(r.setting(k) for k in keys),
            len(r.runs),
            *(
                _num(r.mean.get(c, math.nan) if s == "mean" else r.std.get(c, math.nan))
                for c in cols
                for s in ("mean", "std")
            ),
        ]
        for r in rows
    ]
    if baseline is not None and comparisons is not None:
        by_row = {cfg: {c.metric: c for c in cs} for cfg, cs in comparisons.items()}
        metrics = list(dict.fromkeys(m for cs in by_row.values() for m in cs))
        header += [
            "baseline",
            "diff_seeds",
            "diff_baseline_seeds",
            *(f"{m}_{f}" for m in metrics for f in DIFF_FIELDS),
        ]
        for r, rec in zip(rows, records):
            cs = by_row.get(r.config, {})
            rec += [
                int(r is baseline),
                "" if r is baseline else len(r.runs),
                "" if r is baseline else len(baseline.runs),
                *(v for m in metrics for v in _diff_values(cs.get(m))),
            ]
    return _csv(header, records)


def runs_csv(rows: list[Row], root: Path) -> str:
    """One row per run (the raw values behind ``results.csv``)."""
    cols = metric_columns(rows)
    header = ["run_dir", "configuration", "seed", *cols]
    records = []
    for row in rows:
        for run in row.runs:
            flat = flatten(run.metrics)
            records.append(
                [
                    str(run.path.relative_to(root)),
                    " ".join(row.config),
                    run.seed,
                    *(_num(flat.get(c)) for c in cols),
                ]
            )
    return _csv(header, records)


@dataclass
class Report:
    """What :func:`write_report` wrote; ``comparisons`` maps each configuration to its
    differences against ``baseline`` (empty without one)."""

    root: Path
    rows: list[Row]
    unfinished: list[tuple[Path, str]]
    files: list[Path]
    baseline: Row | None = None
    comparisons: dict[tuple[str, ...], list[Comparison]] = field(default_factory=dict)


def write_report(
    root: Path,
    metric: str = DEFAULT_METRIC,
    out_dir: Path | None = None,
    baseline: Sequence[str] | None = None,
    n_resamples: int = N_RESAMPLES,
) -> Report:
    """Gather every ``metrics.json`` under ``root`` and write results.csv, runs.csv, results.md,
    the plots and report.html (:mod:`mmbridge.reporting.sweep_report`) into ``out_dir`` (default
    ``root``), each atomically.

    Args:
        root: The sweep directory (or any folder of runs).
        metric: The metric of the plots.
        out_dir: Where to write (default ``root``).
        baseline: ``KEY=VALUE`` settings picking one configuration: every other one is compared
            with it question by question (:mod:`mmbridge.reporting.significance`), in results.md,
            results.csv and a plot with the intervals as error bars.
        n_resamples: Bootstrap draws of those comparisons.

    Raises:
        ConfigError: ``root`` is missing, no run has ``metric``, ``baseline`` does not pick one
            configuration, or a compared run has no ``predictions.jsonl``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"report directory {root} does not exist")
    out_dir = Path(out_dir or root)
    rows = aggregate(gather_runs(root))
    unfinished = unfinished_runs(root)
    files: list[Path] = []
    plots: list[str] = []
    base: Row | None = None
    comparisons: dict[tuple[str, ...], list[Comparison]] = {}
    section: list[str] = []
    if rows:
        if metric not in metric_columns(rows):
            raise ConfigError(
                f"--metric {metric}: no run under {root} has it; metrics: "
                f"{', '.join(metric_columns(rows))}"
            )
        if baseline:
            base = select_baseline(rows, baseline)
            comparisons = compare(rows, base, n_resamples)
            section = comparison_markdown(rows, base, comparisons, varying_keys(rows), n_resamples)
        try:
            # matplotlib is an optional dependency (the `sweep` extra): imported only here
            from mmbridge.reporting.plots import write_comparison_plot, write_plots
        except ImportError as exc:
            log.warning("no plots (%s): pip install 'mmbridge[sweep]'", exc)
        else:
            paths = write_plots(rows, metric, out_dir)
            if base is not None:
                paths.append(write_comparison_plot(rows, base, comparisons, out_dir))
            plots = [p.name for p in paths]
        for name, text in (
            ("results.csv", results_csv(rows, base, comparisons)),
            ("runs.csv", runs_csv(rows, root)),
        ):
            atomic_write_text(out_dir / name, text)
            files.append(out_dir / name)
    md = results_markdown(rows, root.name, plots, unfinished, root, section)
    atomic_write_text(out_dir / "results.md", md)
    files += [out_dir / "results.md", *(out_dir / p for p in plots)]
    report = Report(root, rows, unfinished, files, base, comparisons)
    files.append(write_sweep_report(report, out_dir))
    return report


#: The last report written by :class:`ReportCallback` in this process (for ``mmbridge sweep``).
LAST_REPORT: list[Report] = []


class ReportCallback(Callback):
    """Hydra callback: at the end of a multirun, write the report into the sweep directory.

    ``mmbridge train -m`` and ``mmbridge sweep`` add it as ``hydra.callbacks.report``;
    ``baseline`` (``KEY=VALUE`` strings) adds the paired comparisons.
    """

    def __init__(self, metric: str = DEFAULT_METRIC, baseline: Sequence[str] | None = None) -> None:
        self.metric = metric
        self.baseline = list(baseline) if baseline else None

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        root = Path(str(config.hydra.sweep.dir))
        try:
            report = write_report(root, self.metric, baseline=self.baseline)
        except Exception as exc:  # a failed report must not hide the finished runs
            log.error("report of %s failed: %s (run `mmbridge report %s` again)", root, exc, root)
            return
        LAST_REPORT.append(report)
        log.info(
            "%d runs in %d configurations -> %s",
            sum(len(r.runs) for r in report.rows),
            len(report.rows),
            root / "results.md",
        )
