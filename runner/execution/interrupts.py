"""Ctrl-C presses, counted, for every run that watches them (a sharded run's shards).

A run stops in two steps: the first press (SIGINT or SIGTERM) stops admitting and lets the
jobs in flight finish and settle; the second cancels everything (the jobs in flight stay
recorded with their request ids, re-attached next run). An unsharded run watches the
signals itself; the shards of one process all watch one :class:`Interrupts`, fed by the
signals once, so each takes both steps with the others.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import anyio

FIRST = (
    "interrupted: no new jobs; waiting for {in_flight} in flight "
    "(press Ctrl-C again to exit now; they will be re-attached next run)"
)
SECOND = "exiting now; in-flight jobs stay recorded with request ids"


class Interrupts:
    """Presses so far; ``announce`` False: the watcher of the presses says nothing itself."""

    def __init__(self, *, announce: bool = True) -> None:
        self.count = 0
        self.announce = announce
        self._pressed = anyio.Event()

    def press(self) -> None:
        self.count += 1
        pressed, self._pressed = self._pressed, anyio.Event()
        pressed.set()

    async def next(self, seen: int) -> int:
        """Wait for press number ``seen + 1`` (at once if it came already); return its number."""
        while self.count <= seen:
            await self._pressed.wait()
        return seen + 1

    async def from_signals(self) -> None:
        """Count SIGINT and SIGTERM until cancelled."""
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                self.press()


async def two_steps(
    interrupts: Interrupts | None, *, first: Callable[[], None], second: Callable[[], None]
) -> None:
    """Call ``first`` at the first press and ``second`` at the next; ``interrupts`` None:
    count this process's SIGINT and SIGTERM."""
    async with anyio.create_task_group() as tg:
        if interrupts is None:
            interrupts = Interrupts()
            tg.start_soon(interrupts.from_signals)
        seen = await interrupts.next(0)
        first()
        await interrupts.next(seen)
        second()
        tg.cancel_scope.cancel()


async def announce(
    interrupts: Interrupts, in_flight: Callable[[], int], say: Callable[[str], None]
) -> None:
    """Say what the first and the second press do, once for every run watching them."""
    await two_steps(
        interrupts, first=lambda: say(FIRST.format(in_flight=in_flight())),
        second=lambda: say(SECOND),
    )  # fmt: skip
