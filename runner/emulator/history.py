"""The Platform API's request history: every accepted request, kept after the queue forgets it.

fal keeps what it received and answered for each request (payloads 30 days by default) and
lists them with ``GET /v1/models/requests/by-endpoint`` (shared/spec/fal-platform.md).
:class:`RequestHistory` is that record: one small :class:`Entry` per accepted request holding
*references* to the body the queue parsed and to the result body it stored (no copies). Entries
are dropped oldest first, ``retention_s`` (clock seconds) after they were sent or once there are
more than ``max_items``.

Times are whole microseconds since the epoch, exactly what the API renders, so a client that
passes a rendered ``sent_at`` back as ``start`` finds that request (start inclusive, end
exclusive). ``sent_at`` never goes backwards from one entry to the next (a clock that steps
back is read as standing still), which keeps every endpoint's entries sorted by both.

Listing is pure and page-stable. Entries are kept per endpoint in sent order, numbered by a
sequence ``seq``; a :class:`Cursor` names the last key returned and the highest ``seq`` that
existed at the first page, so a request sent mid-listing never enters it, and none repeats or
is skipped. A *shuffled* listing (fault ``history_unordered``) orders by a keyed hash of
``seq`` instead: out of time order across all its pages, yet each entry has one fixed place.
That costs a scan of the window on every page (about 1 us per entry): a fault mode's price
for keeping no listing state on the server. An entry costs about 300 bytes besides the
payloads it shares with the queue.

Outcomes for the ``status`` filter (fal does not document the mapping; this is the emulator's
reading): ``success`` a status code below 400; ``user_error`` a 4xx (a rejected input, a
cancel) or a start deadline the client set (504 with ``X-Fal-Request-Timeout-Type: user``);
``error`` any other 5xx.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import math
from bisect import bisect_left, bisect_right
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, Literal

from runner.emulator.queue import StoredResult

Outcome = Literal["success", "error", "user_error"]
OUTCOMES: frozenset[str] = frozenset({"success", "error", "user_error"})
_MASK64 = (1 << 64) - 1
_SEQ_BITS = 48  # a shuffled key is place << 48 | seq: one int, unique, cheap to compare
_SEQ_MASK = (1 << _SEQ_BITS) - 1
_CURSOR_TAG = "h1"


def to_us(at: float) -> int:
    """Clock seconds as whole microseconds."""
    return round(at * 1_000_000)


def outcome_of(result: StoredResult) -> Outcome:
    if result.status_code < 400:
        return "success"
    if result.status_code < 500 or result.headers.get("X-Fal-Request-Timeout-Type") == "user":
        return "user_error"
    return "error"


@dataclass(eq=False, slots=True)
class Entry:
    """One request as the history keeps it. Times in microseconds; None until it ends."""

    request_id: str
    endpoint_id: str  # one shared string per endpoint
    seq: int
    sent_us: int
    json_input: Any  # the body as received (a reference); None with X-Fal-Store-IO: 0
    store_io: bool = True
    started_us: int | None = None
    ended_us: int | None = None
    status_code: int | None = None
    outcome: Outcome | None = None
    json_output: Any = None  # the stored result body (a reference), once ended


def _place(seed: int, seq: int) -> int:
    """A fixed pseudo-random place for ``seq`` under ``seed``.

    Python's hash of a tuple of ints is not salted per process (only str and bytes are), so
    the order is the same in every run; it is computed in C, which keeps a scan cheap.
    """
    return hash((seed, seq)) & _MASK64


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where a listing stands: its snapshot (``top_seq``), order and last key returned."""

    top_seq: int
    shuffle: int | None = None  # the seed of a shuffled listing
    after: int | None = None  # the key of the last entry returned

    def key(self, entry: Entry) -> int:
        """The entry's place in this listing's order."""
        if self.shuffle is None:
            return entry.seq
        return _place(self.shuffle, entry.seq) << _SEQ_BITS | entry.seq  # as _select inlines it

    def encode(self) -> str:
        shuffle = "" if self.shuffle is None else str(self.shuffle)
        after = "" if self.after is None else str(self.after)
        text = ":".join([_CURSOR_TAG, str(self.top_seq), shuffle, after])
        return base64.urlsafe_b64encode(text.encode()).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, text: str) -> Cursor:
        """The cursor that :meth:`encode` wrote; ValueError for anything else."""
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode("ascii")
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise ValueError("not a cursor") from exc
        parts = raw.split(":")
        if len(parts) != 4 or parts[0] != _CURSOR_TAG:
            raise ValueError("not a cursor")
        _, top, shuffle, after = parts
        if not all(n.isdigit() and n.isascii() for n in (top, shuffle or "0", after or "0")):
            raise ValueError("not a cursor")
        return cls(int(top), int(shuffle) if shuffle else None, int(after) if after else None)


@dataclass(frozen=True, slots=True)
class Query:
    """One listing's filters. Window in microseconds: start inclusive, end exclusive."""

    endpoint_id: str
    start_us: int | None = None
    end_us: int | None = None
    request_id: str | None = None
    status: Outcome | None = None
    limit: int = 50


@dataclass(frozen=True, slots=True)
class Page:
    items: list[Entry]
    next_cursor: Cursor | None
    held_back: int = 0  # entries in the window not listed yet (the listing delay)


@dataclass(slots=True)
class _Index:
    """One endpoint's entries in sent order; those before ``head`` are already dropped."""

    endpoint_id: str
    entries: list[Entry] = field(default_factory=list)
    head: int = 0

    def drop_first(self) -> None:
        self.head += 1
        # Compacting once a fifth is dead costs O(1) per drop amortised, and bounds the shells
        # kept (their payload references are cleared when dropped).
        if self.head > 64 and self.head * 5 > len(self.entries):
            del self.entries[: self.head]
            self.head = 0


class RequestHistory:
    """Every accepted request, oldest first, within retention and ``max_items``."""

    def __init__(self, *, retention_s: float, max_items: int) -> None:
        self.max_items = max_items
        self._retention_us = None if math.isinf(retention_s) else to_us(retention_s)
        self._order: deque[Entry] = deque()
        self._by_id: dict[str, Entry] = {}
        self._by_endpoint: dict[str, _Index] = {}
        self._seq = 0
        self._last_sent_us = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._order)

    def find(self, request_id: str) -> Entry | None:
        return self._by_id.get(request_id)

    def record(
        self, request_id: str, endpoint_id: str, sent_at: float, body: Any, *, store_io: bool
    ) -> Entry:
        """A request the queue accepted at ``sent_at`` (clock seconds)."""
        index = self._by_endpoint.get(endpoint_id)
        if index is None:
            index = self._by_endpoint[endpoint_id] = _Index(endpoint_id)
        self._seq += 1
        self._last_sent_us = max(self._last_sent_us, to_us(sent_at))
        entry = Entry(
            request_id,
            index.endpoint_id,
            self._seq,
            self._last_sent_us,
            body if store_io else None,
            store_io,
        )
        index.entries.append(entry)
        self._order.append(entry)
        self._by_id[request_id] = entry
        while len(self._order) > self.max_items:
            self._drop_oldest()
        return entry

    def ended(
        self, request_id: str, *, started_at: float | None, ended_at: float, result: StoredResult
    ) -> None:
        """The request ended (clock seconds); a request already dropped is ignored."""
        entry = self._by_id.get(request_id)
        if entry is None:
            return
        entry.started_us = None if started_at is None else to_us(started_at)
        entry.ended_us = max(entry.sent_us, to_us(ended_at))
        entry.status_code = result.status_code
        entry.outcome = outcome_of(result)
        entry.json_output = result.body if entry.store_io else None

    def prune(self, now: float) -> None:
        """Drop the entries sent ``retention_s`` or more before ``now``."""
        if self._retention_us is None:
            return
        oldest_kept_us = to_us(now) - self._retention_us
        while self._order and self._order[0].sent_us <= oldest_kept_us:
            self._drop_oldest()

    def _drop_oldest(self) -> None:
        entry = self._order.popleft()
        del self._by_id[entry.request_id]
        index = self._by_endpoint[entry.endpoint_id]
        index.drop_first()
        if index.head >= len(index.entries):
            del self._by_endpoint[entry.endpoint_id]
        entry.json_input = entry.json_output = None
        self.dropped += 1

    def page(
        self,
        query: Query,
        *,
        now: float,
        cursor: Cursor | None = None,
        shuffle: int | None = None,
        delay_s: float = 0.0,
    ) -> Page:
        """One page of ``query``: the first (``cursor`` None; ``shuffle`` seeds a shuffled
        order) or the one after ``cursor``. Entries sent less than ``delay_s`` before ``now``
        are not listed yet."""
        self.prune(now)
        visible_us = to_us(now - delay_s)  # listed iff sent at or before this
        cursor = cursor or Cursor(top_seq=self._seq, shuffle=shuffle)
        if query.request_id is not None:
            found = self._by_id.get(query.request_id)
            window = [found] if found is not None and self._in_window(found, query) else []
            after = -1 if cursor.after is None else cursor.after
            candidates = [e for e in window if e.seq <= cursor.top_seq and cursor.key(e) > after]
            held = sum(e.sent_us > visible_us for e in candidates)
            candidates = [e for e in candidates if e.sent_us <= visible_us]
            return self._select(candidates, query, cursor, held)
        index = self._by_endpoint.get(query.endpoint_id)
        if index is None:
            return Page([], None)
        entries, lo = index.entries, index.head
        if query.start_us is not None:
            lo = bisect_left(entries, query.start_us, lo, key=_sent)
        hi = bisect_right(entries, cursor.top_seq, lo, key=_seq)
        if query.end_us is not None:
            hi = bisect_left(entries, query.end_us, lo, hi, key=_sent)
        listed = bisect_right(entries, visible_us, lo, hi, key=_sent)
        held, hi = hi - listed, listed
        if cursor.shuffle is None and cursor.after is not None:
            lo = max(lo, bisect_right(entries, cursor.after, lo, hi, key=_seq))
        return self._select(islice(entries, lo, hi), query, cursor, held)

    @staticmethod
    def _in_window(entry: Entry, query: Query) -> bool:
        return (
            entry.endpoint_id == query.endpoint_id
            and (query.start_us is None or entry.sent_us >= query.start_us)
            and (query.end_us is None or entry.sent_us < query.end_us)
        )

    @staticmethod
    def _select(candidates: Iterable[Entry], query: Query, cursor: Cursor, held: int) -> Page:
        """Up to ``limit`` entries after ``cursor`` in its order, and the next cursor."""
        if query.status is not None:
            candidates = (e for e in candidates if e.outcome == query.status)
        if cursor.shuffle is None:
            # Already in order and already past the cursor (the caller bisected there).
            found = list(islice(candidates, query.limit + 1))
        else:
            # A scan of the whole window per page (O(n)): a fault mode's cost, which keeps
            # the listing stateless on the server. The window is in seq order, so an entry
            # is found again from its key by bisection.
            window = list(candidates)
            after = -1 if cursor.after is None else cursor.after
            seed = cursor.shuffle
            keys = [(hash((seed, e.seq)) & _MASK64) << _SEQ_BITS | e.seq for e in window]
            smallest = heapq.nsmallest(query.limit + 1, (k for k in keys if k > after))
            found = [window[bisect_left(window, k & _SEQ_MASK, key=_seq)] for k in smallest]
        items = found[: query.limit]
        more = len(found) > query.limit
        if not more:
            return Page(items, None, held)
        return Page(items, Cursor(cursor.top_seq, cursor.shuffle, cursor.key(items[-1])), held)


def _sent(entry: Entry) -> int:
    return entry.sent_us


def _seq(entry: Entry) -> int:
    return entry.seq
