"""The report's charts as inline SVG strings: no network, no script, no chart library.

Pure functions, each returning one ``<svg class="chart">`` element:

    bar_chart           one bar per bucket (``rect.bar``), e.g. completions per minute
    stacked_bar_chart   one bar per bucket stacked by series (``rect.s0`` … ``rect.s5``)
    line_chart          one point per bucket (``polyline.line``) and an optional dashed
                        reference line (``line.ref``), e.g. cumulative spend vs the estimate
    cost_chart          horizontal bars per endpoint: estimate vs billed

Every text (titles, legends, labels, tooltips) is escaped. With nothing to draw, each gives
a chart frame saying so (``text.empty``) rather than an empty string, so a page's layout
does not depend on the run's progress. Styling is by class (see runner.report.assets).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from decimal import Decimal

WIDTH, HEIGHT = 820, 230
LEFT, RIGHT, TOP, BOTTOM = 64, 16, 36, 30
SERIES_CLASSES = 6  # s0 … s5 in the stylesheet
TICKS = 6  # x labels drawn at most
MAX_BAR_W = 40.0  # a run of a few buckets gets bars, not slabs
DOTS_UP_TO = 40  # points marked with a dot (one point alone is otherwise invisible)


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _n(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _open(title: str, height: int = HEIGHT) -> list[str]:
    return [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="{_e(title)}" xmlns="http://www.w3.org/2000/svg">',
        f'<text class="title" x="{LEFT}" y="16">{_e(title)}</text>',
    ]


def empty_chart(title: str, message: str = "nothing recorded yet") -> str:
    """A chart frame with a message instead of data."""
    out = _open(title, 80)
    out.append(f'<text class="empty" x="{LEFT}" y="52">{_e(message)}</text></svg>')
    return "".join(out)


def _frame(top: float, labels: Sequence[str], fmt: Callable[[float], str]) -> list[str]:
    """Gridlines at 0, half and top with their values; at most TICKS x labels."""
    plot_h = HEIGHT - TOP - BOTTOM
    out = []
    for share in (0.0, 0.5, 1.0):
        y = HEIGHT - BOTTOM - share * plot_h
        out.append(f'<line class="grid" x1="{LEFT}" y1="{_n(y)}" x2="{WIDTH - RIGHT}" '
                   f'y2="{_n(y)}"/>')  # fmt: skip
        out.append(f'<text class="axis" x="{LEFT - 6}" y="{_n(y + 4)}" text-anchor="end">'
                   f"{_e(fmt(top * share))}</text>")  # fmt: skip
    n = len(labels)
    step = max(1, -(-n // TICKS))
    slot = (WIDTH - LEFT - RIGHT) / max(n, 1)
    for i in range(0, n, step):
        x = LEFT + (i + 0.5) * slot
        out.append(f'<text class="axis" x="{_n(x)}" y="{HEIGHT - 10}" text-anchor="middle">'
                   f"{_e(labels[i])}</text>")  # fmt: skip
    return out


def _legend(names: Sequence[str], classes: Sequence[str], x: float = LEFT + 240) -> list[str]:
    out = []
    for name, cls in zip(names, classes, strict=True):
        out.append(f'<rect class="{cls}" x="{_n(x)}" y="7" width="10" height="10"/>')
        out.append(f'<text class="legend" x="{_n(x + 14)}" y="16">{_e(name)}</text>')
        x += 24 + 7 * len(name)
    return out


def _bar(slot: float) -> tuple[float, float]:
    """(offset in the slot, width) of a bar."""
    width = min(max(slot * 0.8, 0.5), MAX_BAR_W)
    return (slot - width) / 2, width


def _count(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def bar_chart(values: Sequence[int], *, labels: Sequence[str], title: str, unit: str = "") -> str:
    """One ``rect.bar`` per value (zero-height for 0), labelled by ``labels``."""
    if not values or not any(values):
        return empty_chart(title)
    if len(labels) != len(values):
        raise ValueError("one label per value")
    top = max(values)
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / len(values)
    out = _open(title) + _frame(top, labels, _count)
    offset, bar_w = _bar(slot)
    for i, value in enumerate(values):
        h = plot_h * value / top
        x = LEFT + i * slot + offset
        out.append(
            f'<rect class="bar" x="{_n(x)}" y="{_n(HEIGHT - BOTTOM - h)}" '
            f'width="{_n(bar_w)}" height="{_n(h)}">'
            f"<title>{_e(labels[i])}: {_e(_count(value))}{_e(unit)}</title></rect>"
        )
    out.append("</svg>")
    return "".join(out)


def stacked_bar_chart(
    series: Sequence[tuple[str, Sequence[int]]], *, labels: Sequence[str], title: str
) -> str:
    """Bars stacked by series (at most SERIES_CLASSES); a rect per non-zero segment."""
    if len(series) > SERIES_CLASSES:
        raise ValueError(f"at most {SERIES_CLASSES} series")
    totals = [sum(values[i] for _, values in series) for i in range(len(labels))]
    if not series or not any(totals):
        return empty_chart(title, "no failures")
    top = max(totals)
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / len(labels)
    classes = [f"s{i}" for i in range(len(series))]
    out = _open(title) + _legend([name for name, _ in series], classes)
    out += _frame(top, labels, _count)
    offset, bar_w = _bar(slot)
    for i in range(len(labels)):
        base = float(HEIGHT - BOTTOM)
        for (name, values), cls in zip(series, classes, strict=True):
            if not values[i]:
                continue
            h = plot_h * values[i] / top
            base -= h
            out.append(
                f'<rect class="{cls}" x="{_n(LEFT + i * slot + offset)}" y="{_n(base)}" '
                f'width="{_n(bar_w)}" height="{_n(h)}">'
                f"<title>{_e(labels[i])}: {values[i]} {_e(name)}</title></rect>"
            )
    out.append("</svg>")
    return "".join(out)


def line_chart(
    values: Sequence[Decimal],
    *,
    labels: Sequence[str],
    title: str,
    reference: Decimal | None = None,
    reference_label: str = "",
    fmt: Callable[[Decimal], str] = str,
) -> str:
    """A ``polyline.line`` through one point per value, and a dashed ``line.ref`` at
    ``reference`` (when given and positive) on the same scale."""
    if not values:
        return empty_chart(title)
    if len(labels) != len(values):
        raise ValueError("one label per value")
    top = max([*values, reference or Decimal(0)])
    if top <= 0:
        return empty_chart(title, "nothing billed yet")
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / len(values)

    def y(value: Decimal) -> float:
        return HEIGHT - BOTTOM - plot_h * float(value / top)

    names, classes = ["billed so far"], ["line-key"]
    if reference is not None and reference > 0:
        names.append(reference_label or f"estimate {fmt(reference)}")
        classes.append("ref-key")
    out = _open(title) + _legend(names, classes)
    out += _frame(float(top), labels, lambda v: fmt(Decimal(str(round(v, 6)))))
    if reference is not None and reference > 0:
        out.append(f'<line class="ref" x1="{LEFT}" y1="{_n(y(reference))}" x2="{WIDTH - RIGHT}" '
                   f'y2="{_n(y(reference))}"><title>{_e(names[-1])}</title></line>')  # fmt: skip
    xy = [(LEFT + (i + 0.5) * slot, y(v)) for i, v in enumerate(values)]
    points = " ".join(f"{_n(x)},{_n(y_)}" for x, y_ in xy)
    out.append(f'<polyline class="line" points="{points}"><title>{_e(fmt(values[-1]))} billed'
               f"</title></polyline>")  # fmt: skip
    if len(xy) <= DOTS_UP_TO:
        out += [
            f'<circle class="dot" cx="{_n(x)}" cy="{_n(y_)}" r="3"><title>{_e(labels[i])}: '
            f"{_e(fmt(values[i]))}</title></circle>"
            for i, (x, y_) in enumerate(xy)
        ]
    out.append("</svg>")
    return "".join(out)


def cost_chart(rows: Sequence[tuple[str, Sequence[Decimal]]], fmt: Callable[[Decimal], str]) -> str:
    """Horizontal bars per endpoint: estimate of all jobs, estimate of billed jobs, billed."""
    series = (
        ("estimated, all jobs", "est"),
        ("estimated, billed jobs", "estd"),
        ("billed (output-based)", "bill"),
    )
    top = max([Decimal(0), *(v for _, values in rows for v in values)])
    label_w, bar_w, bar_h, gap = 250, 420, 14, 14
    height = 28 + len(rows) * (3 * bar_h + gap)
    out = [
        f'<svg class="chart" viewBox="0 0 {label_w + bar_w + 110} {height}" role="img" '
        f'aria-label="cost by endpoint" xmlns="http://www.w3.org/2000/svg">'
    ]
    for i, (name, cls) in enumerate(series):
        x = label_w + i * 150
        out.append(f'<rect class="{cls}" x="{x}" y="4" width="12" height="12"/>')
        out.append(f'<text x="{x + 16}" y="14">{_e(name)}</text>')
    y = 28
    for endpoint, values in rows:
        out.append(f'<text x="{label_w - 8}" y="{y + 1.5 * bar_h + 4}" text-anchor="end">')
        out.append(f"{_e(endpoint)}</text>")
        for (_, cls), value in zip(series, values, strict=True):
            width = 0.0 if top == 0 else float(value / top) * bar_w
            out.append(
                f'<rect class="{cls}" x="{label_w}" y="{y}" width="{width:.1f}" '
                f'height="{bar_h - 2}"><title>{_e(fmt(value))}</title></rect>'
            )
            out.append(f'<text x="{label_w + width + 6:.1f}" y="{y + 10}">{_e(fmt(value))}</text>')
            y += bar_h
        y += gap
    out.append("</svg>")
    return "".join(out)
