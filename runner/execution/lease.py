"""A key's in-flight slots shared by processes on one machine: file-lock leases.

The gate directory of a key (``GATE_DIR/<fingerprint>/``, named after the key's
fingerprint, never the key) holds one file per slot. Holding a slot is holding an
exclusive ``fcntl.flock`` on its file; a process waiting for a slot tries every file
without blocking, and sleeps ``poll_s`` when all are held.

A lease expires with its holder: the kernel drops a process's flocks when it exits, however
it exits (SIGKILL included), so a dead worker never keeps a slot. Every process on the key
must be given the same number of slots (the same ``--keys-file``): the count is the number
of files each one tries.

A slot held for a job its process lost contact with is marked (the file holds ``lost``)
until it is released: when every slot is held and marked, no process on the key can take
one again, and a process waiting for one is told (``on_all_lost``) instead of waiting for
ever, since the holders may be waiting too. A mark left by a killed process lies on a free
file, which does not count, and is cleared by the next process to take it.
"""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio

_LOST = b"lost"
_CHECK_EVERY = 50  # failed scans between looks at the marks (each reads every file)


class FileSlots:
    """``count`` slots as flock leases on files in ``directory``. Not shared by threads."""

    def __init__(
        self,
        directory: Path,
        count: int,
        *,
        poll_s: float = 0.01,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        rng: random.Random | None = None,
        on_all_lost: Callable[[], None] | None = None,
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        directory.mkdir(parents=True, exist_ok=True)
        self._paths = [directory / f"slot-{i:05d}.lease" for i in range(count)]
        self._poll_s = poll_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._held: list[int] = []  # descriptors holding a lock
        self._lost: set[int] = set()  # those of them marked lost
        self._on_all_lost = on_all_lost

    @property
    def held(self) -> int:
        return len(self._held)

    async def acquire(self) -> None:
        """Wait until a slot is free in every process, and hold it."""
        scans = 0
        while True:
            fd = self._try_one()
            if fd is not None:
                os.ftruncate(fd, 0)  # a mark its killed holder left
                self._held.append(fd)
                return
            scans += 1
            if self._on_all_lost is not None and scans % _CHECK_EVERY == 0 and self.all_lost():
                self._on_all_lost()
            await self._sleep(self._poll_s)

    def hold_lost(self) -> None:
        """Mark one held slot as held for a job we lost contact with."""
        fd = next(fd for fd in reversed(self._held) if fd not in self._lost)
        os.pwrite(fd, _LOST, 0)
        self._lost.add(fd)

    def all_lost(self) -> bool:
        """Whether every slot is held, by this process or others, for a lost job."""
        for path in self._paths:
            try:
                if path.read_bytes() != _LOST:
                    return False
            except FileNotFoundError:
                return False
        fd = self._try_one()  # a free one with a mark its killed holder left
        if fd is None:
            return True
        self._unlock(fd)
        return False

    def _try_one(self) -> int | None:
        start = self._rng.randrange(len(self._paths))  # spread the tries over the files
        for i in range(len(self._paths)):
            path = self._paths[(start + i) % len(self._paths)]
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            return fd
        return None

    def release(self) -> None:
        """Give back one slot (slots are alike: one not marked lost)."""
        unmarked = [i for i, fd in enumerate(self._held) if fd not in self._lost]
        self._unlock(self._held.pop(unmarked[-1] if unmarked else -1))

    def _unlock(self, fd: int) -> None:
        self._lost.discard(fd)
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Give back every slot still held (e.g. by jobs we lost contact with)."""
        while self._held:
            self._unlock(self._held.pop())
