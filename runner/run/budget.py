"""The spend meter behind ``--max-cost``: committed spend never exceeds the cap.

Pure bookkeeping in ``Decimal``; the engine calls it from one task at a time (admission is
serialised), so it needs no lock.

Every admitted job *reserves* its estimate. When it ends, the reservation is released and
what it actually cost is *settled*: the billed cost from its outputs when known, nothing for
a failure fal does not bill (5xx), and the estimate when the outcome is unknown (the safe
assumption for a cap).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

ZERO = Decimal(0)


@dataclass(slots=True)
class Budget:
    cap_usd: Decimal | None
    spent_usd: Decimal = ZERO
    reserved_usd: Decimal = ZERO
    refused: int = 0
    _blocked_reason: str | None = field(default=None, repr=False)

    @property
    def committed_usd(self) -> Decimal:
        return self.spent_usd + self.reserved_usd

    @property
    def exhausted(self) -> bool:
        return self._blocked_reason is not None

    @property
    def reason(self) -> str | None:
        return self._blocked_reason

    def admit(self, estimate_usd: Decimal | None) -> bool:
        """Reserve a job's estimate if it fits under the cap; once refused, refuse all after."""
        if self.cap_usd is None:
            self.reserved_usd += estimate_usd or ZERO
            return True
        if self._blocked_reason is not None:
            self.refused += 1
            return False
        if estimate_usd is None:
            # A job of unknown cost could break a hard cap: do not guess.
            self._blocked_reason = "a job of unknown cost cannot be admitted under --max-cost"
        elif self.committed_usd + estimate_usd > self.cap_usd:
            self._blocked_reason = (
                f"the next job (${estimate_usd}) would take committed spend "
                f"${self.committed_usd} past --max-cost ${self.cap_usd}"
            )
        else:
            self.reserved_usd += estimate_usd
            return True
        self.refused += 1
        return False

    def reserve_committed(self, estimate_usd: Decimal | None) -> None:
        """A job already submitted in an earlier run: its spend is committed, cap or not."""
        self.reserved_usd += estimate_usd or ZERO

    def settle(self, estimate_usd: Decimal | None, actual_usd: Decimal | None) -> None:
        """A job ended: release its reservation and record what it cost."""
        self.reserved_usd -= estimate_usd or ZERO
        self.spent_usd += actual_usd or ZERO

    def add_prior(self, spent_usd: Decimal) -> None:
        """Spend recorded by earlier runs of the same run directory."""
        self.spent_usd += spent_usd
