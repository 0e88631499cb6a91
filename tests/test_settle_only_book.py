"""A job admitted only to be settled (the budget reached) is reserved as committed by an
earlier run; if admission stops while it waits for a slot, its reservation must be given
back to that same share, not to this run's new spend (which it never took)."""

from __future__ import annotations

import io
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import httpx
import pytest

from runner.execution.engine import Hooks, execute
from runner.execution.gate import local_gate
from runner.execution.interrupts import Interrupts
from runner.execution.spend import PooledSpend, local_spend
from runner.ledger import Ledger
from runner.ledger.schema import JobState, LedgerEvent, payload_fingerprint
from tests.scenario import FAST_POLICIES, emulator, manifest, run_config
from tests.torture_support import manifest_jobs

pytestmark = pytest.mark.anyio


class Book:
    """The run's budget, keeping each share's reservations: committed (earlier) and new."""

    def __init__(self, inner: PooledSpend) -> None:
        self.inner = inner
        self.earlier = self.new = Decimal(0)

    @property
    def exhausted(self) -> bool:
        return self.inner.exhausted

    @property
    def reason(self) -> str | None:
        return self.inner.reason

    async def admit(self, estimate_usd: Decimal | None) -> bool:
        ok = await self.inner.admit(estimate_usd)
        self.new += (estimate_usd or 0) if ok else 0
        return ok

    def reserve_committed(self, estimate_usd: Decimal | None) -> None:
        self.earlier += estimate_usd or 0
        self.inner.reserve_committed(estimate_usd)

    def settle(
        self, estimate_usd: Decimal | None, actual_usd: Decimal | None, *, reattached: bool = False
    ) -> None:
        if reattached:
            self.earlier -= estimate_usd or 0
        else:
            self.new -= estimate_usd or 0
        self.inner.settle(estimate_usd, actual_usd, reattached=reattached)

    def add_prior(self, spent_usd: Decimal) -> None:
        self.inner.add_prior(spent_usd)


async def test_a_settle_only_job_stopped_before_its_slot_is_given_back_as_committed(
    tmp_path: Path,
) -> None:
    path, run_dir = manifest(tmp_path, 2), tmp_path / "run"
    with Ledger.open(run_dir) as ledger:
        for job in manifest_jobs(path).values():  # both left with an unknown submit outcome
            ledger.append(LedgerEvent(
                job.job_key, JobState.SUBMITTING, datetime.now(UTC), attempt=1,
                row_id=job.row_id, endpoint=job.endpoint,
                payload_sha256=payload_fingerprint(job.payload),
            ))  # fmt: skip
        ledger.commit_sync()
    book = Book(local_spend(Decimal("0.01"), None))
    gate = local_gate(fingerprint="fp-test", slots=anyio.Semaphore(1), limit=1, concurrency=1,
                      rate_per_s=None, budget=book, clock=time.monotonic,
                      sleep=anyio.sleep)  # fmt: skip
    presses = Interrupts(announce=False)
    async with emulator() as emu:
        hooks = Hooks(transport=httpx.ASGITransport(app=emu.app), stream=io.StringIO(),
                      handle_signals=False, policies=FAST_POLICIES, gate=gate,
                      interrupts=presses)  # fmt: skip
        # The first job's settle waits for fal's history (up to 10 s); the second waits for
        # the one slot when the first Ctrl-C stops admission.
        config = run_config(path, run_dir, reconcile_after_s=10.0, max_cost_usd=Decimal("0.01"),
                            max_in_flight=1)  # fmt: skip

        async def press_soon() -> None:
            await anyio.sleep(1.5)
            presses.press()  # admission stops: the second job's wait for a slot ends
            await anyio.sleep(0.2)
            presses.press()  # the first job's settle is cancelled: the test ends

        async with anyio.create_task_group() as tg:
            tg.start_soon(press_soon)
            await execute(config, hooks=hooks)
        accepted = emu.snapshot()["submits"]["accepted"]
    assert accepted == 0
    # Nothing new was reserved, so nothing new is given back; of the committed, at most the
    # first job's (cancelled in flight by the second press) is still held.
    assert book.new == 0, (book.new, book.earlier)
    assert book.earlier <= Decimal("0.035"), (book.new, book.earlier)
