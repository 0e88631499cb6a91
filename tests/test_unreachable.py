"""fal's queue unreachable (no DNS, connection refused) for good: once every slot's job in
a row has failed to reach it, each after its retries, admission stops with the reason,
instead of failing every row of the manifest one by one. Nothing was sent, nothing paid;
a rerun sends the rest."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pytest

from runner.emulator import Emulator
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK
from runner.execution.engine import Hooks, execute
from runner.execution.outcome import Done, Failed, Failure, Reach
from runner.ledger import status_summary
from runner.ledger.schema import JobState
from tests.scenario import FAST_POLICIES, emulator, manifest, run_config

pytestmark = pytest.mark.anyio


class NoRoute(httpx.AsyncBaseTransport):
    """The emulator, except that submits (POSTs to the queue) cannot connect while down."""

    def __init__(self, emu: Emulator) -> None:
        self.inner = httpx.ASGITransport(app=emu.app)
        self.down = True
        self.posts = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.startswith("/fal-ai/"):
            self.posts += 1
            if self.down:
                raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)
        return await self.inner.handle_async_request(request)


async def test_an_unreachable_queue_stops_admission_then_a_rerun_sends_the_rest(
    tmp_path: Path,
) -> None:
    path, run_dir = manifest(tmp_path, 40), tmp_path / "run"
    async with emulator() as emu:
        route = NoRoute(emu)
        hooks = Hooks(transport=route, stream=io.StringIO(), handle_signals=False,
                      policies=FAST_POLICIES)  # fmt: skip
        report = await execute(run_config(path, run_dir, concurrency=2), hooks=hooks)
        tried = route.posts
        route.down = False
        again = await execute(run_config(path, run_dir, concurrency=2), hooks=hooks)
        stats = emu.snapshot()
    assert report.exit_code == EXIT_JOBS_FAILED
    assert "could not reach fal's queue" in report.message and "Name or service" in report.message
    # The window's 6 jobs in a row (3 x 2 slots), and those in flight when it stopped, each
    # after its retries (FAST_POLICIES: 8 tries a submit, 3 attempts a job); not 40 jobs.
    failed = report.tally.failed
    assert 6 <= failed <= 12 and tried == failed * 8 * 3, (failed, tried)
    assert again.exit_code == EXIT_OK and again.tally.completed == 40
    assert stats["submits"]["accepted"] == 40 and stats["submits"]["duplicates"] == 0
    assert status_summary(run_dir).by_state == {JobState.COMPLETED: 40}


def test_reach_counts_only_jobs_that_never_reached_the_queue_in_a_row() -> None:
    unreached = Failed(Failure("submit_failed", "ConnectError", True), None, answered=False)
    refused = Failed(Failure("submit_http_422", "bad", False), None, answered=True)
    upload = Failed(Failure("upload_failed", "ConnectError", True), None, answered=False)
    reach = Reach(3)
    assert reach.saw(unreached) is None and reach.saw(unreached) is None
    assert reach.saw(refused) is None  # an answer: the queue is there
    assert reach.saw(unreached) is None and reach.saw(None) is None  # None: sent nothing
    assert reach.saw(upload) is None and reach.saw(unreached) is None
    assert reach.saw(unreached) is not None
    reach.saw(Done.__new__(Done))
    assert reach.in_a_row == 0
