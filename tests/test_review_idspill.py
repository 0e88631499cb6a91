"""Attack review of the spilling id tables: KeyLines and Occurrences against a dict, through
scalar and batch claims interleaved, lower lines taking keys over, 64-bit key clashes, lines
past 2**32, a disk that fills up mid-run (a file-size limit: real EFBIG from pwrite), and a
forked child reading the parent's unnamed spill files."""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runner.manifest import idspill, idtable
from runner.manifest.batches import iter_manifest_jobs
from runner.manifest.identity import Occurrences
from runner.manifest.idtable import KeyLines
from runner.manifest.jobs import ExpandOptions


@pytest.fixture
def tiny(monkeypatch: pytest.MonkeyPatch) -> None:
    """Spills, merges and pending flushes at a few dozen keys, chunks of 7 records."""
    monkeypatch.setattr(idtable, "SPILL_AT", 40)
    monkeypatch.setattr(idtable, "RUN_MAX", 30)
    monkeypatch.setattr(idtable, "_PENDING_MAX", 9)
    monkeypatch.setattr(idspill, "_RECORDS", 7)
    monkeypatch.setattr(Occurrences, "SPILL_AT", 25)


@contextlib.contextmanager
def file_size_limit(size: int) -> Iterator[None]:
    """Files past ``size`` bytes cannot be written (EFBIG), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)


class Reference:
    """What KeyLines answers, as a dict: the least line of each (key, check)."""

    def __init__(self) -> None:
        self.first: dict[tuple[int, int], int] = {}
        self.displaced: set[int] = set()

    def claim(self, key: int, line: int, check: int) -> int:
        held = self.first.setdefault((key, check), line)
        if line < held:
            self.displaced.add(held)
            self.first[key, check] = line
            return line
        return held

    def claim_many(self, keys: list[int], checks: list[int], lines: list[int]) -> list[int]:
        return [
            self.first.setdefault((k, c), n) for k, c, n in zip(keys, checks, lines, strict=True)
        ]


def drive(table: KeyLines, seed: int, rounds: int = 120) -> None:
    """Random claims, one by one and by batch, against the reference, checked as they go."""
    rng = np.random.default_rng(seed)
    # Few distinct low bits: keys share buckets and filter bits; some share all 64 (clash).
    pool = rng.integers(-(2**63), 2**63 - 1, 300, dtype=np.int64)
    pool[:60] = (pool[:60] & ~np.int64(0xFFFFF)) | np.arange(60)
    pool = np.concatenate([pool, [-(2**63), 2**63 - 1, 0, -1, 1]])
    ref = Reference()
    line = 2
    for _ in range(rounds):
        base = line + (2**32 if rng.random() < 0.2 else 0)  # lines past 32 bits too
        if rng.random() < 0.4:
            for key in rng.choice(pool, 5).tolist():
                check = int(rng.integers(0, 2))
                # Sometimes a line below those held: the slow row comes first in the block.
                at = base - int(rng.integers(0, 400)) if rng.random() < 0.3 else base
                at = max(at, 1)
                assert table.claim(key, at, check) == ref.claim(key, at, check), key
                base += 1
        else:
            keys = np.unique(rng.choice(pool, int(rng.integers(1, 40))))
            checks = rng.integers(0, 2, len(keys), dtype=np.uint32)
            lines = base + rng.permutation(len(keys)).astype(np.int64)
            base += len(keys)
            got = table.claim_many(keys, checks, lines).tolist()
            want = ref.claim_many(keys.tolist(), checks.tolist(), lines.tolist())
            assert got == want
        line = base
        assert table.displaced == ref.displaced
    every = np.array([k for k, _ in ref.first], dtype=np.int64)
    checks = np.array([c for _, c in ref.first], dtype=np.uint32)
    assert table.lookup(every, checks).tolist() == list(ref.first.values())
    assert len(table) == len(ref.first)


@pytest.mark.parametrize("seed", range(6))
def test_claims_one_by_one_and_by_batch_agree_with_a_dict_across_spills(
    tiny: None, seed: int
) -> None:
    table = KeyLines()
    drive(table, seed)
    assert len(table._spilled) >= 1


def test_ten_spills_then_duplicates_of_the_first_keys(tiny: None) -> None:
    table = KeyLines()
    first = np.arange(1, 41, dtype=np.int64) * 7919
    table.claim_many(first, np.zeros(40, np.uint32), np.arange(2, 42, dtype=np.int64))
    line = 100
    for n in range(10):
        keys = np.arange(1, 41, dtype=np.int64) * 7919 + 10**6 * (n + 1)
        table.claim_many(keys, np.zeros(40, np.uint32), np.arange(line, line + 40))
        line += 40
    assert sum(map(len, table._spilled)) >= 400
    again = table.claim_many(first[::-1], np.zeros(40, np.uint32), np.arange(line, line + 40))
    assert again.tolist() == list(range(41, 1, -1))
    assert [table.claim(int(k), 5_000) for k in first] == list(range(2, 42))
    assert table.claim(int(first[3]), 1) == 1 and table.displaced == {5}


@pytest.mark.parametrize("limit", [200, 700, 2_000])
def test_a_disk_full_mid_run_keeps_the_same_answers(tiny: None, limit: int) -> None:
    table = KeyLines()
    with file_size_limit(limit):  # spill files past a few records cannot be written
        drive(table, seed=limit)


def test_occurrences_count_as_a_counter_across_spills_and_a_full_disk(tiny: None) -> None:
    rng = np.random.default_rng(5)
    pool = rng.integers(-(2**63), 2**63 - 1, 200, dtype=np.int64)
    pool[:50] = (pool[:50] & ~np.int64(0xFFFFF)) | (np.arange(50) << 10)  # like low bits
    keys = np.concatenate([pool, [0, -1, 2**63 - 1, -(2**63)]])
    for limit in (None, 300):
        counts, ref = Occurrences(), Counter[int]()
        with file_size_limit(limit) if limit else contextlib.nullcontext():
            for key in rng.choice(keys, 3_000).tolist():
                ref[key] += 1
                assert counts.next(key) == ref[key], key
        assert len(counts) == len(ref)


def _spilled_table() -> tuple[KeyLines, np.ndarray]:
    """200 ids claimed at lines 2..201, spilled (with the ``tiny`` fixture's thresholds)."""
    table = KeyLines()
    keys = np.arange(1, 201, dtype=np.int64) * 104_729
    table.claim_many(keys, np.zeros(200, np.uint32), np.arange(2, 202, dtype=np.int64))
    assert table._spilled
    return table, keys


def test_a_forked_child_reads_the_spilled_ids(tiny: None) -> None:
    table, keys = _spilled_table()
    pid = os.fork()
    if pid == 0:  # the child: answers from the same unnamed files
        ok = table.lookup(keys).tolist() == list(range(2, 202))
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.lookup(keys).tolist() == list(range(2, 202))


def test_content_ids_through_the_reader_are_numbered_as_without_spills(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(9)
    prompts = [f"prompt {rng.randrange(60)}" for _ in range(600)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    options = ExpandOptions(manifest_dir=tmp_path, default_endpoint="fal-ai/flux-lora")

    def ids() -> list[str]:
        return [job.row_id for job in iter_manifest_jobs(path, None, options)]  # type: ignore[union-attr]

    expected = ids()
    assert len(set(expected)) == 600 and any(i.endswith(".10") for i in expected)
    monkeypatch.setattr(Occurrences, "SPILL_AT", 7)
    monkeypatch.setattr(idspill, "_RECORDS", 3)
    assert ids() == expected


@pytest.mark.xfail(
    strict=True,
    reason="latent: a forked child shares the parent's spill files (pwrite), where at 7cad00d "
    "its table was a copy-on-write copy; nothing in runner forks with a live table today "
    "(ray's workers are started by raylet), and the fix (reopen the runs in a child) is unclear",
)
def test_a_forked_child_claiming_a_spilled_id_leaves_the_parent_alone(tiny: None) -> None:
    table, keys = _spilled_table()
    pid = os.fork()
    if pid == 0:  # the child takes the first spilled id over with a lower line
        table.claim(int(keys[0]), 1)
        os._exit(0)
    os.waitpid(pid, 0)
    assert table.lookup(keys[:1]).tolist() == [2]
