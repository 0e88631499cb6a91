"""SIGKILL a ledger writer at many points; the ledger must always come back whole.

Each chain is one run directory that several writers in turn grow and get
killed in: at random moments, and at injected points (before an fsync, mid
journal append, mid part write, after a part's rename before its journal is
dropped, before a segment is deleted). After every kill we check that every
event the child reported committed is there exactly once, that the folded
state is at least as far as committed, and that the resume plan is right.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from runner.ledger import (
    Action,
    JobState,
    Ledger,
    LedgerState,
    plan_resume,
    read_events,
    status_summary,
)

CHILD = Path(__file__).with_name("ledger_crash_child.py")
REPO = CHILD.parent.parent
RANK = {"submitting": 0, "queued": 1, "completed": 2}

CHAINS = [
    ["fsync:2", "random", "torn_journal:3", "fsync:9", "replace:1"],
    ["torn_part:1", "fsync:14", "random", "unlink:1", "torn_part:2"],
    ["replace:2", "random", "fsync:27", "torn_journal:7", "unlink:2"],
    ["random", "torn_part:1", "replace:1", "fsync:44", "torn_journal:12"],
]


@dataclass
class Expected:
    committed_seqs: set[int] = field(default_factory=set)
    jobs: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (rank, request_id)

    def add_line(self, line: str) -> None:
        seq, key, state, request_id = line.split()
        self.committed_seqs.add(int(seq))
        rank = max(RANK[state], self.jobs.get(key, (-1, ""))[0])
        self.jobs[key] = (rank, request_id)


def run_child(run_dir: Path, prefix: str, crash: str, rng: random.Random) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(run_dir), prefix, "none" if crash == "random" else crash],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    assert proc.stdout is not None
    if crash == "random":
        if proc.stdout.readline() != "READY\n":
            proc.kill()
            pytest.fail(f"child did not start: {proc.communicate()[1]}")
        time.sleep(rng.uniform(0.0, 0.15))
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"{crash}: child was not killed: {err[-1500:]}"
    return [line for line in out.splitlines() if line and line != "READY"]


def check(run_dir: Path, expected: Expected) -> None:
    for read_kind in ("reader", "after-recovery"):
        if read_kind == "after-recovery":
            Ledger.open(run_dir).close()  # the lock is free and recovery succeeds
        seqs = read_events(run_dir).table["seq"]
        present = set(seqs.to_pylist())
        assert len(present) == len(seqs), f"{read_kind}: an event is counted twice"
        assert expected.committed_seqs <= present, f"{read_kind}: committed events lost"
    state = LedgerState.load(run_dir)
    plan = dict(plan_resume([*expected.jobs, "never-seen"], state))
    assert plan.pop("never-seen").action is Action.SUBMIT
    for key, decision in plan.items():
        rank, request_id = expected.jobs[key]
        record = state.get(key)
        assert record is not None and RANK[record.state.value] >= rank
        if record.state is JobState.COMPLETED:
            assert decision.action is Action.SKIP
        elif record.state is JobState.QUEUED:
            assert (decision.action, decision.request_id) == (Action.REATTACH, request_id)
        else:
            assert (decision.action, decision.possible_duplicate) == (Action.SUBMIT, True)
    assert status_summary(run_dir).jobs == len(state)


def run_chain(run_dir: Path, crashes: list[str], seed: int) -> int:
    rng = random.Random(seed)
    expected = Expected()
    for round_no, crash in enumerate(crashes):
        for line in run_child(run_dir, f"r{round_no}", crash, rng):
            expected.add_line(line)
        check(run_dir, expected)
    return len(expected.committed_seqs)


@pytest.mark.torture
def test_sigkilled_writers_never_lose_committed_events(tmp_path: Path) -> None:
    with ThreadPoolExecutor(len(CHAINS)) as pool:
        futures = [
            pool.submit(run_chain, tmp_path / f"chain{i}", crashes, seed=i)
            for i, crashes in enumerate(CHAINS)
        ]
        committed = [f.result() for f in futures]
    assert sum(len(c) for c in CHAINS) >= 20
    assert all(n > 0 for n in committed)


def test_part_torn_mid_write_is_invisible_to_parquet_readers(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_child(run_dir, "a", "torn_part:1", random.Random(0))
    ledger_dir = run_dir / "ledger"
    assert [p.name for p in ledger_dir.iterdir() if p.name.endswith(".tmp")], "no torn temp"
    # The torn file is hidden: a dataset scan of the folder reads only whole parts.
    table = ds.dataset(ledger_dir, format="parquet").to_table()
    assert table.num_rows == sum(pq.read_metadata(p).num_rows for p in ledger_dir.glob("*.parquet"))
    Ledger.open(run_dir).close()
    assert not [p for p in ledger_dir.iterdir() if p.name.endswith(".tmp")]
