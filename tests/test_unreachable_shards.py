"""An unreachable queue with --shards: the shards share the key's in-flight window, so
the run stops after about a window's worth of jobs in a row, as unsharded. Each shard
counting only its own took N windows: 31 of 80 jobs failed with 4 shards (now 11)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from runner.errors import EXIT_JOBS_FAILED
from runner.execution.engine import Hooks
from runner.scale.shards import execute_sharded
from tests.scenario import FAST_POLICIES, emulator, manifest, run_config
from tests.test_unreachable import NoRoute

pytestmark = pytest.mark.anyio


async def test_an_unreachable_queue_stops_a_sharded_run_after_about_a_window(
    tmp_path: Path,
) -> None:
    path, run_dir = manifest(tmp_path, 80), tmp_path / "run"
    async with emulator() as emu:
        route = NoRoute(emu)
        hooks = Hooks(transport=route, stream=io.StringIO(), handle_signals=False,
                      policies=FAST_POLICIES)  # fmt: skip
        config = run_config(path, run_dir, concurrency=2, shards=4)
        report = await execute_sharded(config, hooks=hooks)
    assert report.exit_code == EXIT_JOBS_FAILED
    assert "could not reach fal's queue" in report.message
    # Unsharded, 6-12 jobs fail (the 6-job window in a row, and those then in flight).
    assert report.tally.failed <= 12, report.tally.failed
