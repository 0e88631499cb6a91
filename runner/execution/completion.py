"""How the runner learns that a job finished: by polling, by the status stream, or by webhook.

Each strategy answers one question, ``await strategy.wait(watch) -> Finished``, for one job.
``Finished`` is a sum type: the result itself (a look read it), a COMPLETED status (the
result is still to be read), or a webhook's payload.

- :class:`Poller` looks at times chosen by :mod:`runner.execution.pacing`: once near the expected
  completion instead of every 0.1 s. By default a look reads the result URL itself, so a
  job found done costs submit + one read; an answer it does not recognise sends it back
  to status reads (see :class:`ResultFirst`).
- The push channels, the SSE status stream and the webhook, are in
  :mod:`runner.execution.push`; each falls back to the poller.

Every HTTP read goes through the one retry policy (:func:`runner.fal.retry.call_with_retry`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from runner.errors import AuthError, FalError
from runner.execution.pacing import (
    ServiceModel,
    explore_delay_s,
    first_poll_delay_s,
    next_poll_delay_s,
    queue_wait_s,
)
from runner.fal.client import Peek, QueueClient, RequestRef
from runner.fal.protocol import (
    FAL_NOT_READY,
    Completed,
    InProgress,
    NotReadyAnswer,
    Queued,
    ResultResponse,
    Status,
)
from runner.fal.retry import RetryPolicy, call_with_retry

# A first look re-aims (sleeps again, no call) while the model's prediction lies at least
# REAIM_S ahead, at most REAIMS times; a job waiting for an unseen endpoint's model checks
# it at least every MODEL_CHECK_S.
REAIM_S = 0.01
REAIMS = 8
MODEL_CHECK_S = 0.25


@dataclass(slots=True)
class Watch:
    """What a strategy knows about one submitted job, updated as statuses arrive."""

    endpoint: str
    ref: RequestRef
    units: float
    position: int | None = None
    submitted_s: float = 0.0
    started_s: float | None = None
    status_calls: int = 0
    on_status: Callable[[Status], None] | None = None


@dataclass(frozen=True, slots=True)
class ResultIn:
    """A look read the result itself: nothing more to fetch."""

    status: Completed
    result: ResultResponse


@dataclass(frozen=True, slots=True)
class StatusIn:
    """A COMPLETED status (maybe carrying the job's error); the result is still to be read."""

    status: Completed


@dataclass(frozen=True, slots=True)
class WebhookIn:
    """The webhook arrived: ``ok`` with the result as ``payload``, or the job's error."""

    ok: bool
    payload: Any


Finished = ResultIn | StatusIn | WebhookIn


class Strategy(Protocol):
    async def wait(self, watch: Watch) -> Finished: ...


@dataclass(slots=True)
class Pacing:
    """Knobs shared by the strategies; times in real seconds."""

    slots: int
    min_poll_s: float = 0.05
    max_poll_s: float = 30.0
    model: ServiceModel = field(default_factory=ServiceModel)
    # Running jobs that explore an endpoint the model has not seen (the others wait), and
    # how many do so now, per endpoint.
    explorers: int = 2
    exploring: Counter[str] = field(default_factory=Counter)
    # The naps of jobs waiting for the model: ended when an explorer's place frees or the
    # model learns, so they look again at once, not at the end of their nap.
    waiting: set[anyio.CancelScope] = field(default_factory=set)

    def notify(self) -> None:
        for nap in list(self.waiting):
            nap.cancel()

    def observe(self, endpoint: str, units: float, service_s: float) -> None:
        """A job's service time, for the model (see :meth:`ServiceModel.observe`)."""
        self.model.observe(endpoint, units, service_s)
        self.notify()


@dataclass(slots=True)
class Reader:
    """One retried status read, with the clock and sleep a strategy was given."""

    client: QueueClient
    policy: RetryPolicy
    clock: Callable[[], float]
    sleep: Callable[[float], Awaitable[None]]
    on_retry: Callable[[int, Exception, float], None] | None = None

    async def status(self, watch: Watch) -> Status:
        watch.status_calls += 1
        status = await call_with_retry(
            lambda: self.client.status(watch.ref),
            policy=self.policy,
            kind="read",
            clock=self.clock,
            sleep=self.sleep,
            on_retry=self.on_retry,
        )
        note(watch, status, self.clock())
        return status

    async def peek(self, watch: Watch, not_ready: NotReadyAnswer) -> Peek | None:
        """One result read, not retried: None when it failed (a status read follows)."""
        watch.status_calls += 1
        try:
            return await self.client.peek_result(watch.ref, not_ready)
        except AuthError:
            raise
        except FalError:
            return None


@dataclass(slots=True)
class ResultFirst:
    """Whether looks read the result URL first, shared by every job of a run.

    fal does not document its answer to a result read before completion (see
    :class:`~runner.fal.protocol.NotReadyAnswer`). A job whose read gets an answer that is
    neither the result nor the recognised "still running" goes back to status reads, and
    when most reads of a run get such answers the run stops reading results first: a
    queue that answers differently costs a few calls, never an outcome.
    """

    enabled: bool = True
    not_ready: NotReadyAnswer = FAL_NOT_READY
    min_sample: int = 20
    say: Callable[[str], None] | None = None
    reads: int = 0
    unrecognised: int = 0

    def count(self, peek: Peek | None) -> None:
        self.reads += 1
        if peek is not None and (peek.result is not None or peek.not_ready):
            return
        self.unrecognised += 1
        if self.enabled and self.reads >= self.min_sample and 2 * self.unrecognised > self.reads:
            self.enabled = False
            if self.say is not None:
                self.say(
                    f"{self.unrecognised} of {self.reads} early result reads got an answer "
                    "that is neither a result nor 'still in progress': looking at the "
                    "status URL first from now on (--first-look status does so from the start)"
                )


def note(watch: Watch, status: Status, now_s: float) -> None:
    """Record what a status says about the job's place and progress."""
    if isinstance(status, Queued):
        watch.position = status.position
    elif isinstance(status, InProgress) and watch.started_s is None:
        # Seen running: the start was at most this late. A job first seen COMPLETED
        # leaves started_s unknown rather than guessed.
        watch.started_s = now_s
        watch.position = None
    if watch.on_status is not None:
        watch.on_status(status)


class Poller:
    """Adaptive polling: ask once near the expected completion, then less often."""

    def __init__(
        self, reader: Reader, pacing: Pacing, result_first: ResultFirst | None = None
    ) -> None:
        self.reader = reader
        self.pacing = pacing
        self.result_first = result_first or ResultFirst(enabled=False)

    def _first_delay(self, watch: Watch) -> float:
        if not self.pacing.model.known(watch.endpoint):
            return explore_delay_s(
                polls=0, min_s=self.pacing.min_poll_s, max_s=self.pacing.max_poll_s
            )
        mean, dev = self.pacing.model.service_s(watch.endpoint, watch.units)
        return first_poll_delay_s(
            position=watch.position,
            service_mean_s=mean,
            service_dev_s=dev,
            ahead_mean_s=self.pacing.model.ahead_s(mean),
            ahead_dev_s=self.pacing.model.ahead_dev_s(dev),
            lag_s=self.pacing.model.lag_s(mean),
            slots=self.pacing.slots,
            min_s=self.pacing.min_poll_s,
            max_s=self.pacing.max_poll_s,
        )

    def _next_delay(self, watch: Watch, status: Status, polls: int) -> float:
        if not self.pacing.model.known(watch.endpoint):
            return explore_delay_s(
                polls=polls, min_s=self.pacing.min_poll_s, max_s=self.pacing.max_poll_s
            )
        mean, dev = self.pacing.model.service_s(watch.endpoint, watch.units)
        now = self.reader.clock()
        running_for = 0.0 if watch.started_s is None else now - watch.started_s
        return next_poll_delay_s(
            state="IN_QUEUE" if isinstance(status, Queued) else "IN_PROGRESS",
            position=watch.position,
            running_for_s=running_for,
            polls=polls,
            service_mean_s=mean,
            service_dev_s=dev,
            ahead_mean_s=self.pacing.model.ahead_s(mean),
            ahead_dev_s=self.pacing.model.ahead_dev_s(dev),
            lag_s=self.pacing.model.lag_s(mean),
            slots=self.pacing.slots,
            min_s=self.pacing.min_poll_s,
            max_s=self.pacing.max_poll_s,
        )

    async def wait(self, watch: Watch, *, wake: anyio.Event | None = None) -> Finished:
        """Poll until COMPLETED. With ``wake``, return early (status None) when it is set."""
        explorer = False
        if not self.pacing.model.known(watch.endpoint):
            explorer = await self._await_model(watch, wake)
        try:
            return await self._looks(watch, wake)
        finally:
            if explorer:
                self.pacing.exploring[watch.endpoint] -= 1
                self.pacing.notify()

    async def _looks(self, watch: Watch, wake: anyio.Event | None) -> Finished:
        model = self.pacing.model
        # The lag a look the model aimed was aimed with: what finds trains the lag.
        aimed: float | None = None
        if model.known(watch.endpoint):
            aimed = await self._aim(watch, wake)
        else:
            await self._nap(self._first_delay(watch), wake)
        polls = 0
        peeking = True
        while True:
            if peeking and self.result_first.enabled:
                peek = await self.reader.peek(watch, self.result_first.not_ready)
                self.result_first.count(peek)
                polls += 1
                if peek is not None and peek.result is not None:
                    if aimed is not None:
                        model.lag.first_look(done=True, aimed=aimed)
                    done = Completed(logs=None)
                    note(watch, done, self.reader.clock())
                    return ResultIn(done, peek.result)
                if peek is not None and peek.not_ready:
                    if aimed is not None:
                        model.lag.first_look(done=False, aimed=aimed)
                        aimed = None
                    await self._nap(self._not_ready_delay(watch, polls), wake)
                    continue
                peeking = False  # an answer we cannot read: the status says what it meant
            status = await self.reader.status(watch)
            polls += 1
            if aimed is not None:
                model.lag.first_look(done=isinstance(status, Completed), aimed=aimed)
                aimed = None
            if isinstance(status, Completed):
                return StatusIn(status)
            await self._nap(self._next_delay(watch, status, polls), wake)

    async def _aim(self, watch: Watch, wake: anyio.Event | None) -> float | None:
        """Sleep until the first look the model predicts, counted from the submit.

        Each wake-up aims again without a call: a lag learned meanwhile (other jobs' early
        looks) moves this look too, instead of every look aimed before it coming early as
        well. Returns the lag the look is aimed with, or None when the predicted time had
        passed already (a job handed over late by a stream): a late look teaches nothing.
        """
        min_s = self.pacing.min_poll_s
        left = watch.submitted_s + self._first_delay(watch) - self.reader.clock()
        if left <= 0:
            await self._nap(min_s, wake)
            return None
        for _ in range(REAIMS):
            await self._nap(max(left, min_s), wake)
            left = watch.submitted_s + self._first_delay(watch) - self.reader.clock()
            if left < REAIM_S:
                break
        return self.pacing.model.lag.lag

    async def _nap(self, delay: float, wake: anyio.Event | None) -> None:
        if wake is None:
            await self.reader.sleep(delay)
            return
        with anyio.move_on_after(delay):
            await wake.wait()
        if wake.is_set():
            raise Woken

    async def _await_model(self, watch: Watch, wake: anyio.Event | None) -> bool:
        """Before an endpoint's first job is seen: whether this job explores.

        Exploring looks early and then less often (:func:`explore_delay_s`) to learn the
        service time from a real completion. ``Pacing.explorers`` running jobs of an
        endpoint do so; the others, and every queued job (it ends after one ahead of it),
        wait for the model without calls, taking an explorer's place when one ends without
        teaching it, and exploring anyway after ``max_poll_s``.
        """
        pacing, endpoint = self.pacing, watch.endpoint
        step, waited = pacing.min_poll_s, 0.0
        while not pacing.model.known(endpoint):
            if (watch.position or 0) <= 0 and pacing.exploring[endpoint] < pacing.explorers:
                pacing.exploring[endpoint] += 1
                return True
            if waited >= pacing.max_poll_s:
                break
            await self._nap_or_change(step, wake)  # a nap ended early counts whole
            waited, step = waited + step, min(step * 1.5, MODEL_CHECK_S)
        return False

    async def _nap_or_change(self, delay: float, wake: anyio.Event | None) -> None:
        """:meth:`_nap`, ended early by :meth:`Pacing.notify` (a place freed, a model)."""
        with anyio.CancelScope() as nap:
            self.pacing.waiting.add(nap)
            try:
                await self._nap(delay, wake)
            finally:
                self.pacing.waiting.discard(nap)

    def _not_ready_delay(self, watch: Watch, polls: int) -> float:
        """After "still running": assume it started when predicted, and is now overdue."""
        if not self.pacing.model.known(watch.endpoint):
            return explore_delay_s(
                polls=polls, min_s=self.pacing.min_poll_s, max_s=self.pacing.max_poll_s
            )
        mean, dev = self.pacing.model.service_s(watch.endpoint, watch.units)
        ahead = max(watch.position or 0, 0)
        model = self.pacing.model
        wait, _ = queue_wait_s(
            ahead, self.pacing.slots, mean, dev, model.ahead_s(mean), model.ahead_dev_s(dev)
        )
        started = watch.submitted_s + wait + model.lag_s(mean)
        return next_poll_delay_s(
            state="IN_PROGRESS",
            position=None,
            running_for_s=max(self.reader.clock() - started, 0.0),
            polls=polls,
            service_mean_s=mean,
            service_dev_s=dev,
            slots=self.pacing.slots,
            min_s=self.pacing.min_poll_s,
            max_s=self.pacing.max_poll_s,
        )


class Woken(Exception):
    """The webhook arrived while the poller slept (control flow for the webhook waiter)."""
