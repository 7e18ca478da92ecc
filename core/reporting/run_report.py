"""A run's ``report.html``: its curves, its scores beside the baselines, its held-out answers.

Written by ``mmbridge train`` at the end of a run and by ``mmbridge report RUN_DIR``, from the
files the run leaves: ``metrics.json`` (validation history per stage, test metrics),
``logs/<stage>/metrics.csv`` (training loss when it was logged) and ``predictions.jsonl`` (every
held-out answer, with the path of its media). With a loaded model whose connector records
attention (Q-Former, Resampler, gated cross-attention), the page also shows attention maps of
a few held-out images; with AlignGPT's gate, its mean weights per question type.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from mmbridge.errors import ConfigError, reading
from mmbridge.reporting.attention_maps import session_attention
from mmbridge.reporting.report_html import (
    COLOURS,
    Series,
    bar_chart,
    esc,
    file_uri,
    img_tag,
    line_chart,
    page,
    png_uri,
    table,
)
from mmbridge.utils.io import atomic_write_text

log = logging.getLogger(__name__)
REPORT = "report.html"
#: Gallery size: this many right and this many wrong answers (fewer when there are fewer).
GALLERY_EACH = 6
#: ``(image path, question) -> attention sheet`` for the held-out images shown with their maps.
AttentionFn = Callable[[str, str], Image.Image]


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            with reading(path, f"line {i}", "one JSON object per line"):
                out.append(dict(json.loads(line)))
    return out


def train_losses(run_dir: Path, stage: str) -> list[tuple[float, float]]:
    """``(step, train loss)`` from ``logs/<stage>/metrics.csv`` (Lightning's CSV logger)."""
    f = run_dir / "logs" / stage / "metrics.csv"
    if not f.is_file():
        return []
    out = []
    with f.open(newline="") as fh:
        for row in csv.DictReader(fh):
            loss = row.get("train/loss") or row.get("train_loss")
            if loss and row.get("step"):
                out.append((float(row["step"]), float(loss)))
    return out


def curves_section(run_dir: Path, metrics: dict[str, Any]) -> str:
    charts = []
    for i, (stage, st) in enumerate(metrics.get("stages", {}).items()):
        val = [
            (float(h.get("step", 0)), float(h["val_loss"]))
            for h in st.get("history", [])
            if "val_loss" in h
        ]
        series = [Series("validation loss", val, COLOURS[1])]
        train = train_losses(run_dir, stage)
        if train:
            series.insert(0, Series("training loss", train, COLOURS[0], dashed=True))
        charts.append(
            line_chart(
                series, f"stage {i + 1}: {stage} ({st.get('steps', '?')} steps)", "step", "loss"
            )
        )
    if not charts:
        return ""
    return (
        '<h2 id="curves">Loss per stage</h2><div class="charts">' + "".join(charts) + "</div>"
        '<p class="note">Validation loss at each validation; training loss as logged '
        "(every <code>trainer.log_every_n_steps</code>).</p>"
    )


def scores_section(test: dict[str, Any]) -> str:
    types = sorted({k.split("/", 1)[1] for k in test if k.startswith("exact_match/")})
    cats = ["all", *types]

    def col(prefix: str) -> list[float | None]:
        return [test.get(f"{prefix}exact_match" + ("" if c == "all" else f"/{c}")) for c in cats]

    groups = {"with the media": col(""), "no media": col("no_media/"), "chance": col("chance/")}
    groups = {k: v for k, v in groups.items() if any(x is not None for x in v)}
    if not groups.get("with the media"):
        return ""
    rows = [
        [c, *("—" if g[i] is None else f"{g[i]:.3f}" for g in groups.values())]
        for i, c in enumerate(cats)
    ]
    return (
        '<h2 id="scores">Exact match per question type</h2>'
        + bar_chart(
            cats, groups, f"test exact match (n={test.get('n', '?')})", "exact match", ymax=1.0
        )
        + table(["question type", *groups], rows, [False, *(True for _ in groups)])
        + '<p class="note">"no media": the same questions with the image removed (what the '
        'LLM guesses from the text); "chance": the most frequent training answer per '
        "question type.</p>"
    )


def gallery_section(preds: list[dict[str, Any]], attention: AttentionFn | None = None) -> str:
    media = [p for p in preds if p.get("mode") == "media"]
    if not media:
        return ""
    right = [p for p in media if p.get("correct")][:GALLERY_EACH]
    wrong = [p for p in media if not p.get("correct")][:GALLERY_EACH]
    cards = []
    for p in right + wrong:
        path = _image_of(p)
        uri = file_uri(path, 160) if path else None
        alt = f"held-out image {p.get('id')}"
        pic = img_tag(uri, alt, "") if uri else f"<p>({esc(media_note(p))})</p>"
        question = str(p.get("question", "")).replace("<image>", "").strip()
        cards.append(
            f'<div class="card {"ok" if p.get("correct") else "bad"}">{pic}'
            f"<div><b>{esc(p.get('qtype', ''))}</b>: {esc(question)}</div>"
            f"<div>reference: <b>{esc(p.get('answer', ''))}</b></div>"
            f"<div>prediction: <b>{esc(p.get('prediction', '')) or '(empty)'}</b> "
            f"{'✓' if p.get('correct') else '✗'}</div></div>"
        )
    out = (
        f'<h2 id="gallery">Held-out questions</h2><p class="note">{len(right)} answered right '
        f"(green), {len(wrong)} wrong (red), of {len(media)}.</p>"
        f'<div class="gallery">{"".join(cards)}</div>'
    )
    shown = [p for p in right[:1] + wrong[:1] if _image_of(p)]
    if attention is not None and shown:
        maps = []
        for p in shown:
            try:
                sheet = attention(str(_image_of(p)), str(p.get("question", "")))
            except Exception as exc:  # the page without maps beats no page
                log.warning("attention map of %s failed: %s", p.get("id"), exc)
                continue
            maps.append(
                f"<p>{esc(p.get('question', '')).replace('&lt;image&gt;', '')}</p>"
                + img_tag(png_uri(sheet), f"attention map of {p.get('id')}")
            )
        if maps:
            out += (
                '<h2 id="attention">Where the connector looks</h2><p class="note">Each panel: '
                "one query's (or text token's) attention over the image patches, averaged "
                "over layers and heads; brighter = more weight.</p>" + "".join(maps)
            )
    return out


def media_note(p: dict[str, Any]) -> str:
    """What a question without a picture to show had: ``audio: clip.wav``, or why none shows."""
    media = p.get("media") or {}
    names = [
        f"{k}: {Path(str(v[0] if isinstance(v, list) and v else v)).name}"
        for k, v in media.items()
        if k != "image"
    ]
    return ", ".join(names) or ("image not found" if "image" in media else "no media recorded")


def _image_of(p: dict[str, Any]) -> str | None:
    img = (p.get("media") or {}).get("image")
    img = img[0] if isinstance(img, list) and img else img
    return str(img) if img and Path(str(img)).is_file() else None


def gate_section(preds: list[dict[str, Any]]) -> str:
    """AlignGPT's gate: the mean weight of each local alignment level per question type."""
    by_type: dict[str, list[list[float]]] = defaultdict(list)
    for p in preds:
        gate = (p.get("prefix") or {}).get("gate") if p.get("mode") == "media" else None
        if gate:
            by_type[str(p.get("qtype", ""))].append([float(x) for x in gate])
    if not by_type:
        return ""
    types = sorted(by_type)
    n_levels = len(next(iter(by_type.values()))[0])
    groups = {
        f"level {j + 1}": [sum(w[j] for w in by_type[t]) / len(by_type[t]) for t in types]
        for j in range(n_levels)
    }
    return (
        '<h2 id="gate">AlignGPT gate weights per question type</h2>'
        + bar_chart(
            types,
            groups,
            "mean gate weight of each local level",
            "weight",
            w=max(560, 90 * len(types) * max(1, n_levels) // 2),
        )
        + '<p class="note">a = softmax(G(x)) over the local alignment levels (AlignGPT, '
        "2405.14129 §3.3), averaged over the held-out questions of each type; the global "
        "level is always added.</p>"
    )


def summary_section(run_dir: Path, metrics: dict[str, Any]) -> str:
    test = metrics.get("test", {})
    params = metrics.get("parameters", {})
    rows = [
        ["run directory", str(run_dir)],
        ["test exact match", _f(test.get("exact_match")) + f" (n={test.get('n', '?')})"],
        [
            "trainable / total parameters",
            f"{params.get('trainable', '?'):,} / {params.get('total', '?'):,}" if params else "?",
        ],
        [
            "visual tokens",
            ", ".join(f"{k}: {v}" for k, v in metrics.get("visual_tokens", {}).items()),
        ],
        ["wall time", f"{metrics.get('wall_s', math.nan):.0f} s"],
        ["overrides", " ".join(metrics.get("overrides", []))],
    ]
    return table(None, [r for r in rows if r[1]])


def _f(x: Any) -> str:
    return "—" if x is None else f"{float(x):.3f}"


def write_run_report(
    run_dir: str | Path, out: str | Path | None = None, attention: AttentionFn | None = None
) -> Path:
    """Write ``report.html`` of the run in ``run_dir`` (or to ``out``); returns its path.

    Args:
        run_dir: A finished run (it has ``metrics.json``).
        out: The file to write (default ``run_dir/report.html``).
        attention: Draws the attention sheet of one held-out image (see
            :func:`mmbridge.reporting.attention_maps.overlay`); None leaves the maps out.

    Raises:
        ConfigError: ``run_dir`` has no ``metrics.json``.
    """
    run_dir = Path(run_dir)
    f = run_dir / "metrics.json"
    if not f.is_file():
        raise ConfigError(
            f"{run_dir}: no metrics.json (not a finished run; a sweep directory "
            f"holds runs one level down)"
        )
    with reading(f, expected="the JSON object a finished run writes"):
        metrics = dict(json.loads(f.read_text()))
    preds = read_json_lines(run_dir / "predictions.jsonl")
    # one boundary for what the sections read: a hand-edited file is named, not a traceback
    with reading([f, run_dir / "predictions.jsonl"], expected="the files of a finished run"):
        sections = [
            summary_section(run_dir, metrics),
            curves_section(run_dir, metrics),
            scores_section(metrics.get("test", {})),
            gate_section(preds),
            gallery_section(preds, attention),
        ]
    path = Path(out) if out is not None else run_dir / REPORT
    atomic_write_text(path, page(f"Run report: {run_dir.name}", [s for s in sections if s]))
    return path


def report_at_end(run_dir: Path, session: Any) -> Path | None:
    """``report.html`` of a run that just finished (attention maps drawn with its model when
    its connector records attention); a failure is logged, never raised: the run is done."""
    try:
        return write_run_report(run_dir, attention=session_attention(session))
    except Exception as exc:
        log.warning(
            "report.html of %s not written: %s (run `mmbridge report %s`)", run_dir, exc, run_dir
        )
        return None
