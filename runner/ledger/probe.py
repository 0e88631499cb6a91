"""A write probe: can this run actually keep what it pays for, before it pays for anything?

:func:`probe_writable` makes the directory (parents too), then creates, writes, fsyncs and
removes a uniquely named hidden file in it. Any OSError becomes one
:class:`~runner.errors.LedgerError` (exit 4) naming the directory and the OS reason, e.g.
``cannot write to the output folder /x/y: [Errno 30] Read-only file system``.

It is blocking (a few syscalls): call it in a worker thread from async code. The probe file
never outlives the call, whichever step fails; the directory it created stays.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from runner.errors import LedgerError

PROBE_PREFIX = ".write-probe-"
_PAYLOAD = b"runner write probe\n"
# O_EXCL: a name that is already taken is never written over, nor removed afterwards.
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)


def probe_writable(directory: Path, *, what: str) -> None:
    """Raise LedgerError unless a file can be created, written and fsynced in ``directory``.

    ``what`` names the directory for the user ("run directory", "output folder").
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _write_and_remove(directory / f"{PROBE_PREFIX}{os.getpid()}-{secrets.token_hex(6)}")
    except OSError as exc:
        raise LedgerError(
            f"cannot write to the {what} {_shown(directory)}: {_reason(exc)}"
        ) from exc


def _write_and_remove(path: Path) -> None:
    fd = os.open(path, _FLAGS, 0o600)
    try:
        try:
            view = memoryview(_PAYLOAD)
            while view:  # a write may be short; a full disk shows up here or at fsync
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        # Runs whatever failed above (even an interrupt): the probe never stays behind.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _reason(exc: OSError) -> str:
    """``[Errno 30] Read-only file system``: the OS's words without the probe file's name."""
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _shown(directory: Path) -> str:
    text = str(directory)
    return text if text.isprintable() else repr(text)  # keeps the message on one line
