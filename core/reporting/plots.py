"""PNG plots of a sweep's configurations (matplotlib, the ``sweep`` extra): a metric against
trainable parameters and against visual tokens, validation-loss learning curves, and the paired
differences against a baseline with their bootstrap intervals as error bars.

Figures are drawn with matplotlib's object API (no pyplot global state, no display needed) and
written atomically.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter

from mmbridge.reporting.results import Row, label, row_name, varying_keys
from mmbridge.reporting.runs import atomic_write_bytes
from mmbridge.reporting.significance import Comparison


def _save(fig: Figure, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _names(rows: list[Row]) -> list[str]:
    keys = varying_keys(rows)
    return [row_name(r, keys) for r in rows]


def _visual_tokens(row: Row) -> float | None:
    vals = [v for k, v in row.mean.items() if k.startswith("visual_tokens/")]
    return sum(vals) if vals else None


def scatter(rows: list[Row], xs: list[float | None], metric: str, xlabel: str, path: Path) -> Path:
    """One point per configuration: ``metric`` (mean, error bar = std over seeds) against x."""
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    points = [
        (x, r, n) for x, r, n in zip(xs, rows, _names(rows)) if x is not None and metric in r.mean
    ]
    for i, (x, r, name) in enumerate(points):
        s = r.std.get(metric, math.nan)
        ax.errorbar(
            [x],
            [r.mean[metric]],
            yerr=[0 if math.isnan(s) else s],
            fmt="o",
            capsize=3,
            color=f"C{i % 10}",
            label=name,
        )
    xvals = [p[0] for p in points]
    if xvals and min(xvals) > 0 and max(xvals) / min(xvals) > 20:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter())  # 660k rather than 660000 or 6.6e5
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label(metric))
    ax.set_title(f"{label(metric)} vs {xlabel}")
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize="small")
    return _save(fig, path)


def run_curve(metrics: dict) -> list[tuple[str, float, float]]:
    """A run's validation losses as (stage, global step, loss): each stage's steps are offset
    by the steps of the stages before it."""
    out, offset = [], 0.0
    for name, st in metrics.get("stages", {}).items():
        for h in st.get("history", []):
            if "val_loss" in h:
                out.append((name, offset + float(h.get("step", 0)), float(h["val_loss"])))
        offset += float(st.get("steps", 0))
    return out


def learning_curves(rows: list[Row], path: Path) -> Path:
    """Validation loss against the global step, one line per configuration (mean over its
    seeds, band = ± std); dashed lines mark where a stage begins."""
    fig = Figure(figsize=(7.2, 4.4))
    ax = fig.add_subplot()
    boundaries: dict[float, str] = {}
    for i, (row, name) in enumerate(zip(rows, _names(rows))):
        points: dict[tuple[str, float], list[float]] = {}
        for run in row.runs:
            for stage, step, loss in run_curve(run.metrics):
                points.setdefault((stage, step), []).append(loss)
        for j, stage in enumerate(dict.fromkeys(s for s, _ in points)):
            steps = sorted(x for s, x in points if s == stage)
            boundaries.setdefault(steps[0], stage)
            vals = [points[(stage, x)] for x in steps]
            mean = [sum(v) / len(v) for v in vals]
            # one legend entry per configuration; stages are separate segments (their val sets
            # differ)
            ax.plot(steps, mean, marker=".", color=f"C{i % 10}", label=name if j == 0 else None)
            if any(len(v) > 1 for v in vals):
                sd = [
                    math.sqrt(sum((y - m) ** 2 for y in v) / (len(v) - 1)) if len(v) > 1 else 0.0
                    for v, m in zip(vals, mean)
                ]
                ax.fill_between(
                    steps,
                    [m - s for m, s in zip(mean, sd)],
                    [m + s for m, s in zip(mean, sd)],
                    color=f"C{i % 10}",
                    alpha=0.15,
                )
    for x, stage in boundaries.items():
        ax.axvline(x, color="grey", linestyle="--", linewidth=0.8)
        ax.annotate(
            stage,
            (x, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            fontsize="small",
            color="grey",
        )
    ax.set_xlabel("training step (all stages)")
    ax.set_ylabel("validation loss")
    ax.set_title("learning curves")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # runs without a validation history draw no line
        ax.legend(fontsize="small")
    return _save(fig, path)


def write_plots(rows: list[Row], metric: str, out_dir: Path) -> list[Path]:
    """The three figures of a report, named after ``metric``; returns their paths."""
    stem = metric.removeprefix("test/").replace("/", "_")
    return [
        scatter(
            rows,
            [r.mean.get("parameters/trainable") for r in rows],
            metric,
            "trainable parameters",
            out_dir / f"{stem}_vs_trainable_params.png",
        ),
        scatter(
            rows,
            [_visual_tokens(r) for r in rows],
            metric,
            "visual tokens per sample",
            out_dir / f"{stem}_vs_visual_tokens.png",
        ),
        learning_curves(rows, out_dir / "learning_curves.png"),
    ]


def comparison_plot(
    rows: list[Row], baseline: Row, comparisons: dict[tuple[str, ...], list[Comparison]], path: Path
) -> Path:
    """Each configuration's exact match minus the baseline's (one line per configuration),
    overall and per question type, with the 95 % bootstrap interval as error bars; filled
    markers where the interval excludes 0."""
    names = dict(zip((r.config for r in rows), _names(rows)))
    others = [r for r in rows if r is not baseline and comparisons.get(r.config)]
    metrics = list(dict.fromkeys(c.metric for r in others for c in comparisons[r.config]))
    fig = Figure(figsize=(7.2, 1.6 + 0.5 * len(others) * max(1, len(metrics)) ** 0.5))
    ax = fig.add_subplot()
    step = 0.8 / max(1, len(metrics))
    for j, metric in enumerate(metrics):
        first = True
        for i, row in enumerate(others):
            c = next((c for c in comparisons[row.config] if c.metric == metric), None)
            if c is None:
                continue
            y = i - 0.4 + step * (j + 0.5)  # the overall difference on top, then each type
            ax.errorbar(
                [c.diff],
                [y],
                xerr=[[c.diff - c.low], [c.high - c.diff]],
                fmt="o",
                capsize=3,
                color=f"C{j % 10}",
                mfc=f"C{j % 10}" if c.significant else "white",
                label=("all questions" if metric == "test/exact_match" else label(metric))
                if first
                else None,
            )
            first = False
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(others)), [names[r.config] for r in others])
    ax.invert_yaxis()
    ax.set_xlabel(f"exact match − baseline ({names[baseline.config]}), 95 % bootstrap interval")
    ax.set_title("paired difference against the baseline (filled: the interval excludes 0)")
    ax.grid(alpha=0.3, axis="x")
    if metrics:
        ax.legend(fontsize="small", loc="best")
    return _save(fig, path)


def write_comparison_plot(
    rows: list[Row],
    baseline: Row,
    comparisons: dict[tuple[str, ...], list[Comparison]],
    out_dir: Path,
) -> Path:
    return comparison_plot(rows, baseline, comparisons, out_dir / "exact_match_vs_baseline.png")
