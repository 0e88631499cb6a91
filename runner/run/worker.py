"""One job's life: intent, submit, completion, result, record; a new attempt for retryable failures.

Nothing here raises for a per-job failure: every way a job can end becomes a ledger event
(``completed``, ``failed``, ``unknown``), and only fatal errors (a refused key) escape.
The ledger sees the intent to submit, committed, *before* the POST, and the request id,
committed, right after the acknowledgement: a crash anywhere leaves either a job to
re-attach to or a visible unknown outcome, never silence.

Local input files are checked and uploaded (``Shared.resolve``) *before* the intent is
recorded: a bad file becomes a plain ``failed`` record (``input_error``, not retryable)
and a failed upload a retryable ``upload_failed``, neither of which can be mistaken for a
POST of unknown outcome. Only the payload sent carries the URLs; the ledger's ``request``
and the job_key keep the manifest's local paths. A completed job's outputs are handed to
the download stage (``Shared.downloads``) right after the completion is committed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

import anyio

from runner.config import RunConfig
from runner.endpoints.cost import Estimate, PriceTable, billed_cost
from runner.errors import AuthError, FalError, HTTPStatusError
from runner.fal.client import QueueClient, RequestRef
from runner.fal.protocol import (
    Completed,
    InProgress,
    ResultResponse,
    Status,
)
from runner.fal.retry import Action, RetryPolicy, call_with_retry, classify
from runner.ledger.schema import JobState, LedgerEvent, encode_request, utcnow
from runner.ledger.store import Ledger
from runner.manifest.jobs import Job
from runner.media.downloads import DownloadItem
from runner.media.uploads import InputFailure
from runner.run.budget import Budget
from runner.run.completion import Finished, Pacing, Strategy, Watch
from runner.run.outcome import Failure, Success, expired, read_result, read_status
from runner.run.progress import Tally
from runner.run.ratelimit import AdaptiveRate

Resolve = Callable[[Job], Awaitable[Mapping[str, Any] | InputFailure]]


@dataclass(slots=True)
class Shared:
    """Everything the workers of one run share; built once by the engine."""

    config: RunConfig
    client: QueueClient
    ledger: Ledger
    strategy: Strategy
    pacing: Pacing
    prices: PriceTable
    rate: AdaptiveRate
    tally: Tally
    budget: Budget
    input_sizes: Callable[[Job], list[tuple[int, int]]]
    submit_policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(attempts=8))
    read_policy: RetryPolicy = field(default_factory=lambda: RetryPolicy(timeout_s=300.0))
    webhook_url: str | None = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], Awaitable[None]] = anyio.sleep
    now: Callable[[], datetime] = utcnow
    endpoint_limits: dict[str, anyio.CapacityLimiter] = field(default_factory=dict)
    on_change: Callable[[], None] = lambda: None
    say: Callable[[str], None] = lambda _message: None
    resolve: Resolve | None = None  # local inputs -> URLs; None sends the payload as is
    downloads: Callable[[DownloadItem], Awaitable[None]] | None = None


@dataclass(frozen=True, slots=True)
class Ticket:
    """A job the scheduler admitted: submit it as ``attempt``, or re-attach to ``reattach``."""

    job: Job
    estimate: Estimate
    attempt: int = 1
    reattach: RequestRef | None = None

    @property
    def units(self) -> float:
        steps = getattr(self.job.request, "num_inference_steps", None) or 28
        return max(self.estimate.megapixels, 1) * int(steps)


@dataclass(frozen=True, slots=True)
class Ended:
    """How a job's run ended here: a ledger state and whether money was spent."""

    state: JobState
    billed_usd: Decimal | None = None


def event(t: Ticket, state: JobState, at: datetime, attempt: int, **fields: Any) -> LedgerEvent:
    return LedgerEvent(job_key=t.job.job_key, state=state, at=at, attempt=attempt, **fields)


async def run_job(t: Ticket, s: Shared) -> Ended:
    """Drive one job to an end state, recording every step."""
    limiter = s.endpoint_limits.get(t.job.endpoint)
    if limiter is None:
        return await _attempts(t, s)
    async with limiter:
        return await _attempts(t, s)


Step = tuple["Ended", bool]
"""How an attempt ended, and whether another attempt may help."""


async def _attempts(t: Ticket, s: Shared) -> Ended:
    attempt, ref = t.attempt, t.reattach
    while True:
        step = await submit(t, s, attempt) if ref is None else ref
        if isinstance(step, tuple):
            ended, retry = step
        else:
            ended, retry = await finish(t, s, step, attempt)
        if not retry or attempt >= s.config.max_attempts:
            return ended
        attempt, ref = attempt + 1, None
        s.tally.retries += 1


def _intent(
    t: Ticket, s: Shared, attempt: int, state: JobState = JobState.SUBMITTING, **fields: Any
) -> LedgerEvent:
    """An event carrying the whole job (row, request, estimate): the first one of an attempt."""
    job = t.job
    return event(
        t, state, s.now(), attempt, row_id=job.row_id, line=job.line, source=job.source,
        variant=job.variant, endpoint=job.endpoint, request=encode_request(job.payload),
        metadata=dict(job.metadata), estimated_usd=t.estimate.usd, **fields,
    )  # fmt: skip


async def _prepare(t: Ticket, s: Shared, attempt: int) -> Mapping[str, Any] | Step:
    """The payload to send, its local files checked and uploaded; or how the attempt ended.

    Nothing was sent yet, so the failure is recorded as a full record (the ledger learns
    the row) and no ``submitting`` intent that would look like an unknown outcome.
    """
    if s.resolve is None:
        return t.job.payload
    try:
        resolved = await s.resolve(t.job)
    except AuthError:
        raise
    except FalError as exc:
        failure = Failure("upload_failed", f"upload: {_detail(exc)}", retryable=True)
    else:
        if not isinstance(resolved, InputFailure):
            return resolved
        failure = Failure("input_error", resolved.message, retryable=False)
    ended = await _failed(t, s, attempt, failure, billed=Decimal(0), full_record=True)
    return ended, failure.retryable


async def submit(t: Ticket, s: Shared, attempt: int) -> RequestRef | Step:
    """Resolve inputs, record the intent, POST with the submit policy, record the ack."""
    payload = await _prepare(t, s, attempt)
    if isinstance(payload, tuple):
        return payload
    s.ledger.append(_intent(t, s, attempt))
    await s.ledger.commit()

    async def post() -> Any:
        await s.rate.acquire()
        return await s.client.submit(
            t.job.endpoint,
            payload,
            webhook_url=s.webhook_url,
            priority=s.config.priority,
            start_timeout_s=s.config.start_timeout_s,
        )

    def on_retry(_attempt: int, exc: Exception, _wait_s: float) -> None:
        if isinstance(exc, HTTPStatusError) and exc.status_code == 429:
            s.rate.on_throttle()

    try:
        ack = await call_with_retry(
            post, policy=s.submit_policy, kind="submit", clock=s.clock, sleep=s.sleep,
            on_retry=on_retry,
        )  # fmt: skip
    except AuthError:
        raise
    except FalError as exc:
        return await _submit_failed(t, s, attempt, exc)
    s.rate.on_success()
    s.ledger.append(
        event(
            t, JobState.QUEUED, s.now(), attempt,
            request_id=ack.request_id,
            gateway_request_id=ack.gateway_request_id,
            submitted_at=s.now(),
        )
    )  # fmt: skip
    await s.ledger.commit()
    ref: RequestRef = ack
    return ref


async def _submit_failed(t: Ticket, s: Shared, attempt: int, exc: FalError) -> Step:
    decision = classify(exc, kind="submit")
    if decision.action is Action.UNKNOWN_OUTCOME:
        # The POST may have been queued and billed: never resubmit blindly.
        s.ledger.append(event(t, JobState.UNKNOWN, s.now(), attempt, error_message=str(exc)))
        await s.ledger.commit()
        s.budget.settle(t.estimate.usd, t.estimate.usd)
        s.tally.unknown += 1
        return Ended(JobState.UNKNOWN), False
    # Certainly not accepted: nothing was paid. Retryable unless the request itself is bad.
    code = exc.status_code if isinstance(exc, HTTPStatusError) else None
    permanent = code is not None and 400 <= code < 500 and code not in (408, 409, 429)
    error_type = f"submit_http_{code}" if code else "submit_failed"
    failure = Failure(error_type, _detail(exc), retryable=not permanent)
    return await _failed(t, s, attempt, failure, billed=Decimal(0)), failure.retryable


async def finish(t: Ticket, s: Shared, ref: RequestRef, attempt: int) -> Step:
    """Wait for completion and record the outcome; the bool asks for another attempt."""
    position = getattr(ref, "queue_position", None)
    running = False

    def on_status(status: Status) -> None:
        nonlocal running
        if not running and isinstance(status, InProgress | Completed):
            running = True
            s.tally.remote_queued -= 1
            s.tally.remote_running += 1
            s.ledger.append(event(t, JobState.IN_PROGRESS, s.now(), attempt, started_at=s.now()))
        s.on_change()

    watch = Watch(
        endpoint=t.job.endpoint, ref=ref, units=t.units, position=position,
        submitted_s=s.clock(), on_status=on_status,
    )  # fmt: skip
    s.tally.remote_queued += 1
    timed_out = False
    try:
        if s.config.job_timeout_s is None:
            finished = await s.strategy.wait(watch)
        else:
            with anyio.move_on_after(s.config.job_timeout_s) as scope:
                finished = await s.strategy.wait(watch)
            timed_out = scope.cancelled_caught
    except AuthError:
        raise
    except HTTPStatusError as exc:
        if exc.status_code != 404:
            return _lost(t, s, ref, exc)
        # The queue acknowledged this id, so a 404 means it forgot it.
        failure = expired(ref.request_id, _detail(exc))
        return await _failed(t, s, attempt, failure, billed=Decimal(0)), False
    except FalError as exc:
        return _lost(t, s, ref, exc)
    finally:
        if running:
            s.tally.remote_running -= 1
        else:
            s.tally.remote_queued -= 1
    if timed_out:
        return await _timed_out(t, s, ref, attempt), False
    _learn(t, s, watch, finished.status)
    return await _outcome(t, s, ref, attempt, watch, finished)


def _lost(t: Ticket, s: Shared, ref: RequestRef, exc: FalError) -> Step:
    """Lost contact with a request fal may still run: keep it re-attachable next run."""
    s.tally.detached += 1
    s.say(f"{t.job.row_id}: lost track of request {ref.request_id}: {_detail(exc)}")
    return Ended(JobState.QUEUED), False


def _learn(t: Ticket, s: Shared, watch: Watch, status: Completed) -> None:
    service = status.inference_time_s
    if service is None and watch.started_s is not None:
        service = s.clock() - watch.started_s
    if service is not None and service > 0:
        s.pacing.model.observe(t.job.endpoint, t.units, service)


async def _timed_out(t: Ticket, s: Shared, ref: RequestRef, attempt: int) -> Ended:
    with anyio.CancelScope(shield=True):
        outcome = "not cancelled"
        try:
            outcome = await call_with_retry(
                lambda: s.client.cancel(ref), policy=RetryPolicy(attempts=3, timeout_s=10.0),
                kind="read", clock=s.clock, sleep=s.sleep,
            )  # fmt: skip
        except FalError as exc:
            outcome = f"cancel failed: {_detail(exc)}"
        message = f"no result within --job-timeout {s.config.job_timeout_s}s ({outcome})"
        failure = Failure("job_timeout", message, retryable=False)
        ended = await _failed(t, s, attempt, failure, billed=Decimal(0))
    return ended


async def _outcome(
    t: Ticket, s: Shared, ref: RequestRef, attempt: int, watch: Watch, finished: Finished
) -> Step:
    status = finished.status
    read: Success | Failure
    if finished.result is not None:
        read = read_result(finished.result)  # the look itself read the result
    elif finished.webhook_payload is not None and finished.webhook_ok:
        read = read_result(ResultResponse(status_code=200, body=finished.webhook_payload))
    elif finished.webhook_ok is None and (failure := read_status(status)) is not None:
        read = failure
    else:
        try:
            result = await call_with_retry(
                lambda: s.client.result(ref), policy=s.read_policy, kind="read",
                clock=s.clock, sleep=s.sleep,
            )  # fmt: skip
        except HTTPStatusError as exc:
            if exc.status_code != 404:
                raise
            # The job ran and was paid for; only its result is gone.
            ended = await _failed(t, s, attempt, expired(ref.request_id, _detail(exc)),
                                  billed=t.estimate.usd)  # fmt: skip
            return ended, False
        read = read_result(result)
    if isinstance(read, Success):
        return await _completed(t, s, attempt, watch, status, read), False
    ended = await _failed(t, s, attempt, read, billed=Decimal(0))
    return ended, read.retryable


async def _completed(
    t: Ticket, s: Shared, attempt: int, watch: Watch, status: Completed, ok: Success
) -> Ended:
    billed = (
        billed_cost(t.job.endpoint, ok.sizes, s.prices, input_sizes=s.input_sizes(t.job))
        if t.job.request is not None
        else None
    )
    queue_s = None if watch.started_s is None else watch.started_s - watch.submitted_s
    inference = status.inference_time_s or ok.inference_s
    if status.inference_time_s is None and inference is not None and inference > 0:
        s.pacing.model.observe(t.job.endpoint, t.units, inference)  # e.g. from a webhook
    if inference is None and watch.started_s is not None:
        inference = s.clock() - watch.started_s
    done = event(
        t, JobState.COMPLETED, s.now(), attempt,
        completed_at=s.now(), queue_s=queue_s, inference_s=inference, outputs=ok.outputs,
        seed=ok.result.seed, nsfw=tuple(ok.result.has_nsfw_concepts),
        megapixels=ok.megapixels, billed_usd=billed,
    )  # fmt: skip
    s.ledger.append(done)
    await s.ledger.commit()
    actual = billed if billed is not None else t.estimate.usd
    s.budget.settle(t.estimate.usd, actual)
    s.tally.completed += 1
    s.tally.spent_usd += actual or Decimal(0)
    s.on_change()
    if s.downloads is not None and ok.outputs:
        await s.downloads(DownloadItem(t.job.job_key, t.job.row_id, ok.outputs, done))
    return Ended(JobState.COMPLETED, billed)


async def _failed(
    t: Ticket, s: Shared, attempt: int, failure: Failure, *, billed: Decimal | None,
    full_record: bool = False,
) -> Ended:  # fmt: skip
    """Record a failed attempt; count the job failed unless another attempt follows."""
    fields: dict[str, Any] = {
        "error_type": failure.error_type,
        "error_message": failure.message[:2000],
        "retryable": failure.retryable,
    }
    if full_record:
        s.ledger.append(_intent(t, s, attempt, JobState.FAILED, **fields))
    else:
        s.ledger.append(event(t, JobState.FAILED, s.now(), attempt, **fields))
    await s.ledger.commit()
    will_retry = failure.retryable and attempt < s.config.max_attempts
    if not will_retry:
        s.budget.settle(t.estimate.usd, billed)
        s.tally.failed += 1
        s.tally.spent_usd += billed or Decimal(0)
        s.on_change()
    return Ended(JobState.FAILED, billed)


def _detail(exc: Exception) -> str:
    return str(exc)[:2000]
