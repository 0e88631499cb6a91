"""Submit-rate limiting: a fair token bucket, and AIMD adaptation of its rate to 429s.

:class:`TokenBucket` lets ``rate_per_s`` calls through per second with bursts of up to
``burst``; waiters are served first come, first served (one anyio Lock, held while
waiting). :class:`AdaptiveRate` owns a bucket and moves its rate with additive increase,
multiplicative decrease: every 429 halves the rate (down to a floor), but only once per
cooldown window, so a volley of 429s answering requests sent at the old rate counts as one
signal; every success adds a small step back toward the configured maximum. The AIMD
arithmetic is two pure functions over a frozen state.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import anyio

Clock = Callable[[], float]
# Float slack when comparing tokens: a wait of exactly (1 - tokens) / rate can refill to
# 0.9999999999; without slack the next wait is too small to move the clock and never ends.
_EPSILON = 1e-9
Sleep = Callable[[float], Awaitable[None]]


class TokenBucket:
    """``rate_per_s`` tokens per second, holding at most ``burst``; starts full."""

    def __init__(
        self,
        rate_per_s: float,
        burst: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("need rate_per_s > 0 and burst >= 1")
        self._rate = rate_per_s
        self._burst = float(burst)
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = anyio.Lock()

    @property
    def rate_per_s(self) -> float:
        return self._rate

    def set_rate(self, rate_per_s: float) -> None:
        """Change the rate; tokens earned so far are kept (earned at the old rate)."""
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be > 0")
        self._refill()
        self._rate = rate_per_s

    async def acquire(self) -> None:
        """Wait for one token. Waiters queue on the lock, so they are served in order."""
        async with self._lock:
            while True:
                self._refill()
                if self._tokens >= 1 - _EPSILON:
                    self._tokens -= 1
                    return
                # Re-check after the wait: the rate may have changed meanwhile.
                await self._sleep((1 - self._tokens) / self._rate)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
        self._updated = now


@dataclass(frozen=True, slots=True, kw_only=True)
class AimdConfig:
    max_rate_per_s: float
    min_rate_per_s: float
    increase_per_success: float
    decrease_factor: float = 0.5
    cooldown_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.min_rate_per_s <= self.max_rate_per_s:
            raise ValueError("need 0 < min_rate_per_s <= max_rate_per_s")
        if not 0 < self.decrease_factor < 1 or self.increase_per_success < 0:
            raise ValueError("need 0 < decrease_factor < 1 and increase_per_success >= 0")


@dataclass(frozen=True, slots=True)
class AimdState:
    rate_per_s: float
    last_decrease_s: float | None = None


def after_throttle(state: AimdState, config: AimdConfig, *, now_s: float) -> AimdState:
    """Multiplicative decrease on a 429, at most once per ``cooldown_s``."""
    last = state.last_decrease_s
    if last is not None and now_s - last < config.cooldown_s:
        return state
    rate = max(config.min_rate_per_s, state.rate_per_s * config.decrease_factor)
    return AimdState(rate_per_s=rate, last_decrease_s=now_s)


def after_success(state: AimdState, config: AimdConfig) -> AimdState:
    """Additive increase toward the configured maximum."""
    rate = min(config.max_rate_per_s, state.rate_per_s + config.increase_per_success)
    return replace(state, rate_per_s=rate)


class AdaptiveRate:
    """A token bucket whose rate follows AIMD. ``rate_per_s`` is for the progress display."""

    def __init__(
        self,
        max_rate_per_s: float,
        *,
        burst: float = 1.0,
        min_rate_per_s: float | None = None,
        increase_per_success: float | None = None,
        cooldown_s: float = 2.0,
        clock: Clock = time.monotonic,
        sleep: Sleep = anyio.sleep,
    ) -> None:
        # Defaults: floor at 1/32 of the maximum (five halvings); from half to full rate
        # in 25 successes, quick enough to recover, slow enough not to re-trigger at once.
        self.config = AimdConfig(
            max_rate_per_s=max_rate_per_s,
            min_rate_per_s=min_rate_per_s if min_rate_per_s is not None else max_rate_per_s / 32,
            increase_per_success=(
                increase_per_success if increase_per_success is not None else max_rate_per_s / 50
            ),
            cooldown_s=cooldown_s,
        )
        self._state = AimdState(rate_per_s=max_rate_per_s)
        self._clock = clock
        self._bucket = TokenBucket(max_rate_per_s, burst, clock=clock, sleep=sleep)
        self.decreases = 0

    @property
    def rate_per_s(self) -> float:
        return self._state.rate_per_s

    async def acquire(self) -> None:
        await self._bucket.acquire()

    def on_throttle(self) -> bool:
        """Record a 429; returns whether the rate was lowered (False inside the cooldown)."""
        new = after_throttle(self._state, self.config, now_s=self._clock())
        lowered = new is not self._state
        self._set(new)
        self.decreases += lowered
        return lowered

    def on_success(self) -> None:
        self._set(after_success(self._state, self.config))

    def _set(self, state: AimdState) -> None:
        if state.rate_per_s != self._state.rate_per_s:
            self._bucket.set_rate(state.rate_per_s)
        self._state = state
