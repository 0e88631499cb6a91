"""A :class:`runner.report.data.Report` as plain text (``runner report``) or JSON (``--json``).

JSON keeps money exact: Decimals become strings; times are ISO 8601; seconds are floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any

from runner.endpoints.money import format_usd
from runner.ledger import JobState
from runner.ledger.totals import spend_notes, superseded_note
from runner.report.data import Percentiles, Report
from runner.report.invocations import Invocation
from runner.report.schemas import REPORT


def report_json(report: Report) -> dict[str, Any]:
    """The report as JSON-ready values, as :data:`runner.report.schemas.REPORT_SCHEMA` says."""
    doc = _plain(report)
    assert isinstance(doc, dict)
    doc["resume"]["note"] = NEW_JOBS_NOTE
    doc["spent_usd"] = str(report.spent_usd)
    for line, inv in zip(doc["invocations"], report.invocations, strict=True):
        line["status"] = inv.status
    return {"schema": REPORT, **doc}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Enum):
        return value.value
    return value


def _key(key: object) -> str:
    return str(key.value) if isinstance(key, Enum) else str(key)


NEW_JOBS_NOTE = (
    "jobs whose row is not in the ledger yet (new or edited manifest rows) would be submitted "
    "too; the report does not read the manifest, so their number is unknown"
)


def count(n: int, noun: str) -> str:
    """``1 job``, ``2 jobs``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 120:
        return f"{value:.1f}s"
    if value < 7200:
        return f"{value / 60:.1f}min"
    return f"{value / 3600:.1f}h"


def percentile_line(name: str, p: Percentiles) -> str:
    if not p.known:
        return f"{name}: unknown for all {p.of} completed jobs"
    values = "  ".join(
        f"{label} {seconds(v)}"
        for label, v in (("p50", p.p50), ("p90", p.p90), ("p99", p.p99), ("max", p.max))
    )
    return f"{name}: {values}  (known for {p.known} of {p.of} completed jobs)"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        out.append("  ".join(cells).rstrip())
    return out


def render_text(report: Report) -> str:
    lines = [f"run {report.run_dir or '-'}: {count(report.jobs, 'job')}"]
    if report.manifest:
        lines[0] += f" from {report.manifest}"
    lines.append("  " + ", ".join(f"{s.value} {n}" for s, n in report.by_state.items()))
    if report.superseded:
        lines.append(f"  {superseded_note(report)}")
    lines += [f"  {note}" for note in spend_notes(report)]
    lines += ["", "cost by endpoint (estimate of billed jobs vs output-based cost):"]
    rows: list[tuple[str, ...]] = [
        ("endpoint", "jobs", "done", "images", "estimated", "est. billed", "billed")
    ]
    for ep in report.endpoints:
        done = ep.by_state.get(JobState.COMPLETED, 0)
        rows.append(
            (ep.endpoint or "(no endpoint)", str(ep.jobs), str(done), str(ep.images),
             *map(format_usd, (ep.estimated_usd, ep.estimated_done_usd, ep.billed_usd)))
        )  # fmt: skip
    rows.append(
        ("total", str(report.jobs), str(report.timing.completed), str(report.timing.images),
         *map(format_usd, (report.estimated_usd, report.estimated_done_usd, report.billed_usd)))
    )  # fmt: skip
    lines += ["  " + line for line in _table(rows)]
    lines += _safety_lines(report)
    lines += ["", *_invocation_lines(report)]
    lines += ["", *_timing_lines(report), "", *_failure_lines(report), ""]
    lines += _resume_lines(report)
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def _safety_lines(report: Report) -> list[str]:
    """Re-rolls (on top of billed), flagged outputs kept, jobs from the cache."""
    k = report.safety
    lines = []
    if k.rerolls:
        lines.append(
            f"  re-rolls of flagged outputs: {k.rerolls}, {format_usd(k.reroll_usd)} on top of "
            f"billed (total paid {format_usd(report.billed_usd + k.reroll_usd)})"
        )
    if k.flagged_jobs:
        lines.append(
            f"  flagged by fal's safety checker and kept: {count(k.flagged_images, 'image')} "
            f"in {count(k.flagged_jobs, 'job')}"
        )
    if k.cached_jobs:
        lines.append(f"  from the cross-run cache ($0): {count(k.cached_jobs, 'job')}")
    return lines


def when(inv: Invocation) -> str:
    """``2026-12-02 05:15:00 to 05:31:12 UTC``; an unfinished one, to its last event."""
    if inv.started_at is None:
        return "time unknown"
    start = f"{inv.started_at:%Y-%m-%d %H:%M:%S}"
    if inv.ended_at is not None:
        return f"{start} to {inv.ended_at:%H:%M:%S} UTC"
    if inv.last_event_at is not None:
        return f"{start} UTC, last event {inv.last_event_at:%H:%M:%S}"
    return f"{start} UTC"


def invocation_summary(inv: Invocation) -> str:
    """Its jobs and spend: ``13 completed, 1 failed, $0.49``."""
    skipped = f", {inv.skipped} skipped (done before)" if inv.skipped else ""
    return f"{inv.completed} completed{skipped}, {inv.failed} failed, {format_usd(inv.spent_usd)}"


def _invocation_lines(report: Report) -> list[str]:
    if not report.invocations:
        return ["invocations: none recorded"]
    lines = [f"invocations ({len(report.invocations)}):"]
    for inv in report.invocations:
        name = inv.run_id or "(before run ids)"
        name += f" shard {inv.shard}" if inv.shard is not None else ""
        what = invocation_summary(inv)
        if inv.command == "cancel" and inv.message:
            what = inv.message  # runner cancel: N in flight: cancelled ...
        lines.append(f"  {name}  {when(inv)}  {what}  {inv.status}")
    return lines


def _timing_lines(report: Report) -> list[str]:
    t = report.timing
    if t.wall_s is None:
        head = "wall time: - (no completed job with submit and completion times)"
    else:
        head = (
            f"wall time: {seconds(t.wall_s)} ({t.first_submitted_at:%Y-%m-%d %H:%M:%S} to "
            f"{t.last_completed_at:%H:%M:%S} UTC), {t.jobs_per_hour or 0:.0f} jobs/h, "
            f"{t.images_per_hour or 0:.0f} images/h"
        )
    return [
        head,
        "  " + percentile_line("queue time", t.queue),
        "  " + percentile_line("inference time", t.inference),
    ]


def _failure_lines(report: Report) -> list[str]:
    if not report.failed_jobs:
        return ["failures: none"]
    shown = len(report.failures)
    groups = count(report.failure_groups, "group")
    lines = [f"failures: {count(report.failed_jobs, 'job')} in {groups}"]
    if shown < report.failure_groups:
        lines[0] += f" (top {shown})"
    for g in report.failures:
        retry = f", {g.retryable} retryable" if g.retryable else ""
        lines.append(f"  {g.count:>6}  {g.error_type}: {g.summary or '(no message)'}{retry}")
        if g.endpoints:
            on = ", ".join(f"{ep} ({n})" for ep, n in g.endpoints)
            lines.append(f"          on {on}")
        for ex in g.examples:
            where = f"{ex.source or '?'}:{ex.line if ex.line is not None else '?'}"
            lines.append(f"          e.g. row {ex.row_id or '?'} ({where}, {ex.endpoint or '-'})")
    return lines


def _resume_lines(report: Report) -> list[str]:
    r = report.resume
    p = r.policy
    counts = (
        ("re-attach", r.reattach), ("retry", r.retry),
        ("reconcile with fal's history", r.reconcile),
        ("resubmit (possible duplicate)", r.resubmit), ("validate again", r.revalidate),
        ("skip", r.skip), ("record as failed", r.fail),
    )  # fmt: skip
    lines = [
        f"a resume (on-unknown {p.on_unknown}, max attempts {p.max_attempts}"
        f"{', retry-failed' if p.retry_failed else ''}) would:",
    ]
    lines += [f"  {label:<30} {n}" for label, n in counts if n]
    lines.append(f"  ({NEW_JOBS_NOTE})")
    return lines
