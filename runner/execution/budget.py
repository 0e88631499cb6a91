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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

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


@dataclass(slots=True)
class Budget:
    """Admission against ``--max-cost`` (``cap_usd``) and ``--max-total-cost``."""

    cap_usd: Decimal | None
    total_cap_usd: Decimal | None = None
    prior_usd: Decimal = field(default=ZERO, init=False)  # spent by earlier runs
    new: Meter = field(default_factory=Meter, init=False)  # jobs this run submits
    reattached: Meter = field(default_factory=Meter, init=False)  # submitted by earlier runs
    refused: int = field(default=0, init=False)
    _blocked_reason: str | None = field(default=None, init=False, repr=False)

    @property
    def run_committed_usd(self) -> Decimal:
        """What this invocation committed itself: the figure ``--max-cost`` caps."""
        return self.new.committed_usd

    @property
    def committed_usd(self) -> Decimal:
        """Everything committed in the run directory: the figure ``--max-total-cost`` caps."""
        return self.prior_usd + self.new.committed_usd + self.reattached.committed_usd

    @property
    def spent_usd(self) -> Decimal:
        return self.prior_usd + self.new.spent_usd + self.reattached.spent_usd

    @property
    def reserved_usd(self) -> Decimal:
        return self.new.reserved_usd + self.reattached.reserved_usd

    @property
    def exhausted(self) -> bool:
        return self._blocked_reason is not None

    @property
    def reason(self) -> str | None:
        return self._blocked_reason

    def admit(self, estimate_usd: Decimal | None) -> bool:
        """Reserve a new job's estimate if it fits under every cap; once refused, refuse all."""
        if self.cap_usd is None and self.total_cap_usd is None:
            self.new.reserved_usd += estimate_usd or ZERO
            return True
        if self._blocked_reason is None:
            self._blocked_reason = self._refusal(estimate_usd)
        if self._blocked_reason is not None:
            self.refused += 1
            return False
        assert estimate_usd is not None  # _refusal refuses an unknown cost under a cap
        self.new.reserved_usd += estimate_usd
        return True

    def _refusal(self, estimate_usd: Decimal | None) -> str | None:
        """Why a job of this estimate does not fit, or None when it does."""
        if estimate_usd is None:
            # A job of unknown cost could break a hard cap: do not guess.
            flags = [f for f, cap in self._caps() if cap is not None]
            return f"a job of unknown cost cannot be admitted under {' and '.join(flags)}"
        job = format_usd(estimate_usd)
        if self.cap_usd is not None and self.run_committed_usd + estimate_usd > self.cap_usd:
            return (
                f"the next job ({job}) would exceed --max-cost {format_usd(self.cap_usd)} "
                f"(committed in this run: {format_usd(self.run_committed_usd)})"
            )
        total_cap = self.total_cap_usd
        if total_cap is not None and self.committed_usd + estimate_usd > total_cap:
            return (
                f"the next job ({job}) would exceed --max-total-cost {format_usd(total_cap)} "
                f"(committed in total, earlier runs included: {format_usd(self.committed_usd)})"
            )
        return None

    def _caps(self) -> tuple[tuple[str, Decimal | None], ...]:
        return (("--max-cost", self.cap_usd), ("--max-total-cost", self.total_cap_usd))

    def reserve_committed(self, estimate_usd: Decimal | None) -> None:
        """A job submitted by an earlier run, re-attached: committed whatever the caps say.

        It counts toward ``--max-total-cost`` but not toward ``--max-cost``; settle it with
        ``reattached=True``.
        """
        self.reattached.reserved_usd += estimate_usd or ZERO

    def settle(
        self, estimate_usd: Decimal | None, actual_usd: Decimal | None, *, reattached: bool = False
    ) -> None:
        """A job ended: release its reservation and record what it cost.

        ``reattached`` says the reservation came from :meth:`reserve_committed`, not :meth:`admit`.
        """
        (self.reattached if reattached else self.new).settle(estimate_usd, actual_usd)

    def add_prior(self, spent_usd: Decimal) -> None:
        """Spend recorded by earlier runs of the same run directory."""
        self.prior_usd += spent_usd
