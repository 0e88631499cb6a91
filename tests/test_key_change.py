"""A rerun with another key while jobs are in flight: another account's key finds none of
them (fal answers 404), so they would be sent and paid again. Refused, unless the user says
the key was rotated within the same account (``--key-changed``)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from runner.errors import EXIT_OK, UsageError
from runner.execution.engine import Hooks, execute
from runner.execution.summary import RunReport
from runner.fal.key import fingerprint
from runner.ledger.meta import write_run_meta
from runner.ledger.schema import JobState, LedgerEvent, utcnow
from runner.ledger.state import LedgerState
from runner.ledger.store import Ledger
from tests.accounts_support import Accounts, Receive, Scope, Send
from tests.scenario import FAST_POLICIES, manifest, run_config
from tests.torture_support import manifest_jobs

pytestmark = pytest.mark.anyio

KEY_A = "alpha-key-id-0001:aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "bravo-key-id-0002:bbbbbbbbbbbbbbbbbbbbbbbbbbbb"


async def left_in_flight(accounts: Accounts, path: Path, run_dir: Path) -> str:
    """The manifest's first job submitted with KEY_A and recorded queued, as a run killed
    right after fal accepted it leaves it; run.json says KEY_A submitted."""
    job = next(iter(manifest_jobs(path).values()))
    transport = httpx.ASGITransport(app=accounts.app)
    headers = {"Authorization": f"Key {KEY_A}"}
    async with httpx.AsyncClient(transport=transport, headers=headers) as http:
        answer = await http.post(f"http://emulator/{job.endpoint}", json=dict(job.payload))
        request_id = str(answer.json()["request_id"])
    with Ledger.open(run_dir) as ledger:
        ledger.append(LedgerEvent(
            job.job_key, JobState.QUEUED, utcnow(), attempt=1, row_id=job.row_id,
            endpoint=job.endpoint, request_id=request_id,
        ))  # fmt: skip
        ledger.commit_sync()
    write_run_meta(run_dir, {"config": {}, "key_fingerprint": fingerprint(SecretStr(KEY_A))})
    return job.job_key


async def rerun(
    fal: Accounts | RotatedKey, path: Path, run_dir: Path, key: str, **kw: object
) -> RunReport:
    hooks = Hooks(transport=httpx.ASGITransport(app=fal.app), stream=None,
                  handle_signals=False, policies=FAST_POLICIES)  # fmt: skip
    config = run_config(path, run_dir, key=SecretStr(key), download=False, **kw)
    return await execute(config, hooks=hooks)


def accepted(accounts: Accounts, key: str) -> int:
    return int(accounts.by_key[key].snapshot()["submits"]["accepted"])


async def test_another_accounts_key_is_refused_while_jobs_are_in_flight(tmp_path: Path) -> None:
    path, run_dir = manifest(tmp_path, 2), tmp_path / "run"
    accounts = Accounts({KEY_A: 2, KEY_B: 2}, time_scale=0.005)
    async with accounts.running():
        await left_in_flight(accounts, path, run_dir)
        with pytest.raises(UsageError) as refused:
            await rerun(accounts, path, run_dir, KEY_B)
        assert accepted(accounts, KEY_B) == 0  # nothing was sent with it
        # The key that submitted re-attaches: that job is not sent again.
        report = await rerun(accounts, path, run_dir, KEY_A)
        assert report.exit_code == EXIT_OK, report.message
        assert accepted(accounts, KEY_A) == 2
    text = str(refused.value)
    assert "1 job of" in text and "is in flight" in text and "--key-changed" in text
    assert fingerprint(SecretStr(KEY_A)) in text and KEY_A not in text and KEY_B not in text


class RotatedKey:
    """KEY_B is a new key of KEY_A's account: every request reaches that account."""

    def __init__(self, accounts: Accounts) -> None:
        self.account = accounts.by_key[KEY_A].app
        self.app = self

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            same = f"Key {KEY_A}".encode()
            headers = [(n, same if n == b"authorization" else v) for n, v in scope["headers"]]
            scope = {**scope, "headers": headers}
        await self.account(scope, receive, send)


async def test_key_changed_reattaches_with_the_new_key(tmp_path: Path) -> None:
    """--key-changed: a rotated key of the same account re-attaches the job in flight (not
    sent again). Against another account it would not be found (the refusal's reason)."""
    path, run_dir = manifest(tmp_path, 2), tmp_path / "run"
    accounts = Accounts({KEY_A: 2, KEY_B: 2}, time_scale=0.005)
    async with accounts.running():
        job_key = await left_in_flight(accounts, path, run_dir)
        with pytest.raises(UsageError):
            await rerun(RotatedKey(accounts), path, run_dir, KEY_B)
        report = await rerun(RotatedKey(accounts), path, run_dir, KEY_B, key_changed=True)
        assert accepted(accounts, KEY_A) == 2 and accepted(accounts, KEY_B) == 0
    assert report.exit_code == EXIT_OK, report.message
    assert report.tally.completed == 2
    record = LedgerState.load(run_dir).get(job_key)
    assert record is not None and record.state is JobState.COMPLETED


async def test_another_key_with_nothing_in_flight_is_no_concern(tmp_path: Path) -> None:
    path, run_dir = manifest(tmp_path, 2), tmp_path / "run"
    accounts = Accounts({KEY_A: 2, KEY_B: 2}, time_scale=0.005)
    async with accounts.running():
        first = await rerun(accounts, path, run_dir, KEY_A)
        again = await rerun(accounts, path.with_name("m.csv"), run_dir, KEY_B)
    assert first.exit_code == EXIT_OK and again.exit_code == EXIT_OK
