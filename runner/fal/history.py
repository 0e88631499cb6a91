"""HistoryClient: the runner's side of fal's Platform API (request history, account prices).

Reads only, over one injected httpx transport, to the configured Platform API origin. Each
page read is retried as an idempotent read through :func:`runner.fal.retry.call_with_retry`
with the injected policy, clock and sleep. Answers are parsed at this boundary into frozen
models (:class:`HistoryItem`, :class:`AccountPrice`); failures are translated here, and only
here, into the runner's tree::

    401 / 403 / 404                       -> PlatformUnavailableError, not retried (the API
                                             is unavailable to some keys or plans)
    httpx.TransportError, 408, 409,
        429, 5xx                          -> retried; past the policy PlatformUnavailableError
    other status, not JSON, wrong shape,
        a cursor loop or too many pages   -> ProtocolError

Never :class:`runner.errors.AuthError`: a key the queue accepts but the Platform API refuses
means "history or prices are not available, fall back and say so", not "stop the run".

The key is a ``SecretStr``; it goes only into the Authorization header of requests to the
configured API origin (no URL from an answer is ever followed: cursors are opaque query
values) and is redacted from any server text copied into an error. Messages name the URL
path, never the query or the key.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import anyio
import httpx
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from runner.errors import (
    HTTPStatusError,
    PlatformUnavailableError,
    ProtocolError,
    TransportError,
    UsageError,
)
from runner.fal.key import redactor
from runner.fal.protocol import NOT_SENT_ERRORS, RETRY_AFTER_HEADER, parse_retry_after
from runner.fal.retry import READ_RETRY_CODES, RetryPolicy, call_with_retry
from runner.fal.transport import CallTimeouts, fetch

REQUESTS_PATH = "/v1/models/requests/by-endpoint"
PRICING_PATH = "/v1/models/pricing"
MAX_PAGE_SIZE = 100  # the documented bound of ``limit``
MAX_PRICE_IDS = 50  # the documented bound of ids per pricing call
RETENTION_S = 30 * 86400.0  # fal keeps payloads 30 days: older requests cannot be found
# Widens a by-id lookup's window on both sides: our clock and fal's disagree, and the
# window costs nothing when the request id already narrows the answer to one item.
WINDOW_MARGIN_S = 3600.0
BODY_LIMIT = 2000  # characters of an error body kept on HTTPStatusError
UNAVAILABLE_CODES = frozenset({401, 403, 404})
_UNAVAILABLE = "fal's Platform API cannot be read with this key: history or prices unavailable"
_SEGMENT = r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*"
_ENDPOINT_ID = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})+")
_FROZEN = ConfigDict(frozen=True, extra="ignore")
_FROZEN_LATE = ConfigDict(frozen=True, extra="ignore", defer_build=True)  # built on first use


def _as_utc(value: datetime | None) -> datetime | None:
    """An instant without an offset is read as UTC (the API speaks UTC)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


Instant = Annotated[datetime | None, AfterValidator(_as_utc)]


class HistoryItem(BaseModel):
    """One request as fal's history lists it. ``started_at``, ``ended_at``,
    ``status_code`` and ``duration`` stay None while it is queued or running;
    ``json_input`` and ``json_output`` are set only when payloads were asked for."""

    model_config = _FROZEN_LATE

    request_id: str = Field(min_length=1)
    endpoint_id: str | None = None
    sent_at: Instant = None
    started_at: Instant = None
    ended_at: Instant = None
    status_code: int | None = None
    duration: float | None = None
    json_input: Any = None
    json_output: Any = None

    @property
    def ended(self) -> bool:
        """Whether the request has finished (an end time or an outcome code is known)."""
        return self.ended_at is not None or self.status_code is not None


class AccountPrice(BaseModel):
    """The calling account's unit price of one endpoint, exact as the JSON wrote it."""

    model_config = _FROZEN

    endpoint_id: str = Field(min_length=1)
    unit_price: Decimal = Field(ge=0, allow_inf_nan=False)
    unit: str
    currency: str


class _Page(BaseModel):
    model_config = _FROZEN_LATE

    next_cursor: str | None = None
    has_more: bool = False


class _HistoryPage(_Page):
    items: list[HistoryItem]


class _PricePage(_Page):
    prices: list[AccountPrice]


P = TypeVar("P", bound=_Page)


class HistoryClient:
    """List an endpoint's requests, look one up by id, read the account's prices."""

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport,
        *,
        api_url: str,
        key: SecretStr,
        policy: RetryPolicy,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        user_agent: str = "runner",
        page_size: int = MAX_PAGE_SIZE,
        max_pages: int = 100,
        wall_clock: Callable[[], float] = time.time,
        timeouts: CallTimeouts | None = None,
    ) -> None:
        api = httpx.URL(api_url.rstrip("/"))
        if api.scheme not in ("http", "https") or not api.host or api.query or api.fragment:
            raise UsageError(f"Platform API URL must be http(s)://host[:port], got {api_url!r}")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise UsageError(f"page size must be 1..{MAX_PAGE_SIZE}, got {page_size}")
        if max_pages < 1:
            raise UsageError(f"max pages must be at least 1, got {max_pages}")
        self._transport = transport
        self._api = api
        self._key = key
        self._redact_key = redactor(key)
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._user_agent = user_agent
        self._page_size = page_size
        self._max_pages = max_pages
        self._wall_clock = wall_clock  # "now" of a by-id window, HTTP-date Retry-After
        self._extensions = (timeouts or CallTimeouts()).extensions()["read"]

    def __repr__(self) -> str:
        return f"HistoryClient(api_url={str(self._api)!r}, key={self._key!r})"

    @property
    def api_url(self) -> str:
        return str(self._api)

    # --- calls -----------------------------------------------------------------------

    async def requests(
        self,
        endpoint_id: str,
        *,
        start: datetime,
        end: datetime,
        request_id: str | None = None,
        payloads: bool = True,
    ) -> list[HistoryItem]:
        """Every request of ``endpoint_id`` sent in ``[start, end)``, each once, by
        ``sent_at``. Pages carry no order, so all are read before anything is returned;
        a request listed twice keeps its most informed version (ended over running)."""
        _check_endpoint_id(endpoint_id)
        params = {
            "endpoint_id": endpoint_id,
            "start": _wire_instant(start, "start"),
            "end": _wire_instant(end, "end"),
            "limit": str(self._page_size),
        }
        if end <= start:
            raise UsageError(f"history window must end after it starts: {start} .. {end}")
        if payloads:
            params["expand"] = "payloads"
        if request_id is not None:
            if not request_id:
                raise UsageError("request id must not be empty")
            params["request_id"] = request_id
        pages = await self._collect(REQUESTS_PATH, params, _HistoryPage)
        items = [item for page in pages for item in page.items]
        if request_id is not None:  # should the server ignore the filter
            items = [item for item in items if item.request_id == request_id]
        return _dedupe(items)

    async def request(
        self, endpoint_id: str, request_id: str, *, sent_after: datetime | None = None
    ) -> HistoryItem | None:
        """One request by id, with its payloads, or None when fal does not list it.

        The window runs from ``sent_after`` (or the 30-day retention) less a margin to
        now plus a margin: the docs allow a wide window with a request id.
        """
        if not request_id:
            raise UsageError("request id must not be empty")
        margin = timedelta(seconds=WINDOW_MARGIN_S)
        now = datetime.fromtimestamp(self._wall_clock(), UTC)
        if sent_after is None:
            start = now - timedelta(seconds=RETENTION_S) - margin
        else:
            _wire_instant(sent_after, "sent_after")  # refuses a naive instant
            start = min(sent_after - margin, now - margin)
        found = await self.requests(
            endpoint_id, start=start, end=now + margin, request_id=request_id, payloads=True
        )
        return found[0] if found else None

    async def prices(self, endpoint_ids: Sequence[str]) -> dict[str, AccountPrice]:
        """The calling account's price of each endpoint fal knows, keyed by endpoint id;
        ids fal does not price are absent. At most 50 ids go in one call."""
        if isinstance(endpoint_ids, str):
            raise UsageError("prices takes a sequence of endpoint ids, not one string")
        ids = list(dict.fromkeys(endpoint_ids))
        for endpoint_id in ids:
            _check_endpoint_id(endpoint_id)
        found: dict[str, AccountPrice] = {}
        for first in range(0, len(ids), MAX_PRICE_IDS):
            chunk = ids[first : first + MAX_PRICE_IDS]
            params = {"endpoint_id": ",".join(chunk)}
            # Decimal straight from the JSON text: a float would round the price.
            pages = await self._collect(PRICING_PATH, params, _PricePage, parse_float=Decimal)
            found.update((price.endpoint_id, price) for page in pages for price in page.prices)
        return found

    # --- paging ----------------------------------------------------------------------

    async def _collect(
        self,
        path: str,
        params: Mapping[str, str],
        model: type[P],
        *,
        parse_float: Callable[[str], Any] | None = None,
    ) -> list[P]:
        """Every page of one listing, following ``next_cursor`` while ``has_more``."""
        pages: list[P] = []
        cursors: set[str] = set()
        query = dict(params)
        while True:
            body = await self._get(path, query, parse_float=parse_float)
            page = _parse(model, body, f"GET {path}")
            pages.append(page)
            cursor = page.next_cursor
            if not page.has_more or cursor is None:
                return pages
            if cursor in cursors:
                raise ProtocolError(
                    f"GET {path}: page {len(pages)} repeats an earlier cursor: the server loops"
                )
            if len(pages) >= self._max_pages:
                raise ProtocolError(
                    f"GET {path}: still more after {self._max_pages} pages: the server loops"
                    " or the window is too wide"
                )
            cursors.add(cursor)
            query = {**params, "cursor": cursor}

    # --- the one boundary --------------------------------------------------------------

    async def _get(
        self,
        path: str,
        params: Mapping[str, str],
        *,
        parse_float: Callable[[str], Any] | None,
    ) -> Any:
        """One page's JSON, retried as a read; what outlasts the policy is unavailable."""
        url = self._api.copy_with(path=self._api.path.rstrip("/") + path)
        where = f"GET {url.path}"

        async def once() -> Any:
            return await self._get_once(url, params, parse_float=parse_float)

        try:
            return await call_with_retry(
                once, policy=self._policy, kind="read", clock=self._clock, sleep=self._sleep
            )
        except HTTPStatusError as exc:
            raise PlatformUnavailableError(
                f"{where}: HTTP {exc.status_code} past the retry policy: {_UNAVAILABLE}",
                path=url.path,
                status_code=exc.status_code,
            ) from exc
        except TransportError as exc:
            raise PlatformUnavailableError(
                f"{exc} (past the retry policy): {_UNAVAILABLE}", path=url.path
            ) from exc

    async def _get_once(
        self,
        url: httpx.URL,
        params: Mapping[str, str],
        *,
        parse_float: Callable[[str], Any] | None,
    ) -> Any:
        where = f"GET {url.path}"
        request = httpx.Request(
            "GET", url, params=params, headers=self._headers(), extensions=self._extensions
        )
        try:
            response = await fetch(self._transport, request)
        except httpx.TransportError as exc:
            detail = self._redact(str(exc)) or "no detail"
            sent = not isinstance(exc, NOT_SENT_ERRORS)
            raise TransportError(f"{where}: {type(exc).__name__}: {detail}", sent=sent) from exc
        code = response.status_code
        if code in UNAVAILABLE_CODES:
            raise PlatformUnavailableError(
                f"{where}: HTTP {code}: {_UNAVAILABLE}", path=url.path, status_code=code
            )
        if not response.is_success:
            body = self._redact(response.text)[:BODY_LIMIT]
            snippet = " ".join(body[:200].split())
            message = f"{where}: HTTP {code}: {snippet}" if snippet else f"{where}: HTTP {code}"
            if code in READ_RETRY_CODES or code >= 500:  # transient: call_with_retry decides
                retry_after = parse_retry_after(
                    response.headers.get(RETRY_AFTER_HEADER), now_s=self._wall_clock()
                )
                raise HTTPStatusError(
                    message, status_code=code, body=body, retry_after_s=retry_after
                )
            raise ProtocolError(f"unexpected answer: {message}")
        try:
            return json.loads(response.content, parse_float=parse_float)
        except ValueError as exc:  # json.JSONDecodeError and UnicodeDecodeError included
            raise ProtocolError(f"{where}: HTTP {code}: the answer is not JSON") from exc

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Key {self._key.get_secret_value()}",
            "Accept": "application/json",
            "User-Agent": self._user_agent,
        }

    def _redact(self, text: str) -> str:
        return self._redact_key(text)


def _parse(model: type[P], body: Any, where: str) -> P:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        # Locations and reasons only: input values are server text and could echo anything.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'body'}: {error['msg']}"
            for error in exc.errors(include_url=False, include_input=False)[:3]
        )
        raise ProtocolError(f"{where}: unexpected answer shape: {problems}") from exc


def _dedupe(items: Iterable[HistoryItem]) -> list[HistoryItem]:
    """One item per request id, the most informed; ordered by ``sent_at``, then id."""
    best: dict[str, HistoryItem] = {}
    for item in items:
        kept = best.get(item.request_id)
        if kept is None or _information(item) > _information(kept):
            best[item.request_id] = item
    oldest = datetime.min.replace(tzinfo=UTC)
    return sorted(best.values(), key=lambda i: (i.sent_at or oldest, i.request_id))


def _information(item: HistoryItem) -> tuple[bool, bool, bool, int]:
    known = sum(getattr(item, name) is not None for name in HistoryItem.model_fields)
    return (item.ended, item.json_output is not None, item.json_input is not None, known)


def _wire_instant(value: datetime, name: str) -> str:
    """An aware instant as the API's ISO-8601 UTC form: ``2026-01-01T00:00:00Z``."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise UsageError(f"{name} must be timezone-aware, got {value.isoformat()}")
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _check_endpoint_id(endpoint_id: str) -> None:
    if not _ENDPOINT_ID.fullmatch(endpoint_id):
        raise UsageError(f"endpoint id must look like owner/app[/path], got {endpoint_id!r}")
