"""A finished job's answer as an outcome: the result read (from the look that saw it done,
a webhook, or one more call), recovered from fal's request history when the queue has
forgotten it, and what it was billed; how long it waited in the queue."""

from __future__ import annotations

from decimal import Decimal

from runner.endpoints.cost import billed_cost
from runner.errors import AuthError, FalError, HTTPStatusError
from runner.execution.completion import Finished, ResultIn, StatusIn, Watch, WebhookIn
from runner.execution.outcome import (
    Done,
    Expired,
    Failed,
    Failure,
    Lost,
    Outcome,
    Success,
    expired,
    read_result,
    read_status,
)
from runner.execution.recorder import Ticket
from runner.execution.shared import Shared
from runner.fal.client import RequestRef
from runner.fal.protocol import ERROR_TYPES, Completed, ResultResponse, body_error_type
from runner.fal.retry import call_with_retry

ZERO = Decimal(0)


async def finished_outcome(
    t: Ticket, s: Shared, ref: RequestRef, watch: Watch, finished: Finished
) -> Outcome:
    read: Success | Failure
    match finished:
        case ResultIn(result=result):
            read = read_result(result)  # the look itself read the result
        case WebhookIn(ok=True, payload=payload):
            read = read_result(ResultResponse(status_code=200, body=payload))
        case StatusIn(status=status) if (failure := read_status(status)) is not None:
            read = failure
        case _:
            # A COMPLETED status, or a webhook reporting an error: the result says what.
            try:
                result = await call_with_retry(
                    lambda: s.client.result(ref), policy=s.policies.read, kind="read",
                    clock=s.clock, sleep=s.sleep,
                )  # fmt: skip
            except AuthError:
                raise
            except FalError as exc:
                # Gone from the queue (404) or unreadable: fal's history may still have it.
                found = await recovered(t, s, ref, watch, finished)
                if found is not None:
                    return found
                if isinstance(exc, HTTPStatusError) and exc.status_code == 404:
                    # The job ran and was paid for; only its result is gone.
                    gone = expired(ref.request_id, detail(exc))
                    return Expired(gone, billed_usd=t.estimate.usd)
                return Lost(ref.request_id, f"result: {detail(exc)}", True)
            read = read_result(result)
    if isinstance(read, Success):
        return _done(t, s, watch, finished, read)
    # fal bills no infrastructure failure (5xx); any other may have used GPU time.
    billed = ZERO if read.error_type in ERROR_TYPES else None
    return Failed(read, billed_usd=billed)


async def recovered(
    t: Ticket, s: Shared, ref: RequestRef, watch: Watch, finished: Finished | None = None
) -> Outcome | None:
    """The job's output from fal's request history, when the queue no longer has it."""
    if s.reconciler is None:
        return None
    item = await s.reconciler.recover(t.job.endpoint, ref.request_id, None)
    if item is None or item.status_code is None:
        return None
    body = item.json_output
    answer = ResultResponse(
        status_code=item.status_code, body=body, request_id=ref.request_id,
        error_type=body_error_type(body),
    )  # fmt: skip
    read = read_result(answer)
    if isinstance(read, Failure):
        # What the job really ended with, not "result expired"; fal bills no 5xx.
        return Failed(read, billed_usd=ZERO if read.error_type in ERROR_TYPES else None)
    s.recorder.say(f"{t.job.row_id}: result of {ref.request_id} recovered from fal's history")
    done = finished or StatusIn(Completed(logs=None))
    return _done(t, s, watch, done, read)


def _done(t: Ticket, s: Shared, watch: Watch, finished: Finished, ok: Success) -> Done:
    billed = None
    if t.job.request is not None:
        lora_bytes = s.lora_bytes(t.job)
        billed = billed_cost(t.job.endpoint, ok.sizes, s.prices,
                             input_sizes=s.input_sizes(t.job), lora_bytes=lora_bytes)  # fmt: skip
        if billed is not None and lora_bytes is None and t.job.payload.get("loras"):
            # LoRA sizes unknown: the surcharge is too, so settle no lower than the
            # estimate, which counted the largest one (the cap must hold).
            billed = max(billed, t.estimate.usd or billed)
    status_s = None if isinstance(finished, WebhookIn) else finished.status.inference_time_s
    inference = status_s or ok.inference_s
    if status_s is None and inference is not None and inference > 0:
        s.pacing.observe(t.job.endpoint, t.units, inference)  # e.g. from a webhook
    queue_s = queue_time_s(watch, s.clock(), inference)
    if inference is None and watch.started_s is not None:
        inference = s.clock() - watch.started_s
    return Done(ok, billed_usd=billed, queue_s=queue_s, inference_s=inference)


def queue_time_s(watch: Watch, now_s: float, fal_inference_s: float | None) -> float | None:
    """How long a job waited in the queue, at most: from the submit to the first look that
    saw it running or, for a job first seen done (a result read first, a webhook), to
    that look less the inference time fal reported. None when neither is known."""
    if watch.started_s is not None:
        return max(watch.started_s - watch.submitted_s, 0.0)
    if fal_inference_s is None:
        return None
    return max(now_s - watch.submitted_s - fal_inference_s, 0.0)


def detail(exc: Exception) -> str:
    return str(exc)[:2000]
