"""A line chart as a standalone SVG (no plotting library): the report's picture of error by block."""

from __future__ import annotations

import math
from html import escape

# Okabe-Ito: distinguishable by most colour-blind readers; a series beyond them repeats with a dashed line
COLOURS = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
WIDTH, HEIGHT = 760, 360
LEFT, RIGHT, TOP, BOTTOM = 70, 200, 40, 50  # margins; the legend sits in the right one, outside the data


def line_chart_svg(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str) -> str:
    """`series`: name -> (x, y) points, drawn as lines with a point marker each, on a logarithmic y axis when the
    values span more than a factor of 20 (relative errors of layers often do)."""
    points = [p for values in series.values() for p in values if math.isfinite(p[1])]
    if not points:
        return _svg([f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle">{escape(title)}: no data</text>'])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_low, x_high = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    positive = [y for y in ys if y > 0]
    log = bool(positive) and len(positive) == len(ys) and max(ys) / min(positive) > 20
    if log:
        y_low, y_high = math.log10(min(ys)), math.log10(max(ys))
    else:
        y_low, y_high = min(0.0, min(ys)), max(ys)
    if y_high <= y_low:
        y_high = y_low + 1

    def at(x: float, y: float) -> tuple[float, float]:
        value = math.log10(y) if log else y
        px = LEFT + (x - x_low) / (x_high - x_low) * (WIDTH - LEFT - RIGHT)
        py = HEIGHT - BOTTOM - (value - y_low) / (y_high - y_low) * (HEIGHT - TOP - BOTTOM)
        return round(px, 1), round(py, 1)

    parts = [f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">{escape(title)}</text>']
    parts.append(f'<rect x="{LEFT}" y="{TOP}" width="{WIDTH - LEFT - RIGHT}" height="{HEIGHT - TOP - BOTTOM}" '
                 'fill="none" stroke="#888"/>')  # fmt: skip
    for tick in _ticks(y_low, y_high, log):
        _, py = at(x_low, tick)
        label = f"{tick:.2g}"
        parts.append(f'<line x1="{LEFT - 4}" x2="{WIDTH - RIGHT}" y1="{py}" y2="{py}" stroke="#ddd"/>')
        parts.append(f'<text x="{LEFT - 8}" y="{py + 4}" text-anchor="end" font-size="11">{label}</text>')
    for tick in _ticks(x_low, x_high, False):
        px, _ = at(tick, 10**y_low if log else y_low)
        parts.append(f'<text x="{px}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" font-size="11">{tick:g}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 12}" text-anchor="middle" '
                 f'font-size="12">{escape(x_label)}</text>')  # fmt: skip
    parts.append(f'<text x="16" y="{(TOP + HEIGHT - BOTTOM) / 2}" text-anchor="middle" font-size="12" '
                 f'transform="rotate(-90 16 {(TOP + HEIGHT - BOTTOM) / 2})">{escape(y_label)}'
                 f'{" (log scale)" if log else ""}</text>')  # fmt: skip
    for index, (name, values) in enumerate(series.items()):
        colour = COLOURS[index % len(COLOURS)]
        dash = ' stroke-dasharray="5 3"' if index >= len(COLOURS) else ""
        drawn = [at(x, y) for x, y in sorted(values) if math.isfinite(y) and (y > 0 or not log)]
        path = " ".join(f"{px},{py}" for px, py in drawn)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"{dash}/>')
        parts += [f'<circle cx="{px}" cy="{py}" r="2.2" fill="{colour}"/>' for px, py in drawn]
        ly = TOP + 8 + 18 * index
        parts.append(f'<line x1="{WIDTH - RIGHT + 14}" x2="{WIDTH - RIGHT + 34}" y1="{ly}" y2="{ly}" '
                     f'stroke="{colour}" stroke-width="2"{dash}/>')  # fmt: skip
        parts.append(f'<text x="{WIDTH - RIGHT + 40}" y="{ly + 4}" font-size="11">{escape(name)}</text>')
    return _svg(parts)


def _ticks(low: float, high: float, log: bool) -> list[float]:
    """About five round values between `low` and `high` (powers of ten on a log axis, given as exponents)."""
    if log:
        return [10.0**e for e in range(math.floor(low), math.ceil(high) + 1) if low - 1e-9 <= e <= high + 1e-9]
    step = 10 ** math.floor(math.log10((high - low) / 5))
    step *= next(m for m in (1, 2, 5, 10) if (high - low) / (step * m) <= 6)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]


def _svg(parts: list[str]) -> str:
    body = "\n  ".join(parts)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
            f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif">\n  '
            f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>\n  {body}\n</svg>\n')  # fmt: skip
