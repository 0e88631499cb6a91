"""The journal: checksummed lines, torn tails ignored, group commit."""

from __future__ import annotations

import json
import zlib
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import anyio
import pytest

from runner.ledger import JobState, Ledger, LedgerEvent, read_events
from runner.ledger.journal import (
    SegmentWriter,
    bodies_table,
    decode_segment,
    encode_line,
    list_segments,
)
from runner.ledger.schema import LEDGER_SCHEMA, OutputImage, encode_event, rows_to_table

NOW = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def lines(n: int) -> bytes:
    return b"".join(encode_line({"seq": i, "job_key": f"k{i}"}) for i in range(1, n + 1))


def test_line_is_crc_space_json_newline() -> None:
    line = encode_line({"seq": 7, "job_key": "k"})
    crc, body = line[:8], line[9:-1]
    assert line.endswith(b"\n") and line[8:9] == b" "
    assert int(crc, 16) == zlib.crc32(body)
    assert decode_segment(line).rows == [{"seq": 7, "job_key": "k"}]


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        (b"", 3),
        (b"0000", 3),  # a few bytes of the next line's checksum
        (encode_line({"seq": 4, "job_key": "k4"})[:-1], 3),  # whole line but no newline
        (encode_line({"seq": 4, "job_key": "k4"})[:20], 3),  # cut mid JSON
        (b"\x00" * 64, 3),  # zero-filled block after a power loss
        (b'deadbeef {"seq": 4}\n', 3),  # checksum does not match
        (b'zzzzzzzz {"seq": 4}\n', 3),  # checksum not hex
        (encode_line({"job_key": "no seq"}), 3),  # valid line but no seq: not an event
    ],
)
def test_torn_or_garbage_tail_is_ignored(tail: bytes, kept: int) -> None:
    read = decode_segment(lines(3) + tail)
    assert [r["seq"] for r in read.rows] == list(range(1, kept + 1))
    assert read.torn_bytes == len(tail)


def test_reading_stops_at_the_first_bad_line() -> None:
    data = bytearray(lines(5))
    second = data.index(b"\n") + 1
    data[second + 12] ^= 0x01  # flip one bit in the second line's JSON
    read = decode_segment(bytes(data))
    assert [r["seq"] for r in read.rows] == [1]


def test_segments_list_in_seq_order(tmp_path: Path) -> None:
    for first in (120, 3, 45):
        SegmentWriter(tmp_path / f"segment-{first:012d}.jsonl").close()
    (tmp_path / "notes.txt").write_text("not a segment")
    assert [p.name[8:20] for p in list_segments(tmp_path)] == [
        "000000000003",
        "000000000045",
        "000000000120",
    ]


def test_torn_journal_tail_is_ignored_by_readers_and_recovery(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, checkpoint_events=1000) as ledger:
        for i in range(3):
            ledger.append(LedgerEvent(f"k{i}", JobState.SUBMITTING, NOW))
        ledger.commit_sync()
        segment = list_segments(tmp_path / "journal")[0]
        with open(segment, "ab") as handle:
            handle.write(encode_line({"seq": 4, "job_key": "k3", "state": "queued"})[:25])
        read = read_events(tmp_path)
        assert read.table["seq"].to_pylist() == [1, 2, 3]
        assert read.torn_bytes == 25
    # Reopening folds the good lines into a part; the torn bytes are gone.
    with Ledger.open(tmp_path) as ledger:
        assert ledger.last_seq == 3
        assert len(ledger.state()) == 3


@pytest.mark.anyio
async def test_concurrent_commits_share_fsyncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs = 0
    real_sync = SegmentWriter.sync

    def counting_sync(self: SegmentWriter) -> None:
        nonlocal syncs
        syncs += 1
        real_sync(self)

    monkeypatch.setattr(SegmentWriter, "sync", counting_sync)
    committed: list[int] = []

    async def worker(ledger: Ledger, task: int) -> None:
        for step in range(5):
            seq = ledger.append(LedgerEvent(f"t{task}-{step}", JobState.SUBMITTING, NOW))
            await ledger.commit()
            assert ledger.committed_seq >= seq
            committed.append(seq)

    async with await anyio.to_thread.run_sync(Ledger.open, tmp_path) as ledger:
        async with anyio.create_task_group() as tg:
            for task in range(50):
                tg.start_soon(worker, ledger, task)
        assert sorted(committed) == list(range(1, 251))
        assert syncs < 250 / 2, "commits were not grouped"
    assert sorted(read_events(tmp_path).table["seq"].to_pylist()) == list(range(1, 251))


@pytest.mark.anyio
async def test_commit_with_nothing_pending_does_not_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with Ledger.open(tmp_path) as ledger:
        ledger.append(LedgerEvent("a", JobState.SUBMITTING, NOW))
        await ledger.commit()
        monkeypatch.setattr(SegmentWriter, "sync", lambda self: pytest.fail("synced again"))
        await ledger.commit()
        monkeypatch.undo()


def test_append_after_close_is_refused(tmp_path: Path) -> None:
    from runner.errors import LedgerError

    ledger = Ledger.open(tmp_path)
    ledger.close()
    with pytest.raises(LedgerError, match="closed"):
        ledger.append(LedgerEvent("a", JobState.SUBMITTING, NOW))


def test_one_ledger_serves_successive_event_loops(tmp_path: Path) -> None:
    async def commit_some(ledger: Ledger, tag: str) -> None:
        async with anyio.create_task_group() as tg:
            for i in range(10):
                ledger.append(LedgerEvent(f"{tag}{i}", JobState.SUBMITTING, NOW))
                tg.start_soon(ledger.commit)

    with Ledger.open(tmp_path) as ledger:
        anyio.run(commit_some, ledger, "a", backend="asyncio")
        anyio.run(commit_some, ledger, "b", backend="trio")
        assert ledger.committed_seq == 20


def test_a_failed_fsync_stops_the_ledger_and_keeps_committed_events(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runner.errors import LedgerError

    ledger = Ledger.open(tmp_path)
    ledger.append(LedgerEvent("a", JobState.SUBMITTING, NOW))
    ledger.commit_sync()

    def failing_sync(self: SegmentWriter) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(SegmentWriter, "sync", failing_sync)
    ledger.append(LedgerEvent("b", JobState.SUBMITTING, NOW))
    with pytest.raises(LedgerError, match="Input/output error"):
        ledger.commit_sync()
    monkeypatch.undo()
    with pytest.raises(LedgerError, match="could not be written earlier"):
        ledger.append(LedgerEvent("c", JobState.SUBMITTING, NOW))
    with pytest.raises(LedgerError):
        ledger.close()
    with Ledger.open(tmp_path) as reopened:  # the lock was released; "a" survived
        assert reopened.state().get("a") is not None


def every_shape() -> list[LedgerEvent]:
    """Events that use every column type, unicode, long decimals and odd exponents."""
    image = OutputImage(url="https://cdn/ü.png", width=8, height=8, content_type="image/png",
                        local_path="out/ü.png", sha256="ab" * 32)  # fmt: skip
    # fmt: off
    return [
        LedgerEvent(job_key="k1", state=JobState.SUBMITTING, at=NOW, row_id="r\n1", line=3,
                    source="m.csv", variant=0, endpoint="fal-ai/flux/dev",
                    request='{"prompt":"ünï \\"q\\""}', metadata={"b": "2", "a": "é"},
                    estimated_usd=Decimal("0.000000000000000001"), attempt=1,
                    payload_sha256="cd" * 32, possible_duplicate=True,
                    price_source="table"),
        LedgerEvent(job_key="k1", state=JobState.QUEUED, at=NOW, attempt=1, request_id="q",
                    submitted_at=NOW, status_url="https://q/s"),
        LedgerEvent(job_key="k1", state=JobState.COMPLETED, at=NOW, started_at=NOW,
                    completed_at=NOW, queue_s=0.0, inference_s=1e-300, outputs=(image,),
                    seed=2**63 - 1, nsfw=(False, True), megapixels=2,
                    billed_usd=Decimal("0E-18"), flagged=True, rerolls=2,
                    reroll_usd=Decimal("1E+2"), duplicate_request_ids=("x", "y"),
                    reconciled="adopted", cached_from="../other", run_id="run-1"),
        LedgerEvent(job_key="k2", state=JobState.FAILED, at=NOW, error_type="e",
                    error_message="x" * 3000, retryable=False, billed_usd=Decimal(0)),
    ]
    # fmt: on


@pytest.mark.parametrize("odd", [None, float("nan"), float("inf")])
def test_arrow_reads_journal_lines_as_the_python_path_does(odd: float | None) -> None:
    events = every_shape()
    if odd is not None:  # Arrow refuses NaN and Infinity: the Python path reads them
        events.append(LedgerEvent(job_key="k3", state=JobState.COMPLETED, at=NOW, queue_s=odd))
    rows = [encode_event(event, seq) for seq, event in enumerate(events, start=1)]
    bodies = [encode_line(row)[9:-1] for row in rows]
    table = bodies_table(bodies)
    assert table.schema.equals(LEDGER_SCHEMA, check_metadata=True)
    # repr, not ==: NaN is not equal to itself
    assert repr(table.to_pylist()) == repr(rows_to_table(rows).to_pylist())
    assert odd is not None or table.equals(rows_to_table(rows))


def test_reading_back_stops_at_a_line_that_is_not_an_event() -> None:
    rows = [{"seq": 1, "job_key": "a", "state": "queued", "at": 0}, [2], {"seq": 3}]
    bodies = [json.dumps(row).encode() for row in rows]
    assert bodies_table(bodies).column("seq").to_pylist() == [1]
