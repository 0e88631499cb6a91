"""The actors of ``runner ray``, and their faces inside a shard's worker.

    SlotGate       one per key, ``runner-gate-<fingerprint>``: the key's in-flight slots as
                   leases with a deadline, and the key's AIMD level
    SpendActor     one per run: the run's budget book (runner.execution.budget.SpendBook)
    ProgressBoard  one per run: each shard's latest tally and its messages not yet shown

    ActorSlots     runner.execution.gate.Slots over a SlotGate
    ActorLevel     runner.execution.ratelimit.Level over a SlotGate (the level cached,
                   refreshed twice a second)
    ActorPool      runner.execution.spend.Pool over a SpendActor: ``admit`` waits for the
                   actor's answer; settlements are sent without waiting (an actor runs one
                   caller's calls in the order they were made)

A shard's worker that dies keeps its budget reservations in the book, counted as spent,
until the shard's next worker reads the shard's ledger; its slot leases expire after their
TTL unless that next worker adopts them first.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import anyio
import ray

from runner.execution.budget import Caps, SpendBook
from runner.execution.progress import Tally
from runner.execution.ratelimit import AimdState, after_success, after_throttle
from runner.execution.sharedrate import LEVEL_AIMD

NAMESPACE = "runner"
_CHECK_EVERY = 25  # refused acquires between asking whether every slot holds a lost job
Message = tuple[Any, ...]  # ("say", text) or ("failure", reason, row id or None, message)


@ray.remote(num_cpus=0)
class SlotGate:
    """A key's in-flight slots for every worker of every machine, and its AIMD level."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.leases: dict[str, tuple[str, float]] = {}  # id -> (holder, expires at)
        self.lost: set[str] = set()  # leases held for jobs their worker lost contact with
        self.peak = 0
        self.aimd = AimdState(rate_per_s=LEVEL_AIMD.max_rate_per_s)
        self.throttles = 0
        self.lowest = self.aimd.rate_per_s  # the lowest level a 429 brought it to

    def _expire(self) -> None:
        now = time.monotonic()
        for lease, (_holder, expires) in list(self.leases.items()):
            if expires < now:
                del self.leases[lease]
                self.lost.discard(lease)

    def acquire(self, holder: str, ttl_s: float) -> str | None:
        self._expire()
        if len(self.leases) >= self.limit:
            return None
        lease = uuid.uuid4().hex
        self.leases[lease] = (holder, time.monotonic() + ttl_s)
        self.peak = max(self.peak, len(self.leases))
        return lease

    def adopt(self, holder: str, ttl_s: float) -> list[str]:
        """The leases ``holder`` (a shard) still holds from a previous worker, renewed (and
        no longer lost: the new worker re-attaches their jobs or sends others)."""
        self.renew(holder, ttl_s)
        adopted = [lease for lease, (h, _e) in self.leases.items() if h == holder]
        self.lost.difference_update(adopted)
        return adopted

    def renew(self, holder: str, ttl_s: float) -> None:
        self._expire()
        deadline = time.monotonic() + ttl_s
        for lease, (h, _e) in self.leases.items():
            if h == holder:
                self.leases[lease] = (h, deadline)

    def release(self, lease: str) -> None:
        self.leases.pop(lease, None)
        self.lost.discard(lease)

    def mark_lost(self, lease: str) -> None:
        if lease in self.leases:
            self.lost.add(lease)

    def all_lost(self) -> bool:
        """Whether every slot is held for a lost job: no worker can take one again."""
        self._expire()
        return len(self.lost) >= self.limit

    def level(self) -> float:
        return self.aimd.rate_per_s

    def throttle(self) -> float:
        self.throttles += 1
        self.aimd = after_throttle(self.aimd, LEVEL_AIMD, now_s=time.monotonic())
        self.lowest = min(self.lowest, self.aimd.rate_per_s)
        return self.aimd.rate_per_s

    def success(self) -> float:
        self.aimd = after_success(self.aimd, LEVEL_AIMD)
        return self.aimd.rate_per_s

    def stats(self) -> dict[str, Any]:
        self._expire()
        return {"limit": self.limit, "held": len(self.leases), "peak": self.peak,
                "level": self.aimd.rate_per_s, "lowest": self.lowest,
                "throttles": self.throttles}  # fmt: skip


@ray.remote(num_cpus=0)
class SpendActor:
    """A run's budget book, for every worker of every machine."""

    def __init__(self) -> None:
        self.book = SpendBook()

    def admit(self, member: str, estimate_usd: Decimal | None, caps: Caps) -> str | None:
        return self.book.admit(member, estimate_usd, caps)

    def join(self, member: str, shard: int | None, prior_usd: Decimal) -> None:
        self.book.join(member, shard, prior_usd)

    def seed(self, priors: dict[int, Decimal]) -> None:
        self.book.seed(priors)

    def reserve_committed(self, member: str, estimate_usd: Decimal | None) -> None:
        self.book.reserve_committed(member, estimate_usd)

    def settle(
        self, member: str, estimate_usd: Decimal | None, actual_usd: Decimal | None,
        reattached: bool,
    ) -> None:  # fmt: skip
        self.book.settle(member, estimate_usd, actual_usd, reattached=reattached)

    def totals(self) -> dict[str, Decimal]:
        b = self.book
        return {"run_committed": b.run_committed_usd, "committed": b.committed_usd,
                "spent": b.spent_usd, "reserved": b.reserved_usd}  # fmt: skip


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Each shard's latest tally, and the messages the driver has not shown yet."""

    def __init__(self) -> None:
        self.tallies: dict[int, Tally] = {}
        self.messages: list[Message] = []

    def update(self, shard: int, tally: Tally, messages: list[Message]) -> None:
        self.tallies[shard] = tally
        self.messages.extend(messages)

    def all(self) -> tuple[list[Tally], list[Message]]:
        messages, self.messages = self.messages, []
        return list(self.tallies.values()), messages


class ActorSlots:
    """:class:`runner.execution.gate.Slots` over a SlotGate actor (polls when all are held)."""

    def __init__(
        self, gate: Any, holder: str, *, ttl_s: float, poll_s: float = 0.02,
        on_all_lost: Callable[[], None] | None = None,
    ) -> None:  # fmt: skip
        self._gate, self._holder, self._ttl_s, self._poll_s = gate, holder, ttl_s, poll_s
        self._held: list[str] = []
        self._spare: list[str] = []  # adopted from this shard's previous worker
        self._lost: set[str] = set()  # held for jobs we lost contact with
        # Told when every slot of the key is held for a lost job (LostSlots.stop_all).
        self.on_all_lost = on_all_lost

    async def start(self) -> None:
        self._spare = await self._gate.adopt.remote(self._holder, self._ttl_s)

    async def acquire(self) -> None:
        if self._spare:
            self._held.append(self._spare.pop())
            return
        tries = 0
        while True:
            lease = await self._gate.acquire.remote(self._holder, self._ttl_s)
            if lease is not None:
                self._held.append(lease)
                return
            tries += 1
            check = self.on_all_lost is not None and tries % _CHECK_EVERY == 0
            if check and await self._gate.all_lost.remote():
                assert self.on_all_lost is not None
                self.on_all_lost()
            await anyio.sleep(self._poll_s)

    def hold_lost(self) -> None:
        """Mark one held lease as held for a job we lost contact with."""
        lease = next(lease for lease in reversed(self._held) if lease not in self._lost)
        self._lost.add(lease)
        self._gate.mark_lost.remote(lease)

    def release(self) -> None:
        """Give back one lease (one not held for a lost job)."""
        unmarked = [i for i, lease in enumerate(self._held) if lease not in self._lost]
        lease = self._held.pop(unmarked[-1] if unmarked else -1)
        self._lost.discard(lease)
        self._gate.release.remote(lease)

    async def renew_forever(self) -> None:
        while True:
            await anyio.sleep(self._ttl_s / 3)
            await self._gate.renew.remote(self._holder, self._ttl_s)

    def close(self) -> None:
        for lease in self._held + self._spare:
            self._gate.release.remote(lease)
        self._held, self._spare, self._lost = [], [], set()


class ActorLevel:
    """:class:`runner.execution.ratelimit.Level` over a SlotGate actor.

    A 429 lowers the cached level at once (this worker slows without waiting for the actor)
    and is sent to the actor, which lowers it for every worker; :meth:`refresh_forever`
    brings the actor's level back twice a second.
    """

    def __init__(self, gate: Any, *, refresh_s: float = 0.5) -> None:
        self._gate = gate
        self._refresh_s = refresh_s
        self._state = AimdState(rate_per_s=LEVEL_AIMD.max_rate_per_s)

    def level(self) -> float:
        return self._state.rate_per_s

    def throttle(self) -> None:
        self._state = after_throttle(self._state, LEVEL_AIMD, now_s=time.monotonic())
        self._gate.throttle.remote()

    def success(self) -> None:
        if self._state.rate_per_s < LEVEL_AIMD.max_rate_per_s:
            self._gate.success.remote()

    async def refresh_forever(self) -> None:
        while True:
            level = await self._gate.level.remote()
            self._state = AimdState(level, self._state.last_decrease_s)
            await anyio.sleep(self._refresh_s)


class ActorPool:
    """:class:`runner.execution.spend.Pool` over a SpendActor."""

    def __init__(self, actor: Any) -> None:
        self._actor = actor

    async def admit(self, member: str, estimate_usd: Decimal | None, caps: Caps) -> str | None:
        reason: str | None = await self._actor.admit.remote(member, estimate_usd, caps)
        return reason

    def join(self, member: str, shard: int | None, prior_usd: Decimal) -> None:
        self._actor.join.remote(member, shard, prior_usd)

    def seed(self, priors: dict[int, Decimal]) -> None:
        self._actor.seed.remote(priors)

    def reserve_committed(self, member: str, estimate_usd: Decimal | None) -> None:
        self._actor.reserve_committed.remote(member, estimate_usd)

    def settle(
        self, member: str, estimate_usd: Decimal | None, actual_usd: Decimal | None,
        reattached: bool,
    ) -> None:  # fmt: skip
        self._actor.settle.remote(member, estimate_usd, actual_usd, reattached)
