"""Every emulator fault at once, at high rates, rerun until only final failures remain.

Nothing may be lost: after every run each manifest job has exactly one folded record,
in a terminal state or a recorded unknown (or a re-attachable queued id); every failure
and every unknown outcome carries its reason; and the emulator's accepted submits are
all accounted for by the ledger. The in-process runs sleep at most a few milliseconds
(an injected sleep), so backoffs and polls do not wait in real time.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runner.emulator import Emulator, EmulatorConfig, parse_faults, serve
from runner.emulator.faults import FAILURE_STATUS
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK
from runner.execution.engine import Hooks, execute
from runner.execution.summary import RunReport
from runner.ledger.resume import Action, ResumePolicy, decide
from runner.ledger.state import LedgerState
from tests.scenario import emulator, manifest, run_config
from tests.torture_support import LONG, check_accounting, histories, manifest_jobs

pytestmark = pytest.mark.anyio

EVERY_FAILURE = ",".join(f"fail_{t}=0.05" for t in FAILURE_STATUS)
STORM = (
    "submit_429=0.3,gateway_502=0.08,gateway_503=0.08,gateway_504=0.08,"
    "reset_after_accept=0.08,timeout_after_accept=0.08,timeout_hang_s=20,"
    f"slow=0.2,slow_s=4,{EVERY_FAILURE},result_retention_s=200"
)
WEBHOOK_STORM = (
    STORM + ",webhook_lost=0.3,webhook_duplicate=0.4,webhook_delay_s=2,webhook_reorder_s=6"
)
SETTLED = {"completed", "failed", "cancelled"}
RECORDED = SETTLED | {"unknown", "queued", "in_progress", "submitting"}


async def fast_sleep(seconds: float) -> None:
    await anyio.sleep(min(seconds, 0.01))


def fast_clock() -> float:
    """Fifty clock seconds per real one. The emulator reports service times in emulated
    seconds, so at a small time scale the webhook patience the runner learns from them is
    far too long in real time; its deadline is read from this clock."""
    return time.monotonic() * 50.0


def check_nothing_lost(run_dir: Path, jobs: dict[str, Any], allowed: set[str]) -> LedgerState:
    state = LedgerState.load(run_dir)
    assert len(state) == len(jobs), "a job has no record, or a record has no job"
    for key, job in jobs.items():
        record = state.get(key)
        assert record is not None, f"{job.row_id}: lost"
        assert record.state.value in allowed, f"{job.row_id}: {record.state.value}"
        if record.state.value in ("queued", "in_progress"):
            assert record.request_id, f"{job.row_id}: in flight without a request id"
    for key, hist in histories(run_dir).items():
        for e in hist.events:
            if e["state"] == "failed":
                assert e["error_type"] and e["error_message"], f"{key}: failure without reason"
            if e["state"] == "unknown":
                assert e["error_message"], f"{key}: unknown outcome without reason"
    return state


def settled(state: LedgerState, policy: ResumePolicy) -> bool:
    """A rerun would send nothing: every job is skipped by the resume plan."""
    keys = state.keys()  # LedgerState is not iterable itself
    return all(decide(state.brief(k), policy).action is Action.SKIP for k in keys)


async def rerun_until_settled(
    run_dir: Path, jobs: dict[str, Any], once: Any, *, max_attempts: int, max_runs: int = 8
) -> list[RunReport]:
    reports: list[RunReport] = []
    policy = ResumePolicy(max_attempts=max_attempts)
    for _ in range(max_runs):
        report = await once()
        reports.append(report)
        assert report.exit_code in (EXIT_OK, EXIT_JOBS_FAILED), report.message
        state = check_nothing_lost(run_dir, jobs, RECORDED)
        if settled(state, policy):
            break
    final = check_nothing_lost(run_dir, jobs, SETTLED)
    assert settled(final, policy), "still work left after the last rerun"
    return reports


def fault_config(spec: str, seed: int) -> Any:
    return parse_faults(f"{spec},seed={seed}")


@pytest.mark.parametrize("completion", ["poll", "stream"])
@pytest.mark.parametrize("seed", [1, 2] if not LONG else list(range(1, 9)))
async def test_every_fault_at_once_loses_nothing_and_records_every_reason(
    tmp_path: Path, completion: str, seed: int
) -> None:
    rows = 40 if not LONG else 200
    path = manifest(tmp_path, rows)
    jobs = manifest_jobs(path)
    run_dir = tmp_path / "run"
    async with emulator(concurrency=4, faults=fault_config(STORM, seed)) as emu:
        hooks = Hooks(transport=httpx.ASGITransport(app=emu.app), stream=io.StringIO(),
                      handle_signals=False, sleep=fast_sleep)  # fmt: skip
        config = run_config(path, run_dir, completion=completion, concurrency=4, max_attempts=2)

        async def once() -> RunReport:
            return await execute(config, hooks=hooks)

        reports = await rerun_until_settled(run_dir, jobs, once, max_attempts=2)
        stats = emu.snapshot()
    acc = check_accounting(run_dir, stats, jobs)
    # Unknown outcomes happened; fal's history settled them (adopted), so none stays open.
    unknown_events = sum(
        e["state"] == "unknown" for h in histories(run_dir).values() for e in h.events
    )
    assert unknown_events > 0, "the storm produced no unknown outcome"
    fired = set(stats["faults"])
    assert {"submit_429", "reset_after_accept", "timeout_after_accept", "slow"} <= fired, fired
    assert any(f.startswith("gateway_") for f in fired), fired
    failed_types = {
        e["error_type"] for h in histories(run_dir).values() for e in h.events
        if e["state"] == "failed"
    }  # fmt: skip
    # Every failure the emulator planned is on the record, by its type (how many kinds a
    # storm draws depends on how many submits it accepted, which reconciliation lowers).
    planned = {k.removeprefix("fail_") for k in fired if k.startswith("fail_")}
    assert planned and planned <= set(FAILURE_STATUS), fired
    assert planned <= failed_types, (planned, failed_types)
    assert sum(r.duplicates_possible for r in reports) <= acc.unknown_attempts


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn serves on asyncio only
async def test_webhook_mode_under_every_fault_loses_nothing(
    tmp_path: Path, anyio_backend: str
) -> None:
    rows = 24 if not LONG else 120
    path = manifest(tmp_path, rows)
    jobs = manifest_jobs(path)
    run_dir = tmp_path / "run"
    config = EmulatorConfig(time_scale=0.005, concurrency=4,
                            faults=fault_config(WEBHOOK_STORM, 7))  # fmt: skip
    emu = Emulator(config)
    async with serve(emu) as served:
        cfg = run_config(
            path, run_dir, completion="webhook", emulator=True, queue_url=served.base_url,
            webhook_jwks_url=served.base_url + "/rest/.well-known/jwks.json", concurrency=4,
        )  # fmt: skip
        hooks = Hooks(stream=io.StringIO(), handle_signals=False, sleep=fast_sleep,
                      clock=fast_clock)  # fmt: skip

        async def once() -> RunReport:
            return await execute(cfg, hooks=hooks)

        await rerun_until_settled(run_dir, jobs, once, max_attempts=3)
        stats = emu.snapshot()
    check_accounting(run_dir, stats, jobs)
    assert stats["submits"]["accepted"] >= rows
