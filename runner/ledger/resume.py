"""The resume plan: what to do with each manifest job given the ledger. Pure.

    ledger record              decision
    -------------------------  ----------------------------------------------
    none (new key)             SUBMIT
    completed                  SKIP
    queued / in_progress       REATTACH to its request_id (poll; never resubmit)
      ... without request_id   as unknown
    unknown with request_id    REATTACH (the id proves the POST was accepted)
    submitting / unknown       on_unknown: reconcile -> RECONCILE (fal's request history
                               says whether it was accepted: re-attach, or resubmit
                               safely), resubmit -> SUBMIT (possible duplicate spend;
                               the unanswered attempt keeps its number), skip -> SKIP,
                               fail -> FAIL
    failed, cost nothing       SUBMIT, unasked: nothing was billed (never accepted,
      (billed 0)               refused, an input or upload problem, a 5xx)
    failed, maybe billed       SUBMIT with retry_failed; else SKIP
    cancelled                  like a failure that may have been billed
    invalid                    SUBMIT (the row is validated again)

FAIL means: send nothing and record the job as failed (``unknown_outcome``). A SKIP of
anything but a completed job leaves the job not completed: the run does not exit 0.
``max_attempts`` bounds the attempts within one run (see :mod:`runner.execution.worker`); it
does not stop a rerun from retrying a failure that cost nothing.
Jobs in the ledger whose key is no longer in the manifest are never visited,
so they stay in the ledger untouched.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal, Protocol, TypeVar

from runner.ledger.schema import JobState

OnUnknown = Literal["reconcile", "resubmit", "skip", "fail"]


class Action(StrEnum):
    SUBMIT = "submit"
    REATTACH = "reattach"
    RECONCILE = "reconcile"  # settle an unknown outcome from fal's history, then act
    SKIP = "skip"
    FAIL = "fail"


class JobView(Protocol):
    """What a decision reads from a ledger record (JobRecord and JobBrief both fit)."""

    @property
    def state(self) -> JobState: ...
    @property
    def attempt(self) -> int | None: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def retryable(self) -> bool | None: ...
    @property
    def cost_nothing(self) -> bool: ...


class LedgerView(Protocol):
    def brief(self, job_key: str) -> JobView | None: ...


class HasJobKey(Protocol):
    @property
    def job_key(self) -> str: ...


@dataclass(frozen=True, slots=True)
class ResumePolicy:
    on_unknown: OnUnknown = "resubmit"
    retry_failed: bool = False
    max_attempts: int = 3


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one job. ``attempt`` is the attempt number a SUBMIT will use."""

    action: Action
    reason: str
    attempt: int = 1
    request_id: str | None = None
    possible_duplicate: bool = False


_IN_FLIGHT = frozenset(
    {JobState.SUBMITTING, JobState.UNKNOWN, JobState.QUEUED, JobState.IN_PROGRESS}
)
_SKIP_COMPLETED = Decision(Action.SKIP, "completed")
_NEW = Decision(Action.SUBMIT, "new")


def decide(record: JobView | None, policy: ResumePolicy) -> Decision:
    """The decision for one job, from its folded ledger record (None: never seen)."""
    if record is None:
        return _NEW
    state = record.state
    done = record.attempt or 0
    if state is JobState.COMPLETED:
        return _SKIP_COMPLETED
    if state in _IN_FLIGHT and record.request_id:
        return Decision(Action.REATTACH, state.value, done, record.request_id)
    if state in _IN_FLIGHT:
        return _decide_unknown(done, policy)
    if state is JobState.INVALID:
        return Decision(Action.SUBMIT, "invalid: validate again", done + 1)
    if state is JobState.FAILED and record.cost_nothing:
        return Decision(Action.SUBMIT, "failed at no cost: retry", done + 1)
    if policy.retry_failed:
        return Decision(Action.SUBMIT, f"{state.value}: --retry-failed", done + 1)
    return Decision(Action.SKIP, f"{state.value}: may have been billed (--retry-failed)", done)


def _decide_unknown(done: int, policy: ResumePolicy) -> Decision:
    if policy.on_unknown == "reconcile":
        return Decision(Action.RECONCILE, "unknown outcome: reconcile", max(done, 1))
    if policy.on_unknown == "skip":
        return Decision(Action.SKIP, "unknown outcome: --on-unknown skip", done)
    if policy.on_unknown == "fail":
        return Decision(Action.FAIL, "unknown outcome: --on-unknown fail", done)
    # The unanswered attempt did not count: the resubmit keeps its number.
    return Decision(
        Action.SUBMIT, "unknown outcome: resubmit", max(done, 1), possible_duplicate=True
    )


@dataclass
class ResumeSummary:
    """Counts over a streamed plan; complete once the stream is exhausted."""

    actions: Counter[Action] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    possible_duplicates: int = 0
    total: int = 0

    def add(self, decision: Decision) -> None:
        self.total += 1
        self.actions[decision.action] += 1
        self.reasons[decision.reason] += 1
        self.possible_duplicates += decision.possible_duplicate


T = TypeVar("T", bound="str | HasJobKey")


def plan_resume(
    jobs: Iterable[T],
    state: LedgerView,
    *,
    on_unknown: OnUnknown = "resubmit",
    retry_failed: bool = False,
    max_attempts: int = 3,
    summary: ResumeSummary | None = None,
) -> Iterator[tuple[T, Decision]]:
    """Stream (job, decision) over the manifest's jobs (or bare job keys).

    Lazy: the manifest is never held in memory. Pass a ResumeSummary to have
    it counted as the stream is consumed.
    """
    if on_unknown not in ("reconcile", "resubmit", "skip", "fail"):
        raise ValueError(
            f"on_unknown must be reconcile, resubmit, skip or fail, not {on_unknown!r}"
        )
    policy = ResumePolicy(on_unknown, retry_failed, max_attempts)
    for job in jobs:
        key = job if isinstance(job, str) else job.job_key
        decision = decide(state.brief(key), policy)
        if summary is not None:
            summary.add(decision)
        yield job, decision
