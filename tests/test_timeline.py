"""The run over time: completions, failures by reason and spend per bucket, from events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pyarrow as pa
import pytest

from runner.ledger import JobState, LedgerEvent
from runner.ledger.schema import encode_event, rows_to_table
from runner.report.timeline import (
    BUCKET_WIDTHS_S,
    EVENT_COLUMNS,
    MAX_BUCKETS,
    bucket_width_s,
    timeline,
    transitions,
)

T0 = datetime(2026, 12, 1, 22, 0, 30, tzinfo=UTC)


def table(events: list[LedgerEvent]) -> pa.Table:
    return rows_to_table([encode_event(e, i + 1) for i, e in enumerate(events)]).select(
        list(EVENT_COLUMNS)
    )


def ev(key: str, state: JobState, at_s: float, **fields: object) -> LedgerEvent:
    return LedgerEvent(key, state, T0 + timedelta(seconds=at_s), **fields)  # type: ignore[arg-type]


def done(key: str, at_s: float, billed: str) -> list[LedgerEvent]:
    return [
        ev(key, JobState.SUBMITTING, at_s - 5),
        ev(key, JobState.QUEUED, at_s - 4),
        ev(key, JobState.COMPLETED, at_s, billed_usd=Decimal(billed)),
    ]


def test_download_re_record_is_neither_a_completion_nor_a_payment() -> None:
    events = done("a", 10, "0.035")
    # The download stage records the job completed again, with its bill copied.
    events.append(ev("a", JobState.COMPLETED, 12, billed_usd=Decimal("0.035")))
    t = timeline(table(events))
    assert t.completions == (1,)
    assert t.spend_usd == (Decimal("0.035"),)
    assert transitions(table(events)).tolist() == [True, True, True, False]


def test_buckets_are_minutes_from_the_first_whole_minute() -> None:
    events = done("a", 10, "0.035") + done("b", 70, "0.035") + done("c", 200, "0.07")
    t = timeline(table(events), estimate_usd=Decimal("0.2"))
    assert t.start == datetime(2026, 12, 1, 22, 0, tzinfo=UTC) and t.bucket_s == 60
    # 22:00:35 (minute 0), 22:01:35 (minute 1), 22:03:45 (minute 3); submits from 22:00:35.
    assert t.completions == (1, 1, 0, 1)
    assert t.spend_usd == (Decimal("0.035"), Decimal("0.07"), Decimal("0.07"), Decimal("0.14"))
    assert t.estimate_usd == Decimal("0.2") and t.events == 9
    assert t.bucket_start(3) == datetime(2026, 12, 1, 22, 3, tzinfo=UTC)


def test_failures_count_each_failure_by_reason_rerolls_included() -> None:
    events = [
        ev("a", JobState.SUBMITTING, 0),
        ev("a", JobState.FAILED, 5, error_type="timeout", retryable=True),
        ev("a", JobState.SUBMITTING, 6),  # retried in the same run
        ev("a", JobState.FAILED, 70, error_type="timeout"),
        ev("b", JobState.SUBMITTING, 0),
        ev("b", JobState.FAILED, 8, error_type="flagged", billed_usd=Decimal("0.035")),
        ev("c", JobState.INVALID, 0),  # no error type: its state names it
    ]
    t = timeline(table(events))
    assert dict(t.failures) == {"timeout": (1, 1), "flagged": (1, 0), "invalid": (1, 0)}
    assert [reason for reason, _ in t.failures] == ["timeout", "flagged", "invalid"]
    assert t.completions == (0, 0) and t.spend_usd == (Decimal("0.035"),) * 2


def test_many_reasons_keep_the_top_five_and_one_other() -> None:
    events = []
    for i in range(8):
        for n in range(8 - i):
            events.append(ev(f"k{i}-{n}", JobState.FAILED, i, error_type=f"reason{i}"))
    reasons = [reason for reason, _ in timeline(table(events)).failures]
    assert reasons == ["reason0", "reason1", "reason2", "reason3", "reason4", "3 other reasons"]
    six = [e for e in events if e.error_type != "reason7"]  # six reasons: all named
    assert len(timeline(table(six)).failures) == 6


@pytest.mark.parametrize(
    ("span_s", "width"),
    [(0, 60), (119 * 60, 60), (120 * 60, 120), (9 * 3600, 300), (10 * 3600, 600), (3 * 86400, 3600),
     (400 * 86400, 86400 * 4)],
)  # fmt: skip
def test_bucket_width_keeps_at_most_max_buckets(span_s: float, width: int) -> None:
    assert bucket_width_s(span_s) == width
    assert span_s / width < MAX_BUCKETS
    assert width in BUCKET_WIDTHS_S or width % 86400 == 0


def test_a_long_run_is_bucketed_wider() -> None:
    events = done("a", 10, "0.01") + done("b", 5 * 3600, "0.01")
    t = timeline(table(events))
    assert t.bucket_s == 300 and t.buckets <= MAX_BUCKETS
    assert sum(t.completions) == 2


def test_no_events_is_an_empty_timeline() -> None:
    t = timeline(table([]), estimate_usd=Decimal("1"))
    assert (t.start, t.completions, t.failures, t.spend_usd) == (None, (), (), ())
    assert t.estimate_usd == Decimal("1") and t.buckets == 0
