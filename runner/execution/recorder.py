"""The one place that turns what happened to a job into ledger events, spend and counts.

The worker decides; the recorder records. For each attempt it writes the intent (committed
before the POST), the acknowledgement (committed right after it) and the start, and for
each :data:`~runner.execution.outcome.Outcome` it writes the end event, then, when no further
attempt follows in this run, settles the budget, counts the tally and hands a completed
job's outputs to the download stage. No path can forget one of those, because no other
module does them.

A lost job is the exception by design: it is not an end state. Its estimate stays in
committed spend and its slot stays taken until the run ends (see
:class:`runner.execution.scheduler.Scheduler`); the next run re-attaches to it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from runner.endpoints.cost import Estimate
from runner.errors import RowError
from runner.execution.budget import Spend
from runner.execution.outcome import Cached, Done, Expired, Failed, Lost, Outcome, Unknown
from runner.execution.progress import Tally
from runner.execution.reconcile import Intent
from runner.fal.client import RequestRef
from runner.fal.protocol import SubmitAck
from runner.ledger.schema import JobState, LedgerEvent, encode_request
from runner.ledger.store import Ledger
from runner.manifest.jobs import Job, row_identity
from runner.media.downloads import DownloadItem

MESSAGE_LIMIT = 2000


@dataclass(frozen=True, slots=True)
class Ticket:
    """A job the scheduler admitted: submit it as ``attempt``, or re-attach to ``reattach``.

    ``possible_duplicate``: this submit follows an earlier one of unknown outcome, so the
    job may be billed twice; the intent records it for ever.
    """

    job: Job
    estimate: Estimate
    attempt: int = 1
    reattach: RequestRef | None = None  # where an earlier run's accepted submit lives
    possible_duplicate: bool = False
    # An earlier run's submit of unknown outcome, to settle from fal's history first.
    reconcile: Intent | None = None
    reconciled: str | None = None  # how it was settled, recorded with the next intent
    # --flagged reroll: how many times this job's flagged output was re-rolled in this run,
    # and what the discarded attempts cost (runner.execution.flagged).
    reroll: int = 0
    reroll_usd: Decimal = Decimal(0)
    # Requests earlier attempts of this job were accepted under (in the ledger): never
    # the outcome of this attempt's submit when it is settled from fal's history.
    followed: frozenset[str] = frozenset()
    # Admitted after the budget was reached: an earlier run's submit of unknown outcome,
    # settled from fal's history and followed if found there; never sent again this run.
    settle_only: bool = False

    @property
    def earlier(self) -> bool:
        """Admitted under an earlier run's budget (re-attached, or settled only): it counts
        toward ``--max-total-cost``, not ``--max-cost``; a new submit is left to a rerun."""
        return self.reattach is not None or self.settle_only

    @property
    def units(self) -> float:
        steps = getattr(self.job.request, "num_inference_steps", None) or 28
        return max(self.estimate.megapixels, 1) * int(steps)


def invalid_event(error: RowError, now: Any) -> LedgerEvent:
    first = error.problems[0]
    # However the manifest's path is spelt; the line too, so two bad rows sharing an id
    # are two records, not one (runner.manifest.jobs.row_identity).
    identity = row_identity(first)
    key = "invalid-" + hashlib.sha256(identity.encode()).hexdigest()[:24]
    return LedgerEvent(
        job_key=key,
        state=JobState.INVALID,
        at=now,
        row_id=first.row_id,
        line=first.line,
        source=first.file,
        error_type="invalid_row",
        error_message="; ".join(p.message for p in error.problems)[:2000],
        retryable=False,
    )


class Recorder:
    """Ledger events, budget settlements, tallies and download hand-offs of one run."""

    def __init__(
        self,
        ledger: Ledger,
        budget: Spend,
        tally: Tally,
        *,
        now: Callable[[], datetime],
        on_change: Callable[[], None] = lambda: None,
        say: Callable[[str], None] = lambda _message: None,
        downloads: Callable[[DownloadItem], Awaitable[None]] | None = None,
        examples: int = 5,
    ) -> None:
        self.ledger = ledger
        self.budget = budget
        self.tally = tally
        self.now = now
        self.on_change = on_change
        self.say = say
        self.downloads = downloads
        self.examples = examples
        # Starts held for the job's next event (see started(with_next=True)), by job key.
        self._starts: dict[str, datetime] = {}

    def _event(self, t: Ticket, state: JobState, attempt: int, **fields: Any) -> LedgerEvent:
        if self._starts:
            start = self._starts.pop(t.job.job_key, None)
            if start is not None:
                fields.setdefault("started_at", start)
        return LedgerEvent(job_key=t.job.job_key, state=state, at=self.now(), attempt=attempt,
                           **fields)  # fmt: skip

    def _full(self, t: Ticket, state: JobState, attempt: int, **fields: Any) -> LedgerEvent:
        """An event carrying the whole job (row, request, estimate): an attempt's first."""
        job = t.job
        return self._event(
            t, state, attempt, row_id=job.row_id, line=job.line, source=job.source,
            variant=job.variant, endpoint=job.endpoint, request=encode_request(job.payload),
            metadata=dict(job.metadata), estimated_usd=t.estimate.usd, **fields,
        )  # fmt: skip

    # --- an attempt's progress ---------------------------------------------------------

    async def intent(self, t: Ticket, attempt: int, *, payload_sha256: str | None) -> datetime:
        """Committed before the POST: a crash after it leaves a visible unknown outcome.
        Returns the time it was stamped with."""
        extra: dict[str, Any] = {"payload_sha256": payload_sha256}
        if t.possible_duplicate:
            extra["possible_duplicate"] = True
        if t.reconciled is not None:
            extra["reconciled"] = t.reconciled
        if t.estimate.price_source is not None:
            extra["price_source"] = t.estimate.price_source
        event = self._full(t, JobState.SUBMITTING, attempt, **extra)
        self.ledger.append(event)
        await self.ledger.commit()
        return event.at

    async def adopted(
        self, t: Ticket, attempt: int, ref: RequestRef, duplicates: tuple[str, ...]
    ) -> None:
        """fal's history had the request of an unknown outcome: it is this job's now."""
        self.ledger.append(
            self._event(
                t, JobState.QUEUED, attempt, request_id=ref.request_id,
                status_url=ref.status_url, response_url=ref.response_url,
                cancel_url=ref.cancel_url, reconciled="adopted",
                duplicate_request_ids=duplicates or None,
            )
        )  # fmt: skip
        await self.ledger.commit()
        self.tally.reconciled["adopted"] += 1
        if duplicates:
            self.tally.duplicates_found += len(duplicates)
            self.tally.duplicates_found_usd += (t.estimate.usd or Decimal(0)) * len(duplicates)
            self.say(
                f"{t.job.row_id}: fal's history shows {len(duplicates) + 1} requests of one "
                f"submit; {ref.request_id} is followed, the others were billed too: "
                + ", ".join(duplicates)
            )

    async def acknowledged(self, t: Ticket, attempt: int, ack: SubmitAck) -> None:
        """Committed right after the answer: the request id and the URLs to follow."""
        at = self.now()
        self.ledger.append(
            self._event(
                t, JobState.QUEUED, attempt, request_id=ack.request_id,
                gateway_request_id=ack.gateway_request_id, submitted_at=at,
                status_url=ack.status_url, response_url=ack.response_url,
                cancel_url=ack.cancel_url,
            )
        )  # fmt: skip
        await self.ledger.commit()

    def started(self, t: Ticket, attempt: int, *, with_next: bool = False) -> None:
        """The job was seen running. ``with_next``: it was first seen done, so the start
        goes on the event that ends the attempt, which follows at once (one event fewer;
        the folded record is the same)."""
        if with_next:
            self._starts[t.job.job_key] = self.now()
            return
        self.ledger.append(self._event(t, JobState.IN_PROGRESS, attempt, started_at=self.now()))

    # --- how an attempt ended ------------------------------------------------------------

    async def record(self, t: Ticket, attempt: int, outcome: Outcome, *, final: bool) -> None:
        """Record how an attempt ended; ``final``: no further attempt follows in this run."""
        match outcome:
            case Done():
                await self._done(t, attempt, outcome)
            case Failed():
                await self._failed(t, attempt, outcome, final=final)
            case Expired():
                await self._expired(t, attempt, outcome)
            case Unknown():
                await self._unknown(t, attempt, outcome, final=final)
            case Lost():
                await self._lost(t, attempt, outcome)
            case Cached():
                await self._cached(t, attempt, outcome)
        self.on_change()

    def _attempt_result(self, done: Done) -> dict[str, Any]:
        ok = done.success
        return {
            "queue_s": done.queue_s, "inference_s": done.inference_s, "outputs": ok.outputs,
            "seed": ok.result.seed, "nsfw": tuple(ok.result.has_nsfw_concepts),
            "flagged": done.flagged_images > 0, "megapixels": ok.megapixels,
            "billed_usd": done.billed_usd,
        }  # fmt: skip

    async def _done(self, t: Ticket, attempt: int, done: Done) -> None:
        ok = done.success
        event = self._event(
            t, JobState.COMPLETED, attempt, completed_at=self.now(), **self._attempt_result(done)
        )
        self.ledger.append(event)
        await self.ledger.commit()
        actual = done.billed_usd if done.billed_usd is not None else t.estimate.usd
        self._settle(t, actual)
        self.tally.completed += 1
        self.tally.flagged_images += done.flagged_images
        if self.downloads is not None and ok.outputs:
            item = DownloadItem(t.job.job_key, t.job.row_id, ok.outputs, event, done.cache)
            await self.downloads(item)

    async def reroll(self, t: Ticket, attempt: int, done: Done) -> Decimal | None:
        """A flagged output re-rolled (--flagged reroll): reserve the next attempt's estimate,
        then record this one paid and discarded. Returns what it cost, or None (nothing
        recorded) when the budget refuses another attempt."""
        if not await self.budget.admit(t.estimate.usd):
            self.say(f"{t.job.row_id}: flagged output kept: no budget to re-roll it "
                     f"({self.budget.reason})")  # fmt: skip
            return None
        actual = done.billed_usd if done.billed_usd is not None else t.estimate.usd
        cost = actual or Decimal(0)
        n, of = done.flagged_images, len(done.success.outputs)
        self.ledger.append(
            self._event(
                t, JobState.FAILED, attempt, completed_at=self.now(),
                **self._attempt_result(done), error_type="flagged",
                error_message=f"fal's safety checker flagged {n} of {of} images; re-rolled "
                f"with a new seed", retryable=True, rerolls=t.reroll + 1,
                reroll_usd=t.reroll_usd + cost,
            )
        )  # fmt: skip
        await self.ledger.commit()
        self._settle(t, actual)
        self.tally.rerolls += 1
        self.tally.reroll_usd += cost
        return cost

    async def _cached(self, t: Ticket, attempt: int, cached: Cached) -> None:
        """Fulfilled from the cross-run cache: the whole job, completed at $0, its source."""
        self.ledger.append(
            self._full(
                t, JobState.COMPLETED, attempt, completed_at=self.now(),
                outputs=cached.outputs, seed=cached.seed, megapixels=cached.megapixels,
                nsfw=(False,) * len(cached.outputs), flagged=False, billed_usd=Decimal(0),
                request_id=cached.source_request, cached_from=cached.source_run,
            )
        )  # fmt: skip
        await self.ledger.commit()
        self._settle(t, Decimal(0))
        self.tally.completed += 1
        self.tally.cached += 1

    async def _failed(self, t: Ticket, attempt: int, failed: Failed, *, final: bool) -> None:
        failure = failed.failure
        fields: dict[str, Any] = {
            "error_type": failure.error_type,
            "error_message": failure.message[:MESSAGE_LIMIT],
            "retryable": failure.retryable,
            "billed_usd": failed.billed_usd,
        }
        if failed.flagged_images:
            fields["flagged"] = True
        build = self._full if failed.full_record else self._event
        self.ledger.append(build(t, JobState.FAILED, attempt, **fields))
        await self.ledger.commit()
        if final:
            self.tally.flagged_images += failed.flagged_images
            self._settle(t, failed.billed_usd)
            self.tally.fail(failure.error_type, f"{t.job.row_id}: {failure.message}")

    async def _expired(self, t: Ticket, attempt: int, expired: Expired) -> None:
        failure = expired.failure
        self.ledger.append(
            self._event(
                t, JobState.FAILED, attempt, error_type=failure.error_type,
                error_message=failure.message[:MESSAGE_LIMIT], retryable=failure.retryable,
                billed_usd=expired.billed_usd,
            )
        )  # fmt: skip
        await self.ledger.commit()
        self._settle(t, expired.billed_usd)
        self.tally.fail(failure.error_type, f"{t.job.row_id}: {failure.message}")

    async def _unknown(self, t: Ticket, attempt: int, unknown: Unknown, *, final: bool) -> None:
        message = unknown.message[:MESSAGE_LIMIT]
        self.ledger.append(self._event(t, JobState.UNKNOWN, attempt, error_message=message))
        await self.ledger.commit()
        if not final:
            return  # settled next from fal's history
        # It may have been queued and billed: for a cap, assume it was.
        self._settle(t, t.estimate.usd)
        self.tally.unknown += 1
        self.tally.note("unknown_outcome", f"{t.job.row_id}: {message}")

    async def _lost(self, t: Ticket, attempt: int, lost: Lost) -> None:
        # Not an end state: the state stays what it was, with the reason beside it. The
        # estimate stays committed (no settle) and the slot stays taken until the run ends.
        state = JobState.IN_PROGRESS if lost.running else JobState.QUEUED
        message = f"lost contact with request {lost.request_id}: {lost.message}"
        self.ledger.append(
            self._event(t, state, attempt, error_type="lost_contact",
                        error_message=message[:MESSAGE_LIMIT], retryable=True)
        )  # fmt: skip
        await self.ledger.commit()
        self.tally.lost += 1
        self.tally.note("lost_contact", f"{t.job.row_id}: {message}")
        self.say(f"{t.job.row_id}: {message}; it is re-attached next run")

    async def readmit(self, t: Ticket, failed: Failed) -> bool:
        """A retry of a job an earlier run's budget admitted (re-attached, or settled): new
        spend, so this run's budget must allow it, as for a new job. If it does, the
        earlier reservation is settled at what the failed attempt cost."""
        if not await self.budget.admit(t.estimate.usd):
            return False
        self._settle(t, failed.billed_usd)
        return True

    def unsettled(self, t: Ticket, why: str) -> None:
        """A settle-only job fal's history could not show as accepted: nothing is sent, its
        ledger record stays as the earlier run left it, and a rerun settles it again."""
        self._settle(t, Decimal(0))
        self.tally.left += 1
        self.tally.note("left_unsettled", f"{t.job.row_id}: {why}")

    def _settle(self, t: Ticket, actual: Decimal | None) -> None:
        self.budget.settle(t.estimate.usd, actual, reattached=t.earlier)
        self.tally.spent_usd += actual or Decimal(0)
        if t.earlier:
            self.tally.earlier_usd += actual or Decimal(0)
