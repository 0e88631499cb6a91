"""Token bucket rate and fairness on a fake clock; AIMD steps and their adaptation to 429s."""

from __future__ import annotations

import anyio
import pytest

from runner.execution.ratelimit import (
    AccountPace,
    AdaptiveRate,
    AimdConfig,
    AimdState,
    TokenBucket,
    after_success,
    after_throttle,
    submit_rate,
)
from tests.fakes import FakeTime


@pytest.mark.anyio
async def test_bucket_lets_the_burst_through_then_paces_at_the_rate() -> None:
    time = FakeTime(yields=True)
    bucket = TokenBucket(5.0, 3, clock=time.clock, sleep=time.sleep)
    stamps = []
    for _ in range(13):
        await bucket.acquire()
        stamps.append(time.now)
    assert stamps[:3] == [0.0, 0.0, 0.0]
    # 10 more tokens at 5/s: one every 0.2 s
    assert stamps[3:] == pytest.approx([0.2 * k for k in range(1, 11)])


@pytest.mark.anyio
async def test_bucket_refills_while_idle_but_never_beyond_burst() -> None:
    time = FakeTime(yields=True)
    bucket = TokenBucket(2.0, 2, clock=time.clock, sleep=time.sleep)
    for _ in range(2):
        await bucket.acquire()
    time.now += 100.0  # idle for a long time: only `burst` tokens saved
    for _ in range(3):
        await bucket.acquire()
    assert time.sleeps == pytest.approx([0.5])


@pytest.mark.anyio
async def test_bucket_rate_change_applies_to_the_next_wait() -> None:
    time = FakeTime(yields=True)
    bucket = TokenBucket(1.0, 1, clock=time.clock, sleep=time.sleep)
    await bucket.acquire()
    bucket.set_rate(4.0)
    await bucket.acquire()
    assert time.sleeps == pytest.approx([0.25])


@pytest.mark.anyio
async def test_bucket_serves_concurrent_waiters_first_come_first_served() -> None:
    time = FakeTime(yields=True)
    gate = anyio.Event()

    async def gated_sleep(seconds: float) -> None:
        time.sleeps.append(seconds)
        await gate.wait()
        time.now += seconds

    bucket = TokenBucket(10.0, 1, clock=time.clock, sleep=gated_sleep)
    await bucket.acquire()  # empty it
    order: list[int] = []

    async def worker(i: int) -> None:
        await bucket.acquire()
        order.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(6):
            tg.start_soon(worker, i)
            await anyio.wait_all_tasks_blocked()  # worker i is now queued behind i-1
        gate.set()
    assert order == list(range(6))
    assert time.now == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("rate", "burst"),
    [(0.0, 1), (-1.0, 1), (1.0, 0.5)],
)
def test_bucket_rejects_nonsense(rate: float, burst: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


CONFIG = AimdConfig(
    max_rate_per_s=10.0, min_rate_per_s=1.0, increase_per_success=0.5, cooldown_s=2.0
)


@pytest.mark.parametrize(
    ("state", "now_s", "expected"),
    [
        (AimdState(10.0), 0.0, AimdState(5.0, 0.0)),
        (AimdState(5.0, 0.0), 1.9, AimdState(5.0, 0.0)),  # inside the cooldown: counted once
        (AimdState(5.0, 0.0), 2.0, AimdState(2.5, 2.0)),
        (AimdState(1.5, 0.0), 10.0, AimdState(1.0, 10.0)),  # floor
        (AimdState(1.0, 0.0), 10.0, AimdState(1.0, 10.0)),
    ],
)
def test_throttle_halves_the_rate_once_per_cooldown(
    state: AimdState, now_s: float, expected: AimdState
) -> None:
    assert after_throttle(state, CONFIG, now_s=now_s) == expected


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (AimdState(5.0, 3.0), AimdState(5.5, 3.0)),
        (AimdState(9.8), AimdState(10.0)),
        (AimdState(10.0), AimdState(10.0)),
    ],
)
def test_success_adds_a_step_toward_the_maximum(state: AimdState, expected: AimdState) -> None:
    assert after_success(state, CONFIG) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_rate_per_s": 1.0, "min_rate_per_s": 2.0, "increase_per_success": 0.1},
        {"max_rate_per_s": 1.0, "min_rate_per_s": 0.0, "increase_per_success": 0.1},
        {
            "max_rate_per_s": 1.0,
            "min_rate_per_s": 0.5,
            "increase_per_success": 0.1,
            "decrease_factor": 1.0,
        },
    ],
)
def test_aimd_config_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AimdConfig(**kwargs)


def test_a_burst_of_429s_halves_once_and_successes_recover() -> None:
    time = FakeTime(yields=True)
    rate = AdaptiveRate(8.0, clock=time.clock, sleep=time.sleep, cooldown_s=1.0)
    assert rate.rate_per_s == 8.0
    lowered = [rate.on_throttle() for _ in range(20)]  # one storm, same instant
    assert lowered == [True] + [False] * 19
    assert rate.rate_per_s == 4.0
    time.now = 1.0
    assert rate.on_throttle()
    assert rate.rate_per_s == 2.0
    assert rate.decreases == 2
    for _ in range(150):
        rate.on_success()
    assert rate.rate_per_s == 8.0  # default step 8/50 per success, capped at the maximum


def test_adaptive_rate_never_drops_below_the_floor() -> None:
    time = FakeTime(yields=True)
    rate = AdaptiveRate(4.0, min_rate_per_s=0.5, cooldown_s=0.0, clock=time.clock, sleep=time.sleep)
    for _ in range(10):
        rate.on_throttle()
    assert rate.rate_per_s == 0.5


@pytest.mark.anyio
async def test_adaptive_rate_paces_the_bucket_at_the_lowered_rate() -> None:
    time = FakeTime(yields=True)
    rate = AdaptiveRate(10.0, clock=time.clock, sleep=time.sleep)
    await rate.acquire()
    rate.on_throttle()  # 10/s -> 5/s
    await rate.acquire()
    await rate.acquire()
    assert time.sleeps == pytest.approx([0.2, 0.2])


PACE = AccountPace(start_per_s=50.0, headroom=2.0, min_per_s=0.5, max_per_s=2000.0)


@pytest.mark.parametrize(
    ("slots", "mean_s", "expected"),
    [
        (40, None, 50.0),  # nothing seen yet: start high
        (40, 0.0, 50.0),
        (40, 3.0, 2 * 40 / 3.0),  # twice what 40 busy slots of 3 s jobs finish
        (4, 10.0, 0.8),
        (1, 100.0, 0.5),  # floor
        (40, 0.001, 2000.0),  # ceiling
    ],
)
def test_account_pace_is_headroom_times_the_completion_rate(
    slots: int, mean_s: float | None, expected: float
) -> None:
    assert PACE.ceiling(slots, mean_s) == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs", [{"start_per_s": 0.1, "min_per_s": 1.0}, {"headroom": 0.0}, {"max_per_s": 10.0}]
)
def test_account_pace_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AccountPace(**kwargs)


@pytest.mark.anyio
async def test_default_rate_follows_the_observed_service_time() -> None:
    """No --rate: the ceiling moves with the mean the model reports, before each token."""
    time = FakeTime(yields=True)
    mean: list[float | None] = [None]
    rate = submit_rate(
        None, slots=8, mean_service_s=lambda: mean[0], pace=PACE, clock=time.clock,
        sleep=time.sleep,
    )  # fmt: skip
    for _ in range(8):  # a burst of one token per slot, at once
        await rate.acquire()
    assert time.now == 0.0
    await rate.acquire()
    assert rate.rate_per_s == 50.0 and time.sleeps == pytest.approx([1 / 50])
    mean[0] = 0.4  # 8 slots of 0.4 s jobs: 20 finish a second, the ceiling is 40/s
    await rate.acquire()
    assert rate.rate_per_s == pytest.approx(40.0)
    assert time.sleeps[-1] == pytest.approx(1 / 40)
    mean[0] = 8.0  # long jobs: 1 a second finishes, 2/s is the ceiling
    await rate.acquire()
    assert rate.max_rate_per_s == pytest.approx(2.0)
    assert time.sleeps[-1] == pytest.approx(1 / 2)


@pytest.mark.anyio
async def test_a_throttled_default_rate_keeps_its_share_when_the_ceiling_moves() -> None:
    time = FakeTime(yields=True)
    mean: list[float | None] = [1.0]
    rate = submit_rate(
        None, slots=10, mean_service_s=lambda: mean[0], pace=PACE, clock=time.clock,
        sleep=time.sleep,
    )  # fmt: skip
    await rate.acquire()
    assert rate.max_rate_per_s == pytest.approx(20.0)
    assert rate.on_throttle()
    assert rate.rate_per_s == pytest.approx(10.0)
    mean[0] = 0.5  # the ceiling doubles; the 429's halving still holds
    await rate.acquire()
    assert rate.max_rate_per_s == pytest.approx(40.0)
    assert rate.rate_per_s == pytest.approx(20.0)
    assert rate.config.min_rate_per_s == pytest.approx(40.0 / 32)
    for _ in range(100):
        rate.on_success()
    assert rate.rate_per_s == pytest.approx(40.0)


@pytest.mark.anyio
async def test_an_explicit_rate_is_a_fixed_cap() -> None:
    time = FakeTime(yields=True)
    rate = submit_rate(
        3.0, slots=40, mean_service_s=lambda: 0.01, pace=PACE, clock=time.clock,
        sleep=time.sleep,
    )  # fmt: skip
    for _ in range(6):
        await rate.acquire()
    assert rate.max_rate_per_s == 3.0
    assert time.sleeps == pytest.approx([1 / 3] * 3)
