"""One job's life: inputs, intent, submit, completion, result; a new attempt when one may help.

Every path returns an :data:`~runner.execution.outcome.Outcome` value; the one recorder
(:class:`~runner.execution.recorder.Recorder`) turns it into ledger events, budget settlements,
tallies and the download hand-off. Nothing here raises for a per-job failure; only a
refused key (:class:`~runner.errors.AuthError`) escapes, because it is fatal to the run.

The ledger sees the intent to submit, committed, *before* the POST, and the request id,
committed, right after the acknowledgement: a crash anywhere leaves either a job to
re-attach to or a visible unknown outcome, never silence.

Local input files are checked and uploaded (``Shared.resolve``) *before* the intent is
recorded: a bad file becomes a ``failed`` record (``input_error``) and a failed upload a
retryable ``upload_failed``, neither of which can be mistaken for a POST of unknown outcome.
Only the payload sent carries the URLs; the ledger's ``request`` and the job_key keep the
manifest's local paths, and ``payload_sha256`` fingerprints what was actually sent.

Attempts: only an attempt the server answered (acknowledged, or refused with a reason)
counts toward ``--max-attempts``. One that never reached it keeps its number. A re-roll of a
flagged output (:mod:`runner.execution.flagged`) is an attempt of its own; a job the cross-run
cache holds (:mod:`runner.execution.reuse`) is never sent.

A finished job's answer becomes its outcome in :mod:`runner.execution.results`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import anyio

from runner.errors import AuthError, FalError, HTTPStatusError
from runner.execution.completion import Finished, Watch, WebhookIn
from runner.execution.flagged import judge, reseeded
from runner.execution.outcome import (
    Cached,
    Done,
    Expired,
    Failed,
    Failure,
    Lost,
    Outcome,
    Unknown,
    expired,
    submit_failed,
)
from runner.execution.reconcile import Absent, Adopt, Intent, Unavailable, describe
from runner.execution.recorder import Ticket
from runner.execution.results import ZERO, detail, finished_outcome, recovered
from runner.execution.shared import NotSentError, Shared
from runner.fal.client import RequestRef
from runner.fal.protocol import Completed, InProgress, Status
from runner.fal.retry import call_with_retry
from runner.ledger.schema import payload_fingerprint
from runner.media.uploads import InputFailure


async def run_job(t: Ticket, s: Shared) -> Outcome | None:
    """Drive one job to an outcome, recording every step; None if an interrupt stopped it
    before it sent anything, or if it was only to be settled and fal's history did not
    show it accepted (the budget is reached: nothing new is sent)."""
    try:
        limiter = s.endpoint_limits.get(t.job.endpoint)
        if limiter is None:
            return await _attempts(t, s)
        async with limiter:
            return await _attempts(t, s)
    except NotSentError:
        return None


async def _attempts(t: Ticket, s: Shared) -> Outcome | None:
    attempt, ref = max(t.attempt, 1), t.reattach
    answered = unanswered = 0
    followed: set[str] = set(t.followed) if ref is None else {*t.followed, ref.request_id}
    if t.reconcile is not None:
        # An earlier run's submit of unknown outcome: fal's history says what it became.
        intent = await _with_fingerprint(t, s, t.reconcile)
        if isinstance(intent, Failed):
            await s.recorder.record(t, attempt, intent, final=True)
            return intent
        t, ref = await _settle(t, s, attempt, intent)
        if ref is None and t.settle_only:
            return None
    while True:
        slot, cached = None, None
        if ref is None and s.reuse is not None:
            t, slot, cached = await s.reuse.lookup(t)
        if cached is not None:  # done in an earlier run using the same --cache: $0
            await s.recorder.record(t, attempt, cached, final=True)
            return cached
        sent = await submit(t, s, attempt) if ref is None else ref
        if not isinstance(sent, _OUTCOMES):
            followed.add(sent.request_id)
        outcome = sent if isinstance(sent, _OUTCOMES) else await finish(t, s, sent, attempt)
        if isinstance(outcome, Done):
            if slot is not None and not isinstance(sent, _OUTCOMES):  # filed once downloaded
                outcome = replace(outcome, cache=replace(slot, request_id=sent.request_id))
            judged, t = await judge(t, attempt, outcome, config=s.config, recorder=s.recorder)
            if judged is None:  # re-rolled with a new seed: a new attempt of its own
                if s.reuse is not None and outcome.cache is not None:
                    await s.reuse.mark_flagged(outcome.cache, outcome.success.result.seed)
                attempt, ref = attempt + 1, None
                continue
            outcome = judged
        if isinstance(outcome, Unknown) and s.reconciler is not None and outcome.intent:
            unanswered += 1
            if unanswered < s.config.max_attempts:
                # Settle it now, from fal's history, rather than leave it to a rerun.
                await s.recorder.record(t, attempt, outcome, final=False)
                intent = replace(outcome.intent, followed=frozenset(followed))
                t, ref = await _settle(t, s, attempt, intent)
                if ref is None:
                    s.tally.retries += 1
                continue
        retry = isinstance(outcome, Failed) and outcome.retryable
        if isinstance(outcome, Failed):
            if outcome.answered:
                answered += 1
            else:
                unanswered += 1
        limit = s.config.max_attempts
        final = not retry or answered >= limit or unanswered >= limit
        retried = t
        if not final and t.earlier:
            # Admitted by an earlier run's budget: a new submit is new spend, which this
            # run's budget must allow; if it does not, it is left to the next run.
            assert isinstance(outcome, Failed)
            final = not await s.recorder.readmit(t, outcome)
            retried = replace(t, reattach=None, settle_only=False)
        await s.recorder.record(t, attempt, outcome, final=final)
        if final:
            return outcome
        t = retried
        if isinstance(outcome, Failed) and outcome.answered:
            attempt += 1  # an attempt the server never saw keeps its number
        ref = None
        s.tally.retries += 1


_OUTCOMES = (Done, Failed, Unknown, Lost, Expired, Cached)


async def _with_fingerprint(t: Ticket, s: Shared, intent: Intent) -> Intent | Failed:
    """An intent recorded before fingerprints were: the payload is resolved again (uploads
    come from the cache, so the URLs are the ones sent) and fingerprinted."""
    if intent.payload_sha256:
        return intent
    payload = await _prepare(t, s)
    if isinstance(payload, Failed):
        return payload
    return replace(intent, payload_sha256=payload_fingerprint(payload))


async def _settle(
    t: Ticket, s: Shared, attempt: int, intent: Intent
) -> tuple[Ticket, RequestRef | None]:
    """Follow the request fal's history shows, or resubmit: safely when it shows none, as
    a possible duplicate when it cannot be read. The ticket carries what the next intent
    records."""
    settled = await s.reconciler.settle(intent) if s.reconciler is not None else Unavailable("off")
    said = describe(settled, resubmit=not t.settle_only)
    s.recorder.say(f"{t.job.row_id}: unknown submit outcome: {said}")
    if isinstance(settled, Adopt):
        ref = s.client.urls_for(t.job.endpoint, settled.item.request_id)
        await s.recorder.adopted(t, attempt, ref, settled.duplicates)
        return replace(t, reconcile=None), ref
    if t.settle_only:  # the budget is reached: nothing new is sent
        s.recorder.unsettled(t, f"unknown submit outcome ({said}); the budget is reached: "
                             "nothing is sent, a rerun settles it again")  # fmt: skip
        return t, None
    if isinstance(settled, Absent):
        s.tally.reconciled["resubmitted_safe"] += 1
        return replace(t, reconcile=None, reconciled="resubmitted_safe"), None
    s.tally.reconciled["history_unavailable"] += 1
    s.tally.possible_duplicates += 1
    s.tally.possible_duplicate_usd += t.estimate.usd or ZERO
    ticket = replace(t, reconcile=None, reconciled="history_unavailable", possible_duplicate=True)
    return ticket, None


async def _prepare(t: Ticket, s: Shared) -> Mapping[str, Any] | Failed:
    """The payload to send, its local files checked and uploaded; or why it cannot be sent.

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
        failure = Failure("upload_failed", f"upload: {detail(exc)}", retryable=True)
    else:
        if not isinstance(resolved, InputFailure):
            return resolved
        failure = Failure("input_error", resolved.message, retryable=False)
    return Failed(failure, billed_usd=ZERO, answered=False, full_record=True)


async def submit(t: Ticket, s: Shared, attempt: int) -> RequestRef | Outcome:
    """Resolve inputs, record the intent, POST with the submit policy, record the ack."""
    with s.unsent.guard():  # an interrupt stops uploads and waits: nothing was sent
        prepared = await _prepare(t, s)
        if isinstance(prepared, Failed):
            return prepared
        # The rate token first: an intent then waits on nothing before its POST, so a kill
        # leaves only intents that were about to be sent to settle, not a queue of them.
        await s.rate.acquire()
    payload = reseeded(t, prepared)  # a re-roll of a flagged output sends its own seed
    sha = payload_fingerprint(payload)
    headers = s.config.submit_headers
    intent_at = await s.recorder.intent(t, attempt, payload_sha256=sha)
    tries = 0

    async def post() -> Any:
        nonlocal tries
        tries += 1
        if tries > 1:
            await s.rate.acquire()
        return await s.client.submit(
            t.job.endpoint,
            payload,
            webhook_url=s.webhook_url,
            priority=s.config.priority,
            start_timeout_s=s.config.start_timeout_s,
            extra_headers=headers,
        )

    def on_retry(_attempt: int, exc: Exception, _wait_s: float) -> None:
        if isinstance(exc, HTTPStatusError) and exc.status_code == 429:
            s.rate.on_throttle()

    try:
        ack = await call_with_retry(
            post, policy=s.policies.submit, kind="submit", clock=s.clock, sleep=s.sleep,
            on_retry=on_retry,
        )  # fmt: skip
    except AuthError:
        raise
    except FalError as exc:
        failed = submit_failed(exc)
        if isinstance(failed, Unknown):
            return replace(failed, intent=Intent(t.job.endpoint, intent_at, s.now(), sha))
        return failed
    s.rate.on_success()
    await s.recorder.acknowledged(t, attempt, ack)
    ref: RequestRef = ack
    return ref


async def finish(t: Ticket, s: Shared, ref: RequestRef, attempt: int) -> Outcome:
    """Wait for completion and read the result, as an outcome."""
    position = getattr(ref, "queue_position", None)
    running = False

    def on_status(status: Status) -> None:
        nonlocal running
        if not running and isinstance(status, InProgress | Completed):
            running = True
            s.tally.remote_queued -= 1
            s.tally.remote_running += 1
            s.recorder.started(t, attempt, with_next=isinstance(status, Completed))
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
            return Lost(ref.request_id, detail(exc), running)
        # The queue acknowledged this id, so a 404 means it forgot it: it may have run,
        # and fal's history keeps what it returned for 30 days.
        found = await recovered(t, s, ref, watch)
        if found is not None:
            return found
        return Expired(expired(ref.request_id, detail(exc)), billed_usd=None)
    except FalError as exc:
        return Lost(ref.request_id, detail(exc), running)
    finally:
        if running:
            s.tally.remote_running -= 1
        else:
            s.tally.remote_queued -= 1
    if timed_out:
        return await _timed_out(s, ref)
    _learn(t, s, watch, finished)
    return await finished_outcome(t, s, ref, watch, finished)


def _learn(t: Ticket, s: Shared, watch: Watch, finished: Finished) -> None:
    service = None if isinstance(finished, WebhookIn) else finished.status.inference_time_s
    if service is None and watch.started_s is not None:
        service = s.clock() - watch.started_s
    if service is not None and service > 0:
        s.pacing.observe(t.job.endpoint, t.units, service)


async def _timed_out(s: Shared, ref: RequestRef) -> Outcome:
    with anyio.CancelScope(shield=True):
        outcome = "not cancelled"
        try:
            outcome = await call_with_retry(
                lambda: s.client.cancel(ref), policy=s.policies.cancel, kind="read",
                clock=s.clock, sleep=s.sleep,
            )  # fmt: skip
        except FalError as exc:
            outcome = f"cancel failed: {detail(exc)}"
    message = f"no result within --job-timeout {s.config.job_timeout_s}s ({outcome})"
    # It may have run before the cancel reached it: the cost is not known to be zero.
    return Failed(Failure("job_timeout", message, retryable=False), billed_usd=None)
