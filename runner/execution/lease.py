"""A key's in-flight slots shared by processes on one machine: file-lock leases.

The gate directory of a key (``GATE_DIR/<fingerprint>/``, named after the key's
fingerprint, never the key) holds one file per slot. Holding a slot is holding an
exclusive ``fcntl.flock`` on its file; a process waiting for a slot tries every file
without blocking, and sleeps ``poll_s`` when all are held.

A lease expires with its holder: the kernel drops a process's flocks when it exits, however
it exits (SIGKILL included), so a dead worker never keeps a slot. Every process on the key
must be given the same number of slots (the same ``--keys-file``): the count is the number
of files each one tries.
"""

from __future__ import annotations

import fcntl
import os
import random
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio


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
    ) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        directory.mkdir(parents=True, exist_ok=True)
        self._paths = [directory / f"slot-{i:05d}.lease" for i in range(count)]
        self._poll_s = poll_s
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._held: list[int] = []  # descriptors holding a lock

    @property
    def held(self) -> int:
        return len(self._held)

    async def acquire(self) -> None:
        """Wait until a slot is free in every process, and hold it."""
        while True:
            fd = self._try_one()
            if fd is not None:
                self._held.append(fd)
                return
            await self._sleep(self._poll_s)

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
        """Give back one slot (slots are alike: which one does not matter)."""
        fd = self._held.pop()
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Give back every slot still held (e.g. by jobs we lost contact with)."""
        while self._held:
            self.release()
