"""A sweep's ``report.html``: the results table with intervals, the forest plot against the
baseline, the learning curves of every configuration overlaid, and a gallery of the held-out
questions on which the configurations disagree.

Written by ``mmbridge report SWEEP_DIR`` (and at the end of every ``mmbridge sweep``) from the
:class:`~mmbridge.reporting.tables.Report` that the tables come from, so both say the same.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmbridge.errors import ConfigError
from mmbridge.reporting.report_html import (
    COLOURS,
    Series,
    esc,
    file_uri,
    forest_chart,
    line_chart,
    page,
    table,
)
from mmbridge.reporting.results import Row, label, row_name, varying_keys
from mmbridge.reporting.run_report import REPORT, media_note, read_json_lines
from mmbridge.reporting.significance import paired_bootstrap, read_predictions
from mmbridge.utils.io import atomic_write_text

if TYPE_CHECKING:
    from mmbridge.reporting.tables import Report

#: At most this many questions in the disagreement gallery.
GALLERY_MAX = 12
#: Bootstrap draws of each configuration's exact-match interval (seeded: the same runs give
#: the same interval).
INTERVAL_RESAMPLES = 2000


def _cell(row: Row, metric: str) -> str:
    if metric not in row.mean:
        return "—"
    m, s = row.mean[metric], row.std.get(metric, math.nan)
    return f"{m:.3f}" if math.isnan(s) else f"{m:.3f} ± {s:.3f}"


def exact_match_interval(
    row: Row, n_resamples: int = INTERVAL_RESAMPLES
) -> tuple[float, float, float] | None:
    """The configuration's test exact match over the questions all its runs answered, with a
    95 % bootstrap interval (questions and seeds resampled, as for the paired differences);
    None when a run has no predictions.jsonl."""
    try:
        preds = [read_predictions(run.path) for run in row.runs]
    except ConfigError:
        return None
    keys = sorted(set.intersection(*(set(p) for p in preds))) if preds else []
    if not keys:
        return None
    correct = np.array([[p[k][1] for k in keys] for p in preds], dtype=np.float64)
    # against an all-wrong "baseline", the paired difference is the configuration's own mean
    return paired_bootstrap(np.zeros((1, len(keys))), correct, n_resamples)


def results_section(report: Report, names: dict[tuple[str, ...], str]) -> str:
    rows = report.rows
    types = sorted({k for r in rows for k in r.mean if k.startswith("test/exact_match/")})
    comps = {cfg: {c.metric: c for c in cs} for cfg, cs in report.comparisons.items()}
    head = ["configuration", "runs", "exact match", "95 % interval", *(label(t) for t in types)]
    if report.baseline is not None:
        head.insert(4, "Δ vs baseline [95 % interval]")
    body = []
    for r in rows:
        ci = exact_match_interval(r)
        interval = "—" if ci is None else f"[{ci[1]:.3f}, {ci[2]:.3f}]"
        cells = [
            names[r.config],
            len(r.runs),
            _cell(r, "test/exact_match"),
            interval,
            *(_cell(r, t) for t in types),
        ]
        if report.baseline is not None:
            c = comps.get(r.config, {}).get("test/exact_match")
            diff = (
                "baseline"
                if r is report.baseline
                else "—"
                if c is None
                else f"{c.diff:+.3f} [{c.low:+.3f}, {c.high:+.3f}]"
                + (" *" if c.significant else "")
            )
            cells.insert(4, diff)
        body.append(cells)
    note = (
        "Mean ± sample std over each configuration's seeds (test split); its 95 % bootstrap "
        f"interval ({INTERVAL_RESAMPLES:,} resamples of the held-out questions and of the "
        "seeds, from each run's predictions.jsonl). "
        + (
            "Δ: the paired difference against the baseline on the same questions, 95 % "
            "bootstrap interval (questions and seeds resampled); * = it excludes 0."
            if report.baseline is not None
            else "Run <code>mmbridge report DIR --baseline KEY=VALUE</code> for paired "
            "differences with intervals and the forest plot."
        )
    )
    numeric = [False, True, *(True for _ in head[2:])]
    return (
        '<h2 id="results">Results</h2>' + table(head, body, numeric) + f'<p class="note">{note}</p>'
    )


def forest_section(report: Report, names: dict[tuple[str, ...], str]) -> str:
    if report.baseline is None:
        return ""
    rows = []
    for r in report.rows:
        for c in report.comparisons.get(r.config, []):
            what = "all" if c.metric == "test/exact_match" else c.metric.rsplit("/", 1)[-1]
            rows.append((f"{names[r.config]} · {what}", c.diff, c.low, c.high, c.significant))
    if not rows:
        return ""
    return '<h2 id="forest">Paired difference against the baseline</h2>' + forest_chart(
        rows,
        f"exact match − baseline ({names[report.baseline.config]})",
        "difference, 95 % bootstrap interval (filled: excludes 0)",
    )


def _curve(metrics: dict[str, Any]) -> tuple[list[tuple[float, float]], dict[float, str]]:
    """A run's validation losses against the global step (stages one after another)."""
    out, marks, offset = [], {}, 0.0
    for name, st in metrics.get("stages", {}).items():
        marks[offset] = name
        out += [
            (offset + float(h.get("step", 0)), float(h["val_loss"]))
            for h in st.get("history", [])
            if "val_loss" in h
        ]
        offset += float(st.get("steps", 0))
    return out, marks


def curves_section(rows: list[Row], names: dict[tuple[str, ...], str]) -> str:
    series, marks = [], {}
    for i, r in enumerate(rows):
        points: dict[float, list[float]] = {}
        for run in r.runs:
            curve, m = _curve(run.metrics)
            marks.update(m)
            for x, y in curve:
                points.setdefault(x, []).append(y)
        if points:
            mean = [(x, sum(v) / len(v)) for x, v in sorted(points.items())]
            series.append(Series(names[r.config], mean, COLOURS[i % 10]))
    if not series:
        return ""
    return '<h2 id="curves">Learning curves</h2>' + line_chart(
        series,
        "validation loss (mean over seeds)",
        "training step (all stages)",
        "validation loss",
        marks,
        w=760,
        h=340,
    )


def disagreement_section(rows: list[Row], names: dict[tuple[str, ...], str]) -> str:
    """Questions (with media) that some configuration answers right and another wrong; each
    configuration's answer is its seeds' most common one."""
    answers: dict[tuple[str, ...], dict[str, tuple[str, bool]]] = {}
    info: dict[str, dict[str, Any]] = {}
    for r in rows:
        votes: dict[str, Counter] = {}
        for run in r.runs:
            for p in read_json_lines(run.path / "predictions.jsonl"):
                if p.get("mode") == "media":
                    said = (p.get("prediction", ""), bool(p.get("correct")))
                    votes.setdefault(p["id"], Counter())[said] += 1
                    info.setdefault(p["id"], p)
        answers[r.config] = {q: c.most_common(1)[0][0] for q, c in votes.items()}
    common = set.intersection(*(set(a) for a in answers.values())) if answers else set()
    split = [q for q in info if q in common and len({answers[r.config][q][1] for r in rows}) > 1]
    if not split:
        return (
            (
                '<h2 id="disagree">Where the configurations disagree</h2><p class="note">No '
                "held-out question is answered right by one configuration and wrong by another."
                "</p>"
            )
            if len(rows) > 1 and common
            else ""
        )
    cards = []
    for q in split[:GALLERY_MAX]:
        p = info[q]
        img = (p.get("media") or {}).get("image")
        uri = file_uri(img, 160) if isinstance(img, str) and Path(img).is_file() else None
        pic = (
            f'<img src="{uri}" alt="held-out image {esc(q)}">'
            if uri
            else f"<p>({esc(media_note(p))})</p>"
        )
        lines = "".join(
            f"<div>{'✓' if answers[r.config][q][1] else '✗'} "
            f"{esc(names[r.config])}: "
            f"<b>{esc(answers[r.config][q][0]) or '(empty)'}</b></div>"
            for r in rows
        )
        question = str(p.get("question", "")).replace("<image>", "").strip()
        cards.append(
            f'<div class="card">{pic}<div><b>{esc(p.get("qtype", ""))}</b>: '
            f"{esc(question)}</div><div>reference: <b>{esc(p.get('answer', ''))}</b>"
            f"</div>{lines}</div>"
        )
    return (
        f'<h2 id="disagree">Where the configurations disagree</h2><p class="note">{len(split)} '
        f"of {len(common)} held-out questions are answered right by some configurations and "
        f"wrong by others (the first {len(cards)} shown).</p>"
        f'<div class="gallery">{"".join(cards)}</div>'
    )


def write_sweep_report(report: Report, out_dir: str | Path | None = None) -> Path:
    """Write ``report.html`` for a gathered sweep into ``out_dir`` (default its root)."""
    keys = varying_keys(report.rows)
    names = {r.config: row_name(r, keys) for r in report.rows}
    n_runs = sum(len(r.runs) for r in report.rows)
    intro = (
        f"<p>{n_runs} runs in {len(report.rows)} configurations under <code>{esc(report.root)}"
        "</code>"
        + (f"; {len(report.unfinished)} unfinished" if report.unfinished else "")
        + ".</p>"
    )
    sections = [
        intro,
        results_section(report, names),
        forest_section(report, names),
        curves_section(report.rows, names),
        disagreement_section(report.rows, names),
    ]
    path = Path(out_dir or report.root) / REPORT
    atomic_write_text(path, page(f"Sweep report: {report.root.name}", [s for s in sections if s]))
    return path
