"""The resume outlook of a run report: what ``runner run`` would do with the ledger's jobs.

:func:`resume_outlook` applies :func:`runner.ledger.decide` to every folded record, once per
distinct (state, attempt, has request id, retryable), and counts the outcomes. New manifest
rows (never seen by the ledger) would be submitted too; without the manifest their number is
unknown, so ``new_jobs`` stays None. Pure: a folded ledger table in, a frozen outlook out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger import JobBrief, JobState, ResumePolicy, decide
from runner.ledger.resume import Action


@dataclass(frozen=True, slots=True)
class ResumeOutlook:
    """What ``runner run`` on the same manifest would do with the jobs already in the ledger."""

    policy: ResumePolicy
    reattach: int  # queued / in progress: poll the request id again
    retry: int  # failed and retryable (or --retry-failed): a new attempt
    resubmit: int  # unknown outcome: submit again, possibly paying twice
    revalidate: int  # invalid rows: validated again, submitted when now valid
    skip: int
    fail: int  # unknown outcome recorded as failed (--on-unknown fail)
    reasons: Mapping[str, int]
    new_jobs: int | None = None  # rows the ledger never saw: unknown without the manifest
    reconcile: int = 0  # unknown outcome: settled from fal's history (re-attach or resubmit)


def resume_outlook(jobs: pa.Table, policy: ResumePolicy) -> ResumeOutlook:
    """decide() over every folded record, once per distinct (state, attempt, id?, retryable,
    free)."""
    return outlook_of([outlook_counts(jobs)], policy)


_KEYS = ["state", "attempt", "has_id", "retryable", "free"]


def outlook_counts(jobs: pa.Table) -> pa.Table:
    """How many folded records there are of each distinct (state, attempt, id?, retryable,
    free): what :func:`outlook_of` decides over (tables of disjoint jobs add up)."""
    has_id = pc.and_(
        pc.is_valid(jobs["request_id"]), pc.not_equal(jobs["request_id"], "")
    ).fill_null(False)
    billed = jobs["billed_usd"]
    free = pc.equal(billed, pa.scalar(0, billed.type)).fill_null(False)
    table = pa.table(
        {
            "state": jobs["state"],
            "attempt": jobs["attempt"],
            "has_id": has_id,
            "retryable": jobs["retryable"],
            "free": free,
        }
    )
    return table.group_by(_KEYS).aggregate([("state", "count")])


def outlook_of(counts: Iterable[pa.Table], policy: ResumePolicy) -> ResumeOutlook:
    """The outlook of every record counted in ``counts`` (:func:`outlook_counts`)."""
    tables = list(counts)
    rows: list[dict[str, Any]] = []
    if tables:
        grouped = pa.concat_tables(tables).group_by(_KEYS).aggregate([("state_count", "sum")])
        rows = grouped.rename_columns([*_KEYS, "state_count"]).to_pylist()
    kinds: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for row in rows:
        brief = JobBrief(
            "", JobState(row["state"]), row["attempt"], "id" if row["has_id"] else None,
            row["retryable"], bool(row["free"]),
        )  # fmt: skip
        decision = decide(brief, policy)
        count = row["state_count"]
        reasons[decision.reason] += count
        kinds[_kind(decision.action, decision.possible_duplicate, brief.state)] += count
    return ResumeOutlook(
        policy=policy,
        reattach=kinds["reattach"],
        retry=kinds["retry"],
        resubmit=kinds["resubmit"],
        revalidate=kinds["revalidate"],
        skip=kinds["skip"],
        fail=kinds["fail"],
        reconcile=kinds["reconcile"],
        reasons=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
    )


def _kind(action: Action, possible_duplicate: bool, state: JobState) -> str:
    if action is Action.SUBMIT:
        if possible_duplicate:
            return "resubmit"
        return "revalidate" if state is JobState.INVALID else "retry"
    return action.value
