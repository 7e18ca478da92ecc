"""Self-contained HTML pages: inline SVG charts, tables and images as ``data:`` URIs.

A page written here loads nothing from the network and nothing from disk: every chart is SVG
drawn from the numbers, every picture a base64 PNG inside the file, so a report can be mailed,
archived or opened offline. No plotting library is needed.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

#: Line / bar colours (matplotlib's "tab10", so the PNG plots and the pages agree).
COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;
max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.charts{display:flex;flex-wrap:wrap;gap:1rem}.note{color:#666;font-size:.85rem}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:.6rem}
.card{border:1px solid #ddd;border-radius:6px;padding:.4rem;font-size:.85rem}
.card img{width:100%;image-rendering:pixelated;border-radius:4px}
.ok{border-left:5px solid #2ca02c}.bad{border-left:5px solid #d62728}
.pic{max-width:100%}code{background:#f4f4f4;padding:0 .2rem}
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def png_uri(image: Image.Image) -> str:
    """A ``data:image/png;base64,...`` URI of ``image``."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def file_uri(path: str | Path, max_side: int | None = None) -> str | None:
    """A PNG data URI of the picture at ``path`` (shrunk to ``max_side``), or None when the
    file is missing or is no picture."""
    try:
        with Image.open(path) as src:
            img = src.convert("RGB")
            if max_side is not None:
                img.thumbnail((max_side, max_side))
            return png_uri(img)
    except (OSError, ValueError):
        return None


def img_tag(uri: str, alt: str, cls: str = "pic") -> str:
    return f'<img class="{cls}" src="{uri}" alt="{esc(alt)}">'


def table(
    head: Sequence[str] | None, rows: Sequence[Sequence[object]], numeric: Sequence[bool] = ()
) -> str:
    """An HTML table (no header row when ``head`` is None); cells are escaped;
    ``numeric[i]`` right-aligns column ``i``."""

    def td(i: int, v: object) -> str:
        cls = ' class="num"' if i < len(numeric) and numeric[i] else ""
        return f"<td{cls}>{esc(v)}</td>"

    body = "".join("<tr>" + "".join(td(i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    top = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" if head else ""
    return "<table>" + top + body + "</table>"


def page(title: str, sections: Sequence[str]) -> str:
    """A whole HTML document: ``sections`` are HTML fragments placed in order."""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width"><title>{esc(title)}</title>'
        f'<link rel="icon" href="data:,"><style>{CSS}</style></head><body>'
        f"<h1>{esc(title)}</h1>" + "\n".join(sections) + "</body></html>\n"
    )


# -- charts ---------------------------------------------------------------------------------
def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step)) + 1)]


def _tick(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


@dataclass
class Series:
    """One line of a :func:`line_chart`: ``points`` ``(x, y)``; ``dashed`` for a second kind."""

    name: str
    points: list[tuple[float, float]]
    colour: str = COLOURS[0]
    dashed: bool = False


class _Frame:
    """Axes of a chart: data -> pixel coordinates and the SVG of the frame and ticks."""

    def __init__(
        self,
        xs: Sequence[float],
        ys: Sequence[float],
        w: int,
        h: int,
        ylo: float | None = None,
        yhi: float | None = None,
    ) -> None:
        self.w, self.h, self.left, self.right, self.top, self.bottom = w, h, 56, 12, 28, 40
        self.xt = nice_ticks(min(xs, default=0.0), max(xs, default=1.0))
        self.yt = nice_ticks(
            min(ys, default=0.0) if ylo is None else ylo,
            max(ys, default=1.0) if yhi is None else yhi,
        )

    def x(self, v: float) -> float:
        lo, hi = self.xt[0], self.xt[-1]
        return self.left + (v - lo) / ((hi - lo) or 1) * (self.w - self.left - self.right)

    def y(self, v: float) -> float:
        lo, hi = self.yt[0], self.yt[-1]
        span = self.h - self.top - self.bottom
        return self.h - self.bottom - (v - lo) / ((hi - lo) or 1) * span

    def svg(self, title: str, xlabel: str, ylabel: str, xticks: bool = True) -> str:
        out = [
            f'<text x="{self.w / 2}" y="16" text-anchor="middle" '
            f'font-weight="bold">{esc(title)}</text>'
        ]
        for t in self.yt:
            out.append(
                f'<line x1="{self.left}" x2="{self.w - self.right}" y1="{self.y(t):.1f}" '
                f'y2="{self.y(t):.1f}" stroke="#eee"/><text x="{self.left - 4}" '
                f'y="{self.y(t) + 4:.1f}" text-anchor="end">{_tick(t)}</text>'
            )
        if xticks:
            for t in self.xt:
                out.append(
                    f'<text x="{self.x(t):.1f}" y="{self.h - self.bottom + 14}" '
                    f'text-anchor="middle">{_tick(t)}</text>'
                )
        out.append(
            f'<rect x="{self.left}" y="{self.top}" '
            f'width="{self.w - self.left - self.right}" '
            f'height="{self.h - self.top - self.bottom}" fill="none" stroke="#999"/>'
        )
        out.append(
            f'<text x="{self.w / 2}" y="{self.h - 6}" text-anchor="middle">{esc(xlabel)}</text>'
        )
        out.append(
            f'<text transform="translate(13 {self.h / 2}) rotate(-90)" '
            f'text-anchor="middle">{esc(ylabel)}</text>'
        )
        return "".join(out)


def _svg(w: int, h: int, body: str, label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{esc(label)}" '
        f'width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-size="11" '
        f'font-family="sans-serif">{body}</svg>'
    )


def _legend(names: Sequence[tuple[str, str, bool]], x: float, y: float) -> str:
    out = []
    for i, (name, colour, dashed) in enumerate(names):
        yy = y + 14 * i
        dash = ' stroke-dasharray="4 3"' if dashed else ""
        out.append(
            f'<line x1="{x}" x2="{x + 18}" y1="{yy}" y2="{yy}" stroke="{colour}" '
            f'stroke-width="2"{dash}/><text x="{x + 22}" y="{yy + 4}">{esc(name)}</text>'
        )
    return "".join(out)


def line_chart(
    series: Sequence[Series],
    title: str,
    xlabel: str,
    ylabel: str,
    marks: dict[float, str] | None = None,
    w: int = 500,
    h: int = 300,
) -> str:
    """Lines with point markers; ``marks`` draws a labelled dashed vertical line at each x."""
    xs = [x for s in series for x, _ in s.points] + list(marks or {})
    ys = [y for s in series for _, y in s.points if math.isfinite(y)]
    f = _Frame(xs, ys, w, h)
    body = [f.svg(title, xlabel, ylabel)]
    for x, name in (marks or {}).items():
        body.append(
            f'<line x1="{f.x(x):.1f}" x2="{f.x(x):.1f}" y1="{f.top}" y2="{h - f.bottom}" '
            f'stroke="#888" stroke-dasharray="3 3"/><text x="{f.x(x) + 3:.1f}" '
            f'y="{f.top + 12}" fill="#666">{esc(name)}</text>'
        )
    for s in series:
        pts = [(f.x(x), f.y(y)) for x, y in s.points if math.isfinite(y)]
        dash = ' stroke-dasharray="5 3"' if s.dashed else ""
        if len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            body.append(
                f'<polyline points="{path}" fill="none" stroke="{s.colour}" '
                f'stroke-width="1.8"{dash}/>'
            )
        body += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.6" fill="{s.colour}"/>' for x, y in pts]
    body.append(_legend([(s.name, s.colour, s.dashed) for s in series], f.left + 8, f.top + 26))
    return _svg(w, h, "".join(body), title)


def bar_chart(
    categories: Sequence[str],
    groups: Mapping[str, Sequence[float | None]],
    title: str,
    ylabel: str,
    ymax: float | None = None,
    w: int = 560,
    h: int = 300,
) -> str:
    """Grouped bars: one group per category, one bar per entry of ``groups`` (None = no bar);
    each bar's value is written above it."""
    vals = [v for vs in groups.values() for v in vs if v is not None]
    f = _Frame(
        [0, max(1, len(categories))],
        vals,
        w,
        h,
        ylo=0.0,
        yhi=ymax if ymax is not None else max(vals, default=1.0),
    )
    body = [f.svg(title, "", ylabel, xticks=False)]
    slot = (w - f.left - f.right) / max(1, len(categories))
    bw = slot * 0.8 / max(1, len(groups))
    for c, cat in enumerate(categories):
        x0 = f.left + c * slot + slot * 0.1
        body.append(
            f'<text x="{x0 + slot * 0.4:.1f}" y="{h - f.bottom + 14}" '
            f'text-anchor="middle">{esc(cat)}</text>'
        )
        for g, (name, vs) in enumerate(groups.items()):
            v = vs[c] if c < len(vs) else None
            if v is None:
                continue
            x, y = x0 + g * bw, f.y(v)
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bw * 0.92:.1f}" '
                f'height="{max(0.0, f.y(0) - y):.1f}" fill="{COLOURS[g % 10]}">'
                f"<title>{esc(name)} {esc(cat)}: {v:.3f}</title></rect>"
                f'<text x="{x + bw * 0.46:.1f}" y="{y - 2:.1f}" text-anchor="middle" '
                f'font-size="9">{v:.2f}</text>'
            )
    body.append(
        _legend(
            [(n, COLOURS[g % 10], False) for g, n in enumerate(groups)],
            w - f.right - 150,
            f.top + 12,
        )
    )
    return _svg(w, h, "".join(body), title)


def forest_chart(
    rows: Sequence[tuple[str, float, float, float, bool]], title: str, xlabel: str, w: int = 640
) -> str:
    """One row per ``(label, estimate, low, high, significant)``: a point with its interval,
    filled when ``significant``, beside a vertical line at 0."""
    h = 70 + 26 * len(rows)
    m = max([abs(v) for _, d, lo, hi, _ in rows for v in (d, lo, hi)], default=0.0) or 0.05
    f = _Frame([-m, m], [0.0, 1.0], w, h)  # symmetric about 0
    f.left = 200
    body = [f'<text x="{w / 2}" y="16" text-anchor="middle" font-weight="bold">{esc(title)}</text>']
    for t in f.xt:
        body.append(
            f'<line x1="{f.x(t):.1f}" x2="{f.x(t):.1f}" y1="{f.top}" y2="{h - f.bottom}" '
            f'stroke="#eee"/><text x="{f.x(t):.1f}" y="{h - f.bottom + 14}" '
            f'text-anchor="middle">{_tick(t)}</text>'
        )
    body.append(
        f'<line x1="{f.x(0):.1f}" x2="{f.x(0):.1f}" y1="{f.top}" y2="{h - f.bottom}" '
        f'stroke="#555"/>'
    )
    for i, (name, d, lo, hi, sig) in enumerate(rows):
        y = f.top + 14 + 26 * i
        body.append(
            f'<text x="{f.left - 8}" y="{y + 4}" text-anchor="end">{esc(name)}</text>'
            f'<line x1="{f.x(lo):.1f}" x2="{f.x(hi):.1f}" y1="{y}" y2="{y}" '
            f'stroke="{COLOURS[0]}" stroke-width="2"/><circle cx="{f.x(d):.1f}" cy="{y}" '
            f'r="4.5" stroke="{COLOURS[0]}" fill="{COLOURS[0] if sig else "white"}">'
            f"<title>{d:+.3f} [{lo:+.3f}, {hi:+.3f}]</title></circle>"
        )
    body.append(
        f'<text x="{(f.left + w) / 2}" y="{h - 6}" text-anchor="middle">{esc(xlabel)}</text>'
    )
    return _svg(w, h, "".join(body), title)
