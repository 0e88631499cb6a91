"""The scratch folders of the ledger's big reads (``status``, ``report``, ``export``):
temporary folders in the system's (``TMPDIR``), removed when the read ends.

A read of a big ledger writes much there: at 1,000,000 jobs (177 MB of parts) up to
173 MB for ``status``, 276 MB for ``report``, 1,032 MB for ``export`` (measured; see
bench/README.md). A write there that fails (the folder full, read-only, or a small
tmpfs) is one :class:`LedgerError` naming the folder and ``TMPDIR``, not a traceback and
not an error about the ledger or the export's own file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.errors import LedgerError


@contextmanager
def scratch_folder(prefix: str) -> Iterator[Path]:
    """A new temporary folder, removed with what it holds when the block ends."""
    with tempfile.TemporaryDirectory(prefix=prefix) as folder:
        yield Path(folder)


@contextmanager
def scratch_errors(folder: Path) -> Iterator[None]:
    """The block's failed writes as one LedgerError naming ``folder``'s parent. A file
    not found passes through: a part gone in a compaction (the read starts over)."""
    try:
        yield
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno is None:
            raise
        reason = f"[Errno {exc.errno}] {os.strerror(exc.errno)}"
        where = str(folder.parent)
        shown = where if where.isprintable() else repr(where)
        hint = " (a read of a big ledger needs room there)" if exc.errno == errno.ENOSPC else ""
        raise LedgerError(
            f"cannot write scratch files in {shown}: {reason}{hint}; "
            "set TMPDIR to a folder with room"
        ) from exc
