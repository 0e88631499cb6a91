"""The id table past memory: runs spilled to an unnamed temporary file, probed through filters.

:class:`KeyLines` (ids) and :class:`Occurrences` (contents) spill once they hold ``SPILL_AT``
keys; what they answer is checked against a dict or a counter, with keys that share their
top 48 bits (one bucket, one filter value: every probe of them reads the disk), and their
memory and disk use per key.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from runner.manifest import idspill, idtable
from runner.manifest.identity import Occurrences
from runner.manifest.idtable import KeyLines


@pytest.fixture
def spill_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idtable, "SPILL_AT", 2_000)
    monkeypatch.setattr(idtable, "RUN_MAX", 1_500)


def mixed_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random keys, and runs of keys alike but for their low bits (the filter cannot part them)."""
    spread = rng.integers(-(2**63), 2**63 - 1, count, dtype=np.int64)
    close = rng.integers(-(2**63), 2**63 - 1, count // 40, dtype=np.int64) & ~np.int64(0xFFFF)
    near = (close[:, None] + np.arange(0, 40 * 7, 7, dtype=np.int64)).reshape(-1)
    return np.concatenate([spread, near, [-(2**63), 2**63 - 1, 0, -1]])


def test_spilled_keys_are_found_as_a_dict_says(spill_early: None) -> None:
    rng = np.random.default_rng(11)
    keys = rng.permutation(mixed_keys(rng, 24_000))
    table, first = KeyLines(), dict[tuple[int, int], int]()
    line = 2
    for start in range(0, len(keys), 700):
        block = keys[start : start + 700]
        # Repeats of earlier keys (some under another check: another id), and new keys.
        again = rng.choice(keys[: start + 1], 50)
        block = np.unique(np.concatenate([block, again]))
        checks = (block % 3 == 0).astype(np.uint32) * rng.integers(
            0, 2, len(block), dtype=np.uint32
        )
        lines = line + rng.permutation(len(block))
        line += len(block)
        held = table.claim_many(block, checks, lines)
        expected = [
            first.setdefault((int(k), int(c)), int(n))
            for k, c, n in zip(block.tolist(), checks.tolist(), lines.tolist(), strict=True)
        ]
        assert held.tolist() == expected
    assert table._spilled and len(table) == len(first)
    probe = np.concatenate([keys, keys + 1])
    expected = [first.get((int(k), 0), 0) for k in probe.tolist()]
    assert table.lookup(probe).tolist() == expected
    # One by one, and a lower line taking over a spilled key (written back to the file).
    for key in keys[:300].tolist():
        was = first.setdefault((key, 0), 10**7)
        assert table.claim(key, 10**7) == was
        assert table.claim(key, 1) == 1 and table.displaced == {was}
        table.displaced.clear()
    assert table.lookup(keys[:300]).tolist() == [1] * 300


def test_a_spilled_table_holds_under_3_bytes_a_key_in_memory(spill_early: None) -> None:
    table = KeyLines()
    rng = np.random.default_rng(5)
    for start in range(0, 200_000, 5_000):
        keys = np.unique(rng.integers(-(2**62), 2**62, 5_000))
        table.add(keys, np.arange(start + 2, start + 2 + len(keys)))
    spilled = sum(map(len, table._spilled))
    assert len(table) == 200_000 and spilled >= 198_000
    assert table.nbytes <= 2.5 * spilled + 16 * idtable.SPILL_AT
    assert table.spilled_bytes == 20 * spilled


def test_lines_past_32_bits_are_kept_on_disk(spill_early: None) -> None:
    table = KeyLines()
    table.add(np.arange(3_000) * 5, np.arange(3_000) + 2**32)
    assert table._spilled
    assert table.lookup(np.array([0, 5, 7])).tolist() == [2**32, 2**32 + 1, 0]
    assert table.claim(0, 2**33) == 2**32


def test_a_run_finds_each_key_one_by_one_and_in_a_batch() -> None:
    rng = np.random.default_rng(2)
    keys = np.unique(mixed_keys(rng, 5_000))
    lines = rng.integers(1, 2**40, len(keys))
    run = idspill.spill(keys, np.arange(len(keys), dtype=np.uint32), lines)
    assert run.nbytes <= 2.5 * len(keys)
    absent = np.setdiff1d(keys + 3, keys)
    index, checks, held, places = run.probe(np.concatenate([absent, keys]))
    assert index.tolist() == list(range(len(absent), len(absent) + len(keys)))
    assert checks.tolist() == list(range(len(keys))) and held.tolist() == lines.tolist()
    assert all(run.find(int(k)) == (n, int(lines[n]), n) for n, k in enumerate(keys.tolist()))
    assert run.find(int(absent[0])) is None
    run.set_line(int(places[7]), 3)
    assert run.find(int(keys[7])) == (7, 3, 7)


def test_occurrences_count_across_spills(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Occurrences, "SPILL_AT", 300)
    rng = np.random.default_rng(4)
    keys = mixed_keys(rng, 2_000)
    sightings = [*rng.choice(keys, 6_000).tolist(), 0, 0]
    counts, seen = Occurrences(capacity=4), Counter[int]()
    for key in sightings:
        seen[key] += 1
        assert counts.next(key) == seen[key]
    assert counts._spilled and len(counts) == len(seen)
    assert counts.nbytes < 12 * 1024 + 2.5 * len(seen)


def test_the_spill_file_has_no_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = idspill.spill(np.arange(100, dtype=np.int64), np.zeros(100, np.uint32), np.arange(100))
    assert run.file_bytes == 2_000 and os.fstat(run._file.fd).st_nlink == 0
    assert list(tmp_path.iterdir()) == []
    run.close()


CHILD = """
import os, signal, sys
import numpy as np
from runner.manifest import idtable
idtable.SPILL_AT = 1_000
table = idtable.KeyLines()
table.add(np.arange(50_000, dtype=np.int64), np.arange(50_000) + 2)
assert table.spilled_bytes > 900_000, table.spilled_bytes
print(table._spilled[0]._file.fd, flush=True)
sys.stdin.readline()
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_run_leaves_no_spill_file(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert child.stdout is not None and child.stdin is not None
    fd = int(child.stdout.readline())
    held = os.readlink(f"/proc/{child.pid}/fd/{fd}")
    assert held.startswith(str(tmp_path)) and held.endswith("(deleted)")
    assert list(tmp_path.iterdir()) == []
    child.stdin.write(b"\n")
    child.stdin.close()
    assert child.wait(timeout=60) == -signal.SIGKILL
    child.stdout.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_merged_runs_answer_as_both(monkeypatch: pytest.MonkeyPatch, chunk: int) -> None:
    monkeypatch.setattr(idspill, "_RECORDS", chunk)
    rng = np.random.default_rng(9)
    keys = rng.permutation(np.unique(mixed_keys(rng, 3_000)))
    lines = np.arange(len(keys)) + 2
    cut = [0, 40, 1_000, 1_010, len(keys)]  # small and large runs, interleaved keys
    runs: list[idspill.SpilledRun] = []
    for start, end in itertools.pairwise(cut):
        order = np.argsort(keys[start:end])
        part = keys[start:end][order]
        runs.append(idspill.spill(part, np.zeros(len(part), np.uint32), lines[start:end][order]))
    files = [run._file for run in runs]
    merged = idspill.merge(idspill.merge(runs[0], runs[1]), idspill.merge(runs[2], runs[3]))
    assert len(merged) == len(keys) and all(file._file is None for file in files)
    index, _, held, _ = merged.probe(keys)
    assert index.tolist() == list(range(len(keys))) and held.tolist() == lines.tolist()
    assert merged.probe(keys + 1)[0].tolist() == np.flatnonzero(np.isin(keys + 1, keys)).tolist()
    pushed: list[idspill.SpilledRun] = []
    for n in range(7):
        one = idspill.spill(np.array([n * 2]), np.zeros(1, np.uint32), np.array([n]))
        idspill.push(pushed, one)
    # 1, 1 -> 2; 2, 1 -> 3; 3, 1, 1 -> 3, 2 -> 5; 5, 1, 1 -> 5, 2 (5 is over twice 2).
    assert [len(run) for run in pushed] == [5, 2]
    assert [run.find(n * 2) for n in range(7) for run in pushed if run.find(n * 2)] == [
        (0, n, n) if n < 5 else (0, n, n - 5) for n in range(7)
    ]


def test_without_temporary_space_the_tables_stay_in_memory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, spill_early: None
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    monkeypatch.setattr(Occurrences, "SPILL_AT", 300)
    table, counts = KeyLines(), Occurrences()
    keys = np.arange(5_000, dtype=np.int64) * 3
    for start in range(0, 5_000, 500):
        table.add(keys[start : start + 500], keys[start : start + 500] + 2)
    assert not table._spilled and table.lookup(keys).tolist() == (keys + 2).tolist()
    assert [counts.next(k) for k in range(1_000)] == [1] * 1_000
    assert counts.next(999) == 2 and not counts._spilled and len(counts) == 1_000


def test_a_spilled_run_that_cannot_be_read_back_is_one_manifest_error(
    spill_early: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written runs have no copy in memory: an I/O error reading them ends the check in one
    line naming the temporary directory, not a traceback (nor the "no room" of a write)."""
    from runner.errors import ManifestError

    keys = np.random.default_rng(5).permutation(np.arange(1, 6_001, dtype=np.int64) << 40)
    table = KeyLines()
    table.claim_many(keys, np.zeros(len(keys), np.uint32), np.arange(2, 6_002, dtype=np.int64))
    assert table._spilled, "the fixture's threshold spills nothing"

    def failing(fd: int, size: int, offset: int) -> bytes:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "pread", failing)
    again = keys[:50]
    with pytest.raises(ManifestError, match=r"temporary file in .*Input/output error.*TMPDIR"):
        table.claim_many(again, np.zeros(50, np.uint32), np.arange(7_000, 7_050, dtype=np.int64))
