"""A run's budget shared by its shards: in this process, across processes, across machines.

Every run of a shard admits and settles through its own :class:`PooledSpend`, a handle on
the run's one :class:`Pool`, which keeps a :class:`runner.execution.budget.SpendBook`:

- :class:`LocalPool`: in this process (an unsharded run, or the shards of one process);
- :class:`runner.execution.spendfile.FilePool`: a book in a file under a lock, in the gate
  directory, for the processes of one machine (``--gate-dir``);
- ``runner.scale.ray_driver.ActorPool``: a book in a named Ray actor, for ``runner ray``.

The money path is the same in all three: a job's estimate is reserved before it is
submitted, its cost settled when it ends, and a job is admitted only if it fits under the
caps with every share's commitments counted. A share whose process died keeps its
reservations (they may have been submitted) until the next run of its shard reads the
shard's ledger.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Protocol

from runner.execution.budget import Caps, SpendBook


class Pool(Protocol):
    """Where a run's shares are kept. Only ``admit`` waits for an answer."""

    async def admit(self, member: str, estimate_usd: Decimal | None, caps: Caps) -> str | None:
        """Reserve for ``member`` if the job fits; else the reason it does not."""
        ...

    def join(self, member: str, shard: int | None, prior_usd: Decimal) -> None: ...

    def seed(self, priors: dict[int, Decimal]) -> None: ...

    def reserve_committed(self, member: str, estimate_usd: Decimal | None) -> None: ...

    def settle(
        self, member: str, estimate_usd: Decimal | None, actual_usd: Decimal | None,
        reattached: bool,
    ) -> None: ...  # fmt: skip


class LocalPool:
    """The shares of the runs in this process."""

    def __init__(self) -> None:
        self.book = SpendBook()

    async def admit(self, member: str, estimate_usd: Decimal | None, caps: Caps) -> str | None:
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


class PooledSpend:
    """One shard run's handle on its run's budget (:class:`runner.execution.budget.Spend`)."""

    def __init__(self, pool: Pool, caps: Caps, *, shard: int | None = None) -> None:
        self.pool = pool
        self.caps = caps
        self.shard = shard
        self.member = f"{'run' if shard is None else f'shard-{shard}'}-{uuid.uuid4().hex[:12]}"
        self.refused = 0
        self._reason: str | None = None

    @property
    def exhausted(self) -> bool:
        return self._reason is not None

    @property
    def reason(self) -> str | None:
        return self._reason

    async def admit(self, estimate_usd: Decimal | None) -> bool:
        """Reserve a new job's estimate if it fits under every cap, counting every share."""
        reason = await self.pool.admit(self.member, estimate_usd, self.caps)
        if reason is None:
            return True
        self._reason = reason
        self.refused += 1
        return False

    def reserve_committed(self, estimate_usd: Decimal | None) -> None:
        self.pool.reserve_committed(self.member, estimate_usd)

    def settle(
        self, estimate_usd: Decimal | None, actual_usd: Decimal | None, *, reattached: bool = False
    ) -> None:
        self.pool.settle(self.member, estimate_usd, actual_usd, reattached)

    def add_prior(self, spent_usd: Decimal) -> None:
        """This shard's ledger says earlier runs spent ``spent_usd``: join the pool."""
        self.pool.join(self.member, self.shard, spent_usd)


def local_spend(cap_usd: Decimal | None, total_cap_usd: Decimal | None) -> PooledSpend:
    """An unsharded run's budget: a pool of its own."""
    return PooledSpend(LocalPool(), Caps(cap_usd, total_cap_usd))
