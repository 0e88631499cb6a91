"""Scenario tests for the run engine against the emulator: completion modes, faults,
budget, timeouts and interrupts. Every scenario checks the two invariants that matter:
each job ends in exactly one terminal state, and the emulator saw no duplicate submit
that the ledger does not account for as an unknown outcome."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from runner.emulator import Emulator, EmulatorConfig, FaultConfig, parse_faults, serve
from runner.errors import EXIT_BUDGET, EXIT_JOBS_FAILED, EXIT_OK
from runner.execution.engine import Hooks, execute
from runner.ledger.schema import JobState
from runner.ledger.state import LedgerState
from tests.scenario import emulator, manifest, run, run_config

pytestmark = pytest.mark.anyio

TERMINAL = {JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}


def folded(run_dir: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = LedgerState.load(run_dir).jobs.to_pylist()
    return rows


def unknown_outcomes(run_dir: Path) -> int:
    """Every `unknown` event ever recorded (a resubmit may have followed it)."""
    import pyarrow.compute as pc

    from runner.ledger.fold import read_events

    events = read_events(run_dir).table
    return int(pc.sum(pc.equal(events["state"], "unknown")).as_py() or 0)


def assert_accounted(emu: Emulator, run_dir: Path) -> None:
    stats = emu.snapshot()
    assert stats["submits"]["duplicates"] <= unknown_outcomes(run_dir)


@pytest.mark.parametrize("first_look", ["result", "status"])
async def test_poll_mode_first_look(tmp_path: Path, first_look: str) -> None:
    path = manifest(tmp_path, 8)
    async with emulator() as emu:
        config = run_config(path, tmp_path / "run", first_look=first_look)
        report = await run(emu, config)
        calls = emu.snapshot()["calls"]
    assert report.exit_code == EXIT_OK, report.message
    rows = folded(tmp_path / "run")
    assert {r["state"] for r in rows} == {"completed"}
    assert all(r["outputs"] and r["billed_usd"] is not None for r in rows)
    if first_look == "result":
        # Early reads answer "still in progress"; none needs the status URL.
        assert calls.get("status", 0) == 0 and calls["result"] >= 8
    else:
        assert calls["status"] >= 8 and calls["result"] == 8


async def test_stream_mode_completes_every_job(tmp_path: Path) -> None:
    path = manifest(tmp_path, 8)
    async with emulator() as emu:
        report = await run(emu, run_config(path, tmp_path / "run", completion="stream"))
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK, report.message
    assert {r["state"] for r in folded(tmp_path / "run")} == {"completed"}
    assert stats["submits"]["duplicates"] == 0
    # One stream per job, no status polling.
    assert stats["calls"].get("status", 0) == 0


async def _webhook_run(
    tmp_path: Path, faults: str, rows: int = 8, **overrides: Any
) -> tuple[Any, dict[str, Any]]:
    config = EmulatorConfig(time_scale=0.005, concurrency=2, faults=parse_faults(faults))
    emu = Emulator(config)
    async with serve(emu) as served:
        cfg = run_config(
            manifest(tmp_path, rows), tmp_path / "run", completion="webhook", emulator=True,
            queue_url=served.base_url,
            webhook_jwks_url=served.base_url + "/rest/.well-known/jwks.json", **overrides,
        )  # fmt: skip
        report = await execute(cfg, hooks=Hooks(stream=io.StringIO(), handle_signals=False))
        stats = emu.snapshot()
    return report, stats


async def test_webhook_mode_takes_results_from_the_payload(tmp_path: Path) -> None:
    report, stats = await _webhook_run(tmp_path, "")
    assert report.exit_code == EXIT_OK, report.message
    assert {r["state"] for r in folded(tmp_path / "run")} == {"completed"}
    # Results came in the webhook payload: no result GETs were needed.
    assert stats["calls"].get("result", 0) == 0
    assert stats["submits"]["duplicates"] == 0


async def test_lost_and_duplicate_webhooks_never_stall_a_run(tmp_path: Path) -> None:
    faults = "webhook_lost=0.5,webhook_duplicate=0.5,webhook_reorder_s=2,seed=3"
    report, stats = await _webhook_run(tmp_path, faults, rows=10)
    assert report.exit_code == EXIT_OK, report.message
    rows = folded(tmp_path / "run")
    assert len(rows) == 10 and {r["state"] for r in rows} == {"completed"}
    assert stats["submits"]["duplicates"] == 0


@pytest.mark.parametrize(
    "faults",
    [
        "submit_429=0.5,seed=1",
        "gateway_502=0.2,gateway_503=0.2,gateway_504=0.2,seed=2",
        "slow=0.3,slow_s=0.5,seed=4",
    ],
    ids=["429-storm", "gateway-5xx", "slow"],
)
async def test_transient_faults_end_with_every_job_completed(tmp_path: Path, faults: str) -> None:
    path = manifest(tmp_path, 12)
    async with emulator(faults=parse_faults(faults)) as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
        assert_accounted(emu, tmp_path / "run")
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK, report.message
    assert {r["state"] for r in folded(tmp_path / "run")} == {"completed"}
    assert stats["submits"]["duplicates"] == 0


async def test_429_storm_lowers_the_submit_rate(tmp_path: Path) -> None:
    path = manifest(tmp_path, 10)
    async with emulator(faults=parse_faults("submit_429=@1+2+3+4+5+6")) as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
    assert report.exit_code == EXIT_OK
    assert report.tally.completed == 10


async def test_submit_accepted_then_reset_is_recorded_as_unknown_not_resubmitted(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 10)
    faults = parse_faults("reset_after_accept=@2+5,timeout_after_accept=@7,timeout_hang_s=1")
    resubmit = {"on_unknown": "resubmit"}  # without fal's history (test_reconcile.py has it)
    async with emulator(faults=faults) as emu:
        report = await run(emu, run_config(path, tmp_path / "run", **resubmit))
        first = emu.snapshot()
        assert first["submits"]["accepted"] == 10
        assert first["submits"]["duplicates"] == 0
        assert report.exit_code == EXIT_JOBS_FAILED
        assert report.tally.unknown == 3
        states = [r["state"] for r in folded(tmp_path / "run")]
        assert states.count("unknown") == 3 and states.count("completed") == 7

        # --on-unknown resubmit on a rerun: counted as possible duplicate spend.
        again = await run(emu, run_config(path, tmp_path / "run", **resubmit))
        assert again.exit_code == EXIT_OK
        assert again.duplicates_possible == 3
        assert_accounted(emu, tmp_path / "run")
        assert emu.snapshot()["submits"]["duplicates"] == 3
    assert {r["state"] for r in folded(tmp_path / "run")} == {"completed"}


async def test_on_unknown_skip_sends_nothing_again(tmp_path: Path) -> None:
    path = manifest(tmp_path, 4)
    async with emulator(faults=parse_faults("reset_after_accept=@1")) as emu:
        await run(emu, run_config(path, tmp_path / "run", on_unknown="skip"))
        again = await run(emu, run_config(path, tmp_path / "run", on_unknown="skip"))
        assert emu.snapshot()["submits"]["duplicates"] == 0
    # Skipped, but not completed: the run does not claim success.
    assert (again.tally.skipped, again.tally.left, again.exit_code) == (3, 1, 1)
    assert again.tally.reasons == {"left_unknown": 1}


async def test_failed_jobs_are_retried_up_to_max_attempts(tmp_path: Path) -> None:
    path = manifest(tmp_path, 6)
    faults = parse_faults("fail_runner_disconnected=@1+2+3,fail_internal_error=@1")
    async with emulator(faults=faults) as emu:
        report = await run(emu, run_config(path, tmp_path / "run", max_attempts=2))
    rows = folded(tmp_path / "run")
    by_state = {s: sum(r["state"] == s for r in rows) for s in {r["state"] for r in rows}}
    assert sum(by_state.values()) == 6
    assert set(by_state) <= {"completed", "failed"}
    failed = [r for r in rows if r["state"] == "failed"]
    for r in failed:
        assert r["error_type"] and r["error_message"]
    assert report.tally.retries >= 3


async def test_validation_error_is_permanent_with_fals_detail(tmp_path: Path) -> None:
    # An endpoint the catalog does not know is sent untyped; the emulator answers 404 /
    # a typed one with a bad field answers 422: both are permanent failures.
    path = tmp_path / "m.csv"
    path.write_text("id,endpoint,prompt\na,acme/unknown-model,x\n")
    async with emulator() as emu:
        report = await run(
            emu,
            run_config(path, tmp_path / "run", allowed_endpoints=frozenset({"acme/unknown-model"})),
        )
        assert emu.snapshot()["submits"]["accepted"] == 0
    assert report.exit_code == EXIT_JOBS_FAILED
    (row,) = folded(tmp_path / "run")
    assert row["state"] == "failed" and row["retryable"] is False


async def test_expired_result_is_a_clear_failure(tmp_path: Path) -> None:
    path = manifest(tmp_path, 3)
    # Without fal's history, which would recover it (test_reconcile.py).
    async with emulator(faults=parse_faults("result_retention_s=0,history_unavailable=1")) as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
    rows = folded(tmp_path / "run")
    assert report.exit_code == EXIT_JOBS_FAILED
    assert {r["error_type"] for r in rows} == {"result_expired"}


async def test_budget_cap_stops_admitting_and_exits_3(tmp_path: Path) -> None:
    path = manifest(tmp_path, 10)  # 10 x $0.035
    async with emulator() as emu:
        report = await run(emu, run_config(path, tmp_path / "run", max_cost_usd=Decimal("0.1")))
        stats = emu.snapshot()
    assert report.exit_code == EXIT_BUDGET
    assert "budget" in report.message
    assert stats["submits"]["accepted"] == 2
    assert Decimal(stats["billed_usd"]) <= Decimal("0.1")


async def test_max_total_cost_counts_spend_of_earlier_runs(tmp_path: Path) -> None:
    path = manifest(tmp_path, 4)
    cap = {"max_total_cost_usd": Decimal("0.07")}
    async with emulator() as emu:
        await run(emu, run_config(path, tmp_path / "run", **cap))
        again = await run(emu, run_config(path, tmp_path / "run", **cap))
        assert emu.snapshot()["submits"]["accepted"] == 2
    assert again.exit_code == EXIT_BUDGET
    assert "would exceed --max-total-cost $0.07" in again.message


async def test_max_cost_is_per_night_so_a_reused_run_directory_goes_on(tmp_path: Path) -> None:
    """A nightly job reusing its run directory gets its --max-cost every night."""
    path = manifest(tmp_path, 4)
    cap = {"max_cost_usd": Decimal("0.07")}
    async with emulator() as emu:
        first = await run(emu, run_config(path, tmp_path / "run", **cap))
        second = await run(emu, run_config(path, tmp_path / "run", **cap))
        assert emu.snapshot()["submits"]["accepted"] == 4
    assert first.exit_code == EXIT_BUDGET and "would exceed --max-cost $0.07" in first.message
    assert second.exit_code == 0 and second.tally.skipped == 2


async def test_job_timeout_cancels_remotely_and_records_failure(tmp_path: Path) -> None:
    path = manifest(tmp_path, 2)
    async with emulator(time_scale=1.0, concurrency=1) as emu:
        report = await run(emu, run_config(path, tmp_path / "run", job_timeout_s=0.3))
        stats = emu.snapshot()
    assert report.exit_code == EXIT_JOBS_FAILED
    rows = folded(tmp_path / "run")
    assert {r["error_type"] for r in rows} == {"job_timeout"}
    assert stats["calls"].get("cancel", 0) == 2


async def test_hard_interrupt_then_resume_reattaches_without_resubmitting(tmp_path: Path) -> None:
    path = manifest(tmp_path, 10)
    # 10 jobs of ~0.6 s on 2 slots: about 3 s in all; cancelled after 0.9 s.
    async with emulator(time_scale=0.5, concurrency=2) as emu:
        config = run_config(path, tmp_path / "run")
        with anyio.move_on_after(0.9):  # like a second Ctrl-C: cancel everything at once
            await run(emu, config)
        mid = folded(tmp_path / "run")
        assert any(r["state"] in ("queued", "in_progress") for r in mid), [r["state"] for r in mid]
        report = await run(emu, config)
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK, report.message
    rows = folded(tmp_path / "run")
    assert len(rows) == 10 and {r["state"] for r in rows} == {"completed"}
    assert stats["submits"]["accepted"] == 10
    assert stats["submits"]["duplicates"] == 0


async def test_bad_key_is_fatal_with_exit_2(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from runner.errors import AuthError

    path = manifest(tmp_path, 2)
    async with emulator() as emu:
        with pytest.raises(AuthError) as info:
            await run(emu, run_config(path, tmp_path / "run", key=SecretStr("wrong:key")))
    assert "wrong:key" not in str(info.value)
    assert info.value.exit_code == 2


async def test_key_never_reaches_ledger_or_output(tmp_path: Path) -> None:
    from runner.emulator import DEFAULT_KEY

    path = manifest(tmp_path, 3)
    async with emulator(faults=parse_faults("gateway_502=@1,reset_after_accept=@2")) as emu:
        out = io.StringIO()
        hooks = Hooks(transport=httpx.ASGITransport(app=emu.app), stream=out,
                      handle_signals=False)  # fmt: skip
        await execute(run_config(path, tmp_path / "run"), hooks=hooks)
    for file in (tmp_path / "run").rglob("*"):
        if file.is_file():
            assert DEFAULT_KEY.encode() not in file.read_bytes(), file
    assert DEFAULT_KEY not in out.getvalue()


def test_fault_config_defaults_are_off() -> None:
    assert FaultConfig() == parse_faults("")


async def test_runner_cancel_cancels_what_a_run_left_in_flight(tmp_path: Path) -> None:
    from pydantic import SecretStr

    from runner.emulator import DEFAULT_KEY
    from runner.execution.cancel import cancel_in_flight
    from tests.scenario import EMULATOR_URL

    path = manifest(tmp_path, 6)
    async with emulator(time_scale=1.0, concurrency=1) as emu:
        with anyio.move_on_after(0.5):
            await run(emu, run_config(path, tmp_path / "run"))
        left = [r for r in folded(tmp_path / "run") if r["state"] in ("queued", "in_progress")]
        assert left
        outcome = await cancel_in_flight(
            tmp_path / "run", queue_url=EMULATOR_URL, key=SecretStr(DEFAULT_KEY),
            transport=httpx.ASGITransport(app=emu.app),
        )  # fmt: skip
        assert emu.snapshot()["calls"]["cancel"] == len(left)
    assert outcome.cancelled == len(left)
    states = [r["state"] for r in folded(tmp_path / "run")]
    assert states.count("cancelled") == len(left)
    assert "queued" not in states and "in_progress" not in states


async def test_endpoint_limit_caps_jobs_in_flight_for_that_endpoint(tmp_path: Path) -> None:
    path = manifest(tmp_path, 8)
    peak = 0
    async with emulator(concurrency=4) as emu:
        original = emu.accept

        def accept(*args: Any, **kwargs: Any) -> Any:
            nonlocal peak
            result = original(*args, **kwargs)
            snap = emu.snapshot()["jobs"]
            peak = max(peak, snap["IN_QUEUE"] + snap["IN_PROGRESS"])
            return result

        emu.accept = accept  # type: ignore[method-assign]
        report = await run(
            emu,
            run_config(
                path, tmp_path / "run", concurrency=4,
                endpoint_limits={"fal-ai/flux-lora": 1},
            ),
        )  # fmt: skip
    assert report.exit_code == EXIT_OK
    assert peak == 1
