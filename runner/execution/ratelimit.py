"""Submit-rate limiting: a fair token bucket, and AIMD adaptation of its rate to 429s.

:class:`TokenBucket` lets ``rate_per_s`` calls through per second with bursts of up to
``burst``; waiters are served first come, first served (one anyio Lock, held while
waiting). :class:`AdaptiveRate` owns a bucket and moves its rate with additive increase,
multiplicative decrease: every 429 halves the rate (down to a floor), but only once per
cooldown window, so a volley of 429s answering requests sent at the old rate counts as one
signal; every success adds a small step back toward the configured maximum. The AIMD
arithmetic is two pure functions over a frozen state.

Without ``--rate`` the maximum follows the account (:class:`AccountPace`): a saturated
account finishes ``slots / mean service time`` jobs a second, and the runner submits one
job per finished one, so the ceiling is that completion rate times a headroom, recomputed
as service times are observed. Before the first is seen it starts high. Whether fal
answers a burst of submits with 429s is not documented (shared/spec/fal-queue.md says
queued requests over the slots wait, not that submits are limited): the start, the
headroom and the bounds are configuration, and a 429 still halves the rate.

Shared by processes or machines (a key's gate across them), the AIMD state is a *level*, the
fraction of its ceiling each one runs at, kept where all of them see it (:class:`Level`,
:mod:`runner.execution.sharedrate`): a 429 seen by one halves it for all.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Protocol

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
        # Taken without a checkpoint when free: a submit waits here only for a token.
        self._lock = anyio.Lock(fast_acquire=True)

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


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountPace:
    """The submit ceiling when ``--rate`` is not given: derived from the account.

    ``headroom`` times the completion rate of ``slots`` busy slots (``slots / mean``), kept
    within ``[min_per_s, max_per_s]``; ``start_per_s`` until a service time is known.
    """

    start_per_s: float = 50.0
    headroom: float = 2.0
    min_per_s: float = 0.5
    max_per_s: float = 2000.0

    def __post_init__(self) -> None:
        if not 0 < self.min_per_s <= self.start_per_s <= self.max_per_s or self.headroom <= 0:
            raise ValueError("need 0 < min_per_s <= start_per_s <= max_per_s and headroom > 0")

    def ceiling(self, slots: int, mean_service_s: float | None) -> float:
        if mean_service_s is None or mean_service_s <= 0:
            return self.start_per_s
        wanted = self.headroom * max(slots, 1) / mean_service_s
        return min(max(wanted, self.min_per_s), self.max_per_s)


def retarget(old: AimdConfig, max_rate_per_s: float) -> AimdConfig:
    """The AIMD config for a new maximum, its floor and step scaled alike."""
    scale = max_rate_per_s / old.max_rate_per_s
    return replace(
        old,
        max_rate_per_s=max_rate_per_s,
        min_rate_per_s=old.min_rate_per_s * scale,
        increase_per_success=old.increase_per_success * scale,
    )


class Level(Protocol):
    """A key's AIMD level in (0, 1], shared: every process on the key runs at it."""

    def level(self) -> float:
        """The level as last seen (cheap: asked before every token)."""
        ...

    def throttle(self) -> None:
        """A 429: halve the level (once per cooldown, whoever saw it)."""
        ...

    def success(self) -> None:
        """An accepted submit: raise the level a step."""
        ...


class AdaptiveRate:
    """A token bucket whose rate follows AIMD. ``rate_per_s`` is for the progress display.

    ``follow`` (optional) returns the current ceiling; it is asked before every token, and
    a changed ceiling moves the maximum, the floor, the step and the rate in proportion (a
    rate halved by 429s stays halved relative to the new ceiling).

    ``level`` (optional) is the AIMD state shared with other processes on the key: 429s and
    successes go to it, and the rate follows it (its fraction of this process's maximum).
    """

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
        follow: Callable[[], float] | None = None,
        level: Level | None = None,
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
        self._follow = follow
        self._level = level

    @property
    def rate_per_s(self) -> float:
        return self._state.rate_per_s

    @property
    def max_rate_per_s(self) -> float:
        return self.config.max_rate_per_s

    async def acquire(self) -> None:
        if self._follow is not None:
            self.set_ceiling(self._follow())
        if self._level is not None:
            self.set_level(self._level.level())
        await self._bucket.acquire()

    def set_ceiling(self, max_rate_per_s: float) -> None:
        """Move the maximum; the rate keeps its fraction of it."""
        old = self.config
        if max_rate_per_s <= 0 or max_rate_per_s == old.max_rate_per_s:
            return
        self.config = retarget(old, max_rate_per_s)
        scaled = min(self._state.rate_per_s * max_rate_per_s / old.max_rate_per_s, max_rate_per_s)
        self._set(replace(self._state, rate_per_s=scaled))

    def set_level(self, level: float) -> None:
        """Run at ``level`` of the maximum (kept within the floor)."""
        c = self.config
        rate = min(max(level * c.max_rate_per_s, c.min_rate_per_s), c.max_rate_per_s)
        if rate != self._state.rate_per_s:
            self._set(replace(self._state, rate_per_s=rate))

    def on_throttle(self) -> bool:
        """Record a 429; returns whether the rate was lowered (False inside the cooldown)."""
        if self._level is not None:
            before = self._state.rate_per_s
            self._level.throttle()
            self.set_level(self._level.level())
            lowered = self._state.rate_per_s < before
            self.decreases += lowered
            return lowered
        new = after_throttle(self._state, self.config, now_s=self._clock())
        lowered = new is not self._state
        self._set(new)
        self.decreases += lowered
        return lowered

    def on_success(self) -> None:
        if self._level is not None:
            self._level.success()
            return
        self._set(after_success(self._state, self.config))

    def _set(self, state: AimdState) -> None:
        if state.rate_per_s != self._state.rate_per_s:
            self._bucket.set_rate(state.rate_per_s)
        self._state = state


def submit_rate(
    rate_per_s: float | None,
    *,
    slots: int,
    mean_service_s: Callable[[], float | None],
    pace: AccountPace | None = None,
    clock: Clock = time.monotonic,
    sleep: Sleep = anyio.sleep,
    level: Level | None = None,
) -> AdaptiveRate:
    """The run's submit limiter: ``--rate`` as a fixed cap, or (None) one that follows the
    account's slots and the mean service time observed so far (:class:`AccountPace`)."""
    if rate_per_s is not None:
        return AdaptiveRate(rate_per_s, burst=max(1.0, rate_per_s), clock=clock, sleep=sleep,
                            level=level)  # fmt: skip
    pace = pace if pace is not None else AccountPace()
    return AdaptiveRate(
        pace.start_per_s,
        burst=max(1.0, float(slots)),
        clock=clock,
        sleep=sleep,
        follow=lambda: pace.ceiling(slots, mean_service_s()),
        level=level,
    )
