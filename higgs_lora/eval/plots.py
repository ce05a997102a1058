"""Inline SVG plots for the HTML report, written by hand: no plotting library, no JavaScript, no network.

Each function returns one ``<figure class="plot">`` holding an ``<svg>`` whose bars are ``<rect class="bar">``
elements, so the report is a single self-contained file and a test can count what was drawn.
"""

from __future__ import annotations

from html import escape

import numpy as np

WIDTH, HEIGHT = 420, 230
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 44, 12, 40, 40
SERIES_COLOURS = ("#3b6ea5", "#d08a2e", "#5b9a5b", "#a5475b", "#7b5ea7", "#3a9aa0", "#8c6d31", "#666666")


def _figure(name: str, title: str, body: list[str], legend: list[tuple[str, str]] | None = None) -> str:
    # The legend is one line under the title, left to right, so long titles never run into it; short labels (up to
    # 8 series, e.g. one per codebook) get narrower slots so they fit.
    slot = 90 if len(legend or []) <= 4 else (WIDTH - MARGIN_LEFT) // max(1, len(legend))
    legend_items = "".join(
        f'<text x="{MARGIN_LEFT + slot * i}" y="30" font-size="11">'
        f'<tspan fill="{colour}">&#9632;</tspan> {escape(label)}</text>'
        for i, (label, colour) in enumerate(legend or [])
    )
    return (
        f'<figure class="plot" data-plot="{escape(name)}">'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'role="img" aria-label="{escape(title)}"><title>{escape(title)}</title>'
        f'<text x="{MARGIN_LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>'
        + "".join(body)
        + legend_items
        + f"</svg><figcaption>{escape(title)}</figcaption></figure>"
    )


def _axes(y_max: float, x_labels: list[tuple[float, str]]) -> list[str]:
    """Axis lines, a y scale (0 .. y_max, 4 ticks) and x tick labels at the given x positions (pixels)."""
    bottom, left, right = HEIGHT - MARGIN_BOTTOM, MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    parts = [
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{MARGIN_TOP}" x2="{left}" y2="{bottom}" stroke="#333"/>',
    ]
    for i in range(5):
        value = y_max * i / 4
        y = bottom - (bottom - MARGIN_TOP) * i / 4
        label = f"{value:.3g}"
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
    for x, label in x_labels:
        parts.append(f'<text x="{x:.1f}" y="{bottom + 14}" font-size="10" text-anchor="middle">{escape(label)}</text>')
    return parts


def histogram(
    name: str,
    title: str,
    series: dict[str, list[float]],
    bins: int = 10,
    bounds: tuple[float, float] | None = None,
) -> str:
    """Histogram of one or more series (e.g. fine-tuned vs base) over the same bins, bars side by side.

    The x axis spans the data, not the metric's possible range: similarities between 0.62 and 0.81 fill the plot
    instead of a fifth of a 0-1 axis. `bounds` (the possible range, e.g. DNSMOS 1-5) only clips the axis.
    """
    all_values = [v for values in series.values() for v in values]
    low, high = (min(all_values), max(all_values)) if all_values else (0.0, 1.0)
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    if high <= low:
        low, high = low - 0.5, high + 0.5
        if bounds is not None:
            low, high = max(low, bounds[0]), min(high, bounds[1])
    edges = np.linspace(low, high, bins + 1)
    counts = {label: np.histogram(np.clip(values, low, high), bins=edges)[0] for label, values in series.items()}
    highest = max([1, *[int(c.max()) for c in counts.values() if len(c)]])
    y_max = -(-highest // 4) * 4  # a multiple of 4, so the 4 y ticks are whole counts
    plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    bin_width = plot_width / bins
    bar_width = bin_width / max(1, len(series)) - 1
    body = []
    for s, (label, bin_counts) in enumerate(counts.items()):
        colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        for i, count in enumerate(bin_counts):
            height = plot_height * count / y_max
            x = MARGIN_LEFT + i * bin_width + s * (bar_width + 1) + 0.5
            body.append(
                f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - MARGIN_BOTTOM - height:.1f}" width="{bar_width:.1f}" '
                f'height="{height:.1f}" fill="{colour}"><title>{escape(label)}: {count} in '
                f"[{edges[i]:.3g}, {edges[i + 1]:.3g})</title></rect>"
            )
    ticks = [(MARGIN_LEFT + plot_width * i / 4, f"{low + (high - low) * i / 4:.3g}") for i in range(5)]
    legend = [(label, SERIES_COLOURS[s % len(SERIES_COLOURS)]) for s, label in enumerate(series)]
    return _figure(name, title, _axes(y_max, ticks) + body, legend if len(series) > 1 else None)


def bar_chart(name: str, title: str, series: dict[str, dict[str, float]], y_max: float = 1.0) -> str:
    """Grouped bars: one group per category (e.g. speaker), one bar per series (e.g. fine-tuned, base)."""
    categories = sorted({c for values in series.values() for c in values})
    plot_width = WIDTH - MARGIN_LEFT - MARGIN_RIGHT
    plot_height = HEIGHT - MARGIN_TOP - MARGIN_BOTTOM
    group_width = plot_width / max(1, len(categories))
    bar_width = group_width * 0.8 / max(1, len(series))
    y_max = max([y_max, *[v for values in series.values() for v in values.values()]])
    body = []
    for s, (label, values) in enumerate(series.items()):
        colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        for c, category in enumerate(categories):
            if category not in values:
                continue
            height = plot_height * max(0.0, values[category]) / y_max
            x = MARGIN_LEFT + c * group_width + group_width * 0.1 + s * bar_width
            body.append(
                f'<rect class="bar" x="{x:.1f}" y="{HEIGHT - MARGIN_BOTTOM - height:.1f}" width="{bar_width:.1f}" '
                f'height="{height:.1f}" fill="{colour}"><title>{escape(label)} {escape(category)}: '
                f"{values[category]:.3f}</title></rect>"
            )
    ticks = [(MARGIN_LEFT + group_width * (c + 0.5), category) for c, category in enumerate(categories)]
    legend = [(label, SERIES_COLOURS[s % len(SERIES_COLOURS)]) for s, label in enumerate(series)]
    return _figure(name, title, _axes(y_max, ticks) + body, legend if len(series) > 1 else None)


def nice_range(values: list[float]) -> tuple[float, float]:
    """A y range that starts and ends where the data does, padded by 5% (a flat series gets +-0.5 or +-5%)."""
    low, high = min(values), max(values)
    if high <= low:
        pad = abs(low) * 0.05 or 0.5
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def line_chart(name: str, title: str, series: dict[str, list[tuple[float, float]]], x_label: str = "step") -> str:
    """One polyline (`<polyline class="line">`) per series of (x, y) points, e.g. a loss over steps.

    Both axes span the data (padded 5%), not zero: a loss going from 7.2 to 6.9 is visible. A series of one point
    is drawn as a dot (`<circle class="point">`).
    """
    points = [p for values in series.values() for p in values]
    if not points:
        return _figure(name, title, [])
    x_low, x_high = min(p[0] for p in points), max(p[0] for p in points)
    if x_high <= x_low:
        x_low, x_high = x_low - 1, x_high + 1
    y_low, y_high = nice_range([p[1] for p in points])
    left, right = MARGIN_LEFT, WIDTH - MARGIN_RIGHT
    top, bottom = MARGIN_TOP, HEIGHT - MARGIN_BOTTOM

    def xy(x: float, y: float) -> tuple[float, float]:
        return (
            left + (right - left) * (x - x_low) / (x_high - x_low),
            bottom - (bottom - top) * (y - y_low) / (y_high - y_low),
        )

    body = [
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#333"/>',
    ]
    for i in range(5):
        value = y_low + (y_high - y_low) * i / 4
        y = bottom - (bottom - top) * i / 4
        body.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{value:.3g}</text>')
        x_value = x_low + (x_high - x_low) * i / 4
        x = left + (right - left) * i / 4
        body.append(f'<text x="{x:.1f}" y="{bottom + 14}" font-size="10" text-anchor="middle">{x_value:.4g}</text>')
    body.append(
        f'<text x="{(left + right) / 2:.1f}" y="{bottom + 28}" font-size="10" text-anchor="middle">'
        f"{escape(x_label)}</text>"
    )
    legend = []
    for s, (label, values) in enumerate(series.items()):
        colour = SERIES_COLOURS[s % len(SERIES_COLOURS)]
        legend.append((label, colour))
        coordinates = [xy(x, y) for x, y in sorted(values)]
        if len(coordinates) == 1:
            (cx, cy) = coordinates[0]
            body.append(f'<circle class="point" cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{colour}"/>')
        elif coordinates:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
            body.append(
                f'<polyline class="line" points="{path}" fill="none" stroke="{colour}" stroke-width="1.5">'
                f"<title>{escape(label)}</title></polyline>"
            )
    return _figure(name, title, body, legend if len(series) > 1 else None)
