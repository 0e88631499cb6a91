"""The emulator's Platform API: request history (``requests/by-endpoint``) and prices.

Driven in-process over httpx's ASGI transport with a fake clock, as a client would use it:
the Platform API base is the emulator's base URL plus ``/api``.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.emulator import EmulatorConfig, parse_faults
from runner.emulator.history import Cursor, Query, RequestHistory
from runner.emulator.queue import StoredResult
from runner.emulator.routes import route_kind
from runner.errors import UsageError
from tests.emulator_support import (
    JOB_CLOCK_S,
    SCALE,
    T0,
    FakeClock,
    data_uri,
    in_process,
    make_emulator,
)

pytestmark = pytest.mark.anyio
LORA = "fal-ai/flux-lora"
I2I = "fal-ai/flux-lora/image-to-image"
LIST = "/api/v1/models/requests/by-endpoint"
PRICING = "/api/v1/models/pricing"
FIELDS = {"request_id", "endpoint_id", "sent_at", "started_at", "ended_at", "status_code"}
FIELDS |= {"duration"}
DAY_CLOCK_S = 86_400.0 * SCALE  # the default window, on the clock


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).isoformat().replace("+00:00", "Z")


async def submit(
    client: httpx.AsyncClient, prompt: str = "a cat", path: str = LORA, **kw: Any
) -> dict[str, Any]:
    response = await client.post(f"/{path}", json={"prompt": prompt, "seed": 1}, **kw)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def listing(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    params.setdefault("endpoint_id", LORA)
    response = await client.get(LIST, params=params)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def every_page(client: httpx.AsyncClient, **params: Any) -> list[list[dict[str, Any]]]:
    """Every page of one listing, following ``next_cursor`` until ``has_more`` is false."""
    pages, cursor = [], None
    while True:
        body = await listing(client, **params, **({"cursor": cursor} if cursor else {}))
        pages.append(body["items"])
        assert body["has_more"] is (body["next_cursor"] is not None)
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "the listing never ends"


def ids(items: list[dict[str, Any]]) -> list[str]:
    return [item["request_id"] for item in items]


# -- listing --------------------------------------------------------------------------------


async def test_listing_has_the_documented_fields_null_until_each_request_ends() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        running = await submit(client, "first")
        clock.advance(1.0 * SCALE)
        queued = await submit(client, "second")
        clock.advance(JOB_CLOCK_S / 2)
        during = await listing(client)
        clock.advance(2 * JOB_CLOCK_S)
        after = await listing(client)
    assert during["has_more"] is False and during["next_cursor"] is None
    assert ids(during["items"]) == [running["request_id"], queued["request_id"]]
    for item in during["items"]:
        assert set(item) == FIELDS  # no payloads without expand
        assert item["endpoint_id"] == LORA
        assert (item["started_at"], item["ended_at"], item["status_code"]) == (None, None, None)
        assert item["duration"] is None
    assert [item["sent_at"] for item in during["items"]] == [iso(T0), iso(T0 + 0.01)]
    first, second = after["items"]
    assert first["started_at"] == iso(T0) and first["ended_at"] == iso(T0 + JOB_CLOCK_S)
    assert second["started_at"] == iso(T0 + JOB_CLOCK_S)
    assert second["ended_at"] == iso(T0 + 2 * JOB_CLOCK_S)
    assert [item["status_code"] for item in after["items"]] == [200, 200]
    assert second["duration"] == pytest.approx(2 * JOB_CLOCK_S - 0.01)


async def test_expand_payloads_gives_the_exact_input_and_the_stored_result() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    body = {"prompt": "nested", "seed": 7, "loras": [{"path": "https://x/y.safetensors"}]}
    async with in_process(emu) as client:
        sub = (await client.post(f"/{LORA}", json=body)).json()
        queued = (await listing(client, expand="payloads"))["items"][0]
        clock.advance(JOB_CLOCK_S)
        result = (await client.get(sub["response_url"])).json()
        done = (await listing(client, expand="payloads"))["items"][0]
    assert set(queued) == FIELDS | {"json_input", "json_output"}
    assert queued["json_input"] == body and queued["json_output"] is None
    assert done["json_input"] == body
    assert done["json_output"] == result and result["images"]


async def test_error_bodies_are_kept_as_json_output() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("fail_internal_error=@1"))
    async with in_process(emu) as client:
        sub = await submit(client)
        clock.advance(JOB_CLOCK_S)
        result = await client.get(sub["response_url"])
        item = (await listing(client, expand="payloads"))["items"][0]
    assert (item["status_code"], item["json_output"]) == (500, result.json())
    assert result.status_code == 500


async def test_the_listing_is_per_endpoint_id_as_submitted_sub_path_included() -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        plain = await submit(client)
        response = await client.post(f"/{I2I}", json={"prompt": "x", "image_url": data_uri(8, 8)})
        assert response.status_code == 200
        of_app = await listing(client)
        of_path = await listing(client, endpoint_id=I2I)
    assert ids(of_app["items"]) == [plain["request_id"]]
    assert ids(of_path["items"]) == [response.json()["request_id"]]
    assert of_path["items"][0]["endpoint_id"] == I2I


async def test_window_start_is_inclusive_and_end_exclusive_in_every_iso_form() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    sent = []
    async with in_process(emu) as client:
        for n in range(3):
            sent.append((await submit(client, f"{n}"))["request_id"])
            clock.advance(1.0)
        middle = await listing(client, start=iso(T0 + 1), end=iso(T0 + 2))
        offset = await listing(client, start=iso(T0 + 1).replace("Z", "+00:00"), end=iso(T0 + 1.5))
        fractional = await listing(client, start=iso(T0 + 0.999999), end=iso(T0 + 1.000001))
        day = datetime.fromtimestamp(T0, tz=UTC).date().isoformat()
        from_date = await listing(client, start=day)
        to_date = await listing(client, start="2000-01-01", end=day)
        empty = await listing(client, start=iso(T0 + 2), end=iso(T0 + 1))
    assert ids(middle["items"]) == [sent[1]]
    assert ids(offset["items"]) == [sent[1]]
    assert ids(fractional["items"]) == [sent[1]]
    assert ids(from_date["items"]) == sent
    assert to_date["items"] == [] and empty["items"] == []


async def test_default_window_is_the_last_24_emulated_hours() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        old = await submit(client, "old")
        clock.advance(DAY_CLOCK_S + 0.01)
        new = await submit(client, "new")
        default = await listing(client)
        wide = await listing(client, start=iso(T0))
        before_end = await listing(client, end=iso(T0 + 0.01))  # opens 24 h before it
        clock.now = T0 + DAY_CLOCK_S  # the old one now sent exactly 24 h ago: start inclusive
        edge = await listing(client)
    assert ids(default["items"]) == [new["request_id"]]
    assert ids(edge["items"]) == [old["request_id"]]  # (and nothing sent after "now")
    assert ids(wide["items"]) == [old["request_id"], new["request_id"]]
    assert ids(before_end["items"]) == [old["request_id"]]


async def test_request_id_lists_only_that_request_in_any_window() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        target = await submit(client, "target")
        await submit(client, "other")
        clock.advance(10 * DAY_CLOCK_S)  # far outside the default window
        rid = target["request_id"]
        alone = await listing(client, request_id=rid)
        wide = await listing(client, request_id=rid, start="2000-01-01", end="2100-01-01")
        outside = await listing(client, request_id=rid, start=iso(T0 + 1))
        other_endpoint = await listing(client, request_id=rid, endpoint_id=I2I)
        unknown = await listing(client, request_id="no-such-request")
    assert ids(alone["items"]) == [rid] and alone["has_more"] is False
    assert ids(wide["items"]) == [rid]
    assert outside["items"] == other_endpoint["items"] == unknown["items"] == []


async def test_status_filter_by_outcome() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("fail_internal_error=@1"))
    async with in_process(emu) as client:
        failed = await submit(client, "fails")
        ok = await submit(client, "succeeds")
        cancelled = await submit(client, "cancelled")
        pending = await submit(client, "pending")
        assert (await client.put(cancelled["cancel_url"])).status_code == 202
        clock.advance(JOB_CLOCK_S)  # "fails" ends (it ran half its time), "succeeds" runs
        clock.advance(JOB_CLOCK_S)
        by = {s: ids((await listing(client, status=s))["items"]) for s in ("success", "error")}
        by["user_error"] = ids((await listing(client, status="user_error"))["items"])
        everything = ids((await listing(client))["items"])
    assert by == {
        "success": [ok["request_id"]],
        "error": [failed["request_id"]],
        "user_error": [cancelled["request_id"]],
    }
    assert pending["request_id"] in everything and len(everything) == 4


# -- pagination -----------------------------------------------------------------------------


@pytest.mark.parametrize("unordered", [False, True])
async def test_pages_hold_every_item_exactly_once(unordered: bool) -> None:
    faults = parse_faults("history_unordered=1" if unordered else "")
    clock = FakeClock()
    emu = make_emulator(clock, faults=faults)
    async with in_process(emu) as client:
        sent = []
        for n in range(23):
            sent.append((await submit(client, f"{n}"))["request_id"])
            clock.advance(0.001)
        pages = await every_page(client, limit=5)
        again = await every_page(client, limit=5)
        stats = (await client.get("/_emulator/stats")).json()
    listed = [rid for page in pages for rid in ids(page)]
    assert [len(page) for page in pages] == [5, 5, 5, 5, 3]
    assert sorted(listed) == sorted(sent) and len(set(listed)) == 23
    if unordered:
        assert listed != sent  # shuffled across pages, not sent order
        assert ids(again[0]) != ids(pages[0])  # each listing has its own shuffle
        assert stats["faults"]["history_unordered"] == 2
    else:
        assert listed == sent
        assert "history_unordered" not in stats["faults"]


@pytest.mark.parametrize("unordered", [False, True])
async def test_requests_arriving_between_pages_neither_repeat_nor_push_others_out(
    unordered: bool,
) -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults(f"history_unordered={int(unordered)}"))
    async with in_process(emu) as client:
        before = [(await submit(client, f"b{n}"))["request_id"] for n in range(10)]
        first = await listing(client, limit=4)
        later = [(await submit(client, f"l{n}"))["request_id"] for n in range(6)]
        seen, cursor = ids(first["items"]), first["next_cursor"]
        while cursor is not None:
            body = await listing(client, limit=4, cursor=cursor)
            seen += ids(body["items"])
            cursor = body["next_cursor"]
    assert len(seen) == len(set(seen))
    assert sorted(seen) == sorted(before)  # later ones wait for a fresh listing
    assert not set(later) & set(seen)


async def test_status_filtered_pages_and_a_cursor_reused_give_the_same_page() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, concurrency=4, faults=parse_faults("fail_internal_error=0.5"))
    async with in_process(emu) as client:
        for n in range(12):
            await submit(client, f"{n}")
        clock.advance(3 * JOB_CLOCK_S)
        everything = [item for page in await every_page(client) for item in page]
        failures = [rid for page in await every_page(client, status="error", limit=2)
                    for rid in ids(page)]  # fmt: skip
        first = await listing(client, limit=3)
        twice = [await listing(client, limit=3, cursor=first["next_cursor"]) for _ in range(2)]
    expected = [item["request_id"] for item in everything if item["status_code"] == 500]
    assert failures == expected and 0 < len(expected) < 12
    assert twice[0] == twice[1]


async def test_a_cursor_not_given_out_is_refused() -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        answers = [
            await client.get(LIST, params={"endpoint_id": LORA, "cursor": bad})
            for bad in ("garbage!", "Mg==", Cursor(3).encode()[:-2] + "xx")
        ]
    for answer in answers:
        assert answer.status_code == 422
        assert answer.json()["detail"][0]["loc"] == ["query", "cursor"]


@settings(max_examples=60, deadline=None)
@given(
    count=st.integers(0, 40),
    limit=st.integers(1, 9),
    shuffle=st.none() | st.integers(0, 2**63),
    status=st.sampled_from([None, "success", "error"]),
    drop=st.integers(0, 10),
)
def test_history_pages_cover_the_matching_entries_exactly_once(
    count: int, limit: int, shuffle: int | None, status: Any, drop: int
) -> None:
    max_items = max(1, count - drop)
    history = RequestHistory(retention_s=float("inf"), max_items=max_items)
    rng = random.Random(count)
    outcomes: dict[str, str | None] = {}
    for n in range(count):
        rid = f"r{n}"
        outcomes[rid] = None
        history.record(rid, LORA, T0 + n, {"n": n}, store_io=True)
        if rng.random() < 0.7:
            code = 200 if rng.random() < 0.5 else 503
            result = StoredResult(code, {})
            history.ended(rid, started_at=T0 + n, ended_at=T0 + n + 1, result=result)
            outcomes[rid] = "success" if code == 200 else "error"
    query = Query(LORA, start_us=None, end_us=None, status=status, limit=limit)
    page = history.page(query, now=T0 + count, shuffle=shuffle)
    listed = [e.request_id for e in page.items]
    while page.next_cursor is not None:
        cursor = Cursor.decode(page.next_cursor.encode())
        page = history.page(query, now=T0 + count, cursor=cursor)
        assert page.items, "a cursor was given out for an empty page"
        listed += [e.request_id for e in page.items]
    kept = list(outcomes)[-max_items:] if count else []  # the oldest dropped first
    expected = [rid for rid in kept if status is None or outcomes[rid] == status]
    assert sorted(listed) == sorted(expected) and len(listed) == len(set(listed))
    assert len(history) == len(kept)
    if shuffle is None:
        assert listed == expected


# -- retention ------------------------------------------------------------------------------


async def test_history_outlives_the_queues_result_retention() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, result_retention_s=60.0)
    async with in_process(emu) as client:
        sub = await submit(client)
        clock.advance(JOB_CLOCK_S)
        result = (await client.get(sub["response_url"])).json()
        clock.advance(3600 * SCALE)
        gone = await client.get(sub["response_url"])
        kept = await listing(client, request_id=sub["request_id"], expand="payloads")
    assert gone.status_code == 404
    assert emu.scheduler.jobs == {}
    assert kept["items"][0]["json_output"] == result
    assert kept["items"][0]["status_code"] == 200


async def test_history_drops_entries_past_its_retention_and_its_size_limit() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, history_retention_s=100.0, history_max_items=3)
    async with in_process(emu) as client:
        sent = []
        for n in range(4):
            sent.append((await submit(client, f"{n}"))["request_id"])
            clock.advance(10 * SCALE)
        capped = await listing(client, start="2000-01-01")
        clock.now = T0 + 100 * SCALE  # the first kept one (sent at +10) is still in
        at_100 = await listing(client, start="2000-01-01")
        clock.now = T0 + 110 * SCALE
        at_110 = await listing(client, start="2000-01-01")
        stats = (await client.get("/_emulator/stats")).json()
    assert ids(capped["items"]) == sent[1:]  # oldest dropped first
    assert ids(at_100["items"]) == sent[1:]
    assert ids(at_110["items"]) == sent[2:]
    assert stats["history"] == {"entries": 2, "dropped": 2}


async def test_a_submit_whose_answer_was_lost_is_in_the_history() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("reset_after_accept=@1"))
    async with in_process(emu) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(f"/{LORA}", json={"prompt": "lost", "seed": 5})
        clock.advance(JOB_CLOCK_S)
        items = (await listing(client, expand="payloads"))["items"]
    assert [item["json_input"] for item in items] == [{"prompt": "lost", "seed": 5}]
    assert items[0]["status_code"] == 200 and items[0]["json_output"]["seed"] == 5


async def test_store_io_0_keeps_the_request_listed_without_payloads() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        private = await submit(client, "private", headers={"X-Fal-Store-IO": "0"})
        public = await submit(client, "public", headers={"X-Fal-Store-IO": "1"})
        clock.advance(2 * JOB_CLOCK_S)
        items = (await listing(client, expand="payloads"))["items"]
    assert ids(items) == [private["request_id"], public["request_id"]]
    assert (items[0]["json_input"], items[0]["json_output"]) == (None, None)
    assert items[0]["status_code"] == 200 and items[0]["ended_at"] is not None
    assert items[1]["json_input"] == {"prompt": "public", "seed": 1}
    assert items[1]["json_output"]["seed"] == 1


# -- faults ---------------------------------------------------------------------------------


async def test_history_unavailable_answers_403_for_history_and_pricing() -> None:
    emu = make_emulator(FakeClock(), faults=parse_faults("history_unavailable=@1+2"))
    async with in_process(emu) as client:
        listed = await client.get(LIST, params={"endpoint_id": LORA})
        priced = await client.get(PRICING, params={"endpoint_id": LORA})
        later = await client.get(LIST, params={"endpoint_id": LORA})
    for answer in (listed, priced):
        assert answer.status_code == 403 and isinstance(answer.json()["detail"], str)
    assert later.status_code == 200
    assert emu.snapshot()["faults"]["history_unavailable"] == 2


async def test_history_delay_lists_a_request_only_that_long_after_it_was_sent() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("history_delay_s=5"))
    async with in_process(emu) as client:
        sub = await submit(client)
        at_once = await listing(client)
        by_id = await listing(client, request_id=sub["request_id"])
        clock.advance(4.9 * SCALE)
        nearly = await listing(client)
        clock.advance(0.1 * SCALE)
        listed = await listing(client)
    assert at_once["items"] == by_id["items"] == nearly["items"] == []
    assert ids(listed["items"]) == [sub["request_id"]]
    assert emu.snapshot()["faults"]["history_delay"] == 3


async def test_history_page_limit_caps_the_page_size() -> None:
    emu = make_emulator(FakeClock(), faults=parse_faults("history_page_limit=2"))
    async with in_process(emu) as client:
        sent = [(await submit(client, f"{n}"))["request_id"] for n in range(5)]
        first = await listing(client, limit=50)
        pages = await every_page(client)
        small = await listing(client, limit=1)
    assert len(first["items"]) == 2 and first["has_more"] is True
    assert [ids(page) for page in pages] == [sent[0:2], sent[2:4], sent[4:]]
    assert len(small["items"]) == 1
    assert emu.snapshot()["faults"]["history_page_limit"] == 4


def test_history_fault_specs_parse() -> None:
    config = parse_faults(
        "history_unavailable=@2,history_unordered=1,history_delay_s=3,history_page_limit=7"
    )
    assert config.history_unavailable.at == frozenset({2})
    assert config.history_unordered.rate == 1.0
    assert (config.history_delay_s, config.history_page_limit) == (3.0, 7)
    for bad in ("history_page_limit=-1", "history_delay_s=-2", "history_unordered=2"):
        with pytest.raises(UsageError):
            parse_faults(bad)


# -- pricing --------------------------------------------------------------------------------


async def test_pricing_answers_the_price_table_and_omits_unknown_ids() -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        comma = await client.get(PRICING, params={"endpoint_id": f"{LORA},fal-ai/nope,{I2I}"})
        repeated = await client.get(PRICING, params=[("endpoint_id", LORA), ("endpoint_id", I2I)])
    assert comma.status_code == 200
    assert comma.json() == {
        "prices": [
            {"endpoint_id": LORA, "unit_price": 0.035, "unit": "image", "currency": "USD"},
            {"endpoint_id": I2I, "unit_price": 0.035, "unit": "image", "currency": "USD"},
        ],
        "next_cursor": None,
        "has_more": False,
    }
    assert repeated.json() == comma.json()


async def test_account_prices_win_in_pricing_and_in_billing() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, account_prices={LORA: Decimal("0.02"), "fal-ai/custom": Decimal(1)})
    async with in_process(emu) as client:
        body = (await client.get(PRICING, params={"endpoint_id": f"{LORA},{I2I}"})).json()
        custom = (await client.get(PRICING, params={"endpoint_id": "fal-ai/custom"})).json()
        await submit(client)
        clock.advance(JOB_CLOCK_S)
        stats = (await client.get("/_emulator/stats")).json()
    assert [(p["endpoint_id"], p["unit_price"]) for p in body["prices"]] == [
        (LORA, 0.02),
        (I2I, 0.035),
    ]
    assert custom["prices"][0]["unit_price"] == 1.0
    assert stats["billing"][LORA]["usd"] == "0.02"  # one 1 MP image at the account's price


def test_account_prices_are_validated_and_frozen() -> None:
    prices = {LORA: Decimal("0.01")}
    config = EmulatorConfig(account_prices=prices)
    prices[LORA] = Decimal(5)
    assert config.account_prices[LORA] == Decimal("0.01")
    with pytest.raises(UsageError):
        EmulatorConfig(account_prices={LORA: Decimal(-1)})
    with pytest.raises(UsageError):
        EmulatorConfig(history_max_items=0)


async def test_pricing_wants_1_to_50_ids() -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        none = await client.get(PRICING)
        many = await client.get(
            PRICING, params={"endpoint_id": ",".join(f"a/{n}" for n in range(51))}
        )
        fifty = await client.get(
            PRICING, params={"endpoint_id": ",".join(f"a/{n}" for n in range(50))}
        )
    assert none.status_code == many.status_code == 422
    assert fifty.status_code == 200 and fifty.json()["prices"] == []


# -- auth, validation, routing ---------------------------------------------------------------


@pytest.mark.parametrize("path", [LIST, PRICING])
@pytest.mark.parametrize("header", [None, "Key wrong:key", "Bearer emulator:local-key"])
async def test_calls_without_the_key_are_refused(path: str, header: str | None) -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu, auth=False) as client:
        headers = {"Authorization": header} if header else {}
        answer = await client.get(path, params={"endpoint_id": LORA}, headers=headers)
    assert answer.status_code == 401
    assert answer.json() == {"detail": "Unauthorized: missing or invalid Key credentials"}


@pytest.mark.parametrize(
    ("params", "name"),
    [({}, "endpoint_id"), ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"),
     ({"limit": "ten"}, "limit"), ({"status": "failed"}, "status"),
     ({"start": "yesterday"}, "start"), ({"end": "2026-13-01"}, "end"),
     ({"expand": "logs"}, "expand")],
)  # fmt: skip
async def test_bad_listing_parameters_are_422(params: dict[str, str], name: str) -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        answer = await client.get(LIST, params={"endpoint_id": LORA, **params} if params else {})
    assert answer.status_code == 422
    assert answer.json()["detail"][0]["loc"] == ["query", name]


async def test_the_api_prefix_is_not_shadowed_by_the_queue_routes() -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        posted = await client.post(LIST, json={"prompt": "x"})
        listed = await client.get(LIST, params={"endpoint_id": LORA, "limit": "100"})
        stats = (await client.get("/_emulator/stats")).json()
    assert posted.status_code == 405  # not a submit
    assert listed.status_code == 200
    assert stats["submits"]["accepted"] == 0
    assert stats["calls"]["platform"] == 2
    assert route_kind("GET", LIST) == route_kind("GET", PRICING) == "platform"
