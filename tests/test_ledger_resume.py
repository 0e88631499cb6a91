"""The resume plan: one table of (ledger record, policy) -> decision, and the stream."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from runner.ledger import (
    Action,
    Decision,
    JobBrief,
    JobState,
    Ledger,
    LedgerEvent,
    LedgerState,
    ResumePolicy,
    ResumeSummary,
    decide,
    plan_resume,
)

T0 = datetime(2026, 11, 21, tzinfo=UTC)
DEFAULT = ResumePolicy()
RETRY_FAILED = ResumePolicy(retry_failed=True)
SKIP_UNKNOWN = ResumePolicy(on_unknown="skip")
FAIL_UNKNOWN = ResumePolicy(on_unknown="fail")


def brief(
    state: str,
    attempt: int | None = 1,
    request_id: str | None = None,
    retryable: bool | None = None,
    *,
    free: bool = False,
) -> JobBrief:
    return JobBrief("k", JobState(state), attempt, request_id, retryable, free)


S, R, K, F = Action.SUBMIT, Action.REATTACH, Action.SKIP, Action.FAIL

CASES = [
    # id, record, policy, (action, attempt, request_id, possible_duplicate)
    ("new key", None, DEFAULT, (S, 1, None, False)),
    ("completed", brief("completed", 1, "r1"), DEFAULT, (K, 1, None, False)),
    ("completed even with retry_failed", brief("completed"), RETRY_FAILED, (K, 1, None, False)),
    ("queued reattaches", brief("queued", 1, "r1"), DEFAULT, (R, 1, "r1", False)),
    ("in_progress reattaches", brief("in_progress", 2, "r2"), DEFAULT, (R, 2, "r2", False)),
    # An unanswered attempt does not count: the resubmit keeps its number.
    ("queued without id is unknown", brief("queued"), DEFAULT, (S, 1, None, True)),
    ("submitting resubmits", brief("submitting"), DEFAULT, (S, 1, None, True)),
    ("unknown resubmits", brief("unknown", 2), DEFAULT, (S, 2, None, True)),
    ("unknown with an id reattaches", brief("unknown", 1, "r1"), DEFAULT, (R, 1, "r1", False)),
    ("unknown skip policy", brief("unknown"), SKIP_UNKNOWN, (K, 1, None, False)),
    ("submitting fail policy", brief("submitting"), FAIL_UNKNOWN, (F, 1, None, False)),
    # A failure that cost nothing is retried by every rerun, unasked, attempts or not.
    ("failed free", brief("failed", 1, "r1", True, free=True), DEFAULT, (S, 2, None, False)),
    ("failed free past max", brief("failed", 9, None, True, free=True), DEFAULT,
     (S, 10, None, False)),
    ("failed free not retryable", brief("failed", 1, None, False, free=True), DEFAULT,
     (S, 2, None, False)),
    # One that may have been billed needs --retry-failed.
    ("failed maybe billed", brief("failed", 1, "r1", False), DEFAULT, (K, 1, None, False)),
    ("failed maybe billed retryable", brief("failed", 1, "r1", True), DEFAULT,
     (K, 1, None, False)),
    (
        "failed with retry_failed",
        brief("failed", 5, None, False),
        RETRY_FAILED,
        (S, 6, None, False),
    ),
    ("cancelled skips", brief("cancelled", 1, None, True), DEFAULT, (K, 1, None, False)),
    ("cancelled retry_failed", brief("cancelled"), RETRY_FAILED, (S, 2, None, False)),
    ("invalid validates again", brief("invalid", None), DEFAULT, (S, 1, None, False)),
    ("no attempt recorded", brief("unknown", None), DEFAULT, (S, 1, None, True)),
]  # fmt: skip


@pytest.mark.parametrize(
    ("record", "policy", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(
    record: JobBrief | None, policy: ResumePolicy, expected: tuple[Action, int, str | None, bool]
) -> None:
    decision = decide(record, policy)
    got = (decision.action, decision.attempt, decision.request_id, decision.possible_duplicate)
    assert got == expected
    assert decision.reason


def test_max_attempts_does_not_stop_a_rerun_from_retrying_a_free_failure() -> None:
    """--max-attempts bounds the attempts of one run; a failure that cost nothing is
    retried by every rerun, so kills and outages cannot turn it permanent."""
    free = brief("failed", 3, None, True, free=True)
    assert decide(free, ResumePolicy(max_attempts=3)).action is Action.SUBMIT
    billed = brief("failed", 1, "r1", False)
    assert decide(billed, ResumePolicy(max_attempts=9)).action is Action.SKIP


@dataclass(frozen=True)
class FakeJob:
    job_key: str
    prompt: str


def build_ledger(run_dir: Path) -> LedgerState:
    events = [
        LedgerEvent("done", JobState.COMPLETED, T0, attempt=1, request_id="r-done"),
        LedgerEvent("flying", JobState.SUBMITTING, T0, attempt=1),
        LedgerEvent("flying", JobState.QUEUED, T0, request_id="r-fly"),
        LedgerEvent("lost", JobState.SUBMITTING, T0, attempt=1),
        LedgerEvent("broke", JobState.FAILED, T0, attempt=1, retryable=True, billed_usd=Decimal(0)),
        LedgerEvent("gone", JobState.COMPLETED, T0, attempt=1),
    ]
    with Ledger.open(run_dir) as ledger:
        for event in events:
            ledger.append(event)
        ledger.commit_sync()
    return LedgerState.load(run_dir)


def test_plan_streams_over_jobs_with_a_summary(tmp_path: Path) -> None:
    state = build_ledger(tmp_path)
    jobs = [FakeJob(k, "p") for k in ("done", "flying", "lost", "broke", "fresh")]
    summary = ResumeSummary()
    stream = plan_resume(iter(jobs), state, summary=summary)
    first_job, first = next(stream)  # lazy: one job at a time
    assert (first_job, first.action, summary.total) == (jobs[0], Action.SKIP, 1)
    rest = {job.job_key: d for job, d in stream}
    assert rest["flying"] == Decision(Action.REATTACH, "queued", 1, "r-fly")
    assert rest["lost"].possible_duplicate and rest["lost"].action is Action.SUBMIT
    assert (rest["broke"].action, rest["broke"].attempt) == (Action.SUBMIT, 2)
    assert rest["fresh"].reason == "new"
    assert summary.total == 5 and summary.possible_duplicates == 1
    assert summary.actions == {Action.SKIP: 1, Action.REATTACH: 1, Action.SUBMIT: 3}


def test_plan_accepts_bare_keys_and_leaves_missing_jobs_untouched(tmp_path: Path) -> None:
    state = build_ledger(tmp_path)
    plan = dict(plan_resume(["done", "lost"], state, on_unknown="skip"))
    assert {k: d.action for k, d in plan.items()} == {"done": Action.SKIP, "lost": Action.SKIP}
    # "gone" is not in the manifest: never visited, still in the ledger as it was.
    assert "gone" not in plan
    again = LedgerState.load(tmp_path).get("gone")
    assert again is not None and again.state is JobState.COMPLETED


def test_full_record_works_as_decide_input(tmp_path: Path) -> None:
    state = build_ledger(tmp_path)
    assert decide(state.get("flying"), DEFAULT) == decide(state.brief("flying"), DEFAULT)


def test_unknown_on_unknown_policy_is_refused(tmp_path: Path) -> None:
    state = build_ledger(tmp_path)
    with pytest.raises(ValueError, match="on_unknown"):
        list(plan_resume(["done"], state, on_unknown="maybe"))  # type: ignore[arg-type]
