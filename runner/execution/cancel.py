"""``runner cancel RUN_DIR``: cancel the remote requests a run left in flight.

Takes the run directory's lock (so it never races a live run), cancels every job whose
latest state is ``queued`` or ``in_progress``, and records ``cancelled`` for those fal
accepted. A job fal says is already completed stays as it is: the next run re-attaches
to it and fetches the result that was paid for.

It asks the queue the run used (run.json's ``queue_url``: fal, or an emulator) unless it is
given one, and only when something is in flight does it ask for the key (a
:data:`KeyChoice`), so a run directory with nothing left needs none. A cancel that failed is
counted and makes the command exit 1 (:attr:`CancelOutcome.exit_code`): those jobs may still
run, and be billed. A refused key stops the directory's cancels at once (the rest would be
refused too), each counted failed.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path

import anyio
import httpx
from pydantic import SecretStr

from runner.errors import EXIT_JOBS_FAILED, EXIT_OK, AuthError, FalError, LedgerError, UsageError
from runner.execution.hooks import USER_AGENT
from runner.fal.client import QueueClient
from runner.fal.key import redactor
from runner.fal.retry import RetryPolicies, call_with_retry
from runner.fal.transport import open_transport
from runner.fal.urls import FAL_QUEUE_URL
from runner.ledger.meta import (
    INVOCATIONS,
    end_invocation,
    new_run_id,
    read_run_meta,
    start_invocation,
)
from runner.ledger.schema import JobState, LedgerEvent, utcnow
from runner.ledger.store import Ledger

# The key to cancel with and how to name it in a message (never the key: "FAL_KEY", a keys
# file's line), asked for only when something is in flight; raises UsageError when the key
# that submitted is not at hand.
KeyChoice = Callable[[], tuple[SecretStr, str]]
_ERRORS_SHOWN = 20


@dataclass(slots=True)
class CancelOutcome:
    in_flight: int = 0  # jobs the ledger had queued or in progress, with a request id
    cancelled: int = 0
    already_completed: int = 0
    not_found: int = 0
    failed: int = 0  # no answer, or an error: these may still run at fal
    unknown: int = 0  # submits of unknown outcome: no request id to cancel
    errors: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """0 only when no cancel failed; 1 (as for a run whose jobs failed) otherwise."""
        return EXIT_JOBS_FAILED if self.failed else EXIT_OK

    def add(self, other: CancelOutcome, *, prefix: str = "") -> None:
        self.in_flight += other.in_flight
        self.cancelled += other.cancelled
        self.already_completed += other.already_completed
        self.not_found += other.not_found
        self.failed += other.failed
        self.unknown += other.unknown
        self.errors += [prefix + e for e in other.errors]

    def lines(self) -> list[str]:
        out = []
        if self.in_flight == 0:
            out.append("nothing in flight: nothing to cancel")
        else:
            out.append(
                f"{self.in_flight} in flight: cancelled {self.cancelled}, failed {self.failed}, "
                f"already completed {self.already_completed} (the next run fetches them), "
                f"not found at fal {self.not_found}"
            )
        if self.unknown:
            out.append(
                f"{self.unknown} submits of unknown outcome have no request id to cancel "
                "(the next run settles them from fal's request history)"
            )
        out += [f"error: {e}" for e in self.errors[:_ERRORS_SHOWN]]
        if len(self.errors) > _ERRORS_SHOWN:
            out.append(f"... and {len(self.errors) - _ERRORS_SHOWN} more errors")
        if self.failed:
            out.append(
                f"{self.failed} of {self.in_flight} cancels failed: those jobs may still run "
                "(and be billed); run `runner cancel` again"
            )
        return out


def recorded_queue_url(run_dir: Path) -> str:
    """The queue a run directory's last run used (its run.json), else fal's."""
    meta = read_run_meta(run_dir)
    config = meta.get("config") if meta else None
    if not isinstance(config, dict):
        return FAL_QUEUE_URL
    if config.get("emulator") is True:
        raise UsageError(
            f"{run_dir} was last run on the embedded emulator (--emulator), whose requests "
            "ended with its process: there is nothing there to cancel (give --queue-url to "
            "ask another queue)"
        )
    url = config.get("queue_url")
    return url if isinstance(url, str) and url else FAL_QUEUE_URL


async def cancel_in_flight(
    run_dir: Path,
    *,
    key: SecretStr | KeyChoice,
    queue_url: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    policies: RetryPolicies | None = None,
) -> CancelOutcome:
    """Cancel ``run_dir``'s in-flight requests at ``queue_url`` (None: run.json's queue).

    A key choice that raises UsageError (the key that submitted is not at hand) counts every
    job in flight as failed, with its message: nothing was sent.
    """
    policies = policies or RetryPolicies()
    outcome = CancelOutcome()
    redact: list[Callable[[str], str]] = [redactor(None)]  # the chosen key's, once chosen
    started = utcnow()
    # Its events are its own invocation's, as a run's are (report lists it by this id).
    run_id = new_run_id(started, secrets.randbits(16))
    opened = partial(Ledger.open, run_dir, redact=lambda text: redact[0](text), run_id=run_id)
    ledger = await anyio.to_thread.run_sync(opened)
    async with ledger:
        state = await anyio.to_thread.run_sync(partial(ledger.state, downloads=False))
        jobs = [
            job
            for job in state.jobs.select(["job_key", "state", "endpoint", "request_id"]).to_pylist()
            if job["state"] in (JobState.QUEUED, JobState.IN_PROGRESS)
            and job["request_id"]
            and job["endpoint"]
        ]
        outcome.unknown = len(state.keys_in(frozenset({JobState.SUBMITTING, JobState.UNKNOWN})))
        outcome.in_flight = len(jobs)
        if not jobs:
            return outcome
        url = queue_url
        if url is None:
            url = await anyio.to_thread.run_sync(recorded_queue_url, run_dir)
        try:
            secret, name = (
                (key, "FAL_KEY")
                if isinstance(key, SecretStr)
                else await anyio.to_thread.run_sync(key)
            )
        except UsageError as exc:
            outcome.failed = len(jobs)
            outcome.errors.append(str(exc))
            return outcome
        redact[0] = redactor(secret)
        if transport is None:
            transport = open_transport(url, limits=httpx.Limits())
        async with transport:
            client = QueueClient(transport, queue_url=url, key=secret, user_agent=USER_AGENT)
            for done, job in enumerate(jobs):
                ref = client.urls_for(job["endpoint"], job["request_id"])
                try:
                    answer = await call_with_retry(
                        partial(client.cancel, ref), policy=policies.cancel, kind="read"
                    )
                except AuthError as exc:
                    left = len(jobs) - done
                    outcome.failed += left
                    why = f"{left} cancels failed: this one refused, the rest not tried"
                    outcome.errors.append(f"{exc.naming(name)} ({why})")
                    break
                except FalError as exc:
                    outcome.failed += 1
                    outcome.errors.append(f"{job['request_id']}: {exc}")
                    continue
                if answer == "CANCELLATION_REQUESTED":
                    outcome.cancelled += 1
                    ledger.append(_cancelled(job["job_key"]))
                elif answer == "ALREADY_COMPLETED":
                    outcome.already_completed += 1
                else:
                    outcome.not_found += 1
        await ledger.commit()
        if outcome.cancelled:
            await anyio.to_thread.run_sync(_record, run_dir, run_id, started, outcome)
    return outcome


def _record(run_dir: Path, run_id: str, started: datetime, outcome: CancelOutcome) -> None:
    """run.json's line for this cancel, beside the runs' own (its other content kept)."""
    try:
        meta = {k: v for k, v in (read_run_meta(run_dir) or {}).items() if k != INVOCATIONS}
        start_invocation(run_dir, meta, run_id=run_id, started_at=started)
        facts = {"exit_code": outcome.exit_code, "message": "runner cancel: " + outcome.lines()[0],
                 "completed": 0, "failed": 0, "spent_usd": "0", "command": "cancel"}  # fmt: skip
        end_invocation(run_dir, run_id, facts, ended_at=utcnow())
    except (OSError, LedgerError):
        pass  # the cancels are in the ledger already: only the report's line is lost


def _cancelled(job_key: str) -> LedgerEvent:
    return LedgerEvent(
        job_key=job_key,
        state=JobState.CANCELLED,
        at=utcnow(),
        error_type="cancelled",
        error_message="cancelled by runner cancel",
        retryable=False,
    )
