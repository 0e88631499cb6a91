"""What a finished request means: a pure reading of fal's answer as a success or a failure.

    read_status(Completed)        -> Failure | None   a COMPLETED status carrying an error
    read_result(ResultResponse)   -> Success | Failure
    expired(request_id)           -> Failure           the queue forgot the request (404)

A failure says whether a new attempt may help (``retryable``) from fal's error-type table
(:func:`runner.fal.protocol.is_retryable_error_type`); a 422 is the request's own fault and
never retryable. Nothing here does I/O: the worker records what these functions decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from runner.endpoints.cost import megapixels
from runner.errors import ProtocolError
from runner.fal.protocol import Completed, FluxResult, ResultResponse, is_retryable_error_type
from runner.ledger.schema import OutputImage

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
