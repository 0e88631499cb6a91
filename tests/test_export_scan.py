"""``runner export`` folds the ledger as it reads it, or a bucket of jobs at a time
(runner.ledger.ordered), and writes the bytes one fold of the whole ledger wrote: same rows,
order, columns, types and row groups, with superseded versions left out (or marked, with
--all-versions), re-rolls, flagged outputs, unknown outcomes, failures and retries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.endpoints.money import trim_usd
from runner.ledger import (
    JobState,
    Ledger,
    LedgerEvent,
    exportfile,
    exports,
    jsonl,
    ordered,
    read_folded,
    texts,
    views,
)
from runner.ledger import scan as scan_module
from runner.ledger.exports import export_batches, export_schema
from runner.ledger.identity import superseded_and_last_seqs
from runner.ledger.lastseqs import last_event_seqs
from runner.ledger.ordered import OrderedJobs, StreamedJobs, ordered_jobs
from runner.ledger.schema import encode_request
from runner.ledger.versions import split_versions
from runner.ledger.views import export
from tests import versioned_support
from tests.report_support import T0, sample_run

# The shared fixtures (tests/versioned_support.py).
versioned = versioned_support.versioned


@pytest.fixture(scope="module")
def hexed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The versioned ledger with job keys of 32 hex digits, as runs write them (the export
    folds such a ledger as read, its superseded versions found after)."""

    def event(key: str, *args: object, **kwargs: object) -> LedgerEvent:
        return LedgerEvent(hashlib.md5(key.encode()).hexdigest(), *args, **kwargs)  # type: ignore[arg-type]

    run_dir = tmp_path_factory.mktemp("hexed") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(versioned_support, "LedgerEvent", event)
        ledger = versioned_support.write_versioned(run_dir)
    try:
        yield run_dir
    finally:
        ledger.close()


@pytest.fixture(
    params=["one bucket", "many buckets, small batches", "in buckets, too many jobs in flight"]
)
def buckets(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param != "one bucket":
        monkeypatch.setattr(scan_module, "PASS_BYTES", 2_000)
        monkeypatch.setattr(exports, "BATCH_ROWS", 16)
        monkeypatch.setattr(views, "EXPORT_ROWS", 16)
        monkeypatch.setattr(ordered, "STREAM_EVENTS", 7)  # jobs carried from batch to batch
    if request.param == "in buckets, too many jobs in flight":
        monkeypatch.setattr(ordered, "CARRY_ROWS", 0)  # the buckets and merge, not the stream
    return str(request.param)


def _folded_export(run_dir: Path, out: Path, fmt: str, all_versions: bool) -> bytes:
    """What export wrote when it folded the whole ledger at once."""
    jobs = split_versions(read_folded(run_dir).jobs, all_versions=all_versions).shown
    schema = export_schema(jobs)
    with open(out, "wb") as handle:
        exportfile.write_batches(export_batches(jobs, schema), schema, handle, fmt)
    return out.read_bytes()


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("all_versions", [False, True])
def test_export_writes_the_bytes_of_one_fold(
    versioned: Path, tmp_path: Path, buckets: str, fmt: str, all_versions: bool
) -> None:
    expected = _folded_export(versioned, tmp_path / f"folded.{fmt}", fmt, all_versions)
    rows = export(versioned, tmp_path / f"read.{fmt}", fmt, all_versions=all_versions)  # type: ignore[arg-type]
    assert (tmp_path / f"read.{fmt}").read_bytes() == expected
    every = read_folded(versioned).jobs.num_rows
    assert (rows == every) if all_versions else (0 < rows < every)


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("all_versions", [False, True])
def test_an_export_of_hex_keys_finds_superseded_versions_after_and_writes_the_same_bytes(
    hexed: Path,
    tmp_path: Path,
    buckets: str,
    fmt: str,
    all_versions: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    expected = _folded_export(hexed, tmp_path / f"folded.{fmt}", fmt, all_versions)
    scans: list[Path] = []

    def scan_first(run_dir: Path) -> object:
        scans.append(run_dir)
        return superseded_and_last_seqs(run_dir)

    monkeypatch.setattr(views, "superseded_and_last_seqs", scan_first)
    rows = export(hexed, tmp_path / f"read.{fmt}", fmt, all_versions=all_versions)  # type: ignore[arg-type]
    assert (tmp_path / f"read.{fmt}").read_bytes() == expected
    every = read_folded(hexed).jobs.num_rows
    assert (rows == every) if all_versions else (0 < rows < every)
    # Found first only where the rows cannot be read twice: a bucket merge, versions left out.
    assert len(scans) == (ordered.CARRY_ROWS == 0 and not all_versions)


@pytest.mark.parametrize("all_versions", [False, True])
def test_a_request_field_of_superseded_versions_only_is_no_column_unless_all_versions(
    tmp_path: Path, all_versions: bool
) -> None:
    run_dir = tmp_path / "run"
    with Ledger.open(run_dir) as ledger:
        requests: list[dict[str, object]] = [{"prompt": "a", "old": 1}, {"prompt": "b"}]
        for version, request in enumerate(requests):
            key = hashlib.md5(f"v{version}".encode()).hexdigest()
            ledger.append(LedgerEvent(key, JobState.SUBMITTING, T0, row_id="row-1", variant=0,
                                      request=encode_request(request)))  # fmt: skip
            ledger.append(LedgerEvent(key, JobState.COMPLETED, T0))
            ledger.commit_sync()
    out = tmp_path / "jobs.parquet"
    rows = export(run_dir, out, "parquet", all_versions=all_versions)
    table = pq.read_table(out)
    assert ("req_old" in table.column_names) == all_versions
    assert rows == table.num_rows == 1 + all_versions
    assert table["req_prompt"].to_pylist() == ["a", "b"][1 - all_versions :]


def test_last_event_seqs_are_those_of_one_fold(hexed: Path, versioned: Path) -> None:
    folded = read_folded(hexed).jobs
    seqs = last_event_seqs(hexed)
    assert seqs is not None
    assert seqs.tolist() == sorted(folded["seq"].to_pylist())
    assert last_event_seqs(versioned) is None  # keys that are not 32 hex digits


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_export_of_a_sample_night_writes_the_bytes_of_one_fold(
    tmp_path: Path, buckets: str, fmt: str
) -> None:
    run_dir = sample_run(tmp_path / "run")
    expected = _folded_export(run_dir, tmp_path / f"folded.{fmt}", fmt, False)
    export(run_dir, tmp_path / f"read.{fmt}", fmt)  # type: ignore[arg-type]
    assert (tmp_path / f"read.{fmt}").read_bytes() == expected


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_text_formats_made_a_few_rows_at_a_time_write_the_same_bytes(
    versioned: Path, tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    export(versioned, tmp_path / f"whole.{fmt}", fmt)  # type: ignore[arg-type]
    monkeypatch.setattr(exportfile, "CSV_ROWS", 3)
    monkeypatch.setattr(jsonl, "PIECE_BYTES", 2_000)  # JSONL's pieces: a few rows
    export(versioned, tmp_path / f"pieces.{fmt}", fmt)  # type: ignore[arg-type]
    whole = (tmp_path / f"whole.{fmt}").read_bytes()
    assert (tmp_path / f"pieces.{fmt}").read_bytes() == whole
    assert whole.count(b"\n") > 3 * 10


def _seqs(jobs: OrderedJobs | StreamedJobs) -> list[int]:
    return [s for table in jobs.batches(16) for s in table["seq"].to_pylist()]


def test_a_ledger_is_folded_as_read_in_the_order_of_one_fold(
    versioned: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ordered, "STREAM_EVENTS", 7)
    folded = read_folded(versioned).jobs
    _old, last_seqs = superseded_and_last_seqs(versioned)
    assert last_seqs.tolist() == sorted(folded["seq"].to_pylist())
    with ordered_jobs(versioned, None, lambda t: t, lambda t: None, last_seqs=last_seqs,
                      batch_rows=16) as jobs:  # fmt: skip
        assert isinstance(jobs, StreamedJobs)
        assert jobs.rows == folded.num_rows
        tables = list(jobs.batches(16))
        assert [t.num_rows for t in tables[:-1]] == [16] * (len(tables) - 1)
        assert all(t.column(0).num_chunks == 1 for t in tables)
        assert pa.concat_tables(tables).to_pylist() == folded.to_pylist()
    monkeypatch.setattr(ordered, "CARRY_ROWS", 0)
    with ordered_jobs(versioned, None, lambda t: t, lambda t: None, last_seqs=last_seqs) as jobs:
        assert isinstance(jobs, OrderedJobs)
        assert _seqs(jobs) == folded["seq"].to_pylist()


def test_events_recorded_after_the_scan_of_last_seqs_are_left_out(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with Ledger.open(run_dir, checkpoint_events=3) as ledger:
        for i in range(5):
            ledger.append(LedgerEvent(f"k{i}", JobState.SUBMITTING, T0, row_id=f"row-{i}"))
            ledger.append(LedgerEvent(f"k{i}", JobState.QUEUED, T0, request_id=f"q{i}"))
            ledger.commit_sync()
        before = read_folded(run_dir).jobs
        _old, last_seqs = superseded_and_last_seqs(run_dir)
        ledger.append(LedgerEvent("k1", JobState.FAILED, T0, error_type="timeout"))
        ledger.append(LedgerEvent("k9", JobState.SUBMITTING, T0, row_id="row-9"))
        ledger.commit_sync()
        with ordered_jobs(run_dir, None, lambda t: t, lambda t: None,
                          last_seqs=last_seqs) as jobs:  # fmt: skip
            assert isinstance(jobs, StreamedJobs)
            got = pa.concat_tables(list(jobs.batches(4)))
        assert got.to_pylist() == before.to_pylist()
        assert read_folded(run_dir).jobs.num_rows == before.num_rows + 1


def test_parquet_keeps_no_dictionary_of_a_column_with_a_value_per_job(
    versioned: Path, tmp_path: Path
) -> None:
    export(versioned, tmp_path / "jobs.parquet", "parquet")
    group = pq.ParquetFile(tmp_path / "jobs.parquet").metadata.row_group(0)
    coded = {group.column(i).path_in_schema: group.column(i).has_dictionary_page
             for i in range(group.num_columns)}  # fmt: skip
    assert not coded["job_key"] and not coded["request_id"] and not coded["status_url"]
    assert coded["state"] and coded["endpoint"] and coded["req_prompt"]


def test_money_in_csv_is_the_shortest_text_of_the_decimal() -> None:
    tenths = [Decimal(n).scaleb(-6) for n in range(-3000, 3000, 7)]
    powers = [Decimal(10**k).scaleb(-6) for k in range(18)] + [-Decimal(10**17 - 1).scaleb(-6)]
    values = pa.array([*tenths, *powers, None, Decimal(0)], pa.decimal128(18, 6))
    expected = [None if v is None else str(trim_usd(v)) for v in values.to_pylist()]
    assert texts.usd_texts(values).to_pylist() == expected
    assert "10" in expected and "0.000001" in expected and "0" in expected


def test_nsfw_in_csv_is_the_json_of_its_list() -> None:
    lists = [[True, False], [], None, [None, True], [False], None, [True]]
    values = pa.array(lists, pa.list_(pa.bool_()))
    for sliced in (values, values.slice(2), values.slice(3, 3)):
        expected = [None if v is None else json.dumps(v) for v in sliced.to_pylist()]
        assert texts.json_bools(sliced).to_pylist() == expected


def test_outputs_in_csv_are_the_json_of_their_list() -> None:
    image = pa.struct([("url", pa.string()), ("width", pa.int32()), ("n", pa.int64()),
                       ("local_path", pa.string())])  # fmt: skip
    odd = ['a "quote"', "back\\slash", "tab\there", "caf\u00e9", "del\x7f", "ok ~!#[]"]
    lists = [
        [{"url": "https://cdn.example/a.png", "width": 64, "n": -(2**40), "local_path": None}],
        [],
        None,
        [None, {"url": None, "width": None, "n": 0, "local_path": "out/b.png"}],
        *([{"url": text, "width": 1, "n": 1, "local_path": None}] for text in odd),
        [{"url": "x", "width": 2, "n": 3, "local_path": "y"}] * 3,
    ]
    values = pa.array(lists, pa.list_(image))
    for sliced in (values, values.slice(2), values.slice(3, 4)):
        expected = [None if v is None else json.dumps(v) for v in sliced.to_pylist()]
        assert texts.json_structs(sliced).to_pylist() == expected
    scores = pa.array([[{"score": 0.5}]], pa.list_(pa.struct([("score", pa.float64())])))
    assert texts.json_structs(scores).to_pylist() == [json.dumps([{"score": 0.5}])]


def test_money_texts_refuse_a_decimal_without_a_scale() -> None:
    # Trimming zeros is right only after a point: "100" of a decimal(10, 0) would lose them.
    with pytest.raises(ValueError, match="scale"):
        texts.usd_texts(pa.array([Decimal(100)], pa.decimal128(10, 0)))
