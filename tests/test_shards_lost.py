"""Lost contact in a sharded run: the key's window is shared, so the jobs every shard on it
lost contact with count against it together (runner.scale.shards, runner.execution.gate)."""

from __future__ import annotations

import io
from pathlib import Path

import anyio
import httpx
import pytest

from runner.emulator import FaultConfig, parse_faults
from runner.emulator.faults import FaultInjector
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK
from runner.execution.engine import Hooks
from runner.execution.lease import FileSlots
from runner.fal.key import fingerprint
from runner.fal.retry import RetryPolicies, RetryPolicy
from runner.scale.shards import execute_sharded
from tests.scenario import FAST_POLICIES, FAST_SUBMIT, emulator, manifest, run_config

pytestmark = pytest.mark.anyio


def _hooks(emu: object, policies: RetryPolicies = FAST_POLICIES) -> Hooks:
    return Hooks(
        transport=httpx.ASGITransport(app=emu.app),  # type: ignore[attr-defined]
        stream=io.StringIO(),
        handle_signals=False,
        policies=policies,
    )


async def test_lost_jobs_of_several_shards_filling_the_key_window_stop_every_shard(
    tmp_path: Path,
) -> None:
    """Four shards on one key with a window of 2: every result read fails, so the first two
    jobs sent (by whichever shards) are lost and hold both of the key's slots. No shard can
    take a slot again; each must stop and say why, not wait for a slot forever."""
    path = manifest(tmp_path, 40)
    run_dir = tmp_path / "run"
    config = run_config(
        path, run_dir, shards=4, max_in_flight=2, first_look="status", download=False
    )
    short = RetryPolicy(attempts=2, timeout_s=5.0, base_s=0.001, max_s=0.002)
    policies = RetryPolicies(submit=FAST_SUBMIT, read=short)
    async with emulator(faults=parse_faults("result_5xx=1,history_unavailable=1")) as emu:
        with anyio.fail_after(20):  # hung for ever before the fix
            report = await execute_sharded(config, hooks=_hooks(emu, policies))
        stats = emu.snapshot()
        emu.faults = FaultInjector(FaultConfig())  # the queue recovers
        again = await execute_sharded(config, hooks=_hooks(emu))
        after = emu.snapshot()
    assert report.exit_code == EXIT_JOBS_FAILED
    assert "in-flight slots hold jobs we lost contact with" in report.message
    assert stats["submits"]["accepted"] == 2  # the key's window held
    assert again.exit_code == EXIT_OK and again.tally.completed + again.tally.skipped == 40
    assert after["submits"]["duplicates"] == 0


async def test_a_shard_process_stops_when_other_processes_lost_jobs_hold_the_key_window(
    tmp_path: Path,
) -> None:
    """Across processes (--shard K --gate-dir) the window's slots are file locks. Another
    process holds both, each for a job it lost contact with (and so until its run ends,
    which may be waiting for a slot itself): this one must stop and say why, not wait."""
    path = manifest(tmp_path, 10)
    run_dir, gate_dir = tmp_path / "run", tmp_path / "gate"
    config = run_config(path, run_dir, shards=2, shard=1, gate_dir=gate_dir, max_in_flight=2,
                        download=False)  # fmt: skip
    assert config.key is not None
    other = FileSlots(gate_dir / fingerprint(config.key), 2)  # the other process
    for _ in range(2):
        await other.acquire()
        other.hold_lost()
    try:
        async with emulator() as emu:
            with anyio.fail_after(20):  # waited for ever before
                report = await execute_sharded(config, hooks=_hooks(emu))
            stats = emu.snapshot()
    finally:
        other.close()
    assert report.exit_code == EXIT_JOBS_FAILED
    assert "in-flight slots hold jobs we lost contact with" in report.message
    assert stats["submits"]["accepted"] == 0


def _marks(directory: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(directory.iterdir())]


def _mark_all(directory: Path) -> None:
    for p in directory.iterdir():
        p.write_bytes(b"lost")


async def test_file_slots_lost_marks_move_and_clear(tmp_path: Path) -> None:
    """A slot held for a lost job is marked; a release gives back an unmarked one; close
    clears the marks; a free file's mark (its holder killed) does not count as lost."""
    a, b = FileSlots(tmp_path, 2), FileSlots(tmp_path, 2)
    await a.acquire()
    await a.acquire()
    a.hold_lost()
    assert not b.all_lost()
    a.release()  # the unmarked one: the lost job keeps its slot
    await b.acquire()
    b.hold_lost()
    assert b.all_lost() and a.all_lost()
    b.close()
    assert not a.all_lost()
    a.close()
    assert _marks(tmp_path) == [b"", b""]
    _mark_all(tmp_path)  # as a killed holder leaves them
    assert not a.all_lost()
    await a.acquire()
    await a.acquire()
    assert not a.all_lost()  # taking a slot clears its stale mark
    a.close()
