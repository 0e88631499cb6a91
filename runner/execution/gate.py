"""The account gate: admission for one fal key, shared by every shard that uses it.

A key's admission is three things, and all three sit behind one :class:`AccountGate`:

- the **slots**: how many of the key's requests may be submitted and unfinished at once
  (the in-flight window, :attr:`runner.config.RunConfig.in_flight_limit`);
- the **submit rate** with its AIMD backoff (:class:`runner.execution.ratelimit.AdaptiveRate`),
  so a 429 seen by one shard slows every shard on that key;
- the **budget reservation** (:class:`runner.execution.budget.Budget`);

plus the learned service-time model (:class:`runner.execution.completion.Pacing`) and the
account's price table (:class:`runner.execution.prices.SharedPrices`), which are facts
about the account, not about one shard.

Inside one process the gate is this object, handed to every shard's engine. Across
processes on one machine its slots are file-lock leases (:mod:`runner.execution.lease`);
across machines they are a named Ray actor (:mod:`runner.scale.ray_driver`); anything with
``acquire``/``release`` will do. Across processes and machines the rate's AIMD level is
shared the same way (:class:`runner.execution.ratelimit.Level`: a file in the gate directory,
or the gate actor), and the budget is one pool per run (:mod:`runner.execution.spend`): each
shard's run gets its own handle on it as :attr:`AccountGate.budget`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from runner.execution.budget import Spend
from runner.execution.completion import Pacing
from runner.execution.outcome import Reach
from runner.execution.prices import SharedPrices
from runner.execution.ratelimit import AdaptiveRate, Level, submit_rate


class LostSlots:
    """The key's slots held by jobs we lost contact with, counted over every shard on the key.

    Such a slot stays taken until its shard's run ends, so lost contact never widens the
    window. When they fill the key's window no shard on the key can take a slot again: each
    one watching is told to stop admitting (each shard counting only its own would wait for
    a slot forever once the shards' lost jobs together filled the window).
    """

    def __init__(self, limit: int, *, mark: Callable[[], None] | None = None) -> None:
        self.limit = limit
        self.count = 0
        self.mark = mark  # tell the slots shared with other processes (FileSlots.hold_lost)
        self._stops: list[Callable[[str], None]] = []

    @property
    def reason(self) -> str:
        return f"all {self.limit} in-flight slots hold jobs we lost contact with"

    def watch(self, stop: Callable[[str], None]) -> Callable[[], None]:
        """Call ``stop(reason)`` when the window fills (at once if it is full); the result
        stops watching."""
        self._stops.append(stop)
        if self.count >= self.limit:
            stop(self.reason)

        def unwatch() -> None:
            if stop in self._stops:
                self._stops.remove(stop)

        return unwatch

    def add(self) -> None:
        """One more slot held by a lost job."""
        self.count += 1
        if self.mark is not None:
            self.mark()
        if self.count >= self.limit:
            self.stop_all()

    def stop_all(self) -> None:
        """Every slot of the key holds a lost job (counted here, or seen in the slots)."""
        for stop in list(self._stops):
            stop(self.reason)


class Slots(Protocol):
    """A counting semaphore over a key's in-flight slots (anyio.Semaphore is one)."""

    async def acquire(self) -> None: ...

    def release(self) -> None: ...


@dataclass(slots=True)
class AccountGate:
    """Everything that admits a job on one key. ``fingerprint`` names the key, never is it."""

    fingerprint: str
    slots: Slots
    rate: AdaptiveRate
    budget: Spend  # each shard's run gets its own handle on the run's pool
    pacing: Pacing
    limit: int  # how many slots ``slots`` holds
    # The account's price table, asked of fal once for every shard on the key.
    prices: SharedPrices = field(default_factory=SharedPrices)
    # The key's slots its shards' lost jobs hold (None: a count of this gate's own).
    lost: LostSlots | None = None
    # Jobs in a row, over every shard on the key, whose submits never reached fal's queue.
    reach: Reach | None = None

    def __post_init__(self) -> None:
        if self.lost is None:
            self.lost = LostSlots(self.limit)
        if self.reach is None:
            self.reach = Reach(max(self.limit, 4))


def local_gate(
    *,
    fingerprint: str,
    slots: Slots,
    limit: int,
    concurrency: int,
    rate_per_s: float | None,
    budget: Spend,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    level: Level | None = None,
    lost: LostSlots | None = None,
) -> AccountGate:
    """A gate whose rate and pacing live in this process; its slots, and its rate's AIMD
    level, may be shared further."""
    pacing = Pacing(slots=concurrency)
    # --rate as a fixed cap, else a pace that follows the key's slots and observed job times.
    rate = submit_rate(rate_per_s, slots=concurrency, mean_service_s=pacing.model.job_mean_s,
                       clock=clock, sleep=sleep, level=level)  # fmt: skip
    return AccountGate(fingerprint, slots, rate, budget, pacing, limit, lost=lost)
