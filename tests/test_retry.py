"""The one retry policy: classification table for submit vs read, backoff, and the loop."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import anyio
import httpx
import pytest

from runner.errors import AuthError, HTTPStatusError, ProtocolError, TransportError
from runner.fal.retry import (
    GIVE_UP,
    UNKNOWN_OUTCOME,
    Decision,
    RetryPolicy,
    backoff_s,
    call_with_retry,
    classify,
    is_throttled,
    retry,
)
from tests.fakes import FakeTime

NGINX = "<html><head><title>502 Bad Gateway</title></head><center>nginx</center></html>"
NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 GMT


def status_error(
    code: int, body: str = "", *, request_id: str | None = None, after: float | None = None
) -> HTTPStatusError:
    return HTTPStatusError(
        f"HTTP {code}", status_code=code, body=body, request_id=request_id, retry_after_s=after
    )


def response(code: int, body: str = "", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(code, text=body, headers=headers or {})


# (failure, decision for a submit POST, decision for a read)
ROWS: list[tuple[str, BaseException | httpx.Response, Decision, Decision]] = [
    ("refused before sending", TransportError("refused", sent=False), retry(), retry()),
    ("reset after sending", TransportError("reset", sent=True), UNKNOWN_OUTCOME, retry()),
    ("httpx connect error", httpx.ConnectError("refused"), retry(), retry()),
    ("httpx connect timeout", httpx.ConnectTimeout("slow"), retry(), retry()),
    ("httpx pool timeout", httpx.PoolTimeout("busy"), retry(), retry()),
    ("httpx read timeout after send", httpx.ReadTimeout("slow"), UNKNOWN_OUTCOME, retry()),
    ("httpx read error", httpx.ReadError("reset"), UNKNOWN_OUTCOME, retry()),
    ("httpx remote protocol", httpx.RemoteProtocolError("eof"), UNKNOWN_OUTCOME, retry()),
    ("httpx write error", httpx.WriteError("pipe"), UNKNOWN_OUTCOME, retry()),
    ("429 with Retry-After", status_error(429, after=2.0), retry(2.0), retry(2.0)),
    ("429 without Retry-After", status_error(429), retry(), retry()),
    ("nginx 502 without request id", status_error(502, NGINX), retry(), retry()),
    ("nginx 504 without request id", status_error(504, NGINX), retry(), retry()),
    ("503 with request id", status_error(503, NGINX, request_id="r1"), UNKNOWN_OUTCOME, retry()),
    (
        "500 from the app",
        status_error(500, '{"detail":"x"}', request_id="r1"),
        UNKNOWN_OUTCOME,
        retry(),
    ),
    ("502 not from nginx", status_error(502, '{"detail":"x"}'), UNKNOWN_OUTCOME, retry()),
    ("nginx 500 is not a gateway code", status_error(500, NGINX), UNKNOWN_OUTCOME, retry()),
    (
        "503 with Retry-After on a read",
        status_error(503, request_id="r", after=5),
        UNKNOWN_OUTCOME,
        retry(5.0),
    ),
    ("408", status_error(408), GIVE_UP, retry()),
    ("409", status_error(409), GIVE_UP, retry()),
    ("404 expired result", status_error(404), GIVE_UP, GIVE_UP),
    ("422 validation", status_error(422), GIVE_UP, GIVE_UP),
    ("401 bad key as status error", status_error(401), GIVE_UP, GIVE_UP),
    ("auth error", AuthError("refused"), GIVE_UP, GIVE_UP),
    ("protocol error", ProtocolError("odd"), UNKNOWN_OUTCOME, GIVE_UP),
    ("unrelated bug", KeyError("x"), GIVE_UP, GIVE_UP),
    ("raw nginx 502", response(502, NGINX), retry(), retry()),
    (
        "raw 503 with request id",
        response(503, NGINX, {"x-fal-request-id": "r1"}),
        UNKNOWN_OUTCOME,
        retry(),
    ),
    (
        "raw 504 with timeout type",
        response(504, "{}", {"X-Fal-Request-Timeout-Type": "user", "x-fal-request-id": "r"}),
        UNKNOWN_OUTCOME,
        GIVE_UP,
    ),
    (
        "raw 429 with HTTP-date Retry-After",
        response(429, "", {"Retry-After": "Tue, 14 Nov 2023 22:13:30 GMT"}),
        retry(10.0),
        retry(10.0),
    ),
    ("raw 200 is not a failure", response(200, "{}"), GIVE_UP, GIVE_UP),
]


@pytest.mark.parametrize(
    ("failure", "submit", "read"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS]
)
def test_classification_table(
    failure: BaseException | httpx.Response, submit: Decision, read: Decision
) -> None:
    assert classify(failure, kind="submit", now_s=NOW) == submit
    assert classify(failure, kind="read", now_s=NOW) == read


def test_raw_httpx_status_error_is_classified_by_its_response() -> None:
    request = httpx.Request("POST", "https://queue.fal.run/fal-ai/flux-lora")
    resp = httpx.Response(502, text=NGINX, request=request)
    exc = httpx.HTTPStatusError("bad gateway", request=request, response=resp)
    assert classify(exc, kind="submit") == retry()


@pytest.mark.parametrize(
    ("attempt", "rng_value", "expected"),
    [
        (1, 0.5, 0.1),
        (2, 0.5, 0.2),
        (3, 0.5, 0.4),
        (4, 0.5, 0.8),
        (5, 0.5, 1.0),
        (9, 0.5, 1.0),
        (1, 0.0, 0.05),
        (3, 0.0, 0.2),
        (3, 0.999999, 0.6),
        (4, 0.999999, 1.0),
    ],
)
def test_backoff_doubles_with_jitter_and_never_exceeds_the_cap(
    attempt: int, rng_value: float, expected: float
) -> None:
    got = backoff_s(attempt, base_s=0.1, max_s=1.0, rng_value=rng_value, jitter=(0.5, 1.5))
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"attempts": 0},
        {"timeout_s": -1.0},
        {"base_s": 2.0, "max_s": 1.0},
        {"jitter": (1.5, 0.5)},
    ],
)
def test_policy_rejects_nonsense(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


class Script:
    """An async callable that raises the scripted failures, then returns ``value``."""

    def __init__(
        self,
        failures: Sequence[BaseException],
        value: str = "done",
        *,
        takes_s: float = 0.0,
        time: FakeTime | None = None,
    ) -> None:
        self.failures = list(failures)
        self.value = value
        self.calls = 0
        self.takes_s = takes_s
        self.time = time

    async def __call__(self) -> str:
        self.calls += 1
        if self.time is not None:
            self.time.now += self.takes_s
        if self.failures:
            raise self.failures.pop(0)
        return self.value


POLICY = RetryPolicy(attempts=5, timeout_s=100.0, base_s=0.1, max_s=10.0, jitter=(0.5, 1.5))


async def run(
    script: Script,
    time: FakeTime,
    *,
    kind: str = "read",
    policy: RetryPolicy = POLICY,
    on_retry: Callable[[int, Exception, float], None] | None = None,
) -> str:
    return await call_with_retry(
        script,
        policy=policy,
        kind=kind,  # type: ignore[arg-type]
        clock=time.clock,
        sleep=time.sleep,
        rng=lambda: 0.5,
        on_retry=on_retry,
    )


@pytest.mark.anyio
async def test_transient_read_failures_back_off_then_succeed() -> None:
    time = FakeTime()
    script = Script([TransportError("reset", sent=True), status_error(503, request_id="r")])
    assert await run(script, time) == "done"
    assert script.calls == 3
    assert time.sleeps == pytest.approx([0.1, 0.2])


@pytest.mark.anyio
async def test_429_waits_the_retry_after_then_succeeds() -> None:
    time = FakeTime()
    script = Script([status_error(429, after=3.0)])
    assert await run(script, time, kind="submit") == "done"
    assert time.sleeps == [3.0]


@pytest.mark.anyio
async def test_attempt_limit_reraises_the_last_failure() -> None:
    time = FakeTime()
    last = status_error(502, NGINX)
    script = Script([status_error(503, NGINX)] * 4 + [last, status_error(502, NGINX)])
    with pytest.raises(HTTPStatusError) as info:
        await run(script, time)
    assert info.value is last
    assert script.calls == 5
    assert time.sleeps == pytest.approx([0.1, 0.2, 0.4, 0.8])


@pytest.mark.anyio
async def test_total_time_limit_stops_before_a_wait_that_would_overrun() -> None:
    time = FakeTime()
    policy = RetryPolicy(attempts=100, timeout_s=2.0, base_s=0.4, max_s=10.0, jitter=(1.0, 1.0))
    script = Script([TransportError("refused", sent=False)] * 10, takes_s=0.25, time=time)
    with pytest.raises(TransportError):
        await run(script, time, kind="submit", policy=policy)
    # call 0.25 | wait 0.4 | call -> 0.9 | wait 0.8 | call -> 1.95 | next wait 1.6 would overrun
    assert script.calls == 3
    assert time.sleeps == pytest.approx([0.4, 0.8])
    assert time.now == pytest.approx(1.95)


@pytest.mark.anyio
async def test_retry_after_past_the_total_time_gives_up_without_sleeping() -> None:
    time = FakeTime()
    script = Script([status_error(429, after=3600.0)])
    with pytest.raises(HTTPStatusError):
        await run(script, time)
    assert time.sleeps == []


@pytest.mark.anyio
async def test_submit_read_timeout_after_send_is_never_resubmitted() -> None:
    time = FakeTime()
    timeout = TransportError("POST ...: ReadTimeout", sent=True)
    script = Script([timeout])
    with pytest.raises(TransportError) as info:
        await run(script, time, kind="submit")
    assert script.calls == 1
    assert time.sleeps == []
    assert classify(info.value, kind="submit") == UNKNOWN_OUTCOME


@pytest.mark.anyio
async def test_submit_5xx_with_request_id_is_never_resubmitted() -> None:
    time = FakeTime()
    script = Script([status_error(503, NGINX, request_id="req-9")])
    with pytest.raises(HTTPStatusError):
        await run(script, time, kind="submit")
    assert script.calls == 1


@pytest.mark.anyio
async def test_submit_gateway_502_and_refused_connection_are_resubmitted() -> None:
    time = FakeTime()
    script = Script([TransportError("refused", sent=False), status_error(502, NGINX)])
    assert await run(script, time, kind="submit") == "done"
    assert script.calls == 3


@pytest.mark.anyio
async def test_permanent_failure_gives_up_at_once() -> None:
    time = FakeTime()
    script = Script([status_error(404)])
    with pytest.raises(HTTPStatusError):
        await run(script, time)
    assert script.calls == 1
    assert time.sleeps == []


@pytest.mark.anyio
async def test_on_retry_sees_each_attempt_failure_and_wait() -> None:
    time = FakeTime()
    seen: list[tuple[int, str, float]] = []
    first, second = status_error(429, after=1.0), status_error(500, request_id="r")
    script = Script([first, second])
    await run(script, time, on_retry=lambda n, exc, wait: seen.append((n, str(exc), wait)))
    assert seen == [(1, "HTTP 429", 1.0), (2, "HTTP 500", pytest.approx(0.2))]


@pytest.mark.anyio
async def test_cancellation_is_not_caught_by_the_retry_loop() -> None:
    time = FakeTime()

    async def blocked() -> str:
        await anyio.sleep_forever()
        return "never"

    with anyio.move_on_after(0) as scope:  # expired deadline: no real time passes
        await call_with_retry(
            blocked, policy=POLICY, kind="read", clock=time.clock, sleep=time.sleep
        )
    assert scope.cancelled_caught
    assert time.sleeps == []


@pytest.mark.parametrize(
    ("failure", "throttled"),
    [
        (status_error(429), True),
        (response(429), True),
        (status_error(503), False),
        (TransportError("reset", sent=True), False),
    ],
)
def test_is_throttled_spots_429s_for_the_rate_limiter(
    failure: BaseException | httpx.Response, throttled: bool
) -> None:
    assert is_throttled(failure) is throttled
