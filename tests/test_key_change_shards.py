"""--key-changed with --shards: a rotated key of the same account re-attaches each shard's
jobs in flight, as it does unsharded (it was refused: the shard's recorded key won)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from runner.errors import EXIT_OK, UsageError
from runner.execution.engine import Hooks
from runner.execution.jobsource import item_shard
from runner.execution.summary import RunReport
from runner.ledger.state import LedgerState
from runner.scale.layout import shard_dir
from runner.scale.shards import execute_sharded
from tests.accounts_support import Accounts
from tests.scenario import FAST_POLICIES, manifest, run_config
from tests.test_key_change import KEY_A, KEY_B, RotatedKey, accepted, left_in_flight
from tests.torture_support import manifest_jobs

pytestmark = pytest.mark.anyio


async def sharded(fal: RotatedKey, path: Path, run_dir: Path, **kw: object) -> RunReport:
    hooks = Hooks(transport=httpx.ASGITransport(app=fal.app), stream=None,
                  handle_signals=False, policies=FAST_POLICIES)  # fmt: skip
    config = run_config(path, run_dir, key=SecretStr(KEY_B), download=False, shards=2, **kw)
    return await execute_sharded(config, hooks=hooks)


async def test_key_changed_reattaches_a_shards_jobs_with_the_rotated_key(tmp_path: Path) -> None:
    path, run_dir = manifest(tmp_path, 1), tmp_path / "run"
    job = next(iter(manifest_jobs(path).values()))
    accounts = Accounts({KEY_A: 2, KEY_B: 2}, time_scale=0.005)
    async with accounts.running():
        # The job accepted under KEY_A and left queued in its shard's ledger.
        await left_in_flight(accounts, path, shard_dir(run_dir, item_shard(job, 2)))
        with pytest.raises(UsageError) as refused:
            await sharded(RotatedKey(accounts), path, run_dir)
        report = await sharded(RotatedKey(accounts), path, run_dir, key_changed=True)
        assert accepted(accounts, KEY_A) == 1 and accepted(accounts, KEY_B) == 0
    assert "--key-changed" in str(refused.value)
    assert KEY_A not in str(refused.value) and KEY_B not in str(refused.value)
    assert report.exit_code == EXIT_OK, report.message
    record = LedgerState.load(shard_dir(run_dir, item_shard(job, 2))).get(job.job_key)
    assert record is not None and record.state.value == "completed"
