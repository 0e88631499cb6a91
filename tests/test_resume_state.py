"""A resume's planning on the narrow, key-ranged read (ResumeState) decides exactly as on the
full fold (LedgerState): every kind of state, every policy, spend, in-flight records and
pending downloads."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pytest

from runner.execution.scheduler import prior_spend
from runner.ledger import JobState, Ledger, LedgerEvent, LedgerState, resumescan
from runner.ledger import resumestate as resumestate_module
from runner.ledger.records import read_records
from runner.ledger.resume import OnUnknown, ResumePolicy, decide
from runner.ledger.resumescan import load_resume_state
from runner.ledger.resumestate import IN_FLIGHT as IN_FLIGHT_STATES
from runner.media.pending import ChunkedPending, pending_downloads
from tests.test_ledger_state import at, image, random_events, write

UNKNOWN: tuple[OnUnknown, ...] = ("reconcile", "resubmit", "skip", "fail")
POLICIES = [ResumePolicy(u, retry) for u, retry in itertools.product(UNKNOWN, (False, True))]


def every_kind(n: int) -> list[LedgerEvent]:
    """Jobs in every state a resume tells apart, including superseded versions of a row."""
    out: list[LedgerEvent] = []
    t = 0.0

    def ev(key: str, state: JobState, **fields: object) -> None:
        nonlocal t
        t += 1
        out.append(LedgerEvent(key, state, at(t), **fields))  # type: ignore[arg-type]

    for i in range(n):
        k = f"{i:04d}-"
        intent = {"row_id": f"row-{i}", "variant": 0, "endpoint": "a/b", "attempt": 1}
        ev(k + "done", JobState.SUBMITTING, **intent)
        ev(k + "done", JobState.QUEUED, request_id=f"r-{i}")
        ev(k + "done", JobState.COMPLETED, outputs=(image(i, True),), billed_usd=Decimal("0.02"))
        ev(k + "fetch", JobState.SUBMITTING, **intent)
        ev(k + "fetch", JobState.COMPLETED, outputs=(image(i, False),), billed_usd=Decimal("0.01"))
        ev(k + "queued", JobState.SUBMITTING, **intent)
        ev(k + "queued", JobState.QUEUED, request_id=f"q-{i}")
        ev(k + "running", JobState.IN_PROGRESS, attempt=2, request_id=f"p-{i}")
        ev(k + "intent", JobState.SUBMITTING, **intent)
        ev(k + "unknown-id", JobState.UNKNOWN, attempt=1, request_id=f"u-{i}")
        ev(k + "unknown", JobState.SUBMITTING, attempt=3)
        ev(k + "unknown", JobState.UNKNOWN)
        ev(k + "free", JobState.FAILED, attempt=1, billed_usd=Decimal(0), retryable=True)
        ev(k + "billed", JobState.FAILED, attempt=2, billed_usd=Decimal("0.5"), retryable=False)
        ev(k + "maybe", JobState.FAILED, attempt=1)
        ev(k + "cancelled", JobState.CANCELLED, attempt=1, request_id=f"c-{i}")
        ev(k + "invalid", JobState.INVALID, row_id=f"bad-{i}", retryable=False)
        # A retry: attempt 1's request id and outputs do not carry into attempt 2.
        ev(k + "retry", JobState.QUEUED, attempt=1, request_id=f"old-{i}")
        ev(k + "retry", JobState.SUBMITTING, attempt=2)
        ev(k + "reroll", JobState.COMPLETED, outputs=(image(i, True),), reroll_usd=Decimal("0.3"))
        # Two versions of one row: the old one stays in the ledger, superseded.
        ev(
            k + "v1",
            JobState.COMPLETED,
            row_id=f"edited-{i}",
            variant=0,
            outputs=(image(i, False),),
        )
        ev(k + "v2", JobState.SUBMITTING, row_id=f"edited-{i}", variant=0, attempt=1)
    return out


def assert_same_plan(
    run_dir: Path, *, downloads: bool, absent: tuple[str, ...] = (), **load: int
) -> None:
    full = LedgerState.load(run_dir)
    new = load_resume_state(run_dir, downloads=downloads, **load)
    keys = list(full.keys())
    assert len(new) == len(full) and set(keys) == {
        full.jobs["job_key"][i].as_py() for i in range(len(full))
    }
    for key in [*keys, "never-seen", *absent]:
        old_brief, new_brief = full.brief(key), new.brief(key)
        assert (old_brief is None) == (new_brief is None), key
        if old_brief is not None and new_brief is not None:
            assert new_brief.state is old_brief.state and new_brief.attempt == old_brief.attempt
            assert new_brief.cost_nothing == old_brief.cost_nothing
            assert new_brief.retryable == old_brief.retryable
        for policy in POLICIES:
            assert decide(new_brief, policy) == decide(old_brief, policy), (key, policy)
    assert prior_spend(new) == prior_spend(full)
    in_flight = sorted(full.keys_in(IN_FLIGHT_STATES))
    assert sorted(new.keys_in(IN_FLIGHT_STATES)) == in_flight
    assert new.records == read_records(run_dir, in_flight)
    old_pending = pending_downloads(full) if downloads else {}
    chunked = ChunkedPending(new)
    assert len(chunked) == len(old_pending)
    # In manifest order and then shuffled: the same items, each handed out once.
    order = keys[::-1] if len(keys) % 2 else keys
    for key in order:
        want = old_pending.get(key) if downloads else None
        assert chunked.pop(key) == want, key
        assert chunked.pop(key) is None
    assert len(chunked) == 0


@pytest.mark.parametrize("downloads", [True, False])
@pytest.mark.parametrize("pass_bytes", [None, 2_000], ids=["one-range", "many-ranges"])
def test_every_kind_of_state_plans_the_same(
    tmp_path: Path, downloads: bool, pass_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resumestate_module, "PENDING_CHUNK", 3)
    write(tmp_path, every_kind(12), checkpoint_events=41)
    assert_same_plan(tmp_path, downloads=downloads, pass_bytes=pass_bytes)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(4))
def test_random_ledgers_plan_the_same(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resumestate_module, "PENDING_CHUNK", 1 + seed * 3)
    write(tmp_path, random_events(random.Random(seed), jobs=60, events=700))
    for downloads in (True, False):
        assert_same_plan(tmp_path, downloads=downloads, pass_bytes=1_000 * (seed + 1))


def test_the_spill_files_are_gone_and_the_ledger_is_untouched(tmp_path: Path) -> None:
    write(tmp_path, every_kind(5), checkpoint_events=30)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    state = load_resume_state(tmp_path, pass_bytes=500)
    assert len(state) == 5 * 16
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_an_empty_ledger(tmp_path: Path) -> None:
    with Ledger.open(tmp_path):
        pass
    state = load_resume_state(tmp_path)
    assert len(state) == 0 and state.brief("a") is None and state.spent == 0
    assert state.keys_in(IN_FLIGHT_STATES) == [] and len(ChunkedPending(state)) == 0


HI = "0123456789abcdef"  # keys sharing their first 16 digits: one packed half alike
ODD = (
    HI.upper() * 2, HI * 2 + "0", HI[:15] * 2, HI[:15] + "g" + HI, HI[:15] + "-" + HI,
    "0x" + HI[:14] + HI, " " + HI[:15] + HI, HI[:15] + "_" + HI,
)  # fmt: skip


def hex_keys(events: list[LedgerEvent]) -> list[LedgerEvent]:
    """``events`` with their job keys as a manifest spells them (32 hex digits), some
    sharing the first half, and a few keys that only look like it (kept as text)."""
    names = sorted({e.job_key for e in events})
    spelled = {}
    for i, name in enumerate(names):
        digest = hashlib.sha256(name.encode()).hexdigest()[:32]
        spelled[name] = HI + digest[16:] if i % 5 == 0 else digest
    for name, odd in zip(names[1::7], ODD, strict=False):
        spelled[name] = odd
    spelled[names[2]] = spelled[names[3]].upper()  # a packed key's value, spelled otherwise
    return [dataclasses.replace(e, job_key=spelled[e.job_key]) for e in events]


@pytest.mark.parametrize("downloads", [True, False])
@pytest.mark.parametrize("pass_bytes", [None, 2_000], ids=["one-range", "many-ranges"])
def test_hex_job_keys_packed_plan_the_same(
    tmp_path: Path, downloads: bool, pass_bytes: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resumestate_module, "PENDING_CHUNK", 4)
    write(tmp_path, hex_keys(every_kind(12)), checkpoint_events=41)
    absent = (HI * 2, HI + "f" * 16, "f" * 32, "0" * 32, HI.upper() + HI)
    state = load_resume_state(tmp_path, downloads=downloads, pass_bytes=pass_bytes)
    assert state.nbytes < 40 * len(state)  # the keys packed, not held as text
    assert_same_plan(tmp_path, downloads=downloads, absent=absent, pass_bytes=pass_bytes)  # type: ignore[arg-type]


def test_ranges_folded_out_of_key_order_still_plan_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = resumescan._spill
    monkeypatch.setattr(
        resumescan,
        "_spill",
        lambda tables, bounds, files, schema: real(tables, bounds, files[::-1], schema),
    )
    monkeypatch.setattr(resumestate_module, "PENDING_CHUNK", 5)
    write(tmp_path, hex_keys(random_events(random.Random(7), jobs=80, events=600)))
    assert_same_plan(tmp_path, downloads=True, pass_bytes=1_500)


def test_each_key_goes_to_the_range_of_the_bounds_below_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = random.Random(3)
    alphabet = ["a", "b", "z", "é", "€", "𝔸", "0", "A"]  # 1- to 4-byte UTF-8
    words = ["".join(rng.choices(alphabet, k=rng.randrange(4))) for _ in range(400)]
    bounds = sorted(set(rng.sample(words, 12)))
    keys = pa.chunked_array([words[:150], [*words[150:], None]], pa.string())
    expected = [0 if w is None else sum(b <= w for b in bounds) for w in keys.to_pylist()]
    for compared in (0, 100):  # sorted and bisected, or compared bound by bound
        monkeypatch.setattr(resumescan, "_COMPARED_BOUNDS", compared)
        assert resumescan._ranges_of(keys, bounds).tolist() == expected
        assert resumescan._ranges_of(keys, []).tolist() == [0] * len(keys)


@pytest.mark.parametrize("bitmap", [True, False])
def test_pending_chunks_by_last_seq_as_a_sort_in_a_few_bytes_a_job(
    monkeypatch: pytest.MonkeyPatch, bitmap: bool
) -> None:
    """Pending jobs of both kinds of key, their last seqs distinct and out of order, are
    ranked (by a bitmap of the seqs, or a sort when the seqs are far apart) as a stable
    argsort orders them, each chunk's span the min first / max last seq of its jobs; and the
    chunking by bitmap holds at most ~5 bytes a job more than it was given (a sort's
    permutation beside a copy of each array held 20)."""
    import tracemalloc

    import numpy as np

    from runner.ledger import resumebuild

    monkeypatch.setattr(resumebuild, "_BLOCK", 4_096)
    monkeypatch.setattr(resumestate_module, "PENDING_CHUNK", 1_000)
    rng = np.random.default_rng(7)
    n, m = 300_000, 20_000  # pending of packed keys, of others
    spread = 1 if bitmap else 2**40  # seqs far apart: past 2**31, and a bitmap too large
    last = (rng.permutation(4 * (n + m))[: n + m].astype(np.int64) + 1) * spread
    gap = rng.integers(0, 50, n + m).astype(np.int32)
    gap[::97] = resumebuild._GAP_MAX  # a span too long to note: read from the start
    other = rng.permutation(n + m) < m  # the kinds of key interleaved
    coded = np.empty(n + m, dtype=np.int32)
    coded[~other] = np.arange(n) * 3  # rows grow from slice to slice, as the builder codes them
    coded[other] = -1 - np.arange(m) * 2
    tracemalloc.start()  # numpy's arrays are traced
    builder = resumebuild.Builder(True, pa.schema([]))
    for part in np.array_split(np.arange(n + m), 40):
        part = rng.permutation(part)  # a slice's jobs in any order
        for group, index in zip(builder.pending, (coded[part], -1 - coded[part]), strict=True):
            mine = index >= 0
            group.add(index[mine], gap[part][mine], last[part][mine].astype(last.dtype))
    rows_of = {c: i for i, c in enumerate(coded.tolist())}
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    pending = builder._chunked(lambda c: np.array([rows_of[x] for x in c.tolist()], np.int32))
    peak = tracemalloc.get_traced_memory()[1] - before
    tracemalloc.stop()
    order = np.argsort(last, kind="stable")
    assert np.array_equal(pending.rows, order)
    first = np.where(gap == resumebuild._GAP_MAX, 0, last - gap)[order]
    starts = np.arange(0, n + m, 1_000)
    assert np.array_equal(pending.high, np.maximum.reduceat(last[order], starts))
    assert np.array_equal(pending.low, np.minimum.reduceat(first, starts))
    if bitmap:  # the rows (4 bytes a job), the bitmap and a block's temporaries
        assert peak < 5 * (n + m) + 2**20, peak
