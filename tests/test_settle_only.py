"""After the budget is reached, a job an earlier run left with an unknown submit outcome is
only settled from fal's history, never sent: what the run says of it must say so."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from runner.errors import EXIT_BUDGET
from runner.execution.engine import Hooks, execute
from tests.scenario import FAST_POLICIES, emulator, manifest, run_config
from tests.torture_support import left_submitting, manifest_jobs

pytestmark = pytest.mark.anyio


async def test_a_settle_only_job_absent_from_history_is_not_said_resubmitted(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 2)
    run_dir = tmp_path / "run"
    job = list(manifest_jobs(path).values())[1]
    left_submitting(run_dir, job)
    stream = io.StringIO()
    async with emulator() as emu:
        hooks = Hooks(transport=httpx.ASGITransport(app=emu.app), stream=stream,
                      handle_signals=False, policies=FAST_POLICIES)  # fmt: skip
        config = run_config(path, run_dir, reconcile_after_s=1.0, max_cost_usd=Decimal("0.01"))
        report = await execute(config, hooks=hooks)
        accepted = emu.snapshot()["submits"]["accepted"]
    assert report.exit_code == EXIT_BUDGET and accepted == 0
    said = stream.getvalue() + "\n".join(report.tally.examples)
    assert job.row_id in said
    # Nothing was resubmitted: no line may say it was.
    assert "resubmitted" not in said, said
