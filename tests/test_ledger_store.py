"""The ledger store: events round-trip, folding, parts, lock, compaction, views."""

from __future__ import annotations

import csv
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from runner.errors import LedgerCorruptError, LedgerError, LedgerLockedError
from runner.ledger import (
    LEDGER_SCHEMA,
    JobState,
    Ledger,
    LedgerEvent,
    LedgerState,
    OutputImage,
    compact,
    export,
    fold_tables,
    read_events,
    read_run_meta,
    status_summary,
    write_run_meta,
)
from runner.ledger.folding import fold
from runner.ledger.schema import SCHEMA_VERSION, encode_event, rows_to_table

REPO = Path(__file__).parent.parent
# The package exports a fold() function that hides the submodule's attribute name.
fold_module = importlib.import_module("runner.ledger.folding")
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
IMAGE = OutputImage("https://cdn/x.png", 1024, 768, "image/png", "out/x.png", "ab" * 32)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def job_events(key: str, endpoint: str = "fal-ai/flux/dev") -> list[LedgerEvent]:
    return [
        LedgerEvent(
            key, JobState.SUBMITTING, at(0), row_id=f"row-{key}", line=2, source="m.csv", variant=0,
            endpoint=endpoint, request='{"prompt":"cat"}', metadata={"shot": "1"},
            estimated_usd=Decimal("0.025"), attempt=1,
        ),
        LedgerEvent(key, JobState.QUEUED, at(1), request_id=f"req-{key}", submitted_at=at(1)),
        LedgerEvent(key, JobState.IN_PROGRESS, at(2), started_at=at(2), queue_s=1.0),
        LedgerEvent(
            key, JobState.COMPLETED, at(5), completed_at=at(5), inference_s=3.0, outputs=(IMAGE,),
            seed=42, nsfw=(False,), megapixels=1, billed_usd=Decimal("0.025"),
        ),
    ]  # fmt: skip


def write(run_dir: Path, events: list[LedgerEvent], *, checkpoint_events: int = 1000) -> None:
    with Ledger.open(run_dir, checkpoint_events=checkpoint_events) as ledger:
        for event in events:
            ledger.append(event)
            ledger.commit_sync()


def test_folded_record_carries_every_field_forward(tmp_path: Path) -> None:
    write(tmp_path, job_events("a"))
    record = LedgerState.load(tmp_path).get("a")
    assert record is not None
    assert (record.state, record.seq, record.at) == (JobState.COMPLETED, 4, at(5))
    assert (record.row_id, record.line, record.source, record.variant) == ("row-a", 2, "m.csv", 0)
    assert (record.request, record.metadata) == ('{"prompt":"cat"}', {"shot": "1"})
    assert record.request_id == "req-a"  # survives into completed
    assert (record.submitted_at, record.started_at, record.completed_at) == (at(1), at(2), at(5))
    assert (record.queue_s, record.inference_s, record.seed) == (1.0, 3.0, 42)
    assert (record.outputs, record.nsfw, record.megapixels) == ((IMAGE,), (False,), 1)
    assert (record.estimated_usd, record.billed_usd) == (Decimal("0.025"), Decimal("0.025"))


def test_new_attempt_clears_the_previous_attempts_fields(tmp_path: Path) -> None:
    key = "b"
    events = [
        *job_events(key)[:2],
        LedgerEvent(key, JobState.FAILED, at(3), error_type="HTTPStatusError", error_message="500",
                    retryable=True, billed_usd=Decimal(0)),
        LedgerEvent(key, JobState.SUBMITTING, at(4), attempt=2),
    ]  # fmt: skip
    write(tmp_path, events)
    record = LedgerState.load(tmp_path).get(key)
    assert record is not None
    assert (record.state, record.attempt) == (JobState.SUBMITTING, 2)
    assert (record.request_id, record.error_type, record.retryable, record.billed_usd) == (
        None, None, None, None,
    )  # fmt: skip
    assert (record.row_id, record.request, record.estimated_usd) == (
        "row-b", '{"prompt":"cat"}', Decimal("0.025"),
    )  # fmt: skip


def test_fold_is_the_same_across_parts_and_journal(tmp_path: Path) -> None:
    events = [e for key in ("a", "b", "c") for e in job_events(key)]
    write(tmp_path / "one", events)
    write(tmp_path / "many", events, checkpoint_events=3)
    assert len(list((tmp_path / "many" / "ledger").glob("part-*.parquet"))) >= 3
    one = LedgerState.load(tmp_path / "one").jobs
    many = LedgerState.load(tmp_path / "many").jobs
    assert one.equals(many)


def test_unknown_key_is_none_and_keys_are_listed(tmp_path: Path) -> None:
    write(tmp_path, job_events("a") + job_events("b"))
    state = LedgerState.load(tmp_path)
    assert state.get("zz") is None and state.brief("zz") is None
    assert sorted(state.keys()) == ["a", "b"] and "a" in state and len(state) == 2


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("estimated_usd", Decimal("0.1234567890123456789"), "decimal places"),
        ("billed_usd", Decimal("NaN"), "finite"),
        ("submitted_at", datetime(2026, 1, 1), "timezone-aware"),
    ],
)
def test_event_refuses_values_the_schema_cannot_hold(
    field: str, value: object, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        LedgerEvent("k", JobState.QUEUED, T0, **{field: value})  # type: ignore[arg-type]


def test_money_round_trips_exactly(tmp_path: Path) -> None:
    amount = Decimal("0.000123456789012345")
    write(tmp_path, [LedgerEvent("m", JobState.COMPLETED, T0, billed_usd=amount)])
    record = LedgerState.load(tmp_path).get("m")
    assert record is not None and record.billed_usd == amount


def test_parts_are_readable_by_pyarrow_dataset(tmp_path: Path) -> None:
    write(tmp_path, [e for k in ("a", "b") for e in job_events(k)], checkpoint_events=2)
    table = ds.dataset(str(tmp_path / "ledger"), format="parquet").to_table()
    assert table.num_rows == 8
    assert table.schema.remove_metadata().equals(LEDGER_SCHEMA.remove_metadata())
    glob = ds.dataset(sorted((tmp_path / "ledger").glob("*.parquet")), format="parquet")
    assert sorted(glob.to_table()["seq"].to_pylist()) == list(range(1, 9))
    meta = pq.read_schema(next((tmp_path / "ledger").glob("*.parquet"))).metadata
    assert meta[b"runner.ledger.schema_version"] == str(SCHEMA_VERSION).encode()


def test_corrupt_part_raises_naming_the_file(tmp_path: Path) -> None:
    write(tmp_path, job_events("a"))
    part = next((tmp_path / "ledger").glob("part-*.parquet"))
    data = bytearray(part.read_bytes())
    part.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(LedgerCorruptError, match=re.escape(part.name)):
        read_events(tmp_path)
    with pytest.raises(LedgerCorruptError, match=re.escape(part.name)):
        status_summary(tmp_path)


def test_part_with_a_newer_schema_version_is_refused(tmp_path: Path) -> None:
    (tmp_path / "ledger").mkdir()
    table = LEDGER_SCHEMA.empty_table().replace_schema_metadata(
        {b"runner.ledger.schema_version": b"99"}
    )
    pq.write_table(table, tmp_path / "ledger" / "part-000000000001-000000000001.parquet")
    with pytest.raises(LedgerCorruptError, match="schema version"):
        read_events(tmp_path)


V1_COLUMNS = 28  # version 1 ended at "retryable"; version 2 appended five columns


def write_v1_part(run_dir: Path, events: list[LedgerEvent]) -> Path:
    """A part as a version-1 runner wrote it: the first 28 columns, version 1 metadata."""
    table = rows_to_table([encode_event(e, i + 1) for i, e in enumerate(events)])
    v1 = table.select(LEDGER_SCHEMA.names[:V1_COLUMNS]).replace_schema_metadata(
        {b"runner.ledger.schema_version": b"1"}
    )
    (run_dir / "ledger").mkdir(parents=True, exist_ok=True)
    path = run_dir / "ledger" / f"part-000000000001-{len(events):012d}.parquet"
    pq.write_table(v1, path)
    return path


def test_a_version_1_ledger_is_read_and_resumed_as_version_2(tmp_path: Path) -> None:
    assert LEDGER_SCHEMA.names[V1_COLUMNS - 1] == "retryable"
    write_v1_part(tmp_path, job_events("a") + job_events("b"))
    events = read_events(tmp_path).table
    assert events.schema.names == LEDGER_SCHEMA.names
    assert events["possible_duplicate"].null_count == events.num_rows
    state = LedgerState.load(tmp_path)
    record = state.get("a")
    assert record is not None and record.state is JobState.COMPLETED
    assert record.status_url is None and record.possible_duplicate is None
    # A v2 writer appends to it, and compaction rewrites it whole in version 2.
    with Ledger.open(tmp_path) as ledger:
        ledger.append(
            LedgerEvent(
                "c",
                JobState.QUEUED,
                T0,
                request_id="r-c",
                status_url="http://q/s",
                possible_duplicate=True,
            )
        )
        ledger.commit_sync()
    again = LedgerState.load(tmp_path)
    c = again.get("c")
    assert c is not None and c.status_url == "http://q/s" and c.possible_duplicate is True
    assert status_summary(tmp_path).jobs == 3


V3_COLUMNS = 40  # version 3 ended at "cached_from"; version 4 appended run_id


def test_a_version_3_ledger_is_read_with_null_run_ids_and_compacts_to_version_4(
    tmp_path: Path,
) -> None:
    assert LEDGER_SCHEMA.names[V3_COLUMNS - 1] == "cached_from"
    assert LEDGER_SCHEMA.names[V3_COLUMNS:] == ["run_id"]
    table = rows_to_table([encode_event(e, i + 1) for i, e in enumerate(job_events("a"))])
    v3 = table.select(LEDGER_SCHEMA.names[:V3_COLUMNS]).replace_schema_metadata(
        {b"runner.ledger.schema_version": b"3"}
    )
    (tmp_path / "ledger").mkdir()
    pq.write_table(v3, tmp_path / "ledger" / f"part-000000000001-{v3.num_rows:012d}.parquet")
    events = read_events(tmp_path).table
    assert events.schema.names == LEDGER_SCHEMA.names
    assert events["run_id"].null_count == events.num_rows
    with Ledger.open(tmp_path, run_id="20261202T051500Z-abcd") as ledger:
        ledger.append(LedgerEvent("b", JobState.QUEUED, T0, request_id="r-b"))
        ledger.commit_sync()
        ledger.compact()
    (part,) = (tmp_path / "ledger").glob("part-*.parquet")
    assert pq.read_schema(part).metadata[b"runner.ledger.schema_version"] == b"4"
    folded = {r["job_key"]: r["run_id"] for r in LedgerState.load(tmp_path).jobs.to_pylist()}
    assert folded == {"a": None, "b": "20261202T051500Z-abcd"}


def test_second_writer_is_refused_naming_dir_and_pid(tmp_path: Path) -> None:
    with Ledger.open(tmp_path), pytest.raises(LedgerLockedError) as info:
        Ledger.open(tmp_path)
    assert str(tmp_path) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
    Ledger.open(tmp_path).close()  # released on close


def test_lock_is_free_once_the_holding_process_dies(tmp_path: Path) -> None:
    code = (
        "import sys, time; from runner.ledger import Ledger; "
        "l = Ledger.open(sys.argv[1]); print('locked', flush=True); time.sleep(60)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
        with pytest.raises(LedgerLockedError, match=f"pid {proc.pid}"):
            Ledger.open(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    Ledger.open(tmp_path).close()


def test_readers_work_while_a_writer_holds_the_lock(tmp_path: Path) -> None:
    with Ledger.open(tmp_path) as ledger:
        for event in job_events("a")[:2]:
            ledger.append(event)
        ledger.commit_sync()
        summary = status_summary(tmp_path)
        assert summary.by_state == {JobState.QUEUED: 1}
        assert export(tmp_path, tmp_path / "out.jsonl", "jsonl") == 1


def test_recovery_after_crash_between_part_rename_and_journal_delete(tmp_path: Path) -> None:
    write(tmp_path / "src", job_events("a"))
    part = next((tmp_path / "src" / "ledger").glob("part-*.parquet"))
    run = tmp_path / "run"
    (run / "ledger").mkdir(parents=True)
    (run / "journal").mkdir()
    part.rename(run / "ledger" / part.name)
    # The same four events still in a journal segment: the crash left both.
    from runner.ledger.journal import encode_line
    from runner.ledger.schema import encode_event

    lines = b"".join(encode_line(encode_event(e, i)) for i, e in enumerate(job_events("a"), 1))
    (run / "journal" / "segment-000000000001.jsonl").write_bytes(lines)
    assert read_events(run).table.num_rows == 4  # the reader counts each event once
    with Ledger.open(run) as ledger:
        assert ledger.last_seq == 4
        ledger.append(LedgerEvent("b", JobState.SUBMITTING, T0))
    assert read_events(run).table["seq"].to_pylist() == [1, 2, 3, 4, 5]


def test_recovery_removes_temp_files_and_covered_parts(tmp_path: Path) -> None:
    write(tmp_path, [e for k in ("a", "b") for e in job_events(k)], checkpoint_events=4)
    ledger_dir = tmp_path / "ledger"
    inputs = {p: p.read_bytes() for p in ledger_dir.glob("part-*.parquet")}
    assert len(inputs) == 2
    compact(tmp_path)
    # A compaction that died after its rename, before deleting its inputs, and a torn temp part.
    for path, data in inputs.items():
        path.write_bytes(data)
    (ledger_dir / ".part-000000000009-000000000010.parquet.tmp").write_bytes(b"half")
    read = read_events(tmp_path)
    assert (read.parts, read.table.num_rows) == (1, 2)  # the wide part only; folded rows
    Ledger.open(tmp_path).close()
    assert [p.name for p in ledger_dir.iterdir()] == ["part-000000000001-000000000008.parquet"]


def test_compaction_keeps_the_folded_state(tmp_path: Path) -> None:
    events = [e for k in "abcdef" for e in job_events(k)]
    write(tmp_path, events, checkpoint_events=5)
    before = LedgerState.load(tmp_path).jobs
    assert compact(tmp_path) >= 4
    assert len(list((tmp_path / "ledger").glob("*.parquet"))) == 1
    assert LedgerState.load(tmp_path).jobs.equals(before)
    write(
        tmp_path, [LedgerEvent("a", JobState.SUBMITTING, T0, attempt=2)]
    )  # a new attempt after it
    record = LedgerState.load(tmp_path).get("a")
    assert record is not None and record.request_id is None and record.row_id == "row-a"


def test_status_counts_by_state_and_endpoint_with_exact_spend(tmp_path: Path) -> None:
    events = job_events("a") + job_events("b") + job_events("c", "fal-ai/flux/schnell")[:1]
    events.append(LedgerEvent("d", JobState.INVALID, T0, error_message="bad row"))
    write(tmp_path, events)
    write_run_meta(tmp_path, {"runner_version": "0.1.0", "manifest_sha256": "00"})
    summary = status_summary(tmp_path)
    assert summary.jobs == 4 and summary.events == 10
    assert summary.by_state == {
        JobState.COMPLETED: 2, JobState.SUBMITTING: 1, JobState.INVALID: 1,
    }  # fmt: skip
    assert summary.billed_usd == Decimal("0.05") and summary.estimated_usd == Decimal("0.075")
    assert (summary.unknown_outcomes, summary.possible_duplicates) == (1, 0)
    dev = {e.endpoint: e for e in summary.by_endpoint}["fal-ai/flux/dev"]
    assert (dev.jobs, dev.billed_usd) == (2, Decimal("0.05"))
    assert summary.run_meta is not None and summary.run_meta["runner_version"] == "0.1.0"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_writes_one_row_per_job_joinable_by_row_id(tmp_path: Path, fmt: str) -> None:
    write(tmp_path, job_events("a") + job_events("b")[:2])
    out = tmp_path / f"jobs.{fmt}"
    assert export(tmp_path, out, fmt) == 2  # type: ignore[arg-type]
    if fmt == "parquet":
        rows = pq.read_table(out).to_pylist()
    elif fmt == "csv":
        with open(out, newline="") as handle:
            rows = list(csv.DictReader(handle))
    else:
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_row = {r["row_id"]: r for r in rows}
    assert set(by_row) == {"row-a", "row-b"}
    assert by_row["row-a"]["state"] == "completed" and by_row["row-b"]["state"] == "queued"
    if fmt != "parquet":
        assert str(by_row["row-a"]["billed_usd"]) == "0.025"
        outputs = by_row["row-a"]["outputs"]
        urls = json.loads(outputs) if fmt == "csv" else outputs
        assert urls[0]["url"] == IMAGE.url
    assert not list(tmp_path.glob(".*.tmp"))


def test_run_meta_round_trips_and_refuses_secrets(tmp_path: Path) -> None:
    assert read_run_meta(tmp_path) is None
    write_run_meta(tmp_path, {"config": {"concurrency": 8}, "version": "0.1.0"})
    assert read_run_meta(tmp_path) == {"config": {"concurrency": 8}, "version": "0.1.0"}
    with pytest.raises(ValueError, match="secret") as info:
        write_run_meta(tmp_path, {"config": {"key": SecretStr("fal-secret-value")}})
    assert "fal-secret-value" not in str(info.value)
    assert read_run_meta(tmp_path) == {"config": {"concurrency": 8}, "version": "0.1.0"}
    (tmp_path / "run.json").write_text("[1, 2")
    with pytest.raises(LedgerError, match=r"run\.json"):
        read_run_meta(tmp_path)


def test_empty_run_dir_reads_as_empty(tmp_path: Path) -> None:
    Ledger.open(tmp_path).close()
    assert read_events(tmp_path).table.num_rows == 0
    assert len(LedgerState.load(tmp_path)) == 0
    assert status_summary(tmp_path).jobs == 0
    assert export(tmp_path, tmp_path / "empty.parquet", "parquet") == 0
    schema = pq.read_table(tmp_path / "empty.parquet").schema
    # The ledger's columns, money at the micro-dollar, and whether a job is superseded.
    assert schema.names == [*LEDGER_SCHEMA.names, "superseded"]
    assert schema.field("billed_usd").type == pa.decimal128(18, 6)
    for name in ("csv", "jsonl"):
        assert export(tmp_path, tmp_path / f"empty.{name}", name) == 0


def test_status_of_a_directory_that_is_no_run_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="not a run directory"):
        status_summary(tmp_path / "typo")
    with pytest.raises(LedgerError, match="not a run directory"):
        export(tmp_path, tmp_path / "x.csv", "csv")


def test_run_dir_that_is_a_file_is_a_ledger_error(tmp_path: Path) -> None:
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(LedgerError, match="not-a-dir"):
        Ledger.open(path)


@pytest.mark.parametrize("seed", range(5))
def test_folding_in_groups_equals_folding_at_once(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    states = ["submitting", "unknown", "queued", "in_progress", "completed", "failed"]
    rows = []
    for seq in range(1, 400):
        extra = {
            name: f"{name}{seq}"
            for name in ("request_id", "row_id", "error_type")
            if rng.random() < 0.4
        }
        event = LedgerEvent(f"k{rng.randrange(12)}", rng.choice(states), at(seq), **extra)  # type: ignore[arg-type]
        rows.append(encode_event(event, seq))
    events = rows_to_table(rows)
    cuts = sorted(rng.sample(range(1, len(rows)), 6))
    tables = [events.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True)]
    monkeypatch.setattr(fold_module, "FOLD_GROUP_EVENTS", 40)
    grouped, count = fold_tables(tables)
    assert count == len(rows)
    assert grouped.equals(fold(events))


def reference_fold(rows: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """The folding rule written the slow, obvious way: one dict per job."""
    from runner.ledger.schema import ATTEMPT_FIELDS, OUTCOME_FIELDS

    jobs: dict[str, dict[str, object]] = {}
    for row in sorted(rows, key=lambda r: r["seq"]):  # type: ignore[arg-type, return-value]
        job = jobs.setdefault(str(row["job_key"]), {})
        if row["state"] == "submitting":
            for name in ATTEMPT_FIELDS:
                job.pop(name, None)
        for name in OUTCOME_FIELDS:
            job.pop(name, None)
        job.update({k: v for k, v in row.items() if v is not None})
    return jobs


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_fold_matches_the_obvious_fold(seed: int) -> None:
    rng = random.Random(seed)
    states = ["submitting", "unknown", "queued", "in_progress", "completed", "failed"]
    rows = []
    for seq in rng.sample(range(1, 5000), 600):  # out of seq order on purpose
        fields = {
            name: f"{name}{seq}"
            for name in ("request_id", "row_id", "error_type", "endpoint", "error_message")
            if rng.random() < 0.3
        }
        if rng.random() < 0.3:
            fields["attempt"] = rng.randrange(1, 4)  # type: ignore[assignment]
        event = LedgerEvent(f"k{rng.randrange(40)}", rng.choice(states), at(seq), **fields)  # type: ignore[arg-type]
        rows.append(encode_event(event, seq))
    folded = {r["job_key"]: r for r in fold(rows_to_table(rows)).to_pylist()}
    expected = reference_fold(rows)
    assert folded.keys() == expected.keys()
    for key, want in expected.items():
        got = {k: v for k, v in folded[key].items() if v is not None and k != "at"}
        assert got == {k: v for k, v in want.items() if k != "at"}, key
