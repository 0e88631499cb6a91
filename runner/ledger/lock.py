"""One writer per run directory: a non-blocking ``fcntl.flock`` on ``run_dir/.lock``.

The kernel drops the lock when its holder exits, however it exits, so a
crashed run never leaves a stale lock. The holder's pid is written into the
file only to make the refusal message useful; the flock alone decides.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from runner.errors import LedgerLockedError

LOCK_NAME = ".lock"
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


class RunLock:
    """An exclusive writer lock on a run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.path = run_dir / LOCK_NAME
        self._fd = -1

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def acquire(self) -> None:
        # O_NOFOLLOW: a link planted as .lock would have us truncate the file it points at.
        fd = os.open(self.path, _FLAGS, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f" (held by pid {holder})" if holder else ""
            raise LedgerLockedError(
                f"run directory {self.run_dir} is in use by another runner{who}; "
                "wait for it to finish or choose another --ledger directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None
