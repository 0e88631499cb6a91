"""Accounting for tests and benchmarks: what the emulator saw and what fal would bill.

- submits per canonical input (sha256 of the endpoint and the sorted-keys JSON
  body), so a test can tell a duplicate submission from two distinct jobs;
- HTTP calls by route kind;
- busy time of the concurrency slots and the makespan (first submit to last
  completion), both in clock seconds and in emulated seconds;
- billed megapixels and dollars per endpoint, via :func:`runner.endpoints.cost.billed_cost`
  (only successful outputs are billed, as fal bills).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from runner.endpoints import cost


def canonical_input(endpoint: str, body: Any) -> str:
    """Stable id of one submitted input: sha256 over the endpoint and sorted-keys JSON."""
    return _input_digest(endpoint, body).hex()


def _input_digest(endpoint: str, body: Any) -> bytes:
    text = json.dumps(
        {"endpoint": endpoint, "body": body}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(text.encode()).digest()


@dataclass(slots=True)
class _Billing:
    images: int = 0
    megapixels: int = 0
    usd: Decimal = Decimal(0)
    unpriced: int = 0  # billed outputs whose price is unknown


@dataclass
class Stats:
    """Mutable counters owned by one emulator."""

    prices: cost.PriceTable
    calls: Counter[str] = field(default_factory=Counter)
    # raw sha256 of the canonical input -> accepted count; one entry per distinct input for
    # the emulator's life, so kept as 32 bytes rather than the 64-character hex
    submits: Counter[bytes] = field(default_factory=Counter)
    duplicates: int = 0
    endings: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    billing: dict[str, _Billing] = field(default_factory=dict)
    first_submit_at: float | None = None
    last_finish_at: float | None = None
    # Accepted and not yet ended (queued or running), now and at its highest: what a
    # client's in-flight window is checked against.
    outstanding: int = 0
    peak_outstanding: int = 0

    def call(self, kind: str) -> None:
        self.calls[kind] += 1

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1

    def accepted(self, endpoint: str, body: Any, at: float) -> None:
        digest = _input_digest(endpoint, body)
        if digest in self.submits:
            self.duplicates += 1
        self.submits[digest] += 1
        self.outstanding += 1
        self.peak_outstanding = max(self.peak_outstanding, self.outstanding)
        if self.first_submit_at is None:
            self.first_submit_at = at

    def ended(self, ending: str, at: float) -> None:
        self.endings[ending] += 1
        self.outstanding -= 1
        self.last_finish_at = at if self.last_finish_at is None else max(self.last_finish_at, at)

    def bill(
        self,
        endpoint: str,
        outputs: Sequence[tuple[int, int]],
        *,
        input_sizes: Sequence[tuple[int, int]] = (),
    ) -> None:
        entry = self.billing.setdefault(endpoint, _Billing())
        entry.images += len(outputs)
        entry.megapixels += sum(cost.megapixels(w, h) for w, h in outputs)
        usd = cost.billed_cost(endpoint, outputs, self.prices, input_sizes=input_sizes)
        if usd is None:
            entry.unpriced += len(outputs)
        else:
            entry.usd += usd

    def snapshot(
        self, *, busy_s: float, concurrency: int, time_scale: float, queue: Mapping[str, int]
    ) -> dict[str, Any]:
        """The JSON answered by ``GET /_emulator/stats``. Money is rendered as strings."""
        makespan_s = 0.0
        if self.first_submit_at is not None and self.last_finish_at is not None:
            makespan_s = max(0.0, self.last_finish_at - self.first_submit_at)
        capacity_s = makespan_s * concurrency
        return {
            "calls": dict(self.calls),
            "submits": {
                "accepted": len(self.submits) + self.duplicates,
                "distinct_inputs": len(self.submits),
                "duplicates": self.duplicates,
                "outstanding": self.outstanding,
                "peak_outstanding": self.peak_outstanding,
                "by_input": {digest.hex(): n for digest, n in self.submits.items()},
            },
            "jobs": {**queue, "endings": dict(self.endings)},
            "faults": dict(self.faults),
            "slots": {
                "concurrency": concurrency,
                "busy_s": busy_s,
                "makespan_s": makespan_s,
                "busy_emulated_s": busy_s / time_scale,
                "makespan_emulated_s": makespan_s / time_scale,
                "utilization": busy_s / capacity_s if capacity_s > 0 else 0.0,
            },
            "billing": {
                endpoint: {
                    "images": b.images,
                    "megapixels": b.megapixels,
                    "usd": str(b.usd),
                    "unpriced_images": b.unpriced,
                }
                for endpoint, b in sorted(self.billing.items())
            },
            "billed_usd": str(sum((b.usd for b in self.billing.values()), Decimal(0))),
        }
