"""A key's AIMD level shared by the processes of one machine: a file in the gate directory.

``GATE_DIR/<fingerprint>/rate.json`` holds the key's :class:`runner.execution.ratelimit.AimdState`
over a maximum of 1 (the *level*: the fraction of its own ceiling each process submits at).
A 429 seen by any process halves it, at most once per cooldown measured on the wall clock
(the processes share no other); each accepted submit raises it a step back toward 1. Every
change takes an exclusive ``flock`` on ``rate.lock`` and replaces the file; a process reads
the level before each submit token, again only when the file changed (one ``stat``).

At the full level, the common case, a success changes nothing and writes nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from runner.execution.ratelimit import AimdConfig, AimdState, after_success, after_throttle

# The defaults of AdaptiveRate over a maximum of 1: a floor of 1/32 (five halvings), from
# half to full in 25 successes, one halving per 2 s of 429s.
LEVEL_AIMD = AimdConfig(
    max_rate_per_s=1.0, min_rate_per_s=1 / 32, increase_per_success=1 / 50, cooldown_s=2.0
)


class FileLevel:
    """:class:`runner.execution.ratelimit.Level` in ``directory`` (a key's gate directory)."""

    def __init__(
        self,
        directory: Path,
        *,
        config: AimdConfig = LEVEL_AIMD,
        clock: Callable[[], float] = time.time,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self._path = directory / "rate.json"
        self._lock = directory / "rate.lock"
        self._config = config
        self._clock = clock
        self._seen: tuple[int, int] | None = None  # (mtime_ns, inode) of the file read
        self._state = AimdState(rate_per_s=1.0)

    def level(self) -> float:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return self._state.rate_per_s
        if (st.st_mtime_ns, st.st_ino) != self._seen:
            self._state = self._read()
        return self._state.rate_per_s

    def throttle(self) -> None:
        with self._changing() as state:
            self._state = after_throttle(state, self._config, now_s=self._clock())

    def success(self) -> None:
        if self.level() >= self._config.max_rate_per_s:
            return
        with self._changing() as state:
            self._state = after_success(state, self._config)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[AimdState]:
        fd = os.open(self._lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            before = self._read()
            yield before
            if self._state != before:
                tmp = self._path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps([self._state.rate_per_s, self._state.last_decrease_s]))
                os.replace(tmp, self._path)
                st = os.stat(self._path)
                self._seen = (st.st_mtime_ns, st.st_ino)
        finally:
            os.close(fd)

    def _read(self) -> AimdState:
        try:
            st = os.stat(self._path)
            rate, last = json.loads(self._path.read_text())
        except (FileNotFoundError, ValueError):
            return AimdState(rate_per_s=self._config.max_rate_per_s)
        self._seen = (st.st_mtime_ns, st.st_ino)
        return AimdState(rate_per_s=float(rate), last_decrease_s=last)
