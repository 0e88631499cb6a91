"""Fakes shared by the tests: a clock that only moves when someone sleeps."""

from __future__ import annotations

from dataclasses import dataclass, field

import anyio.lowlevel


@dataclass
class FakeTime:
    """``clock()`` and ``sleep()`` for injection: sleeping advances ``now`` at once.

    ``yields`` makes each sleep a scheduling point too, for code whose tasks must
    interleave (the rate limiter's waiters).
    """

    now: float = 0.0
    sleeps: list[float] = field(default_factory=list)
    yields: bool = False

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.yields:
            await anyio.lowlevel.checkpoint()
