"""The JSON the emulator answers: status bodies, logs, stored results, webhook bodies.

Pure functions of a :class:`~runner.emulator.queue.Job` and "now"; no I/O.

Decisions where fal's public material is silent (documented here, tested in
tests/test_emulator_protocol.py):

- A result GET before completion answers 400 ``{"detail": "Request is still in
  progress"}`` (fal's wording); the official client never does this (it polls
  status first), so nothing depends on the exact code beyond "not 2xx".
- A cancelled request becomes COMPLETED with ``error_type: "request_cancelled"``
  and its result is 400 ``{"detail": "Request was cancelled", ...}``.
- An input image that cannot be read (bad URL, not an image) is accepted, runs
  briefly and completes with a 422 whose ``detail`` names the field, type
  ``file_download_error``, as fal's apps answer; status carries ``error`` and
  ``error_type: "file_download_error"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from runner.emulator.faults import FAILURE_DETAIL, FAILURE_STATUS
from runner.emulator.queue import Ending, Job, Phase, StoredResult

STILL_RUNNING = {"detail": "Request is still in progress"}
NOT_FOUND = {"detail": "Request not found"}


@dataclass(frozen=True, slots=True)
class JobPlan:
    """What the app decided at submit time, kept on the job until it ends."""

    body: dict[str, Any]
    seed: int
    steps: int
    num_images: int
    output_format: str
    output_size: tuple[int, int] | None
    input_sizes: tuple[tuple[int, int], ...] = ()
    input_error: tuple[str, str] | None = None  # (field, message)
    input_error_type: str = "file_download_error"  # the 422's type for input_error
    webhook_url: str | None = None
    sync_mode: bool = False
    origin: str = ""  # scheme://host the client used: output URLs point back there
    output_retention_s: float | None = None  # CDN lifetime of outputs (emulated seconds)
    # The body as the picture depends on it: input images held here by their content, not
    # their URL (None: the body itself).
    render_body: dict[str, Any] | None = None


def plan_of(job: Job) -> JobPlan:
    assert isinstance(job.context, JobPlan)
    return job.context


def urls(base: str, job: Job) -> dict[str, str]:
    """status/response/cancel URLs: owner/app only, the sub-path dropped, our own origin."""
    root = f"{base}/{job.app_path}/requests/{job.request_id}"
    return {"response_url": root, "status_url": f"{root}/status", "cancel_url": f"{root}/cancel"}


def submit_body(base: str, job: Job, position: int) -> dict[str, Any]:
    return {
        "status": "IN_QUEUE",
        "request_id": job.request_id,
        **urls(base, job),
        "queue_position": position,
        "logs": None,
        "metrics": {},
    }


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat()


def _entry(message: str, at: float, level: str = "INFO") -> dict[str, Any]:
    return {"message": message, "level": level, "source": "USER", "timestamp": _iso(at)}


def job_logs(job: Job, now: float) -> list[dict[str, Any]]:
    """Runner log lines up to ``now``: start, step progress at quarters, the end."""
    if job.started_at is None:
        return []
    plan = plan_of(job)
    logs = [_entry(f"Starting inference ({plan.steps} steps)", job.started_at)]
    end = job.finished_at if job.finished_at is not None else job.finish_due
    for quarter in (1, 2, 3):
        at = job.started_at + (end - job.started_at) * quarter / 4
        if at <= min(now, end) and job.ending in (None, Ending.SUCCEEDED):
            logs.append(_entry(f"Step {plan.steps * quarter // 4}/{plan.steps}", at))
    if job.finished_at is not None and job.result is not None:
        if job.result.error:
            logs.append(_entry(job.result.error, job.finished_at, "ERROR"))
        else:
            logs.append(_entry("Inference finished", job.finished_at))
    return logs


def status_body(
    base: str, job: Job, *, position: int, with_logs: bool, now: float, time_scale: float
) -> dict[str, Any]:
    """The status JSON; ``logs`` is always present once the job has left the queue."""
    if job.phase is Phase.QUEUED:
        return {"status": "IN_QUEUE", "request_id": job.request_id, **urls(base, job),
                "queue_position": position, "logs": None, "metrics": {}}  # fmt: skip
    body: dict[str, Any] = {
        "status": job.phase.value,
        "request_id": job.request_id,
        **urls(base, job),
        "logs": job_logs(job, now) if with_logs else None,
        "metrics": {},
    }
    if job.phase is Phase.DONE:
        ran_s = 0.0
        if job.started_at is not None and job.finished_at is not None:
            # Reported in clock seconds (emulated x time_scale), like every time a client
            # can measure, so a client pacing itself by fal's metrics sees a consistent world.
            ran_s = job.finished_at - job.started_at
        body["metrics"] = {"inference_time": round(ran_s, 6)}
        if job.result is not None and job.result.error is not None:
            body["error"] = job.result.error
            body["error_type"] = job.result.error_type
    return body


def infra_failure(error_type: str, *, user_timeout: bool = False) -> StoredResult:
    """An infrastructure error as fal stores it: detail, error_type, X-Fal-Error-Type."""
    headers = {"X-Fal-Error-Type": error_type}
    if user_timeout:
        headers["X-Fal-Request-Timeout-Type"] = "user"
    detail = FAILURE_DETAIL[error_type]
    return StoredResult(
        status_code=FAILURE_STATUS[error_type],
        body={"detail": detail, "error_type": error_type},
        headers=headers,
        error=detail,
        error_type=error_type,
    )


def cancelled() -> StoredResult:
    detail = "Request was cancelled"
    return StoredResult(
        status_code=400,
        body={"detail": detail, "error_type": "request_cancelled"},
        error=detail,
        error_type="request_cancelled",
    )


def input_failure(field: str, message: str, kind: str = "file_download_error") -> StoredResult:
    return StoredResult(
        status_code=422,
        body={"detail": [{"loc": ["body", field], "msg": message, "type": kind}]},
        error=message,
        error_type=kind,
    )


def success(
    job: Job, images: Sequence[dict[str, Any]], flagged: Sequence[bool], *, time_scale: float
) -> StoredResult:
    plan = plan_of(job)
    assert job.started_at is not None and job.finished_at is not None
    return StoredResult(
        status_code=200,
        body={
            "images": list(images),
            "timings": {"inference": round(job.finished_at - job.started_at, 6)},
            "seed": plan.seed,
            "has_nsfw_concepts": list(flagged),
            "prompt": plan.body.get("prompt", ""),
        },
    )
