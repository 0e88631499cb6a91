"""release_freed gives a fragmented heap's free pages back (what keeps a long run's RSS flat)."""

from __future__ import annotations

import os
import sys

import pytest

from runner import libc
from runner.ledger import heap


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap")
def test_release_freed_returns_the_pages_of_a_fragmented_heap() -> None:
    if not libc.available():
        pytest.skip("not glibc")
    # 2 KB objects come from malloc's heap (obmalloc takes only up to 512 bytes). Keeping
    # every eighth leaves ~14 KB holes below live chunks: free, but never returned by free().
    blocks = [bytes(2000) + i.to_bytes(4, "little") for i in range(60_000)]
    kept = blocks[::8]
    del blocks
    before = _rss_bytes()
    heap.release_freed()
    after = _rss_bytes()
    assert len(kept) == 7_500
    assert before - after > 40 * 2**20, (before, after)
