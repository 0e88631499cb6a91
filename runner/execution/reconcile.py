"""Settle a submit of unknown outcome from fal's request history, and recover lost results.

fal has no idempotency key: when a submit's answer is lost, only fal's own record of the
requests it received says whether it was accepted. Each intent records the sha256 of the
canonical JSON actually sent (``payload_sha256``); a history item whose ``json_input`` has
the same fingerprint, on the same endpoint, inside the intent's window, is that request.

    settle_from(items, intent, now)   pure: Adopt | Absent | None (not yet sure)
    Reconciler.settle(intent)         query, wait out the settle delay if needed, decide
    Reconciler.recover(...)           an ended request's output, from the history

The settle delay (``--reconcile-after``) and the clock margin are configuration: fal does
not document how soon an accepted request is listed, nor how its ``sent_at`` relates to our
clock (``shared/spec/fal-platform.md``). A history that cannot be read is said once; the
caller then falls back to resubmitting and records a possible duplicate.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from runner.errors import PlatformUnavailableError, ProtocolError
from runner.fal.history import HistoryClient, HistoryItem
from runner.ledger.schema import payload_fingerprint

# How far around an intent's own times a matching request may have been stamped: our clock
# against fal's, plus a submit's retries (the window's cost is only more pages to read).
CLOCK_MARGIN_S = 120.0


@dataclass(frozen=True, slots=True)
class Intent:
    """What the ledger knows of a submit of unknown outcome."""

    endpoint: str
    first_at: datetime  # no earlier than the intent was recorded
    last_at: datetime  # no earlier than the POST's outcome became unknown
    payload_sha256: str
    # Requests this job already followed (earlier attempts of the same payload): a retry
    # sends the same JSON, so fal's history lists them too, and they are not this submit.
    followed: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Adopt:
    """The history has the request: follow it. Other matches were billed as well."""

    item: HistoryItem
    duplicates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Absent:
    """Past the settle delay and not in the history: it was never accepted."""


@dataclass(frozen=True, slots=True)
class Unavailable:
    reason: str


Settlement = Adopt | Absent | Unavailable


def fingerprint_of(json_input: Any) -> str | None:
    """The canonical fingerprint of a history item's input (None: no payload kept)."""
    if json_input is None:
        return None
    try:
        return payload_fingerprint(json_input)
    except (TypeError, ValueError):
        return None


def matches(items: Sequence[HistoryItem], payload_sha256: str) -> list[HistoryItem]:
    """The items whose input is the payload, earliest first. Pure."""
    found = [i for i in items if fingerprint_of(i.json_input) == payload_sha256]
    return sorted(found, key=lambda i: (i.sent_at is None, i.sent_at or datetime.min, i.request_id))


def settle_from(
    items: Sequence[HistoryItem], intent: Intent, now: datetime, settle_s: float
) -> Adopt | Absent | None:
    """Adopt the earliest match (the others are billed duplicates); Absent once the settle
    delay has passed with no match; None while a match may still appear. Pure."""
    found = [
        i for i in matches(items, intent.payload_sha256) if i.request_id not in intent.followed
    ]
    if found:
        return Adopt(found[0], tuple(i.request_id for i in found[1:]))
    if now >= intent.last_at + timedelta(seconds=settle_s):
        return Absent()
    return None


class Reconciler:
    """Settles unknown outcomes for one run; says once when the history cannot be read."""

    def __init__(
        self,
        history: HistoryClient | None,
        *,
        settle_s: float,
        now: Callable[[], datetime],
        sleep: Callable[[float], Awaitable[None]],
        say: Callable[[str], None] = lambda _message: None,
        margin_s: float = CLOCK_MARGIN_S,
    ) -> None:
        self.history = history
        self.settle_s = settle_s
        self.now = now
        self.sleep = sleep
        self.say = say
        self.margin = timedelta(seconds=margin_s)
        self.unavailable: str | None = None if history else "no Platform API URL"
        self.adopted = 0
        self.absent = 0
        self.duplicates_found = 0

    def _give_up(self, exc: Exception) -> Unavailable:
        if self.unavailable is None:
            self.unavailable = str(exc)[:300]
            self.say(
                f"fal's request history cannot be read ({self.unavailable}): unknown outcomes "
                "are resubmitted and recorded as possible duplicate spend"
            )
        return Unavailable(self.unavailable)

    async def settle(self, intent: Intent) -> Settlement:
        """Look for the request; wait out the settle delay when it is not listed yet."""
        while True:
            if self.unavailable is not None or self.history is None:
                return Unavailable(self.unavailable or "no history")
            now = self.now()
            try:
                items = await self.history.requests(
                    intent.endpoint,
                    start=intent.first_at - self.margin,
                    end=now + self.margin,
                    payloads=True,
                )
            except (PlatformUnavailableError, ProtocolError) as exc:
                return self._give_up(exc)
            settled = settle_from(items, intent, now, self.settle_s)
            if isinstance(settled, Adopt):
                self.adopted += 1
                self.duplicates_found += len(settled.duplicates)
                return settled
            if isinstance(settled, Absent):
                self.absent += 1
                return settled
            due = intent.last_at + timedelta(seconds=self.settle_s) - self.now()
            await self.sleep(max(due.total_seconds(), 0.0) + 0.001)

    async def recover(
        self, endpoint: str, request_id: str, sent_after: datetime | None
    ) -> HistoryItem | None:
        """The history's record of an ended request, with its output (success or error);
        None when the history has none."""
        if self.history is None or self.unavailable is not None:
            return None
        try:
            item = await self.history.request(endpoint, request_id, sent_after=sent_after)
        except (PlatformUnavailableError, ProtocolError) as exc:
            self._give_up(exc)
            return None
        if item is None or not item.ended or item.status_code is None:
            return None
        if item.json_output is None:
            return None
        return item


def describe(settled: Settlement, *, resubmit: bool = True) -> str:
    """One line for a log; ``resubmit``: an absent request is sent again (else left)."""
    if isinstance(settled, Adopt):
        extra = f"; {len(settled.duplicates)} duplicates billed" if settled.duplicates else ""
        return f"found in fal's history as {settled.item.request_id}{extra}"
    if isinstance(settled, Absent):
        return "not in fal's history: never accepted" + (", resubmitted" if resubmit else "")
    return f"history unavailable: {settled.reason}"
