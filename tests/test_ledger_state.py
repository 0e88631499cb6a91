"""Ledger.state(): the admission fold (few columns) agrees with the full fold; the index."""

from __future__ import annotations

import importlib
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from runner.ledger import JobState, Ledger, LedgerEvent, LedgerState, OutputImage
from runner.ledger.fold import ADMISSION_COLUMNS
from runner.ledger.index import KeyIndex, Strings, Values
from runner.media.downloads import pending_downloads

fold_module = importlib.import_module("runner.ledger.fold")
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
STATES = list(JobState)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def image(i: int, fetched: bool) -> OutputImage:
    local = f"out/{i}.png" if fetched else None
    sha = "ab" * 32 if local else None
    return OutputImage(f"https://cdn/{i}.png", 64, 64, "image/png", local, sha)


def random_events(rng: random.Random, jobs: int, events: int) -> list[LedgerEvent]:
    """Events of many jobs in random states; every field a resume or a download reads varies."""
    out = []
    for n in range(events):
        key = f"job-{rng.randrange(jobs)}"
        state = rng.choice(STATES)
        fields: dict[str, object] = {}
        if state is JobState.SUBMITTING or rng.random() < 0.2:
            fields.update(
                row_id=f"row-{key}", line=n, source="m.csv", endpoint=rng.choice(["a/b", "c/d"]),
                request='{"prompt":"' + "x" * rng.randrange(200) + '"}', metadata={"n": str(n)},
                estimated_usd=Decimal("0.025"),
            )  # fmt: skip
        if rng.random() < 0.5:
            fields["attempt"] = rng.randrange(1, 4)
        if rng.random() < 0.4:
            fields["request_id"] = f"req-{n}"
        if rng.random() < 0.4:
            fields["retryable"] = rng.random() < 0.5
        if state is JobState.COMPLETED:
            count = rng.randrange(3)
            fields.update(
                outputs=tuple(image(n * 10 + i, rng.random() < 0.5) for i in range(count)),
                billed_usd=Decimal("0.03"), seed=n, queue_s=0.5,
            )  # fmt: skip
        if state is JobState.FAILED:
            fields.update(error_type="boom", error_message="it broke")
        out.append(LedgerEvent(key, state, at(n), **fields))  # type: ignore[arg-type]
    for j in range(0, jobs, 5):  # some jobs end completed, with outputs not all downloaded
        outputs = (image(j, True), image(j + 1, rng.random() < 0.5))
        out.append(LedgerEvent(f"job-{j}", JobState.COMPLETED, at(events + j), outputs=outputs))
    # Outputs not downloaded in attempt 1 do not count once attempt 2 completes without any.
    key, t = "job-retried", events + jobs
    out += [
        LedgerEvent(key, JobState.COMPLETED, at(t), attempt=1, outputs=(image(t, False),)),
        LedgerEvent(key, JobState.SUBMITTING, at(t + 1), attempt=2),
        LedgerEvent(key, JobState.COMPLETED, at(t + 2), attempt=2),
    ]
    return out


def write(run_dir: Path, events: list[LedgerEvent], *, checkpoint_events: int = 97) -> None:
    """Events spread over several parts and a journal left behind (as after a crash)."""
    ledger = Ledger.open(run_dir, checkpoint_events=checkpoint_events)
    for event in events:
        ledger.append(event)
        ledger.commit_sync()
    ledger._segment.close()  # no close(): the last events stay in the journal only
    ledger._lock.release()


@pytest.mark.parametrize("whole", [False, True], ids=["pending-rows", "whole-table"])
@pytest.mark.parametrize("seed", range(4))
def test_admission_state_agrees_with_the_full_fold(
    tmp_path: Path, seed: int, whole: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Jobs with downloads pending: their records alone, or (most jobs) every record.
    monkeypatch.setattr(fold_module, "_WHOLE_FRACTION", 10**9 if whole else 0)
    rng = random.Random(seed)
    events = random_events(rng, jobs=60, events=700)
    write(tmp_path, events)
    full = LedgerState.load(tmp_path)
    with Ledger.open(tmp_path) as ledger:
        for downloads in (True, False):
            state = ledger.state(downloads=downloads)
            assert len(state) == len(full) and sorted(state.keys()) == sorted(full.keys())
            for key in full.keys():  # noqa: SIM118 (not a dict)
                assert state.brief(key) == full.brief(key), key
                record, want = state.get(key), full.get(key)
                assert record is not None and want is not None
                for name in ADMISSION_COLUMNS:
                    assert getattr(record, name) == getattr(want, name), (key, name)
            for name in ADMISSION_COLUMNS:
                got = state.jobs[name].cast(full.jobs.schema.field(name).type)
                assert got.to_pylist() == full.jobs[name].to_pylist(), name
    # Downloads pending: the whole completed record, exactly as the full fold has it.
    with Ledger.open(tmp_path) as ledger:
        jobs = ledger.state().jobs
        assert pending_downloads(ledger.state(downloads=False).jobs) == {}
    pending = pending_downloads(jobs)
    expected = pending_downloads(full.jobs)
    assert pending.keys() == expected.keys() and expected
    # Only those jobs' records are kept whole (``at`` is never null in an event).
    assert jobs.num_rows - jobs["at"].null_count == (len(full) if whole else len(expected))
    if not whole:
        assert jobs.num_rows - jobs["outputs"].null_count == len(expected)
    for key, item in expected.items():
        assert pending[key] == item, key


def test_admission_state_reads_a_fraction_of_the_bytes(tmp_path: Path) -> None:
    events = []
    for i in range(400):
        key = f"{i:032x}"
        events += [
            LedgerEvent(
                key, JobState.SUBMITTING, at(i), row_id=f"r{i}", endpoint="a/b", attempt=1,
                request='{"prompt":"' + "a long prompt " * 20 + '"}', metadata={"sku": str(i)},
            ),
            LedgerEvent(key, JobState.QUEUED, at(i), request_id=f"req-{i}"),
            LedgerEvent(key, JobState.COMPLETED, at(i), outputs=(image(i, i != 7),)),
        ]  # fmt: skip
    write(tmp_path, events, checkpoint_events=500)
    full = LedgerState.load(tmp_path)
    with Ledger.open(tmp_path) as ledger:
        state = ledger.state()
    assert state.jobs.num_rows == 400
    # One job has an output to download: its record alone is whole.
    assert state.jobs["at"].null_count == 399 and state.get(f"{7:032x}") == full.get(f"{7:032x}")
    assert state.jobs.nbytes * 4 < full.jobs.nbytes
    assert state.get(f"{8:032x}") == replace(
        full.get(f"{8:032x}"),  # type: ignore[type-var]
        at=None, row_id=None, line=None, source=None, variant=None, request=None,
        metadata=None, estimated_usd=None, gateway_request_id=None, submitted_at=None,
        started_at=None, completed_at=None, queue_s=None, inference_s=None, outputs=None,
        seed=None, nsfw=None, megapixels=None, error_type=None, error_message=None,
    )  # fmt: skip


def test_empty_ledger_state(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        state = ledger.state()
    assert len(state) == 0 and list(state.keys()) == [] and state.brief("a") is None


@pytest.mark.parametrize("hasher", [hash, lambda key: 7, lambda key: len(key) - 3])
def test_key_index_finds_every_key_and_no_other(hasher: object) -> None:
    rng = random.Random(1)
    keys = ["", "é", "a" * 300, *{f"{rng.getrandbits(64):x}": 0 for _ in range(300)}]
    # Several chunks, one of them sliced: the index reads the bytes where they are.
    chunked = pa.chunked_array([pa.array(keys[:100]), pa.array(["pad", *keys[100:]]).slice(1)])
    index = KeyIndex(chunked, hasher=hasher)  # type: ignore[arg-type]
    assert [index.find(k) for k in keys] == list(range(len(keys)))
    assert list(index) == keys and len(index) == len(keys)
    for other in ("zz", "é ", "a" * 299, keys[5] + "0", keys[5][:-1]):
        assert index.find(other) is None


def test_column_readers_see_nulls_and_slices() -> None:
    strings = pa.array(["x", None, "", "yz", None, "ü"]).slice(1)
    assert [Strings(strings).get(i) for i in range(5)] == [None, "", "yz", None, "ü"]
    ints = pa.chunked_array([pa.array([1, None], pa.int32()), pa.array([None, 4], pa.int32())])
    assert [Values(ints).get(i) for i in range(4)] == [1, None, None, 4]
    bools = pa.array([True, None, False])
    assert [Values(bools).get(i) for i in range(3)] == [True, None, False]
