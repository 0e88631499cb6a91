"""Faults of lost contact: result reads that fail, status streams that are not SSE or drop.

In-process over httpx's ASGI transport with a fake clock, then the official fal-client 1.0.3
and httpx-sse (the SSE reader fal-client uses) against the emulator on a real loopback server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import fal_client
import fal_client.client
import httpx
import httpx_sse
import pytest

from runner.emulator import (
    DEFAULT_KEY,
    Emulator,
    EmulatorConfig,
    FaultConfig,
    Served,
    ServiceTime,
    Trigger,
    parse_faults,
    serve,
)
from runner.emulator.faults import FaultInjector
from runner.errors import UsageError
from tests.emulator_support import JOB_CLOCK_S, FakeClock, in_process, make_emulator

pytestmark = pytest.mark.anyio
LORA = "fal-ai/flux-lora"


@pytest.mark.parametrize(
    ("spec", "check"),
    [("result_5xx=0.2", lambda c: c.result_5xx == Trigger(rate=0.2)),
     ("result_reset=@1+3", lambda c: c.result_reset.at == frozenset({1, 3})),
     ("stream_not_sse=1", lambda c: c.stream_not_sse == Trigger(rate=1.0)),
     ("stream_drop_after=2", lambda c: c.stream_drop_after == 2),
     ("stream_drop_after=0", lambda c: c == FaultConfig())],
)  # fmt: skip
def test_lost_contact_fault_specs_parse(spec: str, check: Callable[[FaultConfig], bool]) -> None:
    assert check(parse_faults(spec))


@pytest.mark.parametrize(
    "spec",
    ["result_5xx=2", "result_reset=@0", "stream_not_sse=often", "stream_drop_after=-1",
     "stream_drop_after=1.5", "stream_drop_after=@2"],
)  # fmt: skip
def test_bad_lost_contact_fault_specs_are_usage_errors(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_faults(spec)


def _result_draws(spec: str, n: int = 200) -> list[int | str | None]:
    injector = FaultInjector(parse_faults(spec))
    return [injector.result_fault() for _ in range(n)]


def test_result_faults_replay_under_a_seed_and_keep_their_own_streams() -> None:
    both = "result_5xx=0.3,result_reset=0.2"
    first, again = _result_draws(both + ",seed=5"), _result_draws(both + ",seed=5")
    resets_alone = _result_draws("result_reset=0.2,seed=5")
    assert first == again != _result_draws(both + ",seed=6")
    # result_5xx being on does not shift the reset stream
    assert [d == "reset" for d in first] == [d == "reset" for d in resets_alone]
    assert {None, "reset", 502, 503} == set(first)
    injector = FaultInjector(parse_faults("stream_not_sse=0.5,seed=5"))
    picks = [injector.stream_not_sse() for _ in range(200)]
    assert 60 < sum(picks) < 140


def test_result_5xx_schedule_hits_listed_reads_with_502_and_503_by_turns() -> None:
    draws = _result_draws("result_5xx=@2+3+5,result_reset=@5", n=6)
    assert draws == [None, 502, 503, None, "reset", None]  # the reset wins the 5th read
    assert _result_draws("result_5xx=1", n=4) == [502, 503, 502, 503]


async def _completed(emu: Emulator, client: httpx.AsyncClient, clock: FakeClock) -> dict[str, Any]:
    sub = (await client.post(f"/{LORA}", json={"prompt": "x"})).json()
    clock.advance(JOB_CLOCK_S)
    return dict(sub)


async def test_result_5xx_answers_like_the_gateway_then_a_later_read_succeeds() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("result_5xx=@1+2"))
    async with in_process(emu) as client:
        sub = await _completed(emu, client, clock)
        failed = [await client.get(sub["response_url"]) for _ in range(2)]
        read = await client.get(sub["response_url"])
        status = await client.get(sub["status_url"])
    assert [r.status_code for r in failed] == [502, 503]
    for response in failed:
        assert "nginx" in response.text and response.headers["content-type"].startswith("text/html")
        assert "x-fal-request-id" not in response.headers
    assert read.status_code == 200 and read.headers["x-fal-request-id"] == sub["request_id"]
    assert read.json()["images"][0]["url"]
    assert status.json()["status"] == "COMPLETED"
    stats = emu.snapshot()
    assert stats["faults"] == {"result_5xx": 2} and stats["calls"]["result"] == 3
    assert stats["jobs"]["endings"] == {"succeeded": 1}
    assert stats["billing"]["fal-ai/flux-lora"]["images"] == 1  # billed once, not per read


async def test_result_reset_breaks_the_read_but_not_the_job() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("result_reset=@1"))
    async with in_process(emu) as client:
        sub = await _completed(emu, client, clock)
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(sub["response_url"])
        read = await client.get(sub["response_url"])
    assert read.status_code == 200 and read.json()["images"]
    assert emu.snapshot()["faults"] == {"result_reset": 1}


async def test_result_faults_at_rate_one_fail_every_read() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("result_5xx=1"))
    async with in_process(emu) as client:
        sub = await _completed(emu, client, clock)
        codes = [(await client.get(sub["response_url"])).status_code for _ in range(6)]
    assert codes == [502, 503] * 3
    reset = make_emulator(clock, faults=parse_faults("result_reset=1"))
    async with in_process(reset) as client:
        sub = await _completed(reset, client, clock)
        for _ in range(4):
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(sub["response_url"])
    assert reset.snapshot()["faults"] == {"result_reset": 4}


async def test_result_faults_leave_status_and_stream_alone() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("result_5xx=1,result_reset=1"))
    async with in_process(emu) as client:
        sub = await _completed(emu, client, clock)
        status = await client.get(sub["status_url"])
        stream = await client.get(sub["status_url"] + "/stream")
    assert status.status_code == 200 and stream.status_code == 200
    assert emu.snapshot()["faults"] == {}


def _data_events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]


async def test_stream_not_sse_answers_the_plain_status_then_the_next_stream_is_sse() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("stream_not_sse=@1+3"))
    async with in_process(emu) as client:
        sub = (await client.post(f"/{LORA}", json={"prompt": "x"})).json()
        stream_url, params = sub["status_url"] + "/stream", {"logs": "1"}
        plain = await client.get(stream_url, params=params)
        status = await client.get(sub["status_url"], params=params)
        clock.advance(JOB_CLOCK_S)
        sse = await client.get(stream_url, params=params)
        done = await client.get(stream_url, params=params)
    assert plain.status_code == 202 and plain.headers["content-type"] == "application/json"
    assert plain.json() == status.json() and plain.json()["status"] == "IN_PROGRESS"
    assert plain.headers["x-fal-request-id"] == sub["request_id"]
    assert sse.headers["content-type"].startswith("text/event-stream")
    assert [e["status"] for e in _data_events(sse.text)] == ["COMPLETED"]
    assert done.status_code == 200 and done.headers["content-type"] == "application/json"
    assert done.json()["status"] == "COMPLETED"
    assert emu.snapshot()["faults"] == {"stream_not_sse": 2}


async def test_an_sse_reader_rejects_a_stream_that_is_not_sse() -> None:
    emu = make_emulator(FakeClock(), faults=parse_faults("stream_not_sse=1"))
    async with in_process(emu) as client:
        sub = (await client.post(f"/{LORA}", json={"prompt": "x"})).json()
        async with httpx_sse.aconnect_sse(client, "GET", sub["status_url"] + "/stream") as source:
            with pytest.raises(httpx_sse.SSEError, match="text/event-stream"):
                async for _ in source.aiter_sse():
                    pass


async def test_stream_drop_after_ends_cleanly_after_n_events_without_completed() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, keepalive_s=2.0, faults=parse_faults("stream_drop_after=2"))
    async with in_process(emu) as client:
        await client.post(f"/{LORA}", json={"prompt": "blocker"})
        sub = (await client.post(f"/{LORA}", json={"prompt": "watched"})).json()
        texts: list[str] = []

        async def read() -> None:
            async with client.stream("GET", sub["status_url"] + "/stream") as response:
                texts.append((await response.aread()).decode())

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.sleep(0.03)  # real time: the stream sends IN_QUEUE first
                clock.advance(JOB_CLOCK_S)  # the blocker ends, the watched job starts
                emu.advance()
        clock.advance(JOB_CLOCK_S)
        after = await client.get(sub["status_url"] + "/stream")  # done: COMPLETED comes first
    assert [e["status"] for e in _data_events(texts[0])] == ["IN_QUEUE", "IN_PROGRESS"]
    assert [e["status"] for e in _data_events(after.text)] == ["COMPLETED"]
    assert emu.snapshot()["faults"] == {"stream_drop_after": 1}  # the finished one did not drop


async def test_stream_drop_after_one_sends_a_single_event() -> None:
    emu = make_emulator(FakeClock(), faults=parse_faults("stream_drop_after=1"))
    async with in_process(emu) as client:
        sub = (await client.post(f"/{LORA}", json={"prompt": "x"})).json()
        for _ in range(2):  # every stream drops, not only the first
            response = await client.get(sub["status_url"] + "/stream")
            assert response.headers["content-type"].startswith("text/event-stream")
            assert [e["status"] for e in _data_events(response.text)] == ["IN_PROGRESS"]
    assert emu.snapshot()["faults"] == {"stream_drop_after": 2}


class TestOverLoopback:
    """fal-client and httpx against uvicorn: what a real client sees of each fault."""

    @pytest.fixture
    def anyio_backend(self) -> str:
        return "asyncio"  # uvicorn and fal-client's AsyncClient are asyncio-only

    @pytest.fixture
    def fal(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
        """Points fal-client's module globals at a served emulator; yields a client maker."""
        # 3 attempts instead of 10 so "retries run out" takes ~0.3 s, not ~30 s of backoff
        monkeypatch.setattr(fal_client.client, "MAX_ATTEMPTS", 3)

        @asynccontextmanager
        async def point(served: Served) -> AsyncIterator[fal_client.AsyncClient]:
            monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", served.base_url + "/")
            client = fal_client.AsyncClient(key=DEFAULT_KEY)
            try:
                yield client
            finally:
                await (await client._client).aclose()  # fal-client never closes it

        yield point

    @staticmethod
    def emulator(faults: str) -> Emulator:
        config = EmulatorConfig(
            time_scale=0.01,
            service=ServiceTime(fixed_s=20.0),
            keepalive_s=1.0,
            faults=parse_faults(faults),
        )
        return Emulator(config)

    @staticmethod
    async def stats(served: Served) -> dict[str, Any]:
        async with httpx.AsyncClient() as http:
            return dict((await http.get(served.base_url + "/_emulator/stats")).json())

    @pytest.mark.parametrize("fault", ["result_5xx=@1+2", "result_reset=@1+2"])
    async def test_official_client_retries_failed_result_reads(self, fal: Any, fault: str) -> None:
        async with serve(self.emulator(fault)) as served, fal(served) as client:
            handle = await client.submit(LORA, {"prompt": "fetched at last", "seed": 3})
            result = await handle.get(interval=0.02)
            counted = await self.stats(served)
        assert result["prompt"] == "fetched at last" and result["seed"] == 3
        assert counted["calls"]["result"] == 3
        assert counted["faults"] == {fault.split("=")[0]: 2}

    async def test_official_client_gives_up_when_every_result_read_is_a_5xx(self, fal: Any) -> None:
        async with serve(self.emulator("result_5xx=1")) as served, fal(served) as client:
            handle = await client.submit(LORA, {"prompt": "never fetched"})
            with pytest.raises(fal_client.client.FalClientHTTPError) as raised:
                await handle.get(interval=0.02)
            status = await handle.status()
            counted = await self.stats(served)
        assert raised.value.status_code == 502  # reads 1..3: 502, 503, 502
        assert "nginx" in raised.value.response.text
        assert isinstance(status, fal_client.Completed)  # the job itself is fine
        assert counted["calls"]["result"] == 3 and counted["faults"] == {"result_5xx": 3}

    async def test_official_client_gives_up_when_every_result_read_resets(self, fal: Any) -> None:
        async with serve(self.emulator("result_reset=1")) as served, fal(served) as client:
            handle = await client.submit(LORA, {"prompt": "never fetched"})
            with pytest.raises(httpx.RemoteProtocolError):
                await handle.get(interval=0.02)
            counted = await self.stats(served)
        assert counted["calls"]["result"] == 3 and counted["faults"] == {"result_reset": 3}

    async def test_stream_faults_over_a_real_socket(self, fal: Any) -> None:
        auth = {"Authorization": f"Key {DEFAULT_KEY}"}
        async with (
            serve(self.emulator("stream_not_sse=@1,stream_drop_after=1")) as served,
            fal(served) as client,
            httpx.AsyncClient(headers=auth) as http,
        ):
            handle = await client.submit(LORA, {"prompt": "watched"})
            url = handle.status_url + "/stream"
            async with httpx_sse.aconnect_sse(http, "GET", url) as source:
                with pytest.raises(httpx_sse.SSEError):
                    async for _ in source.aiter_sse():
                        pass
                plain = source.response.status_code
            async with httpx_sse.aconnect_sse(http, "GET", url) as source:
                events = [event.json() async for event in source.aiter_sse()]
            result = await handle.get(interval=0.02)  # the job goes on regardless
            counted = await self.stats(served)
        assert plain == 202
        assert len(events) == 1 and events[0]["status"] in {"IN_QUEUE", "IN_PROGRESS"}
        assert result["prompt"] == "watched"
        assert counted["faults"] == {"stream_not_sse": 1, "stream_drop_after": 1}
