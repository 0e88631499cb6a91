"""How a job's attempt ended, as values; and the pure reading of fal's answers behind them.

Every path through a job's life ends in one :data:`Outcome`, which the worker hands to the
one recorder (:mod:`runner.execution.recorder`):

    Done        completed: outputs, timings, what it cost
    Failed      a failure with its type and retryability; ``answered`` says whether the
                server answered the attempt (only answered attempts count toward
                --max-attempts) and ``billed`` what it cost (0: certainly nothing)
    Unknown     the POST was sent and its answer lost: it may have been queued and billed
    Lost        an accepted request we lost contact with: re-attached next run
    Expired     the queue forgot an accepted request (404): its result is gone

The readings:

    read_status(Completed)        -> Failure | None   a COMPLETED status carrying an error
    read_result(ResultResponse)   -> Success | Failure
    expired(request_id)           -> Failure           the queue forgot the request (404)
    submit_failed(FalError)       -> Outcome           a submit that failed after its retries

A failure says whether a new attempt may help (``retryable``) from fal's error-type table
(:func:`runner.fal.protocol.is_retryable_error_type`); a 422 is the request's own fault and
never retryable. Nothing here does I/O: the worker records what these functions decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from runner.endpoints.cost import megapixels
from runner.errors import FalError, HTTPStatusError, ProtocolError, TransportError
from runner.fal.protocol import Completed, FluxResult, ResultResponse, is_retryable_error_type
from runner.fal.retry import Action, classify
from runner.ledger.schema import OutputImage

if TYPE_CHECKING:  # --cache only: the cache's modules load when a run uses one
    from runner.media.cache import CacheSlot

MESSAGE_LIMIT = 2000


@dataclass(frozen=True, slots=True)
class Failure:
    error_type: str
    message: str
    retryable: bool


@dataclass(frozen=True, slots=True)
class Success:
    result: FluxResult
    outputs: tuple[OutputImage, ...]
    sizes: tuple[tuple[int, int], ...]
    inference_s: float | None  # from the result's timings, when present

    @property
    def megapixels(self) -> int:
        return sum(megapixels(w, h) for w, h in self.sizes)


@dataclass(frozen=True, slots=True)
class Done:
    """The attempt completed with outputs."""

    success: Success
    billed_usd: Decimal | None  # from the outputs and the price table; None: unpriced
    queue_s: float | None
    inference_s: float | None
    cache: CacheSlot | None = None  # file the outputs in the cross-run cache once downloaded

    @property
    def flagged_images(self) -> int:
        """Outputs fal's safety checker flagged (``has_nsfw_concepts``): black images."""
        return sum(1 for flag in self.success.result.has_nsfw_concepts if flag)


@dataclass(frozen=True, slots=True)
class Failed:
    """The attempt failed. ``billed_usd`` 0 means it certainly cost nothing."""

    failure: Failure
    billed_usd: Decimal | None
    answered: bool = True  # the server answered (acknowledged, or refused with a reason)
    full_record: bool = False  # nothing was sent: the event carries the whole job
    flagged_images: int = 0  # --flagged fail: the outputs fal's safety checker flagged

    @property
    def retryable(self) -> bool:
        return self.failure.retryable


@dataclass(frozen=True, slots=True)
class Unknown:
    """The POST was sent and its answer lost: it may have been queued and billed.

    ``intent`` is what fal's request history needs to settle it (runner.execution.reconcile).
    """

    message: str
    intent: Any = None  # a runner.execution.reconcile.Intent


@dataclass(frozen=True, slots=True)
class Lost:
    """Contact with an accepted request was lost; it stays in flight, re-attached next run."""

    request_id: str
    message: str
    running: bool  # last seen running (else queued)


@dataclass(frozen=True, slots=True)
class Expired:
    """The queue forgot an accepted request (404); ``billed_usd`` is what it may have cost."""

    failure: Failure
    billed_usd: Decimal | None


@dataclass(frozen=True, slots=True)
class Cached:
    """Fulfilled from the cross-run cache: the outputs copied in, nothing submitted, $0."""

    outputs: tuple[OutputImage, ...]
    seed: int | None
    megapixels: int
    source_run: str
    source_request: str | None


Outcome = Done | Failed | Unknown | Lost | Expired | Cached


def read_status(status: Completed) -> Failure | None:
    """A COMPLETED status with ``error`` is the job's failure; no result call is needed."""
    if status.error is None:
        return None
    return _job_error(status.error_type, status.error)


def read_result(result: ResultResponse) -> Success | Failure:
    if result.ok:
        try:
            flux = FluxResult.from_payload(result.body)
        except ProtocolError as exc:
            return Failure("bad_result", str(exc)[:MESSAGE_LIMIT], retryable=False)
        outputs = tuple(
            OutputImage(url=im.url, width=im.width, height=im.height, content_type=im.content_type)
            for im in flux.images
        )
        sizes = tuple((im.width, im.height) for im in flux.images)
        return Success(flux, outputs, sizes, timing(flux.timings))
    message = result_message(result)
    if result.status_code == 422:
        return Failure("validation", message, retryable=False)
    return _job_error(result.error_type, message, result.timeout_type)


def expired(request_id: str, detail: str) -> Failure:
    """The queue acknowledged this id and now answers 404: the result is gone.

    Re-attaching would 404 forever and a new submit pays again, so it is a failure that
    only ``--retry-failed`` redoes.
    """
    message = (
        f"request {request_id} is gone from the queue (404; results are kept about an hour): "
        f"{detail}"
    )
    return Failure("result_expired", message[:MESSAGE_LIMIT], retryable=False)


def _job_error(error_type: str | None, message: str, timeout_type: str | None = None) -> Failure:
    retryable = is_retryable_error_type(error_type, timeout_type=timeout_type)
    return Failure(error_type or "error", message[:MESSAGE_LIMIT], retryable)


def timing(timings: Any) -> float | None:
    value = timings.get("inference") if isinstance(timings, Mapping) else None
    return float(value) if isinstance(value, int | float) else None


def result_message(result: ResultResponse) -> str:
    body = result.body
    if isinstance(body, dict):
        detail = body.get("detail", body.get("error", body))
        return f"{result.status_code}: {detail}"[:MESSAGE_LIMIT]
    return f"{result.status_code}: {body}"[:MESSAGE_LIMIT]


def submit_failed(exc: FalError) -> Outcome:
    """What a submit that failed after its retries means. Pure."""
    if classify(exc, kind="submit").action is Action.UNKNOWN_OUTCOME:
        # The POST may have been queued and billed: never resubmit blindly.
        return Unknown(str(exc)[:MESSAGE_LIMIT])
    # Certainly not accepted: nothing was paid. Retryable unless the request itself is bad.
    code = exc.status_code if isinstance(exc, HTTPStatusError) else None
    permanent = code is not None and 400 <= code < 500 and code not in (408, 409, 429)
    error_type = f"submit_http_{code}" if code else "submit_failed"
    failure = Failure(error_type, str(exc)[:MESSAGE_LIMIT], retryable=not permanent)
    # A refusal is an answer; a request that never reached the server is not.
    answered = not (isinstance(exc, TransportError) and not exc.sent)
    return Failed(failure, billed_usd=Decimal(0), answered=answered)


@dataclass(slots=True)
class Reach:
    """Whether fal's queue can be reached: how many jobs in a row ended with submits that
    never reached it (connection refused, no DNS, no route: each after all its retries).
    ``limit`` in a row is an outage, not a blip: admission stops instead of failing, one
    by one, every row of the manifest. The rows not sent stay to run again."""

    limit: int
    in_a_row: int = 0
    # The reason once ``limit`` was reached: every shard sharing this count stops on it.
    tripped: str | None = None

    def saw(self, outcome: Outcome | None) -> str | None:
        """The reason to stop admitting, once ``limit`` jobs in a row could not reach it."""
        if outcome is None:  # stopped before sending: says nothing of the queue
            return None
        if not (isinstance(outcome, Failed) and not outcome.answered):
            self.in_a_row = 0
            return None
        if outcome.failure.error_type != "submit_failed":
            return None
        self.in_a_row += 1
        if self.in_a_row < self.limit:
            return None
        self.tripped = self.tripped or (
            f"the last {self.in_a_row} jobs could not reach fal's queue, each after its "
            f"retries ({outcome.failure.message[:300]}); the rest were not submitted"
        )
        return self.tripped
