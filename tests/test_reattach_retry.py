"""A job an earlier run left in flight, re-attached, fails for free (fal's runner
disconnected): the rerun retries it when its own budget allows, as it would a new job,
instead of ending with it failed and leaving it to a third run. Without the budget, it is
left as before."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from runner.emulator import DEFAULT_KEY, Emulator, parse_faults
from runner.errors import EXIT_BUDGET, EXIT_OK
from runner.ledger import status_summary
from runner.ledger.schema import JobState, LedgerEvent, utcnow
from runner.ledger.store import Ledger
from tests.scenario import emulator, manifest, run, run_config
from tests.torture_support import manifest_jobs

pytestmark = pytest.mark.anyio


async def left_queued(emu: Emulator, path: Path, run_dir: Path) -> None:
    """The manifest's only job submitted and recorded queued: a run killed after the ack."""
    job = next(iter(manifest_jobs(path).values()))
    transport = httpx.ASGITransport(app=emu.app)
    headers = {"Authorization": f"Key {DEFAULT_KEY}"}
    async with httpx.AsyncClient(transport=transport, headers=headers) as http:
        answer = await http.post(f"http://emulator/{job.endpoint}", json=dict(job.payload))
    with Ledger.open(run_dir) as ledger:
        ledger.append(LedgerEvent(
            job.job_key, JobState.QUEUED, utcnow(), attempt=1, row_id=job.row_id,
            endpoint=job.endpoint, request_id=str(answer.json()["request_id"]),
        ))  # fmt: skip
        ledger.commit_sync()


@pytest.mark.parametrize(
    ("cap", "code", "accepted"), [(None, EXIT_OK, 2), ("0.01", EXIT_BUDGET, 1)]
)
async def test_a_reattached_job_that_failed_for_free_is_retried_within_the_budget(
    tmp_path: Path, cap: str | None, code: int, accepted: int
) -> None:
    path, run_dir = manifest(tmp_path, 1), tmp_path / "run"
    async with emulator(faults=parse_faults("fail_runner_disconnected=@1")) as emu:
        await left_queued(emu, path, run_dir)
        max_cost = Decimal(cap) if cap is not None else None
        report = await run(emu, run_config(path, run_dir, max_cost_usd=max_cost))
        stats = emu.snapshot()
    assert report.exit_code == code, report.message
    # The retry sends the same payload again (the emulator counts it as a repeat): paid once.
    assert stats["submits"]["accepted"] == accepted
    billed = sum(b["images"] for b in stats["billing"].values())
    summary = status_summary(run_dir)
    if cap is None:
        assert billed == 1 and summary.by_state == {JobState.COMPLETED: 1}
        assert report.tally.retries == 1
    else:  # no budget for a new submit: left failed at $0, for a rerun (nothing billed)
        assert billed == 0 and summary.by_state == {JobState.FAILED: 1}
