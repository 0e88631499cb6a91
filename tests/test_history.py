"""HistoryClient against a fake Platform API that speaks the documented protocol over
MockTransport: key check, window filter, limit/cursor paging in no particular order,
``expand=payloads``, the pricing call's 50-id limit."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from runner.errors import (
    AuthError,
    HTTPStatusError,
    PlatformUnavailableError,
    ProtocolError,
    TransportError,
    UsageError,
)
from runner.fal.history import (
    PRICING_PATH,
    REQUESTS_PATH,
    AccountPrice,
    HistoryClient,
    HistoryItem,
)
from runner.fal.retry import RetryPolicy
from tests.fakes import FakeTime

API = "https://api.fal.test"
SECRET = "key-id-1234:very-secret-value-5678"
ENDPOINT = "fal-ai/flux/dev"
T0 = datetime(2026, 3, 1, tzinfo=UTC)
NOW_S = (T0 + timedelta(days=2)).timestamp()
ZERO_WAIT = RetryPolicy(attempts=4, timeout_s=60.0, base_s=0.0, max_s=0.0)
# The same instant written the ways a server may write it.
STAMPS: tuple[Callable[[datetime], str], ...] = (
    lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ"),
    lambda t: t.isoformat(),  # +00:00
    lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
    lambda t: t.strftime("%Y-%m-%dT%H:%M:%S.%f") + "+00:00",
)

Fault = Callable[[httpx.Request], httpx.Response]


def cursor_for(offset: int) -> str:
    return base64.b64encode(str(offset).encode()).decode()


def offset_of(cursor: str | None) -> int:
    return int(base64.b64decode(cursor)) if cursor else 0


def instant(text: str | None, default: datetime) -> datetime:
    if text is None:
        return default
    parsed = datetime.fromisoformat(text)  # a date alone is its midnight
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def record(
    n: int, *, endpoint: str = ENDPOINT, ended: bool = True, sent: datetime | None = None
) -> dict[str, Any]:
    """One request as the fake keeps it (and lists it with ``expand=payloads``)."""
    sent_at = sent or T0 + timedelta(minutes=n, microseconds=n * 1000)
    stamp = STAMPS[n % len(STAMPS)]
    done = {
        "started_at": stamp(sent_at + timedelta(seconds=2)),
        "ended_at": stamp(sent_at + timedelta(seconds=5)),
        "status_code": 200,
        "duration": 4.5,
        "json_output": {"images": [{"url": f"https://v3.fal.media/files/{n}.png"}], "seed": n},
    }
    return {
        "request_id": f"req-{n:04d}",
        "endpoint_id": endpoint,
        "sent_at": stamp(sent_at),
        "json_input": {"prompt": f"fox {n}"},
        **(done if ended else {"started_at": None, "ended_at": None, "status_code": None}),
    }


@dataclass
class FakePlatform:
    """Enough of fal's Platform API for the history and pricing calls.

    A listing's order is a fixed shuffle (not by time), each page is shuffled again, and
    ``overlap`` repeats the previous page's last items at the head of the next one.
    """

    items: list[dict[str, Any]] = field(default_factory=list)
    prices: dict[str, str] = field(default_factory=dict)  # endpoint id -> JSON number text
    price_page: int = 20
    overlap: int = 0
    seed: int = 7
    faults: list[Fault] = field(default_factory=list)
    calls: list[httpx.Request] = field(default_factory=list)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        if request.headers.get("authorization") != f"Key {SECRET}":
            return httpx.Response(401, json={"detail": "Invalid API key"})
        if self.faults:
            return self.faults.pop(0)(request)
        if request.method == "GET" and request.url.path == REQUESTS_PATH:
            return self.by_endpoint(request.url.params)
        if request.method == "GET" and request.url.path == PRICING_PATH:
            return self.pricing(request.url.params)
        return httpx.Response(404, json={"detail": "Not Found"})

    def by_endpoint(self, q: httpx.QueryParams) -> httpx.Response:
        endpoint, request_id = q.get("endpoint_id"), q.get("request_id")
        limit = int(q.get("limit", "50"))
        if not endpoint or not 1 <= limit <= 100:
            return httpx.Response(422, json={"detail": "bad endpoint_id or limit"})
        end = instant(q.get("end"), datetime.fromtimestamp(NOW_S, UTC))
        start = instant(q.get("start"), end - timedelta(days=1))
        listed = [
            item
            for item in self.items
            if item["endpoint_id"] == endpoint
            and start <= instant(item["sent_at"], T0) < end
            and request_id in (None, item["request_id"])
        ]
        order = random.Random(self.seed).sample(listed, len(listed))
        offset = offset_of(q.get("cursor"))
        page = order[max(0, offset - self.overlap) : offset + limit]
        random.Random(self.seed + offset).shuffle(page)
        if q.get("expand") != "payloads":
            page = [{k: v for k, v in i.items() if not k.startswith("json_")} for i in page]
        more = offset + limit < len(order)
        return httpx.Response(
            200,
            json={
                "items": page,
                "next_cursor": cursor_for(offset + limit) if more else None,
                "has_more": more,
            },
        )

    def pricing(self, q: httpx.QueryParams) -> httpx.Response:
        ids = [i for value in q.get_list("endpoint_id") for i in value.split(",") if i]
        if not 1 <= len(ids) <= 50:
            return httpx.Response(400, json={"detail": "endpoint_id: 1 to 50 ids"})
        known = [i for i in ids if i in self.prices]
        offset = offset_of(q.get("cursor"))
        page = known[offset : offset + self.price_page]
        more = offset + self.price_page < len(known)
        # Written by hand so each price keeps the exact digits a float would lose.
        rows = ", ".join(
            f'{{"endpoint_id": {json.dumps(i)}, "unit_price": {self.prices[i]}, '
            f'"unit": "image", "currency": "USD"}}'
            for i in page
        )
        cursor = json.dumps(cursor_for(offset + self.price_page) if more else None)
        text = f'{{"prices": [{rows}], "next_cursor": {cursor}, "has_more": {json.dumps(more)}}}'
        return httpx.Response(200, content=text, headers={"content-type": "application/json"})


def make_client(
    platform: FakePlatform | Callable[[httpx.Request], httpx.Response],
    *,
    time: FakeTime | None = None,
    key: str = SECRET,
    api_url: str = API,
    **options: Any,
) -> HistoryClient:
    clock = time or FakeTime()
    return HistoryClient(
        httpx.MockTransport(platform),
        api_url=api_url,
        key=SecretStr(key),
        policy=options.pop("policy", ZERO_WAIT),
        clock=clock.clock,
        sleep=clock.sleep,
        wall_clock=lambda: NOW_S,
        **options,
    )


def always(code: int, body: Any = None, headers: dict[str, str] | None = None) -> Fault:
    return lambda request: httpx.Response(code, json=body or {"detail": "x"}, headers=headers)


def no_secret(text: str) -> bool:
    return SECRET not in text and SECRET.partition(":")[2] not in text


START, END = T0, T0 + timedelta(days=1)


# --- models ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        ("2026-03-01T10:00:01Z", datetime(2026, 3, 1, 10, 0, 1, tzinfo=UTC)),
        ("2026-03-01T10:00:01+00:00", datetime(2026, 3, 1, 10, 0, 1, tzinfo=UTC)),
        ("2026-03-01T10:00:01.25Z", datetime(2026, 3, 1, 10, 0, 1, 250000, tzinfo=UTC)),
        ("2026-03-01T12:00:01.123456+02:00", datetime(2026, 3, 1, 10, 0, 1, 123456, tzinfo=UTC)),
        ("2026-03-01T10:00:01", datetime(2026, 3, 1, 10, 0, 1, tzinfo=UTC)),
    ],
)
def test_history_item_reads_iso_instants_as_utc(stamp: str, expected: datetime) -> None:
    item = HistoryItem.model_validate({"request_id": "r", "sent_at": stamp, "extra": 1})
    assert item.sent_at == expected
    assert item.sent_at is not None and item.sent_at.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("fields", "ended"),
    [
        ({}, False),
        ({"started_at": "2026-03-01T00:00:00Z", "ended_at": None, "status_code": None}, False),
        ({"ended_at": "2026-03-01T00:00:09Z"}, True),
        ({"status_code": 500}, True),
    ],
)
def test_history_item_ended(fields: dict[str, Any], ended: bool) -> None:
    assert HistoryItem.model_validate({"request_id": "r", **fields}).ended is ended


def test_account_price_is_frozen_and_exact() -> None:
    price = AccountPrice.model_validate(
        {"endpoint_id": ENDPOINT, "unit_price": "0.025", "unit": "image", "currency": "USD"}
    )
    assert price.unit_price == Decimal("0.025")
    with pytest.raises(ValueError, match="frozen"):
        price.unit = "megapixel"


# --- listing -----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_pagination_collects_every_item_exactly_once() -> None:
    inside = [record(n) for n in range(237)]
    outside = [record(900, sent=T0 - timedelta(seconds=1)), record(901, endpoint="fal-ai/x/y")]
    platform = FakePlatform(items=inside + outside)
    items = await make_client(platform, page_size=10).requests(ENDPOINT, start=START, end=END)

    assert [i.request_id for i in items] == [r["request_id"] for r in inside]  # by sent_at
    assert len(platform.calls) == 24
    first = platform.calls[0].url.params
    assert first["start"] == "2026-03-01T00:00:00Z" and first["end"] == "2026-03-02T00:00:00Z"
    assert first["limit"] == "10" and first["expand"] == "payloads" and "cursor" not in first
    assert [c.url.params.get("cursor") for c in platform.calls[1:]] == [
        cursor_for(10 * n) for n in range(1, 24)
    ]
    assert items[5].json_input == {"prompt": "fox 5"} and items[5].ended


@pytest.mark.anyio
async def test_without_payloads_no_expand_and_no_json() -> None:
    platform = FakePlatform(items=[record(n) for n in range(5)])
    items = await make_client(platform).requests(ENDPOINT, start=START, end=END, payloads=False)
    assert "expand" not in platform.calls[0].url.params
    assert len(items) == 5 and all(i.json_input is None and i.json_output is None for i in items)


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(6))
async def test_duplicates_keep_the_most_informed_version(seed: int) -> None:
    # req-0003 ended between two page reads: listed once running, once ended.
    running = record(3, ended=False)
    running.pop("json_output", None)
    items = [record(n) for n in range(30)] + [running]
    platform = FakePlatform(items=items, overlap=3, seed=seed)
    found = await make_client(platform, page_size=7).requests(ENDPOINT, start=START, end=END)

    assert len({i.request_id for i in found}) == len(found) == 30
    three = next(i for i in found if i.request_id == "req-0003")
    assert three.ended and three.json_output is not None


@pytest.mark.anyio
async def test_request_by_id_uses_sent_after_less_a_margin() -> None:
    platform = FakePlatform(items=[record(n) for n in range(40)])
    sent = T0 + timedelta(minutes=17)
    item = await make_client(platform, page_size=5).request(ENDPOINT, "req-0017", sent_after=sent)

    assert item is not None and item.request_id == "req-0017"
    assert item.json_input == {"prompt": "fox 17"}
    (call,) = platform.calls
    q = call.url.params
    assert q["request_id"] == "req-0017" and q["expand"] == "payloads"
    assert (q["start"], q["end"]) == ("2026-02-28T23:17:00Z", "2026-03-03T01:00:00Z")


@pytest.mark.anyio
async def test_request_by_id_defaults_to_the_30_day_retention() -> None:
    platform = FakePlatform(items=[record(n) for n in range(3)])
    item = await make_client(platform).request(ENDPOINT, "req-0002")
    assert item is not None and item.request_id == "req-0002"
    start = instant(platform.calls[0].url.params["start"], T0)
    assert start == datetime.fromtimestamp(NOW_S, UTC) - timedelta(days=30, hours=1)


@pytest.mark.anyio
async def test_request_by_id_not_listed_is_none() -> None:
    platform = FakePlatform(items=[record(n) for n in range(3)])
    assert await make_client(platform).request(ENDPOINT, "req-9999") is None


@pytest.mark.anyio
async def test_request_by_id_ignores_other_ids_when_the_server_ignores_the_filter() -> None:
    def unfiltered(request: httpx.Request) -> httpx.Response:
        items = [record(1), record(2)]
        return httpx.Response(200, json={"items": items, "next_cursor": None, "has_more": False})

    item = await make_client(unfiltered).request(ENDPOINT, "req-0002")
    assert item is not None and item.request_id == "req-0002"


@pytest.mark.anyio
async def test_naive_window_is_a_usage_error() -> None:
    client = make_client(FakePlatform())
    with pytest.raises(UsageError, match="timezone-aware"):
        await client.requests(ENDPOINT, start=datetime(2026, 3, 1), end=T0)
    with pytest.raises(UsageError, match="end after it starts"):
        await client.requests(ENDPOINT, start=T0, end=T0)


@pytest.mark.anyio
async def test_looping_cursor_stops_with_protocol_error() -> None:
    def looping(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"items": [], "next_cursor": "Mg==", "has_more": True})

    platform = FakePlatform(faults=[looping] * 50)
    with pytest.raises(ProtocolError, match="repeats an earlier cursor"):
        await make_client(platform).requests(ENDPOINT, start=START, end=END)
    assert len(platform.calls) == 2


@pytest.mark.anyio
async def test_endless_pages_stop_with_protocol_error_past_max_pages() -> None:
    platform = FakePlatform(items=[record(n) for n in range(50)])
    with pytest.raises(ProtocolError, match="after 3 pages"):
        await make_client(platform, page_size=5, max_pages=3).requests(
            ENDPOINT, start=START, end=END
        )
    assert len(platform.calls) == 3


# --- failures ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("code", [401, 403, 404])
async def test_refusal_is_platform_unavailable_not_retried(code: int) -> None:
    platform = FakePlatform(faults=[always(code)])
    with pytest.raises(PlatformUnavailableError) as caught:
        await make_client(platform).requests(ENDPOINT, start=START, end=END)
    assert not isinstance(caught.value, AuthError)
    assert caught.value.status_code == code and caught.value.path == REQUESTS_PATH
    assert f"GET {REQUESTS_PATH}: HTTP {code}" in str(caught.value)
    assert len(platform.calls) == 1


@pytest.mark.anyio
async def test_wrong_key_is_platform_unavailable_without_the_key() -> None:
    platform = FakePlatform()
    with pytest.raises(PlatformUnavailableError, match="HTTP 401") as caught:
        await make_client(platform, key="other-id:other-secret").prices([ENDPOINT])
    assert "other-secret" not in str(caught.value) and caught.value.path == PRICING_PATH


@pytest.mark.anyio
async def test_api_without_the_history_route_is_platform_unavailable() -> None:
    client = make_client(FakePlatform(), api_url=f"{API}/elsewhere/")
    with pytest.raises(PlatformUnavailableError) as caught:
        await client.requests(ENDPOINT, start=START, end=END)
    assert caught.value.path == f"/elsewhere{REQUESTS_PATH}" and caught.value.status_code == 404


@pytest.mark.anyio
async def test_503_retried_then_succeeds() -> None:
    time = FakeTime()
    platform = FakePlatform(items=[record(n) for n in range(12)], faults=[always(503)] * 2)
    items = await make_client(platform, time=time, page_size=5).requests(
        ENDPOINT, start=START, end=END
    )
    assert len(items) == 12
    assert len(platform.calls) == 2 + 3 and time.sleeps == [0.0, 0.0]


@pytest.mark.anyio
async def test_429_waits_retry_after_then_succeeds() -> None:
    time = FakeTime()
    platform = FakePlatform(items=[record(1)], faults=[always(429, headers={"Retry-After": "2"})])
    items = await make_client(platform, time=time).requests(ENDPOINT, start=START, end=END)
    assert [i.request_id for i in items] == ["req-0001"] and time.sleeps == [2.0]


@pytest.mark.anyio
async def test_5xx_past_the_policy_is_platform_unavailable() -> None:
    platform = FakePlatform(faults=[always(502)] * 10)
    with pytest.raises(PlatformUnavailableError, match="HTTP 502 past the retry") as caught:
        await make_client(platform).requests(ENDPOINT, start=START, end=END)
    assert caught.value.status_code == 502
    assert isinstance(caught.value.__cause__, HTTPStatusError)
    assert len(platform.calls) == ZERO_WAIT.attempts


@pytest.mark.anyio
async def test_transport_error_retried_then_platform_unavailable() -> None:
    time = FakeTime()
    calls: list[httpx.Request] = []

    def unreachable(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectError(f"cannot connect (sent {SECRET})", request=request)

    with pytest.raises(PlatformUnavailableError, match="ConnectError") as caught:
        await make_client(unreachable, time=time).requests(ENDPOINT, start=START, end=END)
    assert len(calls) == ZERO_WAIT.attempts and len(time.sleeps) == ZERO_WAIT.attempts - 1
    assert caught.value.status_code is None and caught.value.path == REQUESTS_PATH
    assert isinstance(caught.value.__cause__, TransportError)
    assert no_secret(str(caught.value)) and no_secret(str(caught.value.__cause__))


@pytest.mark.anyio
async def test_transport_error_then_success() -> None:
    answers = iter([None, None])
    platform = FakePlatform(items=[record(1), record(2)])

    def flaky(request: httpx.Request) -> httpx.Response:
        if next(answers, "ok") is None:
            raise httpx.ReadTimeout("timed out", request=request)
        return platform(request)

    items = await make_client(flaky).requests(ENDPOINT, start=START, end=END)
    assert [i.request_id for i in items] == ["req-0001", "req-0002"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answer", "match"),
    [
        (httpx.Response(200, text="<html>oops</html>"), "not JSON"),
        (httpx.Response(200, json=[]), "unexpected answer shape"),
        (httpx.Response(200, json={"items": "none"}), "items"),
        (httpx.Response(200, json={"items": [{"sent_at": "2026-03-01T00:00:00Z"}]}), "request_id"),
        (httpx.Response(200, json={"items": [{"request_id": "r", "sent_at": "soon"}]}), "sent_at"),
        (httpx.Response(400, json={"detail": "bad window"}), "HTTP 400: .*bad window"),
    ],
)
async def test_unexpected_answer_is_protocol_error_not_retried(
    answer: httpx.Response, match: str
) -> None:
    platform = FakePlatform(faults=[lambda request: answer])
    with pytest.raises(ProtocolError, match=match):
        await make_client(platform).requests(ENDPOINT, start=START, end=END)
    assert len(platform.calls) == 1


@pytest.mark.anyio
@pytest.mark.parametrize("code", [400, 503])
async def test_key_echoed_by_the_server_never_reaches_an_error(code: int) -> None:
    echo = {"detail": f"bad key {SECRET} or {SECRET.partition(':')[2]}", "limit": SECRET}
    platform = FakePlatform(faults=[always(code, echo)] * 10)
    client = make_client(platform)
    with pytest.raises((ProtocolError, PlatformUnavailableError)) as caught:
        await client.requests(ENDPOINT, start=START, end=END)
    cause = caught.value.__cause__
    assert no_secret(str(caught.value)) and no_secret(str(cause))
    assert no_secret(getattr(cause, "body", "")) and "[redacted]" in str(caught.value) + str(
        getattr(cause, "body", "")
    )


def test_repr_never_shows_the_key() -> None:
    client = make_client(FakePlatform())
    assert no_secret(repr(client)) and no_secret(str(client))
    assert "api.fal.test" in repr(client)


@pytest.mark.parametrize(
    "options",
    [{"api_url": "ftp://api.fal.test"}, {"page_size": 0}, {"page_size": 101}, {"max_pages": 0}],
)
def test_bad_configuration_is_a_usage_error(options: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        make_client(FakePlatform(), **options)


# --- prices ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_prices_chunk_at_50_ids_and_follow_cursors() -> None:
    ids = [f"fal-ai/model-{n:03d}" for n in range(120)]
    platform = FakePlatform(prices={i: "0.025" for i in ids[::2]}, price_page=10)
    found = await make_client(platform).prices([*ids, *ids[:5]])  # repeats asked once

    assert sorted(found) == ids[::2]
    asked = [c.url.params["endpoint_id"].split(",") for c in platform.calls]
    assert all(len(chunk) <= 50 for chunk in asked)
    assert list(dict.fromkeys(i for chunk in asked for i in chunk)) == ids
    # 25, 25 and 10 priced ids per chunk, 10 a page: 3 + 3 + 1 calls.
    assert len(platform.calls) == 7
    assert [c.url.params.get("cursor") for c in platform.calls[:3]] == [
        None,
        cursor_for(10),
        cursor_for(20),
    ]


@pytest.mark.anyio
async def test_prices_parse_decimal_exactly() -> None:
    prices = {
        "fal-ai/flux/dev": "0.025",
        "fal-ai/flux/schnell": "0.003",
        "fal-ai/flux-pro/v1.1": "0.0400000000000000000001",
        "fal-ai/flux-lora": "1",
        "fal-ai/flux/krea": "3.5e-2",
    }
    platform = FakePlatform(prices=prices)
    found = await make_client(platform).prices(list(prices))

    assert {k: v.unit_price for k, v in found.items()} == {k: Decimal(v) for k, v in prices.items()}
    assert str(found["fal-ai/flux/dev"].unit_price) == "0.025"
    dev = found["fal-ai/flux/dev"]
    assert (dev.endpoint_id, dev.unit, dev.currency) == ("fal-ai/flux/dev", "image", "USD")
    assert isinstance(dev.unit_price, Decimal)


@pytest.mark.anyio
async def test_no_ids_no_call() -> None:
    platform = FakePlatform()
    assert await make_client(platform).prices([]) == {}
    assert platform.calls == []


@pytest.mark.anyio
@pytest.mark.parametrize("ids", [["fal-ai/a,fal-ai/b"], ["flux"], ["fal-ai/flux dev"]])
async def test_malformed_endpoint_id_is_a_usage_error(ids: list[str]) -> None:
    platform = FakePlatform()
    with pytest.raises(UsageError, match="owner/app"):
        await make_client(platform).prices(ids)
    assert platform.calls == []


@pytest.mark.anyio
async def test_negative_price_is_protocol_error() -> None:
    platform = FakePlatform(prices={ENDPOINT: "-0.5"})
    with pytest.raises(ProtocolError, match="unit_price"):
        await make_client(platform).prices([ENDPOINT])
