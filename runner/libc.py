"""glibc's heap controls, for a process whose RSS must stay flat over millions of jobs.

Imports nothing heavy (the command line calls :func:`limit_arenas` before anything else),
and does nothing where the C library is not glibc (musl, macOS): no symbol, no effect.

- :func:`limit_arenas` caps glibc's malloc arenas. glibc gives each thread that allocates
  an arena of its own, up to 8 per core; a run's worker threads (journal flushes,
  checkpoints, the manifest reader) each churn through theirs and leave it fragmented. On
  a resumed run over a 10,000,000-row manifest (2 cores, concurrency 64) the 16 thread
  arenas grew from 15 to 108 MiB of RSS in 7 minutes with 60-64 MiB of the heap in use,
  which :func:`malloc_trim` at each checkpoint did not hold back; capped at 2 arenas, the
  same run kept them at 4-7 MiB and its RSS at 346-391 MiB (was 399-480), at the same
  jobs a second. The threads mostly wait on the GIL or I/O, so sharing costs nothing seen.
- :func:`malloc_trim` hands back every free page of every arena.
"""

from __future__ import annotations

import ctypes
import functools
import os
from typing import Any

#: Arenas when the user has not set ``MALLOC_ARENA_MAX`` (the main one plus one shared by
#: every thread). Measured, see above; the environment variable wins.
ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number (glibc's malloc.h)


@functools.cache
def _glibc() -> Any | None:
    """The process's own C library symbols when they are glibc's (looked up in the process,
    not with ``ctypes.util.find_library``, which runs ``ldconfig``)."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018  (glibc only)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap malloc's arenas for the threads started from now on (call it before any);
    whether the cap was set (not glibc, or ``MALLOC_ARENA_MAX`` set by the user: no)."""
    libc = _glibc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def malloc_trim() -> None:
    """Return every free page of every arena to the system (about a millisecond)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def available() -> bool:
    """Whether the C library is glibc (the controls do something)."""
    return _glibc() is not None
