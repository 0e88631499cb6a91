"""One budget for a run's shards: in one book (runner.execution.budget.SpendBook), in a file
shared by processes (runner.execution.spendfile), and end to end with several
``runner run --shard K --gate-dir D --max-cost X`` processes on one emulator."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from decimal import Decimal as D
from pathlib import Path

import httpx
import pytest

from runner.errors import EXIT_BUDGET, EXIT_OK
from runner.execution.budget import Caps, SpendBook
from runner.execution.engine import Hooks
from runner.execution.spendfile import FilePool, book_dir
from runner.ledger.schema import JobState
from runner.ledger.views import status_summary
from runner.scale.shards import execute_sharded
from tests.scenario import FAST_POLICIES, emulator, manifest, run_config
from tests.torture_support import REPO, emulator_process, start_run

pytestmark = pytest.mark.anyio

JOB = D("0.035")


def test_shares_of_one_book_are_held_to_one_cap() -> None:
    book, cap = SpendBook(), Caps(cap_usd=D("0.10"))
    assert book.admit("a", JOB, cap) is None
    assert book.admit("b", JOB, cap) is None
    refused = book.admit("a", JOB, cap)  # 0.105 > 0.10, whoever asks
    assert refused is not None and "--max-cost $0.10" in refused
    assert book.admit("b", D("0.001"), cap) == refused  # once refused, every share is
    assert book.run_committed_usd == 2 * JOB


def test_a_dead_share_counts_as_spent_until_its_shard_runs_again() -> None:
    book, caps = SpendBook(), Caps(cap_usd=D("0.20"), total_cap_usd=D("0.30"))
    book.join("dead", 0, D(0))
    for _ in range(3):  # submitted, then the worker died: nothing settled
        assert book.admit("dead", JOB, caps) is None
    book.join("other", 1, D(0))
    assert book.admit("other", JOB, caps) is None
    assert book.committed_usd == book.run_committed_usd == 4 * JOB
    # Shard 0 runs again and reads its ledger: two of the three were billed, one is in
    # flight (re-attached). The dead share's reservations stop counting toward the total,
    # which the ledger now accounts for, but stay in what this invocation committed.
    book.join("again", 0, 2 * JOB)
    book.reserve_committed("again", JOB)
    assert book.committed_usd == 4 * JOB  # 0.07 billed + 0.035 re-attached + other's 0.035
    assert book.run_committed_usd == 4 * JOB
    assert book.admit("again", JOB, caps) is None  # 0.175 <= 0.20
    assert book.admit("other", JOB, caps) is not None  # 0.21 > 0.20: --max-cost holds


def test_a_book_survives_its_json() -> None:
    book, caps = SpendBook(), Caps(total_cap_usd=D("1"))
    book.join("a", 3, D("0.5"))
    book.admit("a", JOB, caps)
    book.settle("a", JOB, D("0.03"))
    book.join("b", 3, D("0.53"))
    again = SpendBook.from_json(book.to_json())
    assert again == book
    assert again.committed_usd == D("0.53")


_CHILD = """
import anyio, os, sys
from decimal import Decimal
from pathlib import Path
from runner.execution.budget import Caps
from runner.execution.spendfile import FilePool, book_dir

async def main() -> None:
    pool = FilePool(Path(sys.argv[1]))
    pool.open()
    for _ in range(int(sys.argv[2])):
        assert await pool.admit("child", Decimal("0.035"), Caps(Decimal("0.2"))) is None
    print("reserved", flush=True)
    os.kill(os.getpid(), 9)  # dies holding its reservations

anyio.run(main)
"""


async def _child_reserves(directory: Path, jobs: int) -> None:
    import anyio

    argv = [sys.executable, "-c", _CHILD, str(directory), str(jobs)]
    done = await anyio.run_process(argv, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.stdout == b"reserved\n" and done.returncode == -9, done.stderr.decode()[-800:]


async def test_a_killed_process_keeps_its_reservations_while_others_run(tmp_path: Path) -> None:
    directory = tmp_path / "budget"
    pool = FilePool(directory)
    pool.open()  # present: the child joins this invocation
    await _child_reserves(directory, 3)
    caps = Caps(D("0.2"))
    admitted = 0
    while await pool.admit("parent", JOB, caps) is None:
        admitted += 1
    assert admitted == 2  # 3 dead + 2 = 0.175; a sixth would be 0.21
    assert pool.book().run_committed_usd == 5 * JOB
    pool.close()
    # Nobody runs now: the next process starts a new invocation, with a full allowance.
    fresh = FilePool(directory)
    fresh.open()
    assert fresh.book().run_committed_usd == 0
    fresh.close()


def _billed(stats: dict[str, object]) -> D:
    return D(str(stats["billed_usd"]))


def _flags(shards: int, gates: Path, cap: D) -> list[str]:
    return ["--shards", str(shards), "--gate-dir", str(gates), "--max-cost", str(cap),
            "--rate", "1000", "--no-download"]  # fmt: skip


@pytest.mark.timeout(300)
def test_max_cost_holds_across_shard_processes(tmp_path: Path) -> None:
    shards, cap = 4, D("0.70")  # 20 jobs at $0.035; each shard alone has 40
    path = manifest(tmp_path, 160)
    run_dir, gates = tmp_path / "run", tmp_path / "gates"
    # Processes on a gate directory are one invocation (one --max-cost) while any of them
    # runs; one started after the others ended is a new one, with a cap of its own. Under
    # load a process can start that late (the test failed so: $1.40 billed). The test stays
    # in the invocation, as a supervisor starting them would, so the four are always one.
    supervisor = FilePool(book_dir(gates, run_dir))
    supervisor.open()
    with emulator_process(tmp_path, time_scale=0.02, concurrency=4) as emu:
        flags = _flags(shards, gates, cap)
        procs = [
            start_run(path, run_dir, emu.url, *flags, "--shard", str(k)) for k in range(shards)
        ]
        errs = [proc.communicate(timeout=240)[1] for proc in procs]
        codes = [proc.returncode for proc in procs]
        stats = emu.stats()
    supervisor.close()
    assert codes == [EXIT_BUDGET] * shards, [e[-600:] for e in errs]
    billed = _billed(stats)
    assert billed <= cap, billed
    # The cap was reached, not merely respected: within one job per shard of it.
    assert billed > cap - shards * JOB, billed
    completed = status_summary(run_dir).by_state.get(JobState.COMPLETED, 0)
    assert completed * JOB == billed
    assert stats["submits"]["duplicates"] == 0
    assert all("stopped at the budget" in err for err in errs), errs[0][-600:]


@pytest.mark.timeout(300)
def test_a_killed_shard_process_does_not_break_the_cap(tmp_path: Path) -> None:
    shards, cap = 3, D("0.70")
    path = manifest(tmp_path, 120)
    run_dir, gates = tmp_path / "run", tmp_path / "gates"
    flags = _flags(shards, gates, cap)
    # Processes on a gate directory are one invocation while any of them runs. The test
    # stays in it, as a supervisor would, so that shard 0's restart belongs to it however
    # soon the other shards reach the cap.
    supervisor = FilePool(book_dir(gates, run_dir))
    supervisor.open()
    with emulator_process(tmp_path, time_scale=0.05, concurrency=4) as emu:
        procs = {k: start_run(path, run_dir, emu.url, *flags, "--shard", str(k))
                 for k in range(shards)}  # fmt: skip
        deadline = time.monotonic() + 60
        while emu.stats()["submits"]["accepted"] < 6:
            assert time.monotonic() < deadline, "nothing was submitted"
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)  # dies holding reservations, jobs in flight
        procs[0].communicate(timeout=30)
        dead = supervisor.book().run_committed_usd
        # Shard 0 again: it resumes from its ledger (re-attaching what the dead one sent).
        procs[0] = start_run(path, run_dir, emu.url, *flags, "--shard", "0")
        errs = {k: p.communicate(timeout=240)[1] for k, p in procs.items()}
        codes = {k: p.returncode for k, p in procs.items()}
        time.sleep(0.5)  # the killed worker's last jobs end on the emulator
        stats = emu.stats()
    book = supervisor.book()
    supervisor.close()
    assert dead > 0
    assert set(codes.values()) <= {EXIT_BUDGET, EXIT_OK}, errs
    assert EXIT_BUDGET in codes.values()
    billed = _billed(stats)
    assert billed <= cap, billed
    assert book.run_committed_usd <= cap
    assert stats["submits"]["duplicates"] == 0
    assert status_summary(run_dir).by_state.get(JobState.COMPLETED, 0) * JOB == billed


async def test_max_total_cost_counts_the_spend_of_shards_not_running(tmp_path: Path) -> None:
    path, run_dir = manifest(tmp_path, 40), tmp_path / "run"
    async with emulator(concurrency=2, time_scale=0.002) as emu:
        hooks = Hooks(transport=httpx.ASGITransport(app=emu.app), stream=io.StringIO(),
                      handle_signals=False, policies=FAST_POLICIES)  # fmt: skip
        first = await execute_sharded(
            run_config(path, run_dir, shards=2, shard=0, download=False), hooks=hooks
        )
        spent = _billed(emu.snapshot())
        # Shard 1 alone, capped at the run directory's total so far: shard 0's ledger counts.
        config = run_config(path, run_dir, shards=2, shard=1, download=False,
                            max_total_cost_usd=spent + JOB / 2)  # fmt: skip
        second = await execute_sharded(config, hooks=hooks)
        after = _billed(emu.snapshot())
    assert first.exit_code == EXIT_OK and spent > 0
    assert second.exit_code == EXIT_BUDGET, second.message
    assert "would exceed --max-total-cost" in second.message
    assert after == spent  # nothing more was sent
