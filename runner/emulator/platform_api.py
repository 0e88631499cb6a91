"""fal's Platform API as the emulator serves it, under ``/api`` (shared/spec/fal-platform.md).

A client points its Platform API base at ``<emulator>/api``::

    GET /api/v1/models/requests/by-endpoint   the request history (:mod:`.history`)
    GET /api/v1/models/pricing                unit prices for the calling account

Both need ``Authorization: Key <key>`` (401 JSON otherwise). The whole ``/api`` prefix is
mounted ahead of the queue's routes, so the queue's ``/{owner}/...`` patterns cannot shadow it
(and no queue app may be owned by ``api``). Malformed parameters are answered 422 with a
FastAPI-style ``{"detail": [{"loc": ["query", name], "msg", "type"}]}``.

``requests/by-endpoint`` query:

- ``endpoint_id`` (required): the id exactly as submitted, sub-path included.
- ``start``, ``end``: ISO-8601 instants (``Z``, an offset, fractional seconds; no offset means
  UTC) or dates; ``start`` inclusive, ``end`` exclusive, on ``sent_at``. Without ``start`` the
  window opens 24 (emulated) hours before ``end``, or before now; without ``end`` it has no
  upper bound. With ``request_id`` there are no defaults: any window, or none, is accepted.
- ``limit`` 1..100 (default 50), ``cursor`` from ``next_cursor``, ``request_id``, ``status``
  (``success|error|user_error``), ``expand=payloads`` (adds ``json_input``, ``json_output``).

Each item has ``request_id, endpoint_id, sent_at, started_at, ended_at, status_code,
duration``: times ISO-8601 with ``Z`` from the emulator's clock, ``duration`` the clock seconds
from sent to ended; all but the first three null until the request ends (``started_at`` stays
null for one that ended without starting).

``pricing`` takes 1..50 ``endpoint_id`` values (comma-separated or repeated) and answers each
known one with the account's price (``EmulatorConfig.account_prices``) or else the price
table's, ``unit`` always ``image`` as fal's docs show it. Faults: ``history_unavailable``,
``history_unordered``, ``history_delay_s``, ``history_page_limit`` (:mod:`.faults`).
"""

from __future__ import annotations

import hmac
import json
import random
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any, cast

from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from runner.emulator.history import OUTCOMES, Cursor, Entry, Outcome, Query
from runner.endpoints import cost

if TYPE_CHECKING:
    from runner.emulator.app import Emulator

PREFIX = "/api"
DEFAULT_WINDOW_S = 86_400.0  # emulated: fal's default window is the last 24 hours
MAX_LIMIT = 100
DEFAULT_LIMIT = 50
MAX_PRICE_IDS = 50
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


class BadParam(ValueError):
    """A query parameter the API refuses (422)."""

    def __init__(self, name: str, message: str, kind: str = "value_error") -> None:
        super().__init__(message)
        self.name = name
        self.kind = kind


def iso(us: int) -> str:
    """Microseconds since the epoch as ISO-8601 UTC with ``Z``."""
    return (_EPOCH + us * _MICROSECOND).isoformat().replace("+00:00", "Z")


def parse_instant(name: str, text: str) -> int:
    """An ISO-8601 instant or date as microseconds since the epoch (no offset: UTC)."""
    text = text.strip()
    if "T" in text:
        text = text.replace(" ", "+")  # an unescaped "+00:00" arrives as " 00:00"
    try:
        at = datetime.fromisoformat(text)
        at = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
        return (at - _EPOCH) // _MICROSECOND
    except (ValueError, OverflowError) as exc:
        raise BadParam(name, f"{name} must be an ISO-8601 instant or date") from exc


def _one(params: QueryParams, name: str) -> str | None:
    value = params.get(name)
    return value.strip() if value is not None and value.strip() else None


def _limit(params: QueryParams) -> int:
    raw = _one(params, "limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadParam("limit", f"limit must be an integer within 1..{MAX_LIMIT}")
    return int(raw)


def _expand(params: QueryParams) -> bool:
    values = {v.strip() for raw in params.getlist("expand") for v in raw.split(",") if v.strip()}
    if values - {"payloads"}:
        raise BadParam("expand", "expand accepts only 'payloads'")
    return bool(values)


def parse_listing(
    params: QueryParams, *, now_us: int, window_us: int
) -> tuple[Query, Cursor | None, bool]:
    """The listing's query, its cursor (None: first page) and whether payloads are wanted."""
    endpoint_id = _one(params, "endpoint_id")
    if endpoint_id is None:
        raise BadParam("endpoint_id", "Field required", "missing")
    request_id = _one(params, "request_id")
    start, end = (_one(params, name) for name in ("start", "end"))
    start_us = None if start is None else parse_instant("start", start)
    end_us = None if end is None else parse_instant("end", end)
    if request_id is None and start_us is None:
        start_us = (now_us if end_us is None else end_us) - window_us
    status = _one(params, "status")
    if status is not None and status not in OUTCOMES:
        raise BadParam("status", "status must be one of success, error, user_error")
    raw_cursor = _one(params, "cursor")
    try:
        cursor = None if raw_cursor is None else Cursor.decode(raw_cursor)
    except ValueError as exc:
        raise BadParam("cursor", "not a cursor this API gave out") from exc
    query = Query(
        endpoint_id=endpoint_id.strip("/"),
        start_us=start_us,
        end_us=end_us,
        request_id=request_id,
        status=cast("Outcome | None", status),
        limit=_limit(params),
    )
    return query, cursor, _expand(params)


def price_ids(params: QueryParams) -> list[str]:
    """The 1..50 distinct endpoint ids asked for, in order."""
    ids = [v.strip() for raw in params.getlist("endpoint_id") for v in raw.split(",")]
    unique = list(dict.fromkeys(i for i in ids if i))
    if not unique:
        raise BadParam("endpoint_id", "Field required", "missing")
    if len(unique) > MAX_PRICE_IDS:
        raise BadParam("endpoint_id", f"at most {MAX_PRICE_IDS} endpoint ids per call")
    return unique


def account_table(base: cost.PriceTable, overrides: Mapping[str, Decimal]) -> cost.PriceTable:
    """``base`` with the account's own unit prices; an endpoint new to ``base`` bills per MP."""
    prices = {price.endpoint: price for price in base}
    for endpoint, usd in overrides.items():
        old = prices.get(endpoint)
        prices[endpoint] = cost.Price(
            endpoint=endpoint,
            usd=usd,
            unit=old.unit if old else "output_mp",
            source="account price (emulator)",
            date=old.date if old else "",
            confidence="confirmed",
            lora_surcharge=old.lora_surcharge if old else None,
        )
    return cost.PriceTable(prices)


def render(entry: Entry, *, payloads: bool) -> dict[str, Any]:
    """One history item as the API answers it."""
    ended = entry.ended_us
    item: dict[str, Any] = {
        "request_id": entry.request_id,
        "endpoint_id": entry.endpoint_id,
        "sent_at": iso(entry.sent_us),
        "started_at": None if ended is None or entry.started_us is None else iso(entry.started_us),
        "ended_at": None if ended is None else iso(ended),
        "status_code": entry.status_code,
        "duration": None if ended is None else round((ended - entry.sent_us) / 1e6, 6),
    }
    if payloads:
        item["json_input"] = entry.json_input
        item["json_output"] = entry.json_output
    return item


def _refused(error: BadParam) -> Response:
    problem = {"loc": ["query", error.name], "msg": str(error), "type": error.kind}
    return JSONResponse({"detail": [problem]}, status_code=422)


class PlatformRoutes:
    """The Platform API handlers, bound to one emulator."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self._key = emu.config.key.get_secret_value().encode()
        self._shuffles = random.Random(f"{emu.config.faults.seed}/history_shuffle")

    def _gate(self, request: Request) -> Response | None:
        """Auth, then the ``history_unavailable`` fault; None means go on."""
        emu = self.emu
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "key" or not hmac.compare_digest(value.encode(), self._key):
            detail = "Unauthorized: missing or invalid Key credentials"
            return JSONResponse({"detail": detail}, status_code=401)
        if emu.faults.history_unavailable():
            emu.stats.fault("history_unavailable")
            detail = "Forbidden: this key cannot use the Platform API"
            return JSONResponse({"detail": detail}, status_code=403)
        emu.advance()
        return None

    async def requests_by_endpoint(self, request: Request) -> Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        emu, faults = self.emu, self.emu.config.faults
        now = emu.clock()
        window_us = round(emu.config.scaled(DEFAULT_WINDOW_S) * 1e6)
        try:
            query, cursor, payloads = parse_listing(
                request.query_params, now_us=round(now * 1e6), window_us=window_us
            )
        except BadParam as exc:
            return _refused(exc)
        shuffle = None
        if cursor is None and emu.faults.history_unordered():
            emu.stats.fault("history_unordered")
            shuffle = self._shuffles.getrandbits(63)
        if faults.history_page_limit and query.limit > faults.history_page_limit:
            emu.stats.fault("history_page_limit")
            query = replace(query, limit=faults.history_page_limit)
        delay_s = emu.config.scaled(faults.history_delay_s)
        page = emu.history.page(query, now=now, cursor=cursor, shuffle=shuffle, delay_s=delay_s)
        if page.held_back and delay_s > 0:
            emu.stats.fault("history_delay")
        body = {
            "items": [render(entry, payloads=payloads) for entry in page.items],
            "next_cursor": None if page.next_cursor is None else page.next_cursor.encode(),
            "has_more": page.next_cursor is not None,
        }
        return JSONResponse(body)

    async def pricing(self, request: Request) -> Response:
        refused = self._gate(request)
        if refused is not None:
            return refused
        try:
            ids = price_ids(request.query_params)
        except BadParam as exc:
            return _refused(exc)
        prices = [
            _price_json(endpoint, price.usd)
            for endpoint in ids
            if (price := self.emu.prices.get(endpoint)) is not None
        ]
        body = '{"prices":[' + ",".join(prices) + '],"next_cursor":null,"has_more":false}'
        return Response(body, media_type="application/json")


def _price_json(endpoint: str, usd: Decimal) -> str:
    """One price as fal lists it; ``unit_price`` a JSON number with every digit of the
    price (a float would round a price of more digits than it keeps)."""
    fields = (("endpoint_id", json.dumps(endpoint)), ("unit_price", format(usd, "f")),
              ("unit", '"image"'), ("currency", '"USD"'))  # fmt: skip
    return "{" + ",".join(f'"{name}":{value}' for name, value in fields) + "}"


def platform_routes(emu: Emulator) -> list[BaseRoute]:
    """The ``/api`` mount: list it before the queue's catch-all routes."""
    api = PlatformRoutes(emu)
    return [
        Mount(
            PREFIX,
            routes=[
                Route("/v1/models/requests/by-endpoint", api.requests_by_endpoint, methods=["GET"]),
                Route("/v1/models/pricing", api.pricing, methods=["GET"]),
            ],
        )
    ]
