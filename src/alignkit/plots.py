"""Dependency-free SVG charts for HTML reports: line and scatter plots with axes, ticks, a legend and optional
vertical markers. Enough to read a curve; not a plotting library."""

from __future__ import annotations

import html
import math

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22"]


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * step:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


TEXT_WIDTH = 6.5  # px per character at font-size 11 (an estimate: the boxes that keep labels apart use it)


def _overlaps(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def _free_row(placed: list, x: float, w: float, y: float, step: float, limit: float) -> float:
    """The first baseline from `y` down (by `step`) whose text box overlaps nothing placed."""
    while y + step < limit and any(_overlaps((x, y - 9, w, 11), box) for box in placed):
        y += step
    return y


def _point_label(placed: list, x: float, y: float, name: str, color: str, plot: tuple) -> str:
    """A point's name next to it: the first of eight positions around it that stays in the plot and overlaps no
    label already placed (else the first position)."""
    left, top, plot_w, plot_h = plot
    w, h = TEXT_WIDTH * len(name), 11
    spots = [(x + 5, y - 4), (x + 5, y + 12), (x - 5 - w, y - 4), (x - 5 - w, y + 12), (x - w / 2, y - 8),
             (x - w / 2, y + 16), (x + 5, y - 16), (x - 5 - w, y - 16)]
    inside = [(sx, sy) for sx, sy in spots if sx >= left and sx + w <= left + plot_w and sy - 9 >= top
              and sy + 2 <= top + plot_h] or spots
    sx, sy = next(((sx, sy) for sx, sy in inside if not any(_overlaps((sx, sy - 9, w, h), b) for b in placed)),
                  inside[0])
    placed.append((sx, sy - 9, w, h))
    return f'<text x="{sx:.1f}" y="{sy:.1f}" fill="{color}">{html.escape(name)}</text>'


def chart(series: list[dict], *, title: str, xlabel: str, ylabel: str, width: int = 520, height: int = 320,
          vlines: list[dict] | None = None) -> str:
    """An SVG chart. Each series: {"label", "x": [...], "y": [...], "style": "line" | "points" | "both"},
    optionally "labels": a name per point, drawn beside it. `vlines`: [{"x": value, "label": text}] drawn as
    dashed vertical markers. Text inside the plot is placed so that no two labels overlap."""
    def ok(v: float) -> bool:
        return v == v and abs(v) != math.inf

    points = [(x, y) for s in series for x, y in zip(s["x"], s["y"]) if ok(x) and ok(y)]
    xs = [x for x, _ in points] + [v["x"] for v in vlines or [] if ok(v["x"])]
    finite = [y for _, y in points]
    if not points:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(finite), max(finite)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    pad = (y1 - y0) * 0.08 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    # the legend sits right of the plot; a long label (about 6.5 px a character) widens the chart, not the plot
    longest = max((len(str(s["label"])) for s in series), default=0)
    left, right, top, bottom = 58, max(130, 30 + int(6.5 * longest)), 28, 42
    width += right - 130
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * plot_h

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="100%" height="100%" fill="white"/>',
           f'<text x="{left}" y="16" font-size="13" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>']
    for t in _ticks(x0, x1):
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" stroke="#999"/>'
                   f'<text x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{t:g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{left - 4}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#eee"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{t:.3g}</text>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{html.escape(xlabel)}</text>')
    out.append(f'<text transform="translate(14,{top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
               f'{html.escape(ylabel)}</text>')
    placed: list[tuple[float, float, float, float]] = []  # text boxes drawn inside the plot (no overlaps)
    for v in (v for v in vlines or [] if ok(v["x"])):
        x, label = px(v["x"]), str(v.get("label", ""))
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" stroke="#555" '
                   f'stroke-dasharray="4,3"/>')
        if label:  # right of the line, or left of it near the plot's right edge; a row lower if taken
            w = TEXT_WIDTH * len(label)
            tx, anchor, box_x = (x + 3, "start", x + 3) if x + 3 + w <= left + plot_w else (x - 3, "end", x - 3 - w)
            ty = _free_row(placed, box_x, w, top + 11, step=12, limit=top + plot_h)
            placed.append((box_x, ty - 9, w, 11))
            out.append(f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{anchor}" fill="#555">{html.escape(label)}</text>')
    for i, s in enumerate(series):
        color = s.get("color", PALETTE[i % len(PALETTE)])
        pts = [(px(x), py(y)) for x, y in zip(s["x"], s["y"]) if ok(x) and ok(y)]
        style = s.get("style", "line")
        if style in ("line", "both") and len(pts) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.8"/>')
        if style in ("points", "both"):
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3.2" fill="{color}"/>' for x, y in pts]
        names = [n for (x, y), n in zip(((x, y) for x, y in zip(s["x"], s["y"])), s.get("labels") or []) if ok(x) and ok(y)]
        for (x, y), name in zip(pts, names):  # each point's own name beside it, where it overlaps no other
            out.append(_point_label(placed, x, y, str(name), color, (left, top, plot_w, plot_h)))
        ly = top + 12 + 15 * i
        out.append(f'<rect x="{left + plot_w + 10}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{left + plot_w + 24}" y="{ly + 1}">{html.escape(str(s["label"]))}</text>')
    out.append("</svg>")
    return "".join(out)
