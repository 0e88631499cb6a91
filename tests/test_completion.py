"""The poller's looks against a scripted fake queue (MockTransport), with a fake clock.

A look reads the result URL first: a job found done costs one read, fal's "still in
progress" answer means look again later, and any other answer sends the job to the
status URL, which explains it as before.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from runner.errors import AuthError
from runner.execution.completion import (
    Pacing,
    Poller,
    Reader,
    ResultFirst,
    ResultIn,
    StatusIn,
    Watch,
)
from runner.fal.client import QueueClient
from runner.fal.protocol import (
    Completed,
    NotReadyAnswer,
    RequestUrls,
    Status,
    peek_verdict,
)
from runner.fal.retry import RetryPolicy
from tests.fakes import FakeTime

pytestmark = pytest.mark.anyio

QUEUE = "https://queue.fal.test"
BASE = f"{QUEUE}/fal-ai/flux-lora/requests/req-1"
REF = RequestUrls(
    request_id="req-1", status_url=f"{BASE}/status", response_url=BASE, cancel_url=f"{BASE}/cancel"
)
RESULT = {
    "images": [{"url": "https://v3.fal.media/x.png", "width": 64, "height": 64}],
    "timings": {"inference": 0.8},
    "seed": 1,
    "has_nsfw_concepts": [False],
    "prompt": "p",
}
RUNNING = (400, {"detail": "Request is still in progress"})
DONE = (200, RESULT)
COMPLETED = (200, {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 0.8}})
IN_PROGRESS = (202, {"status": "IN_PROGRESS", "logs": None})

Answer = tuple[int, Any] | Exception


@dataclass
class FakeQueue:
    """Answers the result and status URLs from scripts; the last answer repeats."""

    results: list[Answer]
    statuses: list[Answer] = field(default_factory=lambda: [COMPLETED])
    calls: Counter[str] = field(default_factory=Counter)

    def handler(self, request: httpx.Request) -> httpx.Response:
        kind = "status" if request.url.path.endswith("/status") else "result"
        script = self.statuses if kind == "status" else self.results
        answer = script[min(self.calls[kind], len(script) - 1)]
        self.calls[kind] += 1
        if isinstance(answer, Exception):
            raise answer
        code, body = answer
        return httpx.Response(code, json=body, headers={"x-fal-request-id": "req-1"})


def poller(queue: FakeQueue, time: FakeTime, first: ResultFirst) -> Poller:
    transport = httpx.MockTransport(queue.handler)
    client = QueueClient(transport, queue_url=QUEUE, key=SecretStr("k:secret"))
    policy = RetryPolicy(attempts=5, base_s=0.01, max_s=0.01)
    reader = Reader(client, policy, time.clock, time.sleep)
    return Poller(reader, Pacing(slots=2), first)


def watch(seen: list[Status] | None = None) -> Watch:
    on_status: Callable[[Status], None] | None = None if seen is None else seen.append
    return Watch(endpoint="fal-ai/flux-lora", ref=REF, units=1.0, on_status=on_status)


async def test_a_job_found_done_costs_one_read_and_no_status() -> None:
    queue, time = FakeQueue([DONE]), FakeTime()
    seen: list[Status] = []
    finished = await poller(queue, time, ResultFirst()).wait(watch(seen))
    assert isinstance(finished, ResultIn) and finished.result.body == RESULT
    assert isinstance(finished.status, Completed)
    assert queue.calls == {"result": 1}
    # The worker still hears that the job ran (it moves the job to IN_PROGRESS).
    assert [type(s) for s in seen] == [Completed]


async def test_still_in_progress_means_look_again_later_without_status_reads() -> None:
    queue, time = FakeQueue([RUNNING, RUNNING, DONE]), FakeTime()
    finished = await poller(queue, time, ResultFirst()).wait(watch())
    assert isinstance(finished, ResultIn)
    assert queue.calls == {"result": 3}
    assert len(time.sleeps) == 3 and all(s > 0 for s in time.sleeps)


@pytest.mark.parametrize(
    "answer",
    [
        (422, {"detail": [{"loc": ["body", "prompt"], "msg": "bad", "type": "value_error"}]}),
        (503, {"detail": "Runner disconnected", "error_type": "runner_disconnected"}),
        (404, {"detail": "Request not found"}),
        (202, {"status": "IN_PROGRESS", "logs": None}),
        (200, {"status": "IN_QUEUE", "queue_position": 3}),
        httpx.ConnectError("refused"),
    ],
    ids=["422", "503", "404", "202", "200-status-shaped", "transport-error"],
)
async def test_an_answer_it_cannot_read_goes_to_the_status_url_at_once(answer: Answer) -> None:
    queue, time = FakeQueue([answer], statuses=[COMPLETED]), FakeTime()
    finished = await poller(queue, time, ResultFirst()).wait(watch())
    # The status decides; the result is read afterwards by the worker, as before.
    assert isinstance(finished, StatusIn) and isinstance(finished.status, Completed)
    assert queue.calls == {"result": 1, "status": 1}
    assert len(time.sleeps) == 1  # the status read came right after the odd answer


async def test_after_an_odd_answer_the_job_stays_on_status_reads() -> None:
    queue = FakeQueue([(500, {"detail": "?"})], statuses=[IN_PROGRESS, IN_PROGRESS, COMPLETED])
    finished = await poller(queue, FakeTime(), ResultFirst()).wait(watch())
    assert isinstance(finished, StatusIn)
    assert queue.calls == {"result": 1, "status": 3}


async def test_first_look_status_never_reads_the_result() -> None:
    queue = FakeQueue([DONE], statuses=[IN_PROGRESS, COMPLETED])
    finished = await poller(queue, FakeTime(), ResultFirst(enabled=False)).wait(watch())
    assert isinstance(finished, StatusIn)
    assert queue.calls == {"status": 2}


async def test_a_refused_key_on_the_result_read_is_fatal() -> None:
    queue = FakeQueue([(401, {"detail": "Unauthorized"})])
    with pytest.raises(AuthError) as caught:
        await poller(queue, FakeTime(), ResultFirst()).wait(watch())
    assert "secret" not in str(caught.value)


async def test_a_queue_that_answers_differently_turns_result_first_off_for_the_run() -> None:
    said: list[str] = []
    first = ResultFirst(min_sample=4, say=said.append)
    queue = FakeQueue([(400, {"detail": "not finished yet"})], statuses=[COMPLETED])
    p = poller(queue, FakeTime(), first)
    for _ in range(3):
        await p.wait(watch())
    assert first.enabled and not said  # too few reads to judge
    await p.wait(watch())
    assert not first.enabled
    assert len(said) == 1 and "--first-look status" in said[0]
    before = queue.calls["result"]
    await p.wait(watch())
    assert queue.calls["result"] == before  # no more result-first reads this run


async def test_a_configured_not_ready_answer_is_recognised() -> None:
    custom = NotReadyAnswer(status_codes=frozenset({409}), detail_contains="not finished")
    queue = FakeQueue([(409, {"detail": "Not finished yet"}), DONE])
    finished = await poller(queue, FakeTime(), ResultFirst(not_ready=custom)).wait(watch())
    assert isinstance(finished, ResultIn)
    assert queue.calls == {"result": 2}


@pytest.mark.parametrize(
    ("code", "body", "verdict"),
    [
        (200, RESULT, "result"),
        (200, {"status": "IN_PROGRESS", "logs": None}, "unknown"),
        (201, RESULT, "unknown"),
        (400, {"detail": "Request is still in progress"}, "not_ready"),
        (400, {"detail": "Request IS STILL IN PROGRESS"}, "not_ready"),
        (400, {"detail": "Bad request"}, "unknown"),
        (400, None, "unknown"),
        (422, {"detail": "in progress"}, "unknown"),
        (500, "in progress", "unknown"),
    ],
)
def test_peek_verdict(code: int, body: Any, verdict: str) -> None:
    assert peek_verdict(code, body) == verdict
