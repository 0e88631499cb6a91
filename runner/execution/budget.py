"""The spend meter behind ``--max-cost`` and ``--max-total-cost``.

Pure bookkeeping in ``Decimal``; the engine calls it from one task at a time (admission is
serialised), so it needs no lock.

Two caps, either, both or neither:

- ``--max-cost`` (``cap_usd``) caps what *this invocation* commits: the reservations of the
  jobs it submits and what they settle at. Spend of earlier runs and jobs re-attached from
  them (submitted, and paid for, by an earlier invocation) do not count, so a nightly job
  that reuses its run directory gets the same allowance every night.
- ``--max-total-cost`` (``total_cap_usd``) caps the run directory's total: spend recorded by
  earlier runs plus everything committed now, re-attached jobs included.

A job is admitted only if it fits under every cap that is set; once one is refused, every
later one is too, so a cheaper job never jumps the queue.

Every admitted job *reserves* its estimate. When it ends, the reservation is released and
what it actually cost is *settled*: the billed cost from its outputs when known, nothing for
a failure fal does not bill (5xx), and the estimate when the outcome is unknown (the safe
assumption for a cap).

A run's budget may be shared by several shards, in one process or in many (the account
gate's budget: :mod:`runner.execution.spend`). :class:`SpendBook` keeps one :class:`Share` per
run of a shard (its ledger's earlier spend, the jobs it admitted, the jobs it re-attached)
and checks the caps against their sums:

- ``--max-cost`` against the new commitments of every share, a share whose worker died
  included: its reservations count as spent, since its jobs may have been submitted;
- ``--max-total-cost`` against the latest share of each shard: a later run of a shard read
  its ledger (earlier spend, jobs to re-attach), which settles what a dead share reserved.
  A shard that has not run yet counts with its ledger's spend (:meth:`SpendBook.seed`).

:class:`Budget` is one share in a book of its own, with a synchronous ``admit``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol

from runner.endpoints.money import format_usd

ZERO = Decimal(0)


@dataclass(slots=True)
class Meter:
    """Spend of one kind of job: settled, and reserved by jobs still running."""

    spent_usd: Decimal = ZERO
    reserved_usd: Decimal = ZERO

    @property
    def committed_usd(self) -> Decimal:
        return self.spent_usd + self.reserved_usd

    def settle(self, estimate_usd: Decimal | None, actual_usd: Decimal | None) -> None:
        self.reserved_usd -= estimate_usd or ZERO
        self.spent_usd += actual_usd or ZERO


@dataclass(frozen=True, slots=True)
class Caps:
    """``--max-cost`` (``cap_usd``) and ``--max-total-cost`` (``total_cap_usd``), either or both."""

    cap_usd: Decimal | None = None
    total_cap_usd: Decimal | None = None

    @property
    def any(self) -> bool:
        return self.cap_usd is not None or self.total_cap_usd is not None


@dataclass(slots=True)
class Share:
    """One run of one shard (or of an unsharded run): its part of the budget."""

    shard: int | None = None
    prior_usd: Decimal = ZERO  # spent by earlier runs, as its ledger says
    new: Meter = field(default_factory=Meter)  # jobs it submits
    reattached: Meter = field(default_factory=Meter)  # submitted by earlier runs
    superseded: bool = False  # a later run of its shard read the ledger it wrote

    @property
    def committed_usd(self) -> Decimal:
        return self.prior_usd + self.new.committed_usd + self.reattached.committed_usd


@dataclass(slots=True)
class SpendBook:
    """Every share of one run's budget, and whether admission is closed. Pure."""

    shares: dict[str, Share] = field(default_factory=dict)
    blocked: str | None = None  # once one job is refused, every later one is too

    def _live(self) -> list[Share]:
        return [s for s in self.shares.values() if not s.superseded]

    @property
    def run_committed_usd(self) -> Decimal:
        """What this invocation committed: the figure ``--max-cost`` caps."""
        return sum((s.new.committed_usd for s in self.shares.values()), ZERO)

    @property
    def committed_usd(self) -> Decimal:
        """Everything committed in the run directory: the figure ``--max-total-cost`` caps."""
        return sum((s.committed_usd for s in self._live()), ZERO)

    @property
    def spent_usd(self) -> Decimal:
        return sum((s.prior_usd + s.new.spent_usd + s.reattached.spent_usd
                    for s in self._live()), ZERO)  # fmt: skip

    @property
    def reserved_usd(self) -> Decimal:
        return sum((s.new.reserved_usd + s.reattached.reserved_usd for s in self._live()), ZERO)

    def join(self, member: str, shard: int | None, prior_usd: Decimal) -> None:
        """``member`` runs ``shard`` and read its ledger: earlier runs of the shard spent
        ``prior_usd``; the shard's earlier shares are settled by that reading."""
        for name, share in self.shares.items():
            if shard is not None and share.shard == shard and name != member:
                share.superseded = True
        share = self.shares.setdefault(member, Share())
        share.shard = shard
        share.prior_usd += prior_usd

    def seed(self, priors: dict[int, Decimal]) -> None:
        """What each shard's ledger says earlier runs spent, before its run joins (so a
        total cap counts the shards not running yet); a shard already in the book is left."""
        known = {s.shard for s in self.shares.values()}
        for shard, prior_usd in priors.items():
            if shard not in known:
                self.shares[f"ledger-{shard}"] = Share(shard, prior_usd)

    def admit(self, member: str, estimate_usd: Decimal | None, caps: Caps) -> str | None:
        """Reserve a new job's estimate for ``member`` if it fits; else why not."""
        share = self.shares.setdefault(member, Share())
        if not caps.any:
            share.new.reserved_usd += estimate_usd or ZERO
            return None
        if self.blocked is None:
            self.blocked = refusal(caps, self, estimate_usd)
        if self.blocked is not None:
            return self.blocked
        assert estimate_usd is not None  # refusal() refuses an unknown cost under a cap
        share.new.reserved_usd += estimate_usd
        return None

    def reserve_committed(self, member: str, estimate_usd: Decimal | None) -> None:
        """A job submitted by an earlier run, re-attached: committed whatever the caps say."""
        self.shares.setdefault(member, Share()).reattached.reserved_usd += estimate_usd or ZERO

    def settle(
        self, member: str, estimate_usd: Decimal | None, actual_usd: Decimal | None,
        *, reattached: bool = False,
    ) -> None:  # fmt: skip
        share = self.shares.setdefault(member, Share())
        (share.reattached if reattached else share.new).settle(estimate_usd, actual_usd)

    def to_json(self) -> dict[str, Any]:
        """The book as JSON (money as exact strings)."""
        return {
            "blocked": self.blocked,
            "shares": {
                name: [s.shard, str(s.prior_usd), str(s.new.spent_usd), str(s.new.reserved_usd),
                       str(s.reattached.spent_usd), str(s.reattached.reserved_usd), s.superseded]
                for name, s in self.shares.items()
            },
        }  # fmt: skip

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> SpendBook:
        shares = {}
        for name, (shard, prior, ns, nr, rs, rr, superseded) in doc["shares"].items():
            shares[name] = Share(
                shard, Decimal(prior), Meter(Decimal(ns), Decimal(nr)),
                Meter(Decimal(rs), Decimal(rr)), bool(superseded),
            )  # fmt: skip
        return cls(shares, doc.get("blocked"))


def refusal(caps: Caps, book: SpendBook, estimate_usd: Decimal | None) -> str | None:
    """Why a job of this estimate does not fit under ``caps``, or None when it does."""
    if estimate_usd is None:
        # A job of unknown cost could break a hard cap: do not guess.
        named = (("--max-cost", caps.cap_usd), ("--max-total-cost", caps.total_cap_usd))
        flags = [f for f, cap in named if cap is not None]
        return f"a job of unknown cost cannot be admitted under {' and '.join(flags)}"
    job = format_usd(estimate_usd)
    run = book.run_committed_usd
    if caps.cap_usd is not None and run + estimate_usd > caps.cap_usd:
        return (
            f"the next job ({job}) would exceed --max-cost {format_usd(caps.cap_usd)} "
            f"(committed in this run: {format_usd(run)})"
        )
    total = book.committed_usd
    if caps.total_cap_usd is not None and total + estimate_usd > caps.total_cap_usd:
        return (
            f"the next job ({job}) would exceed --max-total-cost {format_usd(caps.total_cap_usd)} "
            f"(committed in total, earlier runs included: {format_usd(total)})"
        )
    return None


class Spend(Protocol):
    """What a run admits and settles through: a :class:`runner.execution.spend.PooledSpend`."""

    @property
    def exhausted(self) -> bool: ...

    @property
    def reason(self) -> str | None: ...

    async def admit(self, estimate_usd: Decimal | None) -> bool: ...

    def reserve_committed(self, estimate_usd: Decimal | None) -> None: ...

    def settle(
        self, estimate_usd: Decimal | None, actual_usd: Decimal | None, *, reattached: bool = False
    ) -> None: ...

    def add_prior(self, spent_usd: Decimal) -> None: ...


_RUN = "run"


class Budget:
    """Admission against ``--max-cost`` and ``--max-total-cost``: one share, synchronous."""

    def __init__(self, cap_usd: Decimal | None, total_cap_usd: Decimal | None = None) -> None:
        self.caps = Caps(cap_usd, total_cap_usd)
        self.book = SpendBook({_RUN: Share()})
        self.refused = 0

    @property
    def _share(self) -> Share:
        return self.book.shares[_RUN]

    @property
    def new(self) -> Meter:
        return self._share.new

    @property
    def reattached(self) -> Meter:
        return self._share.reattached

    @property
    def run_committed_usd(self) -> Decimal:
        return self.book.run_committed_usd

    @property
    def committed_usd(self) -> Decimal:
        return self.book.committed_usd

    @property
    def spent_usd(self) -> Decimal:
        return self.book.spent_usd

    @property
    def reserved_usd(self) -> Decimal:
        return self.book.reserved_usd

    @property
    def exhausted(self) -> bool:
        return self.book.blocked is not None

    @property
    def reason(self) -> str | None:
        return self.book.blocked

    def admit(self, estimate_usd: Decimal | None) -> bool:
        """Reserve a new job's estimate if it fits under every cap; once refused, refuse all."""
        if self.book.admit(_RUN, estimate_usd, self.caps) is None:
            return True
        self.refused += 1
        return False

    def reserve_committed(self, estimate_usd: Decimal | None) -> None:
        """A job submitted by an earlier run, re-attached: counts toward ``--max-total-cost``
        but not ``--max-cost``; settle it with ``reattached=True``."""
        self.book.reserve_committed(_RUN, estimate_usd)

    def settle(
        self, estimate_usd: Decimal | None, actual_usd: Decimal | None, *, reattached: bool = False
    ) -> None:
        """A job ended: release its reservation and record what it cost."""
        self.book.settle(_RUN, estimate_usd, actual_usd, reattached=reattached)

    def add_prior(self, spent_usd: Decimal) -> None:
        """Spend recorded by earlier runs of the same run directory."""
        self._share.prior_usd += spent_usd
