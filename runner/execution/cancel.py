"""``runner cancel RUN_DIR``: cancel the remote requests a run left in flight.

Takes the run directory's lock (so it never races a live run), cancels every job whose
latest state is ``queued`` or ``in_progress``, and records ``cancelled`` for those fal
accepted. A job fal says is already completed stays as it is: the next run re-attaches
to it and fetches the result that was paid for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import anyio
import httpx
from pydantic import SecretStr

from runner.errors import FalError
from runner.execution.hooks import USER_AGENT
from runner.fal.client import QueueClient
from runner.fal.key import redactor
from runner.fal.retry import RetryPolicies, call_with_retry
from runner.fal.transport import open_transport
from runner.ledger.schema import JobState, LedgerEvent, utcnow
from runner.ledger.store import Ledger


@dataclass(slots=True)
class CancelOutcome:
    cancelled: int = 0
    already_completed: int = 0
    not_found: int = 0
    errors: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"cancelled {self.cancelled}, already completed {self.already_completed} "
            f"(the next run fetches them), not found {self.not_found}"
        ]
        out += [f"error: {e}" for e in self.errors[:20]]
        return out


async def cancel_in_flight(
    run_dir: Path,
    *,
    queue_url: str,
    key: SecretStr,
    transport: httpx.AsyncBaseTransport | None = None,
    policies: RetryPolicies | None = None,
) -> CancelOutcome:
    policies = policies or RetryPolicies()
    outcome = CancelOutcome()
    ledger = await anyio.to_thread.run_sync(partial(Ledger.open, run_dir, redact=redactor(key)))
    if transport is None:
        transport = open_transport(queue_url, limits=httpx.Limits())
    async with ledger, transport:
        state = await anyio.to_thread.run_sync(partial(ledger.state, downloads=False))
        client = QueueClient(transport, queue_url=queue_url, key=key, user_agent=USER_AGENT)
        jobs = state.jobs.select(["job_key", "state", "endpoint", "request_id"]).to_pylist()
        for job in jobs:
            if job["state"] not in (JobState.QUEUED, JobState.IN_PROGRESS):
                continue
            if not job["request_id"] or not job["endpoint"]:
                continue
            ref = client.urls_for(job["endpoint"], job["request_id"])
            try:
                answer = await call_with_retry(
                    partial(client.cancel, ref),
                    policy=policies.cancel,
                    kind="read",
                )
            except FalError as exc:
                outcome.errors.append(f"{job['request_id']}: {exc}")
                continue
            if answer == "CANCELLATION_REQUESTED":
                outcome.cancelled += 1
                ledger.append(
                    LedgerEvent(
                        job_key=job["job_key"],
                        state=JobState.CANCELLED,
                        at=utcnow(),
                        error_type="cancelled",
                        error_message="cancelled by runner cancel",
                        retryable=False,
                    )
                )
            elif answer == "ALREADY_COMPLETED":
                outcome.already_completed += 1
            else:
                outcome.not_found += 1
        await ledger.commit()
    return outcome
