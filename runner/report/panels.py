"""Sections of the report page about the run's history and safety: the invocations, the
charts over time (:mod:`runner.report.charts`) and fal's safety checker with the cache.

Each function returns an HTML fragment with every text escaped; :mod:`runner.report.html`
puts them in their sections.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from datetime import datetime

from runner.endpoints.money import format_usd
from runner.report.charts import bar_chart, line_chart, stacked_bar_chart
from runner.report.data import Report
from runner.report.invocations import Invocation
from runner.report.text import count, invocation_summary, when
from runner.report.timeline import Timeline


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _width(bucket_s: int) -> str:
    if bucket_s % 86400 == 0:
        return "day" if bucket_s == 86400 else f"{bucket_s // 86400} days"
    if bucket_s % 3600 == 0:
        return "hour" if bucket_s == 3600 else f"{bucket_s // 3600} hours"
    return "minute" if bucket_s == 60 else f"{bucket_s // 60} minutes"


def _labels(t: Timeline) -> list[str]:
    if t.start is None:
        return []
    fmt = "%H:%M" if t.bucket_s < 86400 else "%m-%d"
    starts = [t.bucket_start(i) for i in range(t.buckets)]
    if starts and starts[0].date() != starts[-1].date() and t.bucket_s < 86400:
        fmt = "%m-%d %H:%M"
    return [f"{s:{fmt}}" for s in starts]


def timeline_panel(t: Timeline) -> str:
    """Completions per bucket, cumulative spend against the estimate, failures by reason."""
    labels = _labels(t)
    per = _width(t.bucket_s)
    intro = (
        f"<p>From the ledger's {count(t.events, 'event')}, per {_e(per)} (UTC) from "
        f"{_e(f'{t.start:%Y-%m-%d %H:%M}')}.</p>"
        if t.start is not None
        else "<p>No events recorded yet.</p>"
    )
    charts = [
        bar_chart(t.completions, labels=labels, title=f"completions per {per}"),
        line_chart(
            t.spend_usd, labels=labels, title="spend so far against the estimate",
            reference=t.estimate_usd, reference_label=f"estimate {format_usd(t.estimate_usd)}",
            fmt=format_usd,
        ),
        stacked_bar_chart(list(t.failures), labels=labels, title=f"failures per {per}, by reason"),
    ]  # fmt: skip
    return intro + '<div class="charts">' + "".join(charts) + "</div>"


def _time(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S}"


def invocations_panel(lines: Sequence[Invocation]) -> str:
    """One row per `runner run`: when, its jobs, its spend, how it ended."""
    if not lines:
        return "<p>No invocation recorded (run.json has none, and no event has a run id).</p>"
    rows = []
    for inv in lines:
        status = inv.status if inv.message is None else f"{inv.status}: {inv.message}"
        cls = "ok" if inv.exit_code == 0 else ("warn" if not inv.finished else "")
        rows.append(
            f'<tr class="inv {cls}"><td><code>{_e(inv.run_id or "(before run ids)")}</code></td>'
            f"<td>{_e(when(inv))}</td><td>{_e(invocation_summary(inv))}</td>"
            f'<td class="status">{_e(status)}</td></tr>'
        )
    head = "<tr><th>run id</th><th>when</th><th>jobs and spend</th><th>exit</th></tr>"
    note = (
        '<p class="note">Counts come from run.json for invocations that finished, else from '
        "their ledger events. One that did not finish was killed (SIGKILL, power loss) "
        "before it could record its end.</p>"
    )
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>{note}"


def safety_panel(report: Report) -> str:
    """Flagged outputs kept, re-rolls and what they cost, cache hits."""
    k = report.safety
    tiles = [
        ("flagged images kept", str(k.flagged_images)),
        ("jobs with a flagged image", str(k.flagged_jobs)),
        ("re-rolls of flagged outputs", str(k.rerolls)),
        ("re-rolls cost", format_usd(k.reroll_usd)),
        ("from the cache ($0)", str(k.cached_jobs)),
    ]
    cells = "".join(
        f'<div class="tile"><b>{_e(v)}</b><span>{_e(label)}</span></div>' for label, v in tiles
    )
    note = ""
    if k.rerolls:
        total = format_usd(report.billed_usd + k.reroll_usd)
        note = (
            f'<p class="note">Re-rolls are paid on top of billed: {_e(total)} in all for '
            "the current jobs.</p>"
        )
    return f'<div class="tiles safety">{cells}</div>{note}'
