"""Charts drawn on the server as inline SVG: the dashboard needs no JavaScript and no build
step, and a chart is there in the page's HTML the moment the page loads."""

from __future__ import annotations

from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, MARGIN = 480, 140, 24


def stacked_bars(title: str, bars: list[tuple[str, int, int]]) -> Markup:
    """Jobs per hour, done (green) under failed (red); ``bars``: (label, done, failed)."""
    top = max([done + failed for _, done, failed in bars] + [1])
    step = (WIDTH - 2 * MARGIN) / max(len(bars), 1)
    scale = (HEIGHT - 2 * MARGIN) / top
    parts = [(f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'),
             f'<title>{escape(title)}</title>',
             f'<text x="{MARGIN}" y="14" font-size="12">{escape(title)} (max {top})</text>',
             f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>']
    for index, (label, done, failed) in enumerate(bars):
        x = MARGIN + index * step
        done_height, failed_height = done * scale, failed * scale
        base = HEIGHT - MARGIN
        parts.append(f'<rect class="done" x="{x:.1f}" y="{base - done_height:.1f}" width="{step * 0.8:.1f}" '
                     f'height="{done_height:.1f}" fill="#3a3"><title>{escape(label)}: {done} done</title></rect>')
        parts.append(f'<rect class="failed" x="{x:.1f}" y="{base - done_height - failed_height:.1f}" '
                     f'width="{step * 0.8:.1f}" height="{failed_height:.1f}" fill="#c33">'
                     f'<title>{escape(label)}: {failed} failed</title></rect>')
    if bars:
        parts.append(f'<text x="{MARGIN}" y="{HEIGHT - 6}" font-size="10">{escape(bars[0][0])}</text>')
        parts.append(f'<text x="{WIDTH - MARGIN}" y="{HEIGHT - 6}" font-size="10" text-anchor="end">'
                     f'{escape(bars[-1][0])}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def line(title: str, points: list[tuple[str, float | None]], unit: str) -> Markup:
    """A value per hour (median latency), gaps where there is none."""
    values = [value for _, value in points if value is not None]
    top = max(values + [1.0])
    step = (WIDTH - 2 * MARGIN) / max(len(points) - 1, 1)
    scale = (HEIGHT - 2 * MARGIN) / top
    coordinates = [(MARGIN + index * step, HEIGHT - MARGIN - value * scale)
                   for index, (_, value) in enumerate(points) if value is not None]
    parts = [(f'<svg class="chart" role="img" aria-label="{escape(title)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" xmlns="http://www.w3.org/2000/svg">'),
             f'<title>{escape(title)}</title>',
             f'<text x="{MARGIN}" y="14" font-size="12">{escape(title)} (max {top:.1f} {escape(unit)})</text>',
             f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>']
    if coordinates:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#36c" stroke-width="2"/>')
        parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#36c"/>' for x, y in coordinates]
    parts.append("</svg>")
    return Markup("".join(parts))
