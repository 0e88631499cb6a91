"""Ctrl-C while local inputs are still uploading: the run stops in seconds; and the
two-step stop of a sharded run in one process (runner.execution.interrupts).

A job that has sent nothing to fal (its inputs still uploading, or waiting for a rate token)
has nothing to wait for or settle, so the first Ctrl-C stops it at once. Before, the run
waited for every such upload's retries: minutes against a storage host that never answers.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.errors import EXIT_INTERRUPTED
from runner.ledger.views import status_summary
from tests.emulator_support import png_bytes
from tests.scenario import manifest
from tests.torture_support import EmulatorProcess, check_readable, emulator_process, start_run


@contextmanager
def black_hole() -> Iterator[tuple[str, threading.Event]]:
    """A storage host that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    reached = threading.Event()
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            held.append(conn)
            reached.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}", reached
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


def test_first_ctrl_c_stops_stuck_uploads_in_seconds(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(6):
        (images / f"in{i}.png").write_bytes(png_bytes(64 + i, 64))
        rows.append({"id": f"e{i}", "endpoint": "fal-ai/flux-kontext/dev",
                     "prompt": "make it blue", "image_url": f"images/in{i}.png"})  # fmt: skip
    manifest = tmp_path / "edits.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    with emulator_process(tmp_path, time_scale=0.1) as emu, black_hole() as (storage, reached):
        proc = start_run(manifest, run_dir, emu.url, "--rest-url", storage, "--cdn-url", storage)
        assert reached.wait(30), "the run never started an upload"
        time.sleep(0.3)  # every worker is now inside its upload
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - interrupted
        stats = emu.stats()
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "Traceback" not in err
    assert took < 10, f"Ctrl-C took {took:.1f} s with uploads stuck"
    assert stats["submits"]["accepted"] == 0  # nothing reached the queue
    # Nothing was recorded as sent: no intent is left to settle on the rerun.
    states = [r["state"] for r in check_readable(run_dir).jobs.to_pylist()]
    assert "submitting" not in states, states


def _in_flight_states(run_dir: Path) -> dict[str, int]:
    states = status_summary(run_dir).by_state
    return {s: n for s, n in states.items() if s in ("submitting", "queued", "in_progress")}


def test_first_ctrl_c_on_in_process_shards_finishes_the_jobs_in_flight(tmp_path: Path) -> None:
    path, run_dir = manifest(tmp_path, 60), tmp_path / "run"
    with emulator_process(tmp_path, time_scale=0.3, concurrency=4) as emu:  # ~1 s a job
        proc = start_run(path, run_dir, emu.url, "--shards", "3", "--rate", "1000",
                         "--no-download")  # fmt: skip
        _wait_for_submits(emu, 4)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        stats = emu.stats()
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert err.count("interrupted: no new jobs") == 1, err[-2000:]  # said once, not per shard
    # The shards' jobs in flight at that moment (it said 0: a sum made only when the bar drew).
    assert re.search(r"waiting for [1-9]\d* in flight", err), err[-2000:]
    accepted = stats["submits"]["accepted"]
    assert accepted < 60  # admission stopped in every shard
    # Every job sent was waited for and recorded as it ended: nothing left in flight.
    assert _in_flight_states(run_dir) == {}
    assert status_summary(run_dir).by_state == {"completed": accepted}


def test_second_ctrl_c_on_in_process_shards_exits_leaving_jobs_recorded(tmp_path: Path) -> None:
    path, run_dir = manifest(tmp_path, 60), tmp_path / "run"
    with emulator_process(tmp_path, time_scale=2.0, concurrency=4) as emu:  # ~7 s a job
        proc = start_run(path, run_dir, emu.url, "--shards", "3", "--rate", "1000",
                         "--no-download")  # fmt: skip
        _wait_for_submits(emu, 4)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, err[-2000:]
    assert "exiting now" in err and "Traceback" not in err
    assert _in_flight_states(run_dir)  # re-attached by the next run


def _wait_for_submits(emu: EmulatorProcess, count: int) -> None:
    deadline = time.monotonic() + 60
    while emu.stats()["submits"]["accepted"] < count:
        assert time.monotonic() < deadline, "nothing was submitted"
        time.sleep(0.05)
