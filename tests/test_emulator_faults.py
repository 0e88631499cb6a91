"""Fault injection: the text syntax, per-kind determinism under a seed, and each fault's effect."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runner.emulator import FaultConfig, Trigger, parse_faults
from runner.emulator.faults import FAILURE_STATUS, FaultInjector
from runner.errors import UsageError
from tests.emulator_support import JOB_CLOCK_S, FakeClock, in_process, make_emulator

pytestmark = pytest.mark.anyio
LORA = "/fal-ai/flux-lora"


@pytest.mark.parametrize(
    ("spec", "check"),
    [("", lambda c: c == FaultConfig()),
     ("submit_429=0.1,seed=7", lambda c: c.submit_429 == Trigger(rate=0.1) and c.seed == 7),
     ("reset_after_accept=@2+5", lambda c: c.reset_after_accept.at == frozenset({2, 5})),
     ("gateway_503=@1, slow=0.5, slow_s=3", lambda c: c.gateway_503.at == {1} and c.slow_s == 3),
     ("fail_runner_disconnected=0.25", lambda c: c.failures["runner_disconnected"].rate == 0.25),
     ("webhook_lost=0.5,webhook_duplicate=1,webhook_delay_s=2,webhook_reorder_s=4",
      lambda c: (c.webhook_lost, c.webhook_duplicate, c.webhook_delay_s, c.webhook_reorder_s)
      == (0.5, 1.0, 2.0, 4.0)),
     ("result_retention_s=30,timeout_hang_s=1", lambda c: c.result_retention_s == 30)],
)  # fmt: skip
def test_fault_spec_text_parses_into_frozen_config(
    spec: str, check: Callable[[FaultConfig], bool]
) -> None:
    assert check(parse_faults(spec))


@pytest.mark.parametrize(
    "spec",
    ["submit_429", "submit_429=2", "submit_429=lots", "nonsense=1", "fail_gremlins=0.1",
     "seed=x", "reset_after_accept=@0", "webhook_lost=1.5"],
)  # fmt: skip
def test_bad_fault_specs_are_usage_errors(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_faults(spec)


def _draws(config: FaultConfig, n: int = 200) -> dict[str, list[Any]]:
    injector = FaultInjector(config)
    return {
        "429": [injector.submit_429() for _ in range(n)],
        "gateway": [injector.gateway_error() for _ in range(n)],
        "lost": [injector.lost_answer() for _ in range(n)],
        "fail": [injector.failure() for _ in range(n)],
    }


def test_same_seed_gives_same_sequences_and_kinds_do_not_disturb_each_other() -> None:
    spec = (
        "submit_429=0.3,gateway_502=0.1,gateway_504=0.1,reset_after_accept=0.2,"
        "timeout_after_accept=0.1,fail_internal_error=0.2,fail_runner_disconnected=0.1"
    )
    first, again = _draws(parse_faults(spec + ",seed=7")), _draws(parse_faults(spec + ",seed=7"))
    other = _draws(parse_faults(spec + ",seed=8"))
    alone = _draws(parse_faults("submit_429=0.3,seed=7"))
    assert first == again
    assert first["429"] != other["429"]
    assert alone["429"] == first["429"]  # other kinds being on does not shift this stream
    assert 30 < sum(first["429"]) < 90
    assert {None, 502, 504} == set(first["gateway"])
    assert {None, "reset", "timeout"} == set(first["lost"])


def test_schedules_hit_exactly_the_listed_events() -> None:
    injector = FaultInjector(parse_faults("submit_429=@2+4,fail_internal_error=@3"))
    assert [injector.submit_429() for _ in range(5)] == [False, True, False, True, False]
    assert [injector.failure() for _ in range(4)] == [None, None, "internal_error", None]


async def test_submit_429_is_answered_before_queueing() -> None:
    emu = make_emulator(FakeClock(), faults=parse_faults("submit_429=@2"))
    async with in_process(emu) as client:
        codes = [(await client.post(LORA, json={"prompt": f"{i}"})).status_code for i in range(3)]
    assert codes == [200, 429, 200]
    assert emu.snapshot()["submits"]["accepted"] == 2


@pytest.mark.parametrize("code", [502, 503, 504])
async def test_gateway_errors_have_nginx_html_and_no_request_id(code: int) -> None:
    emu = make_emulator(FakeClock(), faults=parse_faults(f"gateway_{code}=@1+2"))
    async with in_process(emu) as client:
        submitted = await client.post(LORA, json={"prompt": "x"})
        polled = await client.get("/fal-ai/flux-lora/requests/x/status")
        later = await client.post(LORA, json={"prompt": "x"})
    for response in (submitted, polled):
        assert response.status_code == code
        assert "nginx" in response.text and response.headers["content-type"].startswith("text/html")
        assert "x-fal-request-id" not in response.headers
    assert later.status_code == 200
    assert emu.snapshot()["submits"]["accepted"] == 1


async def test_reset_after_accept_queues_the_job_but_the_client_gets_a_transport_error() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("reset_after_accept=@1"))
    async with in_process(emu) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(LORA, json={"prompt": "x"})
        clock.advance(JOB_CLOCK_S)
        stats = (await client.get("/_emulator/stats")).json()
    assert stats["submits"]["accepted"] == 1
    assert stats["jobs"]["endings"] == {"succeeded": 1}  # it ran and was billed
    assert stats["billing"]["fal-ai/flux-lora"]["images"] == 1
    assert stats["faults"] == {"reset_after_accept": 1}


async def test_timeout_after_accept_hangs_then_times_out_with_the_job_queued() -> None:
    faults = parse_faults("timeout_after_accept=@1,timeout_hang_s=1")  # 10 ms real here
    emu = make_emulator(FakeClock(), faults=faults)
    async with in_process(emu) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(LORA, json={"prompt": "x"})
    assert emu.snapshot()["submits"]["accepted"] == 1


async def test_slow_fault_delays_the_answer() -> None:
    emu = make_emulator(FakeClock(), faults=parse_faults("slow=@1,slow_s=5"))  # 50 ms real
    async with in_process(emu) as client:
        started = time.monotonic()
        slow = await client.post(LORA, json={"prompt": "x"})
        middle = time.monotonic()
        fast = await client.post(LORA, json={"prompt": "y"})
        ended = time.monotonic()
    assert slow.status_code == fast.status_code == 200
    assert middle - started >= 0.05 > ended - middle


@pytest.mark.parametrize("error_type", sorted(FAILURE_STATUS))
async def test_failed_jobs_complete_with_error_type_and_its_status_code(error_type: str) -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults(f"fail_{error_type}=1"))
    async with in_process(emu) as client:
        sub = (await client.post(LORA, json={"prompt": "x"})).json()
        clock.advance(JOB_CLOCK_S)
        status = await client.get(sub["status_url"])
        result = await client.get(sub["response_url"])
    assert status.status_code == 200
    assert status.json()["status"] == "COMPLETED"
    assert status.json()["error_type"] == error_type and status.json()["error"]
    assert result.status_code == FAILURE_STATUS[error_type]
    assert result.json()["error_type"] == error_type
    assert result.headers["x-fal-error-type"] == error_type
    assert result.headers["x-fal-request-id"] == sub["request_id"]
    assert "x-fal-request-timeout-type" not in result.headers
    assert emu.snapshot()["billing"] == {}


async def test_result_retention_fault_expires_results() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("result_retention_s=2"))
    async with in_process(emu) as client:
        sub = (await client.post(LORA, json={"prompt": "x"})).json()
        clock.advance(JOB_CLOCK_S + 0.01)
        kept = await client.get(sub["response_url"])
        clock.advance(0.02)
        gone = await client.get(sub["response_url"])
        status = await client.get(sub["status_url"])
    assert (kept.status_code, gone.status_code, status.status_code) == (200, 404, 404)


async def _webhooks(spec: str, jobs: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> Response:
        received.append(json.loads(await request.body()))
        return Response(b"ok")

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    clock = FakeClock()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver)) as http:
        emu = make_emulator(clock, concurrency=jobs, faults=parse_faults(spec), http_client=http)
        async with emu.running(), in_process(emu) as client:
            for i in range(jobs):
                await client.post(LORA, json={"prompt": f"{i}"},
                                  params={"fal_webhook": "http://receiver/hook"})  # fmt: skip
            clock.advance(JOB_CLOCK_S)
            emu.advance()
            with anyio.fail_after(5):
                # Lost deliveries never reach the receiver: poll the dispatcher's counters.
                while not _settled(stats := emu.snapshot()["webhooks"]):  # noqa: ASYNC110
                    await anyio.sleep(0.01)
    return received, stats


def _settled(stats: dict[str, int]) -> bool:
    done = stats["delivered"] + stats["lost"] + stats["failed"]
    return done >= stats["submitted"] + stats["duplicated"]


@pytest.mark.parametrize(
    ("spec", "delivered", "lost"),
    [("", 3, 0), ("webhook_lost=1", 0, 3), ("webhook_duplicate=1", 6, 0),
     ("webhook_lost=0.5,seed=3", None, None)],
)  # fmt: skip
async def test_webhook_faults_reach_the_dispatcher(
    spec: str, delivered: int | None, lost: int | None
) -> None:
    received, stats = await _webhooks(spec, jobs=3)
    again, _ = await _webhooks(spec, jobs=3)
    if delivered is not None:
        assert (len(received), stats["lost"]) == (delivered, lost)
    assert len(received) == len(again)  # the same seed loses the same number
    assert len(received) == stats["delivered"]


async def test_a_faulty_run_replays_identically_under_the_same_seed() -> None:
    spec = "submit_429=0.2,gateway_502=0.1,reset_after_accept=0.2,fail_internal_error=0.3"

    async def run(seed: int) -> list[str]:
        clock = FakeClock()
        emu = make_emulator(clock, concurrency=4, faults=parse_faults(f"{spec},seed={seed}"))
        outcomes: list[str] = []
        async with in_process(emu) as client:
            for i in range(30):
                try:
                    response = await client.post(LORA, json={"prompt": f"{i}"})
                    outcomes.append(str(response.status_code))
                except httpx.TransportError as exc:
                    outcomes.append(type(exc).__name__)
            clock.advance(10 * JOB_CLOCK_S)
            outcomes.append(json.dumps(emu.snapshot()["jobs"]["endings"], sort_keys=True))
        return outcomes

    first, again, other = await run(11), await run(11), await run(12)
    assert first == again
    assert first != other
    assert {"200", "429", "502", "EmulatedDisconnect"} <= set(first)


async def test_webhook_delay_holds_deliveries_and_reorder_holds_each_within_window() -> None:
    started = time.monotonic()
    delayed, _ = await _webhooks("webhook_delay_s=5", jobs=2)  # 50 ms real at this scale
    elapsed = time.monotonic() - started
    _, reordered = await _webhooks("webhook_reorder_s=2,seed=4", jobs=3)
    assert len(delayed) == 2 and elapsed >= 0.05
    assert reordered["held"] == 3 and reordered["delivered"] == 3


async def _render(emu: Any, clock: FakeClock, body: dict[str, Any]) -> tuple[Any, list[bytes]]:
    async with in_process(emu) as client:
        sub = (await client.post(LORA, json=body)).json()
        clock.advance(JOB_CLOCK_S)
        result = (await client.get(sub["response_url"])).json()
        files = [(await client.get(image["url"])).content for image in result["images"]]
    return result, files


async def test_same_request_and_seed_render_the_same_bytes_across_requests() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    body = {"prompt": "a mug", "seed": 7, "num_images": 2}
    first, first_files = await _render(emu, clock, body)
    second, second_files = await _render(emu, clock, body)
    _, other_files = await _render(emu, clock, {**body, "seed": 8})
    assert first_files == second_files
    assert first_files[0] != first_files[1]  # each image of a request is its own picture
    assert other_files[0] != first_files[0]
    assert first["seed"] == second["seed"] == 7


async def test_a_request_without_seed_gets_a_random_one_it_reports() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    first, first_files = await _render(emu, clock, {"prompt": "a mug"})
    second, second_files = await _render(emu, clock, {"prompt": "a mug"})
    assert isinstance(first["seed"], int) and first["seed"] != second["seed"]
    assert first_files != second_files


def _is_black(data: bytes) -> bool:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return image.convert("L").getextrema() == (0, 0)


async def test_flagged_images_are_black_and_reported_in_has_nsfw_concepts() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("flagged=@2"))
    result, files = await _render(emu, clock, {"prompt": "x", "seed": 1, "num_images": 3})
    assert result["has_nsfw_concepts"] == [False, True, False]
    assert [_is_black(f) for f in files] == [False, True, False]
    assert emu.snapshot()["faults"] == {"flagged": 1}
    assert emu.snapshot()["billing"]  # flagged images are billed all the same


async def test_a_flagged_rate_is_a_function_of_the_image_so_the_same_seed_flags_again() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("flagged=0.5,seed=3"))
    body = {"prompt": "x", "seed": 11, "num_images": 4}
    first, _ = await _render(emu, clock, body)
    again, _ = await _render(emu, clock, body)
    seeds = [(await _render(emu, clock, {**body, "seed": s}))[0] for s in range(12, 16)]
    assert first["has_nsfw_concepts"] == again["has_nsfw_concepts"]
    flags = [f for r in [first, *seeds] for f in r["has_nsfw_concepts"]]
    assert 0 < sum(flags) < len(flags)


async def test_no_image_is_flagged_with_the_safety_checker_off() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, faults=parse_faults("flagged=1"))
    result, _ = await _render(emu, clock, {"prompt": "x", "enable_safety_checker": False})
    assert result["has_nsfw_concepts"] == [False]
