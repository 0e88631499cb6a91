"""Duplicate ids: the sorted-run table and the vector path's block claims.

:class:`KeyLines` is checked against a dict of first lines; the batch reader's duplicate
messages against both the per-row path and an exact reference computed here from the ids'
text, on manifests mixing repeated ids, near-duplicates, blank ids and rows the vector path
sends row by row (whose ids it claims out of block order).
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.errors import RowError
from runner.manifest import arrowcsv, idtable
from runner.manifest.batches import iter_job_batches
from runner.manifest.idtable import KeyLines
from runner.manifest.jobs import ExpandOptions
from tests.test_batches import check_same
from tests.torture_support import LONG

FUZZ = settings(
    max_examples=80 if LONG else 25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
# Repeats, near-duplicates (case, spacing, a tab, one letter more), and blanks.
IDS = ["a", "a", "b", "A", " a", "a ", "a\t", "aa", "a.", "b b", "b  b", "", "  ", "é", "e\u0301"]


@pytest.fixture
def small(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arrowcsv, "BLOCK_BYTES", 300)
    monkeypatch.setattr(idtable, "_PENDING_MAX", 4)
    monkeypatch.setattr(idtable, "_DIRECTORY_MIN", 8)  # runs searched through a directory
    monkeypatch.setattr(idtable, "RUN_MAX", 24)  # several runs stop growing
    monkeypatch.setattr(idtable, "SPILL_AT", 6)  # the older runs go to disk


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=200))
def test_keylines_keeps_the_least_line_of_each_key(
    small: None, steps: list[tuple[int, bool]]
) -> None:
    table, first = KeyLines(), dict[int, int]()
    batch: list[tuple[int, int]] = []
    for line, (key, one_by_one) in enumerate(steps, 1):
        key -= 20  # negative keys and zero are keys too
        if one_by_one:
            assert table.claim(key, line) == first.setdefault(key, line)
            continue
        batch.append((key, line))
        if len(batch) == 3 or line == len(steps):
            keys = np.array(sorted({k for k, _ in batch}), dtype=np.int64)
            held = table.lookup(keys)
            assert held.tolist() == [first.get(k, 0) for k in keys.tolist()]
            new = [(k, min(n for j, n in batch if j == k)) for k in keys.tolist() if k not in first]
            table.add(np.array([k for k, _ in new]), np.array([n for _, n in new]))
            first.update(new)
            batch = []
    assert len(table) == len(first)
    assert all(table.claim(key, 10**6) == line for key, line in first.items())


def test_a_lower_line_takes_a_key_over() -> None:
    table = KeyLines()
    table.add(np.array([5, 9]), np.array([30, 40]))
    assert table.claim(9, 35) == 35
    assert table.displaced == {40}
    assert [table.claim(9, 41), table.claim(5, 31)] == [35, 30]
    assert table.lookup(np.array([9, 5, 7])).tolist() == [35, 30, 0]


def test_runs_stop_growing_at_run_max(monkeypatch: pytest.MonkeyPatch) -> None:
    # A merge holds both runs and the merged one: capped, the peak stays near what is held.
    monkeypatch.setattr(idtable, "RUN_MAX", 1_000)
    table = KeyLines()
    for start in range(0, 10_000, 100):
        table.add(np.arange(start, start + 100) * 7, np.arange(start, start + 100) + 2)
    assert max(len(keys) for keys, *_ in table._runs) <= 1_000
    assert table.lookup(np.array([0, 7 * 9_999, 5, 7 * 4_321])).tolist() == [2, 10_001, 0, 4_323]


def test_lines_past_32_bits_are_kept() -> None:
    table = KeyLines()
    table.add(np.array([1]), np.array([2**32 + 5]))
    table.add(np.array([2]), np.array([3]))  # merged with the wide run
    assert table.lookup(np.array([1, 2])).tolist() == [2**32 + 5, 3]


def test_the_table_takes_16_bytes_a_key() -> None:
    table = KeyLines()
    rng = np.random.default_rng(7)
    for _ in range(20):
        keys = np.unique(rng.integers(-(2**62), 2**62, 5_000))
        table.add(keys, np.arange(2, 2 + len(keys)), rng.integers(0, 2**32, len(keys)))
    assert len(table) == 100_000
    assert table.nbytes == 16 * 100_000


@pytest.mark.parametrize("one_by_one", [True, False])
def test_ids_sharing_a_64_bit_key_are_told_apart_by_the_check(
    small: None, one_by_one: bool
) -> None:
    """Two ids whose 64-bit keys agree are two ids: the 32-bit check tells them apart."""
    table = KeyLines()
    for key in range(20):  # enough for runs, merges and a directory
        table.add(np.array([key * 1000]), np.array([key + 2]), np.array([7]))
    first: dict[tuple[int, int], int] = {}
    for line, (key, check) in enumerate([(5000, 8), (5000, 9), (5000, 8), (42, 1), (5000, 7)], 30):
        if one_by_one:
            found = table.claim(key, line, check)
        else:
            held = int(table.lookup(np.array([key]), np.array([check]))[0])
            if not held:
                table.add(np.array([key]), np.array([line]), np.array([check]))
            found = held or line
        assert found == first.setdefault((key, check), line if (key, check) != (5000, 7) else 7)
    assert table.lookup(np.array([5000, 5000, 5000, 5000]), np.array([7, 8, 9, 10])).tolist() == [
        7, 30, 31, 0]  # fmt: skip
    assert table.claim(5000, 3, 9) == 3 and table.displaced == {31}
    assert table.lookup(np.array([5000]), np.array([9])).tolist() == [3]


@st.composite
def id_manifests(draw: Any) -> bytes:
    rows = []
    for n in range(draw(st.integers(1, 80))):
        row_id = draw(st.sampled_from(IDS))
        # Some rows go row by row (a LoRA, a bad count): they claim out of block order.
        kind = draw(st.sampled_from(["plain"] * 4 + ["lora", "bad"]))
        loras = "owner/lora:0.5" if kind == "lora" else ""
        count = "two" if kind == "bad" else "1"
        prompt = f"cat {n}" + ("\nlong" if n % 5 == 0 else "")
        rows.append([row_id, prompt, count, loras])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", "prompt", "num_images", "loras"])
    writer.writerows(rows)
    return out.getvalue().encode()


def reference(data: bytes) -> list[str]:
    """The duplicate messages, from the ids' text: the first line each stripped id was on."""
    first: dict[str, int] = {}
    found = []
    line = 1
    for row in list(csv.reader(io.StringIO(data.decode(), newline="")))[1:]:
        line += 1
        row_id = row[0].strip()
        if row_id:
            seen = first.setdefault(row_id, line)
            if seen != line:
                found.append(f"m.csv:{line}: id {row_id!r} is already used on line {seen}")
        line += row[1].count("\n")
    return found


@FUZZ
@given(id_manifests())
def test_duplicates_are_found_as_the_ids_text_says(
    tmp_path: Path, small: None, data: bytes
) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    options = ExpandOptions(manifest_dir=tmp_path, default_endpoint="fal-ai/flux-lora")
    check_same(path, options)  # the per-row path, job for job and message for message
    messages = [
        str(problem)
        for batch in iter_job_batches(path, None, options, materialize=False)
        for item in batch.items
        if isinstance(item, RowError)
        for problem in item.problems
        if "already used" in problem.message
    ]
    assert [m.replace(str(tmp_path) + "/", "") for m in messages] == reference(data)


def test_a_long_run_is_searched_through_its_directory(small: None) -> None:
    table = KeyLines()
    rng = np.random.default_rng(3)
    keys = np.unique(rng.integers(-(2**63), 2**63 - 1, 3_000, dtype=np.int64))
    keys = np.unique(np.concatenate([keys, [-(2**63), 2**63 - 1, 0, -1]]))
    table.add(keys, np.arange(2, len(keys) + 2))
    probes = np.concatenate([keys, keys + 1, keys - 1])
    expected = {int(k): n for n, k in enumerate(keys.tolist(), 2)}
    assert table.lookup(probes).tolist() == [expected.get(int(k), 0) for k in probes.tolist()]
