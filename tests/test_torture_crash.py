"""SIGKILL the real runner process at random moments, many times, resuming until done.

The emulator runs in its own process, so it outlives every kill and its accounting
(``GET /_emulator/stats``) covers all runs. After every kill the ledger must read, and
every submit the emulator accepted must be accounted for by the ledger; at the end
every job has completed exactly once. RUNNER_LONG_TESTS=1 runs the long variant.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig
from runner.errors import EXIT_INTERRUPTED, EXIT_JOBS_FAILED, EXIT_OK
from runner.ledger import read_run_meta, status_summary
from runner.report.data import build_report, load_events, load_jobs
from runner.report.invocations import Invocation
from runner.report.text import render_text
from tests.scenario import manifest
from tests.torture_support import (
    LONG,
    check_accounting,
    check_readable,
    check_terminal_once,
    emulator_process,
    free_port,
    manifest_jobs,
    secret_leaks,
    serve_app,
    start_run,
)

# The emulator lists a request in its history at once (history_delay_s=0), so a lost submit
# is settled after 5 s rather than the default 60: the chains' last runs no longer sit out a
# minute (reset-after-accept: 63 -> 15 s); test_reconcile covers the settle delay itself.
FAST = ["--concurrency", "8", "--max-in-flight", "24", "--rate", "1000", "--reconcile-after", "5"]


@dataclass(frozen=True)
class Chain:
    rows: int
    kills: int
    seed: int
    faults: str = ""
    modes: tuple[str, ...] = ("stream",)  # completion mode of each run, in turn
    download: bool = False  # download outputs to out/ (killed mid-download too)


@dataclass
class Outcome:
    killed: int = 0
    finished_early: int = 0
    logs: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Where:
    out: Path
    queue_url: str
    webhook_port: int  # the same for every run, so late deliveries reach the next one


def _flags(chain: Chain, run: int, where: Where) -> list[str]:
    mode = chain.modes[run % len(chain.modes)]
    flags = [*FAST, "--out", str(where.out)] if chain.download else [*FAST, "--no-download"]
    flags += ["--completion", mode]
    if mode == "webhook":
        hook = f"127.0.0.1:{where.webhook_port}"
        jwks = where.queue_url + "/rest/.well-known/jwks.json"
        flags += ["--webhook-listen", hook, "--webhook-url", f"http://{hook}/",
                  "--webhook-jwks-url", jwks]  # fmt: skip
    return flags


def check_downloads(run_dir: Path, out: Path, jobs: int) -> None:
    """Every output downloaded once, to a file that exists; no temp file is left behind."""
    rows = check_readable(run_dir).jobs.to_pylist()
    paths = [o["local_path"] for r in rows for o in r["outputs"]]
    assert len(paths) == jobs and all(paths), "an output was not downloaded"
    assert all(Path(p).is_file() for p in paths)
    files = {str(p.resolve()) for p in out.rglob("*") if p.is_file()}
    assert files == {str(Path(p).resolve()) for p in paths}, "stray or temp files in --out"


def _kill_chain(chain: Chain, tmp_path: Path) -> None:
    rng = random.Random(chain.seed)
    path = manifest(tmp_path, chain.rows)
    jobs = manifest_jobs(path)
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    outcome = Outcome()
    with emulator_process(tmp_path, time_scale=0.25, faults=chain.faults) as emu:
        where = Where(out_dir, emu.url, free_port())
        for i in range(chain.kills):
            proc = start_run(path, run_dir, emu.url, *_flags(chain, i, where))
            time.sleep(rng.uniform(0.5, 2.0))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                outcome.killed += 1
            else:
                outcome.finished_early += 1
            out, err = proc.communicate(timeout=60)
            outcome.logs += [out, err]
            check_readable(run_dir)
            check_accounting(run_dir, emu.stats(), jobs)
        codes = []
        for _ in range(8):  # unknown outcomes and lost jobs take one more run each
            proc = start_run(path, run_dir, emu.url, *_flags(chain, 0, where))
            out, err = proc.communicate(timeout=120)
            outcome.logs += [out, err]
            codes.append(proc.returncode)
            assert proc.returncode in (EXIT_OK, EXIT_JOBS_FAILED), err[-2000:]
            if proc.returncode == EXIT_OK:
                break
        assert codes[-1] == EXIT_OK, (codes, outcome.logs[-1][-3000:])
        stats = emu.stats()
    # No job ends failed because of kills (or faults) alone: every one completed, once.
    check_terminal_once(run_dir, jobs, allowed=("completed",))
    acc = check_accounting(run_dir, stats, jobs)
    if "fail_" not in chain.faults:  # a retry after a failed job is a second accept too
        assert stats["submits"]["duplicates"] == acc.duplicates <= acc.unknown_attempts
    # Every completion the server billed twice is on the record, after the last run.
    billed_twice = sum(b["images"] for b in stats["billing"].values()) - chain.rows
    status = status_summary(run_dir)
    assert status.possible_duplicates >= billed_twice, (status.possible_duplicates, billed_twice)
    if "history_" not in chain.faults:
        # With fal's history readable, every unknown outcome was settled exactly.
        assert billed_twice == 0 and status.possible_duplicates == 0
    print(f"kills={outcome.killed} unknown={acc.unknown_attempts} dup={acc.duplicates} "
          f"billed_twice={billed_twice} recorded={status.possible_duplicates}")  # fmt: skip
    assert stats["submits"]["distinct_inputs"] == chain.rows
    assert outcome.killed >= chain.kills // 2, outcome
    assert not secret_leaks(DEFAULT_KEY, *outcome.logs, root=run_dir)
    if chain.download:
        check_downloads(run_dir, out_dir, chain.rows)
    check_invocations(run_dir, outcome, codes)


def check_invocations(run_dir: Path, outcome: Outcome, codes: list[int]) -> None:
    """The report has a line per run that got as far as its ledger: a killed one "did not
    finish" (unless it had recorded its end), every other one has its exit code."""
    events = load_events(run_dir)
    lines = build_report(load_jobs(run_dir), read_run_meta(run_dir), events=events).invocations
    assert events["run_id"].null_count == 0 and all(line.run_id for line in lines)
    killed = [line for line in lines if line.status == "did not finish"]
    finished = [line for line in lines if line.finished]
    assert len(killed) + len(finished) == len(lines)
    # A kill that lands after a run recorded its end (run.json), while it prints its summary
    # or closes, leaves a finished run: seen in .ci/run, a rerun with all 100 rows skipped.
    # So each killed process is one of: no line (killed before it opened the ledger), "did
    # not finish", or finished; and every run that exited on its own is finished.
    ended_then_killed = len(finished) - (outcome.finished_early + len(codes))
    assert ended_then_killed >= 0
    assert len(killed) + ended_then_killed <= outcome.killed
    assert lines[-1].exit_code == codes[-1] == EXIT_OK


# Every fault the emulator has, at once.
EVERY_FAULT = (
    "reset_after_accept=0.03,timeout_after_accept=0.02,timeout_hang_s=2,submit_429=0.05,"
    "gateway_503=0.02,result_5xx=0.05,result_reset=0.03,stream_not_sse=0.3,"
    "stream_drop_after=2,fail_runner_disconnected=0.03,webhook_lost=0.1,"
    "webhook_duplicate=0.1,seed=21"
)
CHAINS = [
    pytest.param(
        Chain(
            rows=200,
            kills=20,
            seed=21,
            faults=EVERY_FAULT,
            modes=("stream", "poll", "webhook", "stream"),
        ),
        id="every-fault-twenty-kills",
    ),
    pytest.param(
        Chain(
            rows=150,
            kills=5,
            seed=2,
            faults="reset_after_accept=0.04,seed=5",
            modes=("stream", "webhook", "poll"),
        ),
        id="reset-after-accept",
    ),
    pytest.param(Chain(rows=100, kills=5, seed=3, download=True), id="downloads"),
]
LONG_FAULTS = (
    "reset_after_accept=0.03,timeout_after_accept=0.02,timeout_hang_s=4,"
    "submit_429=0.1,gateway_503=0.05,seed=9"
)
LONG_CHAINS = [
    pytest.param(
        Chain(
            rows=400,
            kills=24,
            seed=11,
            faults=LONG_FAULTS,
            modes=("stream", "webhook", "stream", "poll"),
        ),
        id="long-faults",
    ),
    pytest.param(Chain(rows=300, kills=20, seed=12, modes=("webhook",)), id="long-webhook"),
    pytest.param(Chain(rows=200, kills=6, seed=1), id="clean"),
    pytest.param(Chain(rows=300, kills=20, seed=13, download=True), id="long-downloads"),
]


@pytest.mark.torture
@pytest.mark.parametrize("chain", CHAINS)
def test_sigkill_at_random_moments_then_resume_completes_every_job_once(
    chain: Chain, tmp_path: Path
) -> None:
    _kill_chain(chain, tmp_path)


@pytest.mark.skipif(not LONG, reason="long variant: set RUNNER_LONG_TESTS=1")
@pytest.mark.parametrize("chain", LONG_CHAINS)
def test_sigkill_twenty_times_then_resume_completes_every_job_once(
    chain: Chain, tmp_path: Path
) -> None:
    _kill_chain(chain, tmp_path)


def _wait_for_jobs(run_dir: Path, proc: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "journal").exists():
            try:
                if len(check_readable(run_dir)) >= count:
                    return
            except Exception:  # a half-created run directory: look again
                pass
        time.sleep(0.05)
    pytest.fail("the run never recorded its first jobs")


@pytest.mark.torture
def test_first_sigint_drains_in_flight_then_rerun_completes_without_duplicates(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 120)
    jobs = manifest_jobs(path)
    run_dir = tmp_path / "run"
    flags = [*FAST, "--no-download", "--completion", "stream"]
    with emulator_process(tmp_path, time_scale=0.1) as emu:
        proc = start_run(path, run_dir, emu.url, *flags)
        _wait_for_jobs(run_dir, proc, 10)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
        assert "Traceback" not in err
        first = check_readable(run_dir)
        states = {r["state"] for r in first.jobs.to_pylist()}
        # In-flight jobs were finished, not abandoned; admission stopped well short.
        assert states == {"completed"}, states
        assert 10 <= len(first) < len(jobs)
        again = start_run(path, run_dir, emu.url, *flags)
        _, err2 = again.communicate(timeout=60)
        assert again.returncode == EXIT_OK, err2[-2000:]
        stats = emu.stats()
    check_terminal_once(run_dir, jobs, allowed=("completed",))
    assert stats["submits"]["duplicates"] == 0
    assert stats["submits"]["accepted"] == len(jobs)
    check_accounting(run_dir, stats, jobs)
    assert [line.status for line in invocation_lines(run_dir)] == ["exit 130", "exit 0"]


def invocation_lines(run_dir: Path) -> tuple[Invocation, ...]:
    jobs, meta, events = load_jobs(run_dir), read_run_meta(run_dir), load_events(run_dir)
    return build_report(jobs, meta, events=events).invocations


@pytest.mark.torture
def test_a_run_killed_by_sigkill_is_a_line_that_did_not_finish(tmp_path: Path) -> None:
    path = manifest(tmp_path, 30)
    run_dir = tmp_path / "run"
    # An unknown outcome the kill left is settled from fal's history at once, not after 60 s.
    flags = [*FAST, "--no-download", "--reconcile-after", "0"]
    with emulator_process(tmp_path, time_scale=0.1) as emu:
        proc = start_run(path, run_dir, emu.url, *flags)
        _wait_for_jobs(run_dir, proc, 5)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        again = start_run(path, run_dir, emu.url, *flags)
        _, err = again.communicate(timeout=120)
        assert again.returncode == EXIT_OK, err[-2000:]
    killed, finished = invocation_lines(run_dir)
    assert killed.status == "did not finish" and killed.ended_at is None
    assert killed.counts_from == "ledger" and killed.events > 0
    assert killed.last_event_at is not None and killed.started_at is not None
    assert finished.status == "exit 0" and finished.message == "all jobs completed"
    assert killed.completed + finished.completed == 30
    text = render_text(build_report(load_jobs(run_dir), read_run_meta(run_dir),
                                    events=load_events(run_dir)))  # fmt: skip
    assert f"{killed.run_id}  " in text and "did not finish" in text


class StallingCdn:
    """The emulator's app, but CDN downloads send half the file and then hang."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.stall = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.stall or not scope["path"].startswith("/cdn/"):
            await self.app(scope, receive, send)
            return

        async def half_then_hang(message: Any) -> None:
            if message["type"] == "http.response.body":
                body = message.get("body", b"")
                await send({"type": "http.response.body", "body": body[: len(body) // 2],
                            "more_body": True})  # fmt: skip
                await anyio.sleep(20)  # the runner is killed meanwhile
                return
            await send(message)

        await self.app(scope, receive, half_then_hang)


def part_files(out_dir: Path) -> list[Path]:
    return list(out_dir.rglob("*.part"))


async def _until_part_file(out_dir: Path, proc: subprocess.Popen[str]) -> None:
    with anyio.fail_after(30):
        while not await anyio.to_thread.run_sync(part_files, out_dir):
            assert proc.poll() is None, "the run ended before downloading"
            await anyio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn serves on asyncio only
async def test_a_download_killed_midway_leaves_no_temp_file_after_resume(
    tmp_path: Path, anyio_backend: str
) -> None:
    path = manifest(tmp_path, 4)
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    emu = Emulator(EmulatorConfig(time_scale=0.01, concurrency=4))
    cdn = StallingCdn(emu.app)
    flags = ["--out", str(out_dir), "--completion", "stream"]
    async with emu.running(), serve_app(cdn) as url:
        proc = start_run(path, run_dir, url, *flags)
        try:
            await _until_part_file(out_dir, proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            await anyio.to_thread.run_sync(proc.communicate)
        cdn.stall = False
        again = start_run(path, run_dir, url, *flags)
        _, err = await anyio.to_thread.run_sync(again.communicate)
    assert again.returncode == EXIT_OK, err[-2000:]
    check_downloads(run_dir, out_dir, 4)
    assert not part_files(out_dir)
