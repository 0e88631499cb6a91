"""Helpers for the torture tests: an emulator in its own process, the runner as a
subprocess, and the ledger checks every torture test ends with.

The accounting rule: a job's *attempt* starts at each ``submitting`` event. An attempt
is *acknowledged* when it recorded ``queued`` (a request id), *refused* when it failed
before any acknowledgement with a submit error that proves nothing was queued, and of
*unknown outcome* otherwise (an ``unknown`` event, or a ``submitting`` left behind by a
kill). Every submit the emulator accepted must be an acknowledged attempt or an
unknown-outcome one, and an acknowledged attempt is never followed by another submit
unless it ended in a recorded failure.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pyarrow.dataset as ds

from runner.emulator import DEFAULT_KEY
from runner.emulator.stats import canonical_input
from runner.errors import RowError
from runner.ledger.fold import read_events
from runner.ledger.schema import JobState, LedgerEvent, payload_fingerprint
from runner.ledger.state import LedgerState
from runner.ledger.store import Ledger
from runner.manifest.jobs import ExpandOptions, Job, iter_jobs
from runner.manifest.reader import read_rows

REPO = Path(__file__).resolve().parent.parent
LONG = os.environ.get("RUNNER_LONG_TESTS") == "1"
REFUSED_PREFIXES = ("submit_http_", "submit_failed", "upload_failed", "input_error")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FAL_KEY"}
    env.update(PYTHONPATH=str(REPO), FAL_KEY=DEFAULT_KEY, PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


@dataclass
class EmulatorProcess:
    """``python -m runner emulator serve`` on a free loopback port."""

    proc: subprocess.Popen[str]
    url: str
    log: Path

    def stats(self) -> dict[str, Any]:
        answer = httpx.get(self.url + "/_emulator/stats", timeout=10.0)
        answer.raise_for_status()
        data: dict[str, Any] = answer.json()
        return data


@contextmanager
def emulator_process(
    tmp: Path, *, time_scale: float, concurrency: int = 8, faults: str = ""
) -> Iterator[EmulatorProcess]:
    port = free_port()
    log = tmp / f"emulator-{port}.log"
    args = [sys.executable, "-m", "runner", "emulator", "serve", "--port", str(port),
            "--time-scale", str(time_scale), "--concurrency", str(concurrency)]  # fmt: skip
    if faults:
        args += ["--faults", faults]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=child_env(),
                                text=True, cwd=tmp)  # fmt: skip
    emu = EmulatorProcess(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 20.0
        while True:
            try:
                emu.stats()
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("emulator did not start: " + log.read_text()) from None
                time.sleep(0.05)
        yield emu
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_run(
    manifest: Path, run_dir: Path, queue_url: str, *flags: str, key: str = DEFAULT_KEY
) -> subprocess.Popen[str]:
    """``python -m runner run`` against ``queue_url``, output captured."""
    args = [sys.executable, "-m", "runner", "run", str(manifest), "--queue-url", queue_url,
            "--ledger", str(run_dir), "--quiet", *flags]  # fmt: skip
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=child_env(FAL_KEY=key), text=True, cwd=manifest.parent)  # fmt: skip


def manifest_jobs(path: Path) -> dict[str, Job]:
    """The manifest's good jobs by job_key, as the runner reads them."""
    jobs: dict[str, Job] = {}
    for item in iter_jobs(read_rows(path), ExpandOptions(manifest_dir=path.parent)):
        if not isinstance(item, RowError):
            jobs[item.job_key] = item
    return jobs


def left_submitting(run_dir: Path, job: Job, *, ago_s: float = 5.0) -> None:
    """``job``'s intent recorded ``ago_s`` ago and nothing after it, as a kill right after
    the intent's commit (before the POST) leaves it."""
    with Ledger.open(run_dir) as ledger:
        ledger.append(LedgerEvent(
            job.job_key, JobState.SUBMITTING, datetime.now(UTC) - timedelta(seconds=ago_s),
            attempt=1, row_id=job.row_id, endpoint=job.endpoint,
            payload_sha256=payload_fingerprint(job.payload),
        ))  # fmt: skip
        ledger.commit_sync()


def check_readable(run_dir: Path) -> LedgerState:
    """The ledger folds, and its parts read as one pyarrow dataset."""
    state = LedgerState.load(run_dir)
    parts = sorted((run_dir / "ledger").glob("*.parquet"))
    if parts:
        table = ds.dataset([str(p) for p in parts], format="parquet").to_table()
        assert table.num_rows >= 0
    return state


@dataclass
class Attempt:
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def states(self) -> list[str]:
        return [e["state"] for e in self.events]

    @property
    def acknowledged(self) -> bool:
        return "queued" in self.states or any(e["request_id"] for e in self.events)

    @property
    def refused(self) -> bool:
        return not self.acknowledged and any(
            e["state"] == "failed" and str(e["error_type"] or "").startswith(REFUSED_PREFIXES)
            for e in self.events
        )

    @property
    def unknown(self) -> bool:
        return not self.acknowledged and not self.refused


@dataclass
class History:
    """One job's events in seq order, cut into attempts."""

    events: list[dict[str, Any]]

    @property
    def attempts(self) -> list[Attempt]:
        out: list[Attempt] = []
        for e in self.events:
            if e["state"] == "submitting":
                out.append(Attempt())
            if out:
                out[-1].events.append(e)
        return out


def histories(run_dir: Path) -> dict[str, History]:
    table = read_events(run_dir).table.sort_by("seq")
    cols = ["job_key", "seq", "state", "request_id", "error_type", "error_message", "retryable"]
    by_job: dict[str, list[dict[str, Any]]] = {}
    for row in table.select(cols).to_pylist():
        by_job.setdefault(row["job_key"], []).append(row)
    return {k: History(v) for k, v in by_job.items()}


@dataclass
class Accounting:
    unknown_attempts: int
    duplicates: int
    accepted: int


def check_accounting(
    run_dir: Path,
    stats: dict[str, Any],
    jobs: dict[str, Job],
    *,
    baseline: Counter[str] | None = None,
) -> Accounting:
    """Every accepted submit is an acknowledged or unknown-outcome attempt of its job;
    no acknowledged attempt was submitted again unless it ended in a recorded failure."""
    accepted: Counter[str] = Counter(stats["submits"]["by_input"])
    digest = {canonical_input(j.endpoint, dict(j.payload)): k for k, j in jobs.items()}
    stray = [d for d, n in accepted.items() if n > 0 and d not in digest]
    assert not stray, f"the emulator accepted {len(stray)} inputs no manifest job sends"
    hist = histories(run_dir)
    unknown_total = 0
    for d, key in digest.items():
        attempts = hist[key].attempts if key in hist else []
        acked = sum(a.acknowledged for a in attempts)
        unknown = sum(a.unknown for a in attempts)
        unknown_total += unknown
        seen = accepted.get(d, 0)
        assert acked <= seen <= acked + unknown, (
            f"{jobs[key].row_id}: emulator accepted {seen}, ledger has {acked} acknowledged "
            f"and {unknown} unknown-outcome attempts: {[a.states for a in attempts]}"
        )
        for earlier in attempts[:-1]:
            if earlier.acknowledged:
                assert "failed" in earlier.states, (
                    f"{jobs[key].row_id}: acknowledged attempt submitted again: "
                    f"{[a.states for a in attempts]}"
                )
    dup = sum(max(n - 1, 0) for n in accepted.values())
    return Accounting(unknown_total, dup, sum(max(n, 0) for n in accepted.values()))


def check_terminal_once(run_dir: Path, jobs: dict[str, Job], allowed: Sequence[str]) -> LedgerState:
    """Each manifest job has one folded record in an allowed state; a completed job
    completed exactly once, as its last event; failures carry their reason."""
    state = check_readable(run_dir)
    hist = histories(run_dir)
    for key, job in jobs.items():
        record = state.get(key)
        assert record is not None, f"{job.row_id}: lost (no ledger record)"
        assert record.state.value in allowed, f"{job.row_id}: {record.state.value}"
        states = [e["state"] for e in hist[key].events]
        if "completed" in states:
            # Completed once: nothing but download updates (also `completed`) after it.
            after = states[states.index("completed") :]
            assert set(after) == {"completed"}, f"{job.row_id}: {states}"
        if record.state.value == "failed":
            assert record.error_type and record.error_message, f"{job.row_id}: no reason"
    return state


def secret_leaks(secret: str, *texts: str, root: Path | None = None) -> list[str]:
    """Where ``secret`` (or its base64/url-encoded forms) shows up."""
    import base64
    from urllib.parse import quote

    needles = {secret.encode(), quote(secret, safe="").encode(), base64.b64encode(secret.encode())}
    found = [f"text #{i}" for i, t in enumerate(texts) if any(n in t.encode() for n in needles)]
    if root is not None:
        for path in root.rglob("*"):
            if path.is_file() and any(n in path.read_bytes() for n in needles):
                found.append(str(path))
    return found


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@asynccontextmanager
async def serve_app(app: Any, port: int = 0) -> AsyncIterator[str]:
    """Any ASGI app on a loopback port (uvicorn, asyncio only); yields its base URL."""
    import anyio
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False,
                            timeout_graceful_shutdown=1)  # fmt: skip
    server = uvicorn.Server(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            while not server.started:
                if server.should_exit:
                    raise RuntimeError("the server failed to start")
                await anyio.sleep(0.01)
            try:
                yield f"http://127.0.0.1:{sock.getsockname()[1]}"
            finally:
                server.should_exit = True
    finally:
        sock.close()
