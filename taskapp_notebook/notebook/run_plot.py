"""The run view's score plot: an inline SVG line chart drawn in Python.

No plotting library: the chart is a few dozen bytes of SVG per point, so it works in the live
widget (an ``HTML`` widget's value), in the static card of a saved notebook and in exported
HTML, without adding a dependency to every install. The SVG holds shapes only — the axis
labels sit in HTML around it — so an HTML sanitizer that drops ``<svg>`` (JupyterLab's, for
untrusted notebooks) leaves no stray text behind; what it leaves is a bar chart of plain
``<div>`` s that the SVG carries hidden for that case.

What it draws: the best score so far per iteration (a polyline, class ``taskapp-run-best``),
every evaluated candidate as a dot at its iteration, and the seed's score as a dashed line.
"""

from __future__ import annotations

from collections.abc import Sequence

from .run_style import ACCENT, BORDER, LABEL, SEED

WIDTH = 360
HEIGHT = 140
_PAD = 6
#: Most points the polyline gets, and most candidate dots (thinned out evenly).
MAX_POINTS = 400
MAX_DOTS = 250
#: Most columns of the sanitizer fallback's bar chart.
MAX_BARS = 60


def _thin(points: Sequence[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    """At most ``limit`` points, evenly spaced, always keeping the first and the last."""
    if len(points) <= limit:
        return list(points)
    step = (len(points) - 1) / (limit - 1)
    return [points[round(i * step)] for i in range(limit)]


def _bounds(values: Sequence[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if high - low < 1e-9:
        margin = max(abs(high) * 0.05, 0.05)
        return low - margin, high + margin
    margin = (high - low) * 0.08
    return low - margin, high + margin


def _fallback(points: Sequence[tuple[float, float]], low: float, high: float) -> str:
    """The best score per iteration as a bar chart of plain ``<div>`` s, inside a zero-size,
    hidden ``foreignObject``: invisible wherever the SVG is drawn; where a sanitizer drops
    ``<svg>`` (JupyterLab, untrusted notebook) the divs remain and take the chart's place."""
    bars = "".join(
        f'<div style="flex:1 1 0;min-width:1px;height:{(y - low) / (high - low) * 100:.1f}%;'
        f'background:{ACCENT};opacity:0.8"></div>'
        for _, y in _thin(points, MAX_BARS)
    )
    return (
        '<foreignObject width="0" height="0" visibility="hidden">'
        f'<div class="taskapp-run-bars" style="display:flex;align-items:flex-end;gap:1px;'
        f'height:{HEIGHT}px;width:{WIDTH}px;border-bottom:1px solid {BORDER}">{bars}</div>'
        "</foreignObject>"
    )


def score_plot(
    history: Sequence[tuple[int, float]],
    dots: Sequence[tuple[int, float]] = (),
    seed_score: float | None = None,
    *,
    fallback: bool = True,
) -> str:
    """HTML with the SVG chart and its axis labels; a short note when there is nothing yet.

    ``fallback`` adds the bar chart for sanitizers that drop SVG (the static card needs it;
    the live widget, whose HTML is never sanitized, does not)."""
    if not history and not dots:
        return (
            f'<div class="taskapp-run-plot" style="color:{LABEL};font-size:12px;'
            f'width:{WIDTH}px;padding:8px 0">no scores yet</div>'
        )
    points = [(float(x), float(y)) for x, y in history]
    cloud = [(float(x), float(y)) for x, y in dots]
    xs = [x for x, _ in points + cloud]
    ys = [y for _, y in points + cloud] + ([seed_score] if seed_score is not None else [])
    x_low, x_high = min(xs), max(max(xs), min(xs) + 1)
    y_low, y_high = _bounds(ys)

    def at(x: float, y: float) -> str:
        px = _PAD + (x - x_low) / (x_high - x_low) * (WIDTH - 2 * _PAD)
        py = _PAD + (y_high - y) / (y_high - y_low) * (HEIGHT - 2 * _PAD)
        return f"{px:.1f},{py:.1f}"

    parts = [
        f'<svg class="taskapp-run-svg" width="{WIDTH}" height="{HEIGHT}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="best score per iteration" style="display:block;overflow:visible">'
    ]
    for i in range(4):  # light horizontal grid
        y = _PAD + i * (HEIGHT - 2 * _PAD) / 3
        parts.append(
            f'<line x1="0" y1="{y:.1f}" x2="{WIDTH}" y2="{y:.1f}" '
            f'style="stroke:{BORDER};stroke-width:1;opacity:0.6"/>'
        )
    if seed_score is not None:
        left, right = at(x_low, seed_score), at(x_high, seed_score)
        parts.append(
            f'<polyline class="taskapp-run-seed" points="{left} {right}" '
            f'style="fill:none;stroke:{SEED};stroke-width:1.5;stroke-dasharray:5 4"/>'
        )
    if cloud:
        circles = "".join(
            '<circle cx="{}" cy="{}" r="2.5"/>'.format(*at(x, y).split(","))
            for x, y in _thin(cloud, MAX_DOTS)
        )
        parts.append(
            f'<g class="taskapp-run-dots" style="fill:{ACCENT};opacity:0.35">{circles}</g>'
        )
    if points:
        shown = _thin(points, MAX_POINTS)
        coords = " ".join(at(x, y) for x, y in shown)
        parts.append(
            f'<polyline class="taskapp-run-best" points="{coords}" '
            f'style="fill:none;stroke:{ACCENT};stroke-width:2;stroke-linejoin:round"/>'
        )
        cx, cy = at(*shown[-1]).split(",")
        parts.append(f'<circle cx="{cx}" cy="{cy}" r="3.5" style="fill:{ACCENT}"/>')
    if fallback and points:
        parts.append(_fallback(points, y_low, y_high))
    parts.append("</svg>")
    label = f"color:{LABEL};font-size:11px;line-height:1"
    y_axis = (
        f'<div style="display:flex;flex-direction:column;justify-content:space-between;'
        f'height:{HEIGHT}px;text-align:right;{label};padding-right:4px">'
        f"<span>{y_high:.2f}</span><span>{y_low:.2f}</span></div>"
    )
    x_axis = (
        f'<div style="display:flex;justify-content:space-between;{label};padding-top:3px;'
        f'width:{WIDTH}px"><span>{x_low:g}</span><span>iteration</span>'
        f"<span>{x_high:g}</span></div>"
    )
    return (
        f'<div class="taskapp-run-plot" style="display:flex;align-items:flex-start">{y_axis}'
        f'<div>{"".join(parts)}{x_axis}</div></div>'
    )
