"""A run's budget shared by processes on one machine: a book in a file, under a lock.

``GATE_DIR/budget-<run>/`` (``<run>`` a hash of the run directory's path) holds the run's
:class:`runner.execution.budget.SpendBook` as ``book.json``. Every operation takes an
exclusive ``flock`` on ``book.lock``, reads the book, changes it and writes it back (a new
file renamed over the old), so reservations from every process are checked against one sum
and the caps hold whatever the interleaving.

Which processes form one invocation (the one ``--max-cost`` caps): those that overlap in
time. Each holds a shared lock on ``presence.lock`` while it runs; a process that finds no
other holder (it can take the lock exclusively) starts a new book. The kernel drops a dead
process's locks, so a crash never keeps an old invocation open, but its reservations stay
in the book, counted as spent, until its shard runs again and reads its own ledger
(:meth:`runner.execution.budget.SpendBook.join`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

from runner.execution.budget import Caps, SpendBook


def book_dir(gate_dir: Path, run_dir: Path) -> Path:
    """Where the budget of ``run_dir`` is kept under ``gate_dir``."""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    return gate_dir / f"budget-{digest}"


class FilePool:
    """A :class:`runner.execution.spend.Pool` in ``directory``; :meth:`open` before use."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._book = directory / "book.json"
        self._lock = directory / "book.lock"
        self._presence = directory / "presence.lock"
        self._present: int | None = None

    def open(self) -> None:
        """Join the invocation of the processes running now, or start a new one."""
        with self._locked():
            fd = os.open(self._presence, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # others run now: join their book (they cannot be converting: we lock)
            else:
                self._write(SpendBook())  # nobody else: a new invocation
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._present = fd

    def close(self) -> None:
        if self._present is not None:
            os.close(self._present)  # drops the shared lock
            self._present = None

    def book(self) -> SpendBook:
        """The book as it is now (for reports and tests)."""
        with self._locked():
            return self._read()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[SpendBook]:
        with self._locked():
            book = self._read()
            yield book
            self._write(book)

    def _read(self) -> SpendBook:
        try:
            return SpendBook.from_json(json.loads(self._book.read_text()))
        except FileNotFoundError:
            return SpendBook()

    def _write(self, book: SpendBook) -> None:
        tmp = self._book.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(book.to_json()))
        os.replace(tmp, self._book)

    async def admit(self, member: str, estimate_usd: Decimal | None, caps: Caps) -> str | None:
        # A few hundred microseconds under the lock: not worth a thread.
        with self._changing() as book:
            return book.admit(member, estimate_usd, caps)

    def join(self, member: str, shard: int | None, prior_usd: Decimal) -> None:
        with self._changing() as book:
            book.join(member, shard, prior_usd)

    def seed(self, priors: dict[int, Decimal]) -> None:
        with self._changing() as book:
            book.seed(priors)

    def reserve_committed(self, member: str, estimate_usd: Decimal | None) -> None:
        with self._changing() as book:
            book.reserve_committed(member, estimate_usd)

    def settle(
        self, member: str, estimate_usd: Decimal | None, actual_usd: Decimal | None,
        reattached: bool,
    ) -> None:  # fmt: skip
        with self._changing() as book:
            book.settle(member, estimate_usd, actual_usd, reattached=reattached)
