"""The poller's calls for many jobs at once, on virtual time against a lockstep fake queue.

Every job of the fake queue takes the same time on one of ``slots`` slots, first come first
served, so the slots free up together and the queue moves in whole rounds (the case where
the runner's calls per job grew with the concurrency). Time only moves when every task
waits (:class:`VirtualTime`), so the figures are the pacing's, whatever the machine's load.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from anyio import wait_all_tasks_blocked
from pydantic import SecretStr

from runner.execution.completion import Pacing, Poller, Reader, ResultFirst, ResultIn, Watch
from runner.execution.pacing import QueueLag
from runner.fal.client import QueueClient
from runner.fal.protocol import RequestUrls
from runner.fal.retry import RetryPolicy
from tests.fakes import FakeTime
from tests.test_completion import DONE, RUNNING, FakeQueue, poller, watch

pytestmark = pytest.mark.anyio

QUEUE = "https://queue.fal.test"
ENDPOINT = "fal-ai/flux-lora"


class VirtualTime:
    """A clock plus a sleep that returns only when :meth:`run` moves time to its end."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, anyio.Event]] = []
        self._seq = 0

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay_s: float) -> None:
        event = anyio.Event()
        self._seq += 1
        heapq.heappush(self._heap, (self.now + max(delay_s, 0.0), self._seq, event))
        await event.wait()

    async def run(self) -> None:
        """Wake sleepers in wake-time order until nothing is left to run."""
        while True:
            await wait_all_tasks_blocked()
            if not self._heap:
                return
            wake, _, event = heapq.heappop(self._heap)
            self.now = max(self.now, wake)
            event.set()


@dataclass
class LockstepQueue:
    """Jobs of ``service_s`` each on ``slots`` slots, first come first served."""

    time: VirtualTime
    slots: int
    service_s: float
    ends: dict[str, float] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    looks: list[float] = field(default_factory=list)  # when each result read came
    _free: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._free = [0.0] * self.slots

    def submit(self, request_id: str) -> int:
        """Queue one job now; returns its position (queued jobs ahead of it)."""
        now = self.time.now
        ahead = sum(1 for end in self.ends.values() if end - self.service_s > now)
        start = max(now, heapq.heappop(self._free))
        heapq.heappush(self._free, start + self.service_s)
        self.ends[request_id] = start + self.service_s
        self.calls["submit"] += 1
        return ahead

    def handler(self, request: httpx.Request) -> httpx.Response:
        request_id = request.url.path.rsplit("/", 1)[-1]
        self.calls["result"] += 1
        self.looks.append(self.time.now)
        body: dict[str, Any]
        if self.time.now < self.ends[request_id]:
            self.calls["not ready"] += 1
            code, body = RUNNING
        else:
            code, body = 200, {**DONE[1], "timings": {"inference": self.service_s}}
        return httpx.Response(code, json=body, headers={"x-fal-request-id": request_id})


def ref(request_id: str) -> RequestUrls:
    base = f"{QUEUE}/{ENDPOINT}/requests/{request_id}"
    return RequestUrls(
        request_id=request_id,
        status_url=f"{base}/status",
        response_url=base,
        cancel_url=f"{base}/cancel",
    )


async def run_jobs(
    queue: LockstepQueue, jobs: int, *, window: int, teach: bool = True
) -> tuple[Pacing, list[int]]:
    """``jobs`` jobs through ``window`` workers, each as the engine's worker runs one:
    submit, wait, and (``teach``) the model learns the service time from the result.
    Returns the pacing and each job's result reads."""
    time = queue.time
    client = QueueClient(
        httpx.MockTransport(queue.handler), queue_url=QUEUE, key=SecretStr("k:secret")
    )
    policy = RetryPolicy(attempts=3, base_s=0.01, max_s=0.01)
    pacing = Pacing(slots=queue.slots)
    p = Poller(Reader(client, policy, time.clock, time.sleep), pacing, ResultFirst())
    reads: list[int] = []
    left = iter(range(jobs))

    async def worker() -> None:
        for k in left:
            rid = f"req-{k}"
            position = queue.submit(rid)
            w = Watch(ENDPOINT, ref(rid), units=1.0, position=position, submitted_s=time.now)
            finished = await p.wait(w)
            assert isinstance(finished, ResultIn)
            reads.append(w.status_calls)
            if teach:
                pacing.observe(ENDPOINT, 1.0, queue.service_s)
            await time.sleep(0.005)  # recording it, before the next submit

    async with anyio.create_task_group() as tg:
        for _ in range(window):
            tg.start_soon(worker)
        tg.start_soon(time.run)
    return pacing, reads


async def test_only_a_few_of_the_first_jobs_explore_an_unseen_endpoint() -> None:
    # 40 jobs start at once on 40 slots and take 1 s. Two explore (looks at 0.1, 0.3 and
    # 0.7 s come early, the one at 1.5 s finds it done); the other 38 wait for the model
    # without calls and then find their job done at the first look.
    queue = LockstepQueue(VirtualTime(), slots=40, service_s=1.0)
    pacing, reads = await run_jobs(queue, 40, window=40)
    assert sorted(reads) == [1] * 38 + [4, 4]
    assert queue.calls["result"] == 46  # every job exploring: 40 x 4 = 160
    assert not +pacing.exploring


async def test_an_explorer_that_teaches_nothing_hands_its_place_on() -> None:
    # Nothing teaches the model (say every job failed): the waiting jobs take the
    # explorers' places two at a time instead of waiting forever, or all exploring at once.
    queue = LockstepQueue(VirtualTime(), slots=8, service_s=1.0)
    pacing, reads = await run_jobs(queue, 8, window=8, teach=False)
    # Two explore and find their job done at 1.5 s; then two waiting jobs take their
    # places, and find theirs (done at 1 s) at their first look, and so on.
    assert sorted(reads) == [1] * 6 + [4, 4]
    assert queue.time.now < 3.0  # not behind max_poll_s (30 s) of waiting
    assert not pacing.model.known(ENDPOINT) and not +pacing.exploring


async def test_a_freed_explorers_place_is_taken_at_once() -> None:
    # As above, every place is taken the moment an explorer ends (its jobs done at 1 s):
    # the two explorers find theirs at 1.5 s, the next two take their places then and look
    # 0.1 s later, and so on: the last look at 1.8 s. Before, a waiting job noticed a freed
    # place only at the end of its nap (up to 0.25 s later): the last look at ~2.26 s.
    queue = LockstepQueue(VirtualTime(), slots=8, service_s=1.0)
    _pacing, reads = await run_jobs(queue, 8, window=8, teach=False)
    assert sorted(reads) == [1] * 6 + [4, 4]
    assert max(queue.looks) == pytest.approx(1.8)


@pytest.mark.parametrize(
    ("slots", "service_s", "rounds"), [(4, 0.3, 80), (16, 0.4, 25), (40, 1.0, 25)]
)
async def test_jobs_in_rounds_cost_about_two_calls_and_keep_the_slots_busy(
    slots: int, service_s: float, rounds: int
) -> None:
    # The bench matrix's shape (bench_slots.py --matrix: 0.3 s jobs at 4 slots, 0.4 s at
    # 16, 1 s at 40, three times the slots in flight), 320 to 1,000 jobs. Before the
    # change 2.33-2.55 calls a job: the first round's exploring, and waves of early first
    # looks from a lag that overshot, every look aimed before a raise raising it again.
    queue = LockstepQueue(VirtualTime(), slots=slots, service_s=service_s)
    jobs = rounds * slots
    pacing, _ = await run_jobs(queue, jobs, window=3 * slots)
    calls = (queue.calls["submit"] + queue.calls["result"]) / jobs
    assert calls <= 2.1
    makespan = max(queue.ends.values())  # the first submit is at 0
    assert makespan <= 1.03 * jobs * service_s / slots
    assert pacing.model.lag.early <= 0.1 * pacing.model.lag.looks


async def test_a_look_re_aims_when_the_lag_moved_meanwhile_without_a_call() -> None:
    queue, time = FakeQueue([DONE]), FakeTime()
    p = poller(queue, time, ResultFirst())  # two slots
    model = p.pacing.model
    model.observe(ENDPOINT, 1.0, 1.0)
    sleep = time.sleep

    async def others_look_early(seconds: float) -> None:
        await sleep(seconds)
        if model.lag.lag == 0.0:
            model.lag.lag = 0.5  # other jobs' early looks raised it while this one slept

    p.reader.sleep = others_look_early
    w = watch()
    w.position = 2  # two ahead on two slots, then its own second
    assert isinstance(await p.wait(w), ResultIn)
    assert queue.calls == {"result": 1}
    assert time.sleeps[0] == pytest.approx(2.0 + 1.3 * 0.25 * 2**0.5)  # aimed with lag 0
    assert time.now == pytest.approx(2.5 + 1.3 * 0.25 * 2**0.5)  # looked with lag 0.5
    assert model.lag.looks == 1 and model.lag.early == 0


def test_looks_aimed_before_a_raise_do_not_raise_the_lag_again() -> None:
    lag = QueueLag(step=0.05, first_step=0.0)  # a fixed step
    for _ in range(10):  # ten looks aimed at lag 0 come back early, one after another
        lag.first_look(done=False, aimed=0.0)
    assert lag.lag == pytest.approx(0.05) and lag.early == 10
    lag.first_look(done=False, aimed=0.05)  # a look aimed after the raise: news
    assert lag.lag == pytest.approx(0.10)
    lag.first_look(done=False)  # no aim given: a step above the current lag, as before
    assert lag.lag == pytest.approx(0.15)


def test_the_first_steps_are_larger_then_settle_to_the_step() -> None:
    lag = QueueLag(step=0.05, first_step=0.4)
    lag.first_look(done=False, aimed=0.0)
    assert lag.lag == pytest.approx(0.4)  # the first early look: a big step
    for _ in range(2000):
        lag.first_look(done=True)
    raised = lag.lag
    lag.first_look(done=False, aimed=raised)
    assert lag.lag == pytest.approx(raised + 0.05)  # later ones: the step


def test_early_looks_settle_at_the_early_share() -> None:
    lag = QueueLag()
    for k in range(10_000):  # the needed lag: 0.3 or 0.6 of a service time, alternately
        needed = 0.3 if k % 2 else 0.6
        lag.first_look(done=lag.lag >= needed, aimed=lag.lag)
    assert lag.early / lag.looks == pytest.approx(lag.early_share, abs=0.01)
    assert 0.59 <= lag.lag <= 0.6 + lag.step
