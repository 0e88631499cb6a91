"""The push channels: the SSE status stream and the webhook, each falling back to polling.

- :class:`Streamer` holds the SSE status stream open. A stream that fails in any way (an
  answer that is not an event stream, a drop before COMPLETED) hands its job to the
  poller; when most streams of a run fail, the run polls from then on and says so once.
- :class:`WebhookWaiter` waits for the webhook (fed by :meth:`WebhookWaiter.deliver`) and
  polls a job whose webhook is late, so a lost webhook never stalls a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from runner.errors import AuthError, FalError
from runner.execution.completion import (
    Finished,
    Poller,
    Reader,
    StatusIn,
    Watch,
    WebhookIn,
    Woken,
    note,
)
from runner.fal.protocol import Completed


@dataclass(slots=True)
class ChannelHealth:
    """Whether a push channel still serves the run, shared by every job of a run.

    Each job whose channel fails falls back to polling on its own; once ``min_sample``
    jobs have tried it and most failed, the run stops opening it and says so once.
    """

    name: str
    enabled: bool = True
    min_sample: int = 10
    say: Callable[[str], None] | None = None
    tried: int = 0
    failed: int = 0
    first_error: str | None = None

    def count(self, error: str | None) -> None:
        self.tried += 1
        if error is None:
            return
        self.failed += 1
        self.first_error = self.first_error or error
        if self.enabled and self.tried >= self.min_sample and 2 * self.failed > self.tried:
            self.enabled = False
            if self.say is not None:
                self.say(
                    f"{self.failed} of {self.tried} {self.name}s failed (first: "
                    f"{self.first_error}): polling every job from now on"
                )


class Streamer:
    """The SSE status stream, one connection per job; polling when the stream fails."""

    def __init__(self, reader: Reader, poller: Poller, health: ChannelHealth) -> None:
        self.reader = reader
        self.poller = poller
        self.health = health
        self.fallbacks = 0

    async def wait(self, watch: Watch) -> Finished:
        if self.health.enabled:
            try:
                async with self.reader.client.stream(watch.ref) as events:
                    async for status in events:
                        note(watch, status, self.reader.clock())
                        if isinstance(status, Completed):
                            self.health.count(None)
                            return StatusIn(status)
            except AuthError:
                raise
            except FalError as exc:
                # Not an event stream, refused, or dropped before COMPLETED: the job is
                # still the queue's, and polling finds it.
                self.health.count(str(exc)[:300])
            self.fallbacks += 1
        return await self.poller.wait(watch)


@dataclass(slots=True)
class _Slot:
    event: anyio.Event = field(default_factory=anyio.Event)
    payload: Any = None
    ok: bool | None = None


class WebhookWaiter:
    """Wait for each job's webhook; poll any job whose webhook is late."""

    def __init__(self, poller: Poller, *, grace_s: float = 1.0, lateness: float = 2.0) -> None:
        self.poller = poller
        self.grace_s = grace_s
        self.lateness = lateness
        self._slots: dict[str, _Slot] = {}
        self._early: dict[str, _Slot] = {}
        self.late_jobs = 0

    def deliver(self, request_id: str, *, ok: bool, payload: Any) -> None:
        """A verified, first-seen webhook for ``request_id`` arrived."""
        slot = self._slots.get(request_id)
        if slot is None:
            # The webhook beat the submit acknowledgement's bookkeeping: keep it briefly.
            if len(self._early) < 100_000:
                slot = self._early.setdefault(request_id, _Slot())
            else:
                return
        slot.payload, slot.ok = payload, ok
        slot.event.set()

    async def wait(self, watch: Watch) -> Finished:
        rid = watch.ref.request_id
        slot = self._early.pop(rid, None) or _Slot()
        self._slots[rid] = slot
        try:
            started = self.poller.reader.clock()
            # The deadline follows the model as it learns, so re-check it at least every
            # second instead of fixing it from the prior at submit time.
            while not slot.event.is_set():
                left = started + self._patience_s(watch) - self.poller.reader.clock()
                if left <= 0:
                    break
                with anyio.move_on_after(min(left, 1.0)):
                    await slot.event.wait()
            if not slot.event.is_set():
                self.late_jobs += 1
                try:
                    finished = await self.poller.wait(watch, wake=slot.event)
                except Woken:
                    pass
                else:
                    return finished
            return self._from_webhook(slot)
        finally:
            self._slots.pop(rid, None)

    def _patience_s(self, watch: Watch) -> float:
        """How long to wait for a webhook before polling: twice the expected time, plus grace."""
        mean, dev = self.poller.pacing.model.service_s(watch.endpoint, watch.units)
        ahead = watch.position or 0
        expected = (ahead / max(self.poller.pacing.slots, 1) + 1) * mean + 3 * dev
        patience = expected * self.lateness + self.grace_s
        return min(patience, 3600.0) if math.isfinite(patience) else 3600.0

    @staticmethod
    def _from_webhook(slot: _Slot) -> Finished:
        return WebhookIn(ok=bool(slot.ok), payload=slot.payload)
