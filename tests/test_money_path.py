"""The money path under faults: every job ends as a record, reruns never go green over
failures, lost contact never widens the window, duplicate spend stays on the record."""

from __future__ import annotations

import errno
import io
import json
from decimal import Decimal
from pathlib import Path

import anyio
import httpx
import pytest

from runner.emulator import FaultConfig, parse_faults
from runner.emulator.faults import FaultInjector
from runner.errors import (
    EXIT_BUDGET,
    EXIT_INTERRUPTED,
    EXIT_JOBS_FAILED,
    EXIT_OK,
    HTTPStatusError,
    LedgerError,
    TransportError,
)
from runner.execution.engine import Hooks, execute
from runner.execution.outcome import Failed, Unknown, submit_failed
from runner.execution.summary import Ending, verdict
from runner.fal.retry import RetryPolicies, RetryPolicy
from runner.ledger import status_summary
from runner.ledger.schema import JobState
from runner.ledger.state import LedgerState
from runner.media.sink import OutputSink
from tests.scenario import FAST_POLICIES, FAST_SUBMIT, emulator, manifest, run, run_config

pytestmark = pytest.mark.anyio


def states(run_dir: Path) -> dict[str, int]:
    found: dict[str, int] = {}
    for row in LedgerState.load(run_dir).jobs.select(["state"]).to_pylist():
        found[row["state"]] = found.get(row["state"], 0) + 1
    return found


# --- the exit status, for every mix of end states ------------------------------------

VERDICTS = [
    (Ending(), EXIT_OK, "all jobs completed"),
    (Ending(failed=1), EXIT_JOBS_FAILED, "1 failed"),
    (Ending(invalid=2), EXIT_JOBS_FAILED, "2 invalid"),
    (Ending(unknown=1), EXIT_JOBS_FAILED, "1 with an unknown outcome"),
    (Ending(lost=3), EXIT_JOBS_FAILED, "3 lost contact"),
    (Ending(left=1), EXIT_JOBS_FAILED, "1 left from earlier runs"),
    (Ending(failed=1, invalid=1, unknown=1, lost=1, left=1), EXIT_JOBS_FAILED,
     "1 failed, 1 invalid, 1 with an unknown outcome, 1 lost contact"),
    (Ending(downloads_failed=2), EXIT_JOBS_FAILED, "not downloaded"),
    (Ending(failed=1, downloads_failed=1), EXIT_JOBS_FAILED, "1 failed"),
    (Ending(stopped_reason="disk full"), EXIT_JOBS_FAILED, "stopped early: disk full"),
    (Ending(budget_reason="cap", failed=4), EXIT_BUDGET, "stopped at the budget: cap"),
    (Ending(interrupted=True, budget_reason="cap", failed=1), EXIT_INTERRUPTED, "interrupted"),
    (Ending(interrupted=True), EXIT_INTERRUPTED, "interrupted"),
]  # fmt: skip


@pytest.mark.parametrize(("end", "code", "says"), VERDICTS)
def test_exit_status_for_every_mix_of_end_states(end: Ending, code: int, says: str) -> None:
    got_code, message = verdict(end)
    assert got_code == code and says in message


def test_only_a_clean_run_exits_0() -> None:
    one_each = [
        Ending(failed=1), Ending(invalid=1), Ending(unknown=1), Ending(lost=1), Ending(left=1),
        Ending(downloads_failed=1),
    ]  # fmt: skip
    assert all(verdict(end)[0] != EXIT_OK for end in one_each)
    assert verdict(Ending())[0] == EXIT_OK


# --- what a failed submit means --------------------------------------------------------

SUBMIT_FAILURES = [
    (TransportError("connect refused", sent=False), "submit_failed", True, False),
    (HTTPStatusError("429", status_code=429), "submit_http_429", True, True),
    (HTTPStatusError("400", status_code=400), "submit_http_400", False, True),
    (HTTPStatusError("409", status_code=409), "submit_http_409", True, True),
]


@pytest.mark.parametrize(("exc", "error_type", "retryable", "answered"), SUBMIT_FAILURES)
def test_a_failed_submit_costs_nothing_and_counts_only_when_answered(
    exc: Exception, error_type: str, retryable: bool, answered: bool
) -> None:
    assert isinstance(exc, TransportError | HTTPStatusError)
    outcome = submit_failed(exc)
    assert isinstance(outcome, Failed)
    assert (outcome.failure.error_type, outcome.retryable, outcome.answered) == (
        error_type,
        retryable,
        answered,
    )
    assert outcome.billed_usd == 0


def test_a_submit_whose_answer_was_lost_is_an_unknown_outcome() -> None:
    outcome = submit_failed(TransportError("reset after the body", sent=True))
    assert isinstance(outcome, Unknown)


# --- lost contact never widens the window ----------------------------------------------


async def test_stream_mode_on_a_streamless_queue_completes_by_polling_within_the_window(
    tmp_path: Path,
) -> None:
    """The issue's reproduction: every stream answers plain JSON. Before, every job was
    'lost', left the window, and admission submitted the whole manifest."""
    path = manifest(tmp_path, 60)
    config = run_config(path, tmp_path / "run", completion="stream", max_in_flight=8)
    async with emulator(concurrency=2, faults=parse_faults("stream_not_sse=1")) as emu:
        report = await run(emu, config)
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK, report.message
    assert report.tally.completed == 60
    assert stats["submits"]["peak_outstanding"] <= 8
    assert stats["submits"]["accepted"] == 60 and stats["submits"]["duplicates"] == 0
    assert stats["faults"]["stream_not_sse"] >= 10


async def test_a_dropped_stream_hands_its_job_to_the_poller(tmp_path: Path) -> None:
    path = manifest(tmp_path, 12)
    config = run_config(path, tmp_path / "run", completion="stream", max_in_flight=4)
    async with emulator(faults=parse_faults("stream_drop_after=1")) as emu:
        report = await run(emu, config)
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK and report.tally.completed == 12
    assert stats["submits"]["peak_outstanding"] <= 4


async def test_a_result_read_that_keeps_failing_leaves_the_job_lost_and_the_run_goes_on(
    tmp_path: Path,
) -> None:
    """One job's result read fails (one attempt allowed here): it is lost, keeps its slot,
    the others complete through the remaining slot, and the run ends 1 (not 2, as it did
    when the error escaped the worker)."""
    path = manifest(tmp_path, 6)
    run_dir = tmp_path / "run"
    config = run_config(path, run_dir, max_in_flight=2, first_look="status")
    once = RetryPolicy(attempts=1, timeout_s=5.0, base_s=0.001, max_s=0.002)
    policies = RetryPolicies(submit=FAST_SUBMIT, read=once)
    # Without fal's history (which would recover the result: see test_reconcile.py).
    faults = parse_faults("result_5xx=@1,history_unavailable=1")
    async with emulator(faults=faults) as emu:
        report = await run(emu, config, policies=policies)
        assert (report.tally.lost, report.tally.completed) == (1, 5)
        assert report.exit_code == EXIT_JOBS_FAILED
        assert "1 lost contact" in report.message
        assert states(run_dir) == {"completed": 5, "queued": 1} or states(run_dir) == {
            "completed": 5,
            "in_progress": 1,
        }
        # The next run re-attaches to it: nothing is sent twice.
        again = await run(emu, config)
        stats = emu.snapshot()
    assert again.exit_code == EXIT_OK and again.tally.completed == 1
    assert stats["submits"]["accepted"] == 6 and stats["submits"]["duplicates"] == 0


async def test_when_every_slot_holds_a_lost_job_admission_stops_and_says_why(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 10)
    config = run_config(path, tmp_path / "run", max_in_flight=2, first_look="status")
    short = RetryPolicy(attempts=2, timeout_s=5.0, base_s=0.001, max_s=0.002)
    async with emulator(faults=parse_faults("result_5xx=1,history_unavailable=1")) as emu:
        report = await run(emu, config, policies=RetryPolicies(submit=FAST_SUBMIT, read=short))
        stats = emu.snapshot()
        emu.faults = FaultInjector(FaultConfig())  # the queue recovers
        again = await run(emu, config)
        after = emu.snapshot()
    assert report.exit_code == EXIT_JOBS_FAILED
    assert "all 2 in-flight slots hold jobs we lost contact with" in report.message
    assert stats["submits"]["accepted"] == 2  # the window held
    assert again.exit_code == EXIT_OK and again.tally.completed == 10
    assert after["submits"]["duplicates"] == 0


# --- reruns never go green over failures -----------------------------------------------


async def test_a_rerun_retries_free_failures_unasked_and_exits_0_only_when_done(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 5)
    run_dir = tmp_path / "run"
    config = run_config(path, run_dir, max_attempts=1)
    async with emulator(faults=parse_faults("fail_runner_disconnected=1")) as emu:
        first = await run(emu, config)
        emu.faults = FaultInjector(FaultConfig())
        second = await run(emu, config)
    assert first.exit_code == EXIT_JOBS_FAILED and first.tally.failed == 5
    assert first.tally.reasons == {"runner_disconnected": 5}
    assert second.exit_code == EXIT_OK and second.tally.completed == 5


async def test_a_billable_failure_keeps_every_rerun_red_until_retry_failed(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        "id,endpoint,prompt,image_url,seed\n"
        "ok,fal-ai/flux-lora,fine,,1\n"
        'bad,fal-ai/flux-lora/image-to-image,edit,"data:image/png;base64,AAAA",2\n'
    )
    run_dir = tmp_path / "run"
    async with emulator() as emu:
        first = await run(emu, run_config(path, run_dir))
        second = await run(emu, run_config(path, run_dir))
        third = await run(emu, run_config(path, run_dir, retry_failed=True))
        accepted = emu.snapshot()["submits"]["accepted"]
    assert first.exit_code == EXIT_JOBS_FAILED and first.tally.failed == 1
    # The rerun sends nothing (the failure may have been billed) and still says so.
    assert second.exit_code == EXIT_JOBS_FAILED
    assert (second.tally.skipped, second.tally.left) == (1, 1)
    assert second.tally.reasons == {"left_failed": 1}
    assert "1 left from earlier runs" in second.message
    assert third.exit_code == EXIT_JOBS_FAILED and third.tally.failed == 1
    assert accepted == 3  # ok once, bad twice: the second run sent nothing


async def test_an_input_error_is_retried_once_the_file_is_fixed(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(
        "id,endpoint,prompt,image_url,seed\nedit,fal-ai/flux-lora/image-to-image,e,in.png,1\n"
    )
    run_dir = tmp_path / "run"
    async with emulator() as emu:
        first = await run(emu, run_config(path, run_dir))
        from PIL import Image

        Image.new("RGB", (64, 64), "red").save(tmp_path / "in.png")
        second = await run(emu, run_config(path, run_dir))
    assert first.exit_code == EXIT_JOBS_FAILED and first.tally.reasons == {"input_error": 1}
    assert second.exit_code == EXIT_OK and second.tally.completed == 1


# --- duplicate spend is on the record for ever -----------------------------------------


async def test_possible_duplicate_spend_stays_in_status_after_the_jobs_complete(
    tmp_path: Path,
) -> None:
    """--on-unknown resubmit: the old way, without fal's history (the default reconciles:
    see test_reconcile.py)."""
    path = manifest(tmp_path, 4)
    run_dir = tmp_path / "run"
    resubmit = {"on_unknown": "resubmit"}
    async with emulator(faults=parse_faults("reset_after_accept=@1+3")) as emu:
        first = await run(emu, run_config(path, run_dir, **resubmit))
        second = await run(emu, run_config(path, run_dir, **resubmit))
        third = await run(emu, run_config(path, run_dir, **resubmit))
        billed_twice = emu.snapshot()["submits"]["duplicates"]
    assert first.tally.unknown == 2 and first.exit_code == EXIT_JOBS_FAILED
    assert second.exit_code == EXIT_OK and second.tally.possible_duplicates == 2
    assert third.exit_code == EXIT_OK and third.tally.possible_duplicates == 0
    summary = status_summary(run_dir)
    assert summary.by_state == {JobState.COMPLETED: 4}
    # Every duplicate the server billed is shown, after the jobs completed, for ever.
    assert billed_twice == 2
    assert summary.possible_duplicates == 2 >= billed_twice
    assert summary.possible_duplicate_usd == Decimal("0.07")


# --- nowhere to put the outputs: nothing is paid -------------------------------------


async def test_an_unwritable_out_folder_stops_the_run_before_any_submit(tmp_path: Path) -> None:
    path = manifest(tmp_path, 3)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    config = run_config(path, tmp_path / "run", out_dir=str(blocker / "out"))
    async with emulator() as emu:
        with pytest.raises(LedgerError, match="output folder") as caught:
            await run(emu, config)
        assert emu.snapshot()["submits"]["accepted"] == 0
    assert caught.value.exit_code == 4 and str(blocker) in str(caught.value)


class FullDisk(OutputSink):
    """The local disk fills up: every output write fails with ENOSPC."""

    def publish(self, temp: Path, relative: str) -> str:
        raise OSError(errno.ENOSPC, "No space left on device", str(temp))


async def test_a_full_disk_stops_admission_instead_of_paying_for_lost_outputs(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 40)
    run_dir = tmp_path / "run"
    config = run_config(path, run_dir, max_in_flight=2)
    async with emulator() as emu:
        hooks = Hooks(
            transport=httpx.ASGITransport(app=emu.app), stream=io.StringIO(),
            handle_signals=False, policies=FAST_POLICIES,
            sink=FullDisk(config.output_target, run_dir),
        )  # fmt: skip
        report = await execute(config, hooks=hooks)
        accepted = emu.snapshot()["submits"]["accepted"]
    assert report.exit_code == EXIT_JOBS_FAILED
    assert "outputs cannot be saved" in report.message and "No space left" in report.message
    # Admission stops once the first output fails to save: what was in flight then, plus
    # the few admitted while that download ran, never the manifest's 40.
    assert accepted < 12, accepted


def test_the_summary_lists_invalid_rows_like_validate_does() -> None:
    from runner.execution.progress import Tally
    from runner.execution.summary import RunReport, print_summary

    tally = Tally()
    for line in range(2, 30):
        tally.bad_row([f"m.csv:{line}: prompt: '{{titel}}' is not a column"])
    out = io.StringIO()
    print_summary(RunReport(tally, 1, "not every job completed", Path("run")), out)
    text = out.getvalue()
    assert "m.csv:2: prompt" in text and "m.csv:21: prompt" in text
    assert "m.csv:22:" not in text and "and 8 more rows" in text


async def test_plan_with_a_ledger_previews_the_rerun_and_its_cost(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.cli import main

    monkeypatch.delenv("FAL_KEY", raising=False)
    path = manifest(tmp_path, 6)
    run_dir = tmp_path / "run"
    async with emulator(faults=parse_faults("fail_runner_disconnected=@1")) as emu:
        await run(emu, run_config(path, run_dir, max_attempts=1))
    # Two more rows, and one row's prompt changed.
    text = path.read_text().replace("prompt number 5,", "prompt number five,")
    path.write_text(text + "r6,fal-ai/flux-lora,six,square,6\nr7,fal-ai/flux-lora,seven,square,7\n")
    argv = ["plan", str(path), "--ledger", str(run_dir), "--json"]
    assert await anyio.to_thread.run_sync(main, argv) == 0  # the CLI runs its own loop
    doc = json.loads(capsys.readouterr().out)
    assert doc["jobs"] == {"new": 2, "changed": 1, "retry": 1, "done": 4}
    assert doc["would_send_usd"] == "0.140"  # four jobs at $0.035
