"""One line per invocation of ``runner run``: run ids on every event, run.json's invocations
(kept across runs, ended or not) and the report's lines drawn from both."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import SecretStr

from runner.errors import AuthError
from runner.ledger import JobState, Ledger, LedgerEvent, read_events, read_run_meta
from runner.ledger.meta import end_invocation, invocations, new_run_id, start_invocation
from runner.report.data import build_report, load_events, load_jobs
from runner.report.invocations import invocation_lines
from runner.report.text import render_text, report_json
from tests.scenario import emulator, manifest, run, run_config

T0 = datetime(2026, 12, 2, 5, 15, 0, tzinfo=UTC)


def test_run_ids_sort_by_time_and_differ_within_a_second() -> None:
    assert new_run_id(T0, 0xABCD) == "20261202T051500Z-abcd"
    assert new_run_id(T0, 0x1ABCD) == "20261202T051500Z-abcd"  # 16 bits of salt
    later = new_run_id(T0 + timedelta(seconds=1), 0)
    assert sorted([later, new_run_id(T0, 0xFFFF)]) == [new_run_id(T0, 0xFFFF), later]


def test_the_ledger_stamps_its_run_id_on_every_event(tmp_path: Path) -> None:
    copied = LedgerEvent("b", JobState.COMPLETED, T0, run_id="20261201T000000Z-0000")
    with Ledger.open(tmp_path, run_id="20261202T051500Z-abcd") as ledger:
        ledger.append(LedgerEvent("a", JobState.SUBMITTING, T0))
        ledger.append(copied)  # e.g. a download re-recording an earlier run's record
        ledger.commit_sync()
    with Ledger.open(tmp_path) as ledger:  # no run id: events keep none
        ledger.append(LedgerEvent("c", JobState.SUBMITTING, T0))
        ledger.commit_sync()
    events = read_events(tmp_path).table
    assert events["run_id"].to_pylist() == ["20261202T051500Z-abcd"] * 2 + [None]


def test_folded_run_id_is_the_latest_events_even_when_null(tmp_path: Path) -> None:
    with Ledger.open(tmp_path, run_id="r1") as ledger:
        ledger.append(LedgerEvent("a", JobState.SUBMITTING, T0, row_id="row"))
        ledger.commit_sync()
    with Ledger.open(tmp_path) as ledger:
        ledger.append(LedgerEvent("a", JobState.QUEUED, T0))
        ledger.commit_sync()
    (job,) = load_jobs(tmp_path).to_pylist()
    assert job["run_id"] is None and job["row_id"] == "row"


def test_invocations_accumulate_in_run_json(tmp_path: Path) -> None:
    meta = {"runner_version": "0.1.0"}
    start_invocation(tmp_path, meta, run_id="r1", started_at=T0)
    end_invocation(tmp_path, "r1", {"exit_code": 0, "completed": 3}, ended_at=T0)
    start_invocation(tmp_path, {**meta, "runner_version": "0.2.0"}, run_id="r2", started_at=T0)
    doc = read_run_meta(tmp_path)
    assert doc is not None and doc["runner_version"] == "0.2.0"
    entries = invocations(doc)
    assert [e["run_id"] for e in entries] == ["r1", "r2"]
    assert entries[0]["exit_code"] == 0 and entries[0]["ended_at"] == T0.isoformat()
    assert entries[1]["ended_at"] is None  # what a SIGKILL leaves
    end_invocation(tmp_path, "r2", {"exit_code": 130}, ended_at=T0)
    assert [e["exit_code"] for e in invocations(read_run_meta(tmp_path))] == [0, 130]


def test_an_unreadable_run_json_is_replaced_as_before(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{not json")
    start_invocation(tmp_path, {}, run_id="r1", started_at=T0)
    assert [e["run_id"] for e in invocations(read_run_meta(tmp_path))] == ["r1"]
    assert invocations({"invocations": [{"run_id": 3}, "x", {"run_id": "ok"}]}) == [
        {"run_id": "ok"}
    ]


def write_history(run_dir: Path) -> None:
    """Three invocations: one finished, one killed mid-run, and events from before run ids."""
    with Ledger.open(run_dir) as ledger:  # an older runner: no run id
        ledger.append(LedgerEvent("old", JobState.SUBMITTING, T0 - timedelta(days=1)))
        ledger.append(LedgerEvent("old", JobState.COMPLETED, T0 - timedelta(days=1),
                                  billed_usd=Decimal("0.035")))  # fmt: skip
        ledger.commit_sync()
    start_invocation(run_dir, {}, run_id="r1", started_at=T0)
    with Ledger.open(run_dir, run_id="r1") as ledger:
        for key in ("a", "b"):
            ledger.append(LedgerEvent(key, JobState.SUBMITTING, T0))
        ledger.append(LedgerEvent("a", JobState.COMPLETED, T0 + timedelta(seconds=30),
                                  billed_usd=Decimal("0.035")))  # fmt: skip
        ledger.append(LedgerEvent("b", JobState.FAILED, T0 + timedelta(seconds=31),
                                  error_type="timeout", retryable=True))  # fmt: skip
        ledger.commit_sync()
    facts = {"exit_code": 1, "message": "not every job completed: 1 failed", "completed": 1,
             "failed": 1, "skipped": 0, "spent_usd": "0.035"}  # fmt: skip
    end_invocation(run_dir, "r1", facts, ended_at=T0 + timedelta(seconds=32))
    later = T0 + timedelta(hours=1)
    start_invocation(run_dir, {}, run_id="r2", started_at=later)
    with Ledger.open(run_dir, run_id="r2") as ledger:  # killed: run.json never hears its end
        ledger.append(LedgerEvent("b", JobState.SUBMITTING, later))
        ledger.append(LedgerEvent("b", JobState.COMPLETED, later + timedelta(seconds=20),
                                  billed_usd=Decimal("0.07")))  # fmt: skip
        ledger.append(LedgerEvent("b", JobState.COMPLETED, later + timedelta(seconds=21),
                                  billed_usd=Decimal("0.07")))  # downloaded  # fmt: skip
        ledger.append(LedgerEvent("c", JobState.SUBMITTING, later + timedelta(seconds=22)))
        ledger.commit_sync()


def test_lines_tell_each_invocation_apart(tmp_path: Path) -> None:
    write_history(tmp_path)
    old, first, killed = invocation_lines(load_events(tmp_path), read_run_meta(tmp_path))
    assert old.run_id is None and old.status == "unknown (before run ids)"
    assert (old.completed, old.spent_usd, old.counts_from) == (1, Decimal("0.035"), "ledger")
    assert first.run_id == "r1" and first.status == "exit 1" and first.finished
    assert (first.completed, first.failed, first.spent_usd) == (1, 1, Decimal("0.035"))
    assert first.counts_from == "run.json" and first.events == 4
    assert killed.run_id == "r2" and killed.status == "did not finish"
    assert killed.ended_at is None and killed.exit_code is None
    # From its events: b completed (its download is not a second bill), c only submitted.
    assert (killed.completed, killed.failed, killed.spent_usd) == (1, 0, Decimal("0.07"))
    assert killed.last_event_at == T0 + timedelta(hours=1, seconds=22)


def test_report_says_did_not_finish_in_text_json_and_html(tmp_path: Path) -> None:
    from runner.report.gallery import gallery
    from runner.report.html import render_html

    write_history(tmp_path)
    jobs = load_jobs(tmp_path)
    report = build_report(jobs, read_run_meta(tmp_path), events=load_events(tmp_path))
    text = render_text(report)
    assert "invocations (3):" in text
    assert re.search(r"r1  2026-12-02 05:15:00 to 05:15:32 UTC  1 completed, 1 failed, "
                     r"\$0\.035  exit 1", text)  # fmt: skip
    assert re.search(r"r2  2026-12-02 06:15:00 UTC, last event 06:15:22  .*did not finish", text)
    doc = report_json(report)
    assert [i["status"] for i in doc["invocations"]] == [
        "unknown (before run ids)", "exit 1", "did not finish",
    ]  # fmt: skip
    assert doc["invocations"][2]["ended_at"] is None
    json.dumps(doc)
    page, _ = render_html(report, gallery(jobs), thumbs=None, page_dir=tmp_path)
    assert page.count('<tr class="inv') == 3 and "did not finish" in page


def test_without_events_run_json_alone_gives_the_lines(tmp_path: Path) -> None:
    write_history(tmp_path)
    lines = invocation_lines(None, read_run_meta(tmp_path))
    assert [line.run_id for line in lines] == ["r1", "r2"]
    assert lines[1].completed == 0 and lines[1].status == "did not finish"


@pytest.mark.anyio
async def test_each_run_records_its_invocation_and_stamps_its_events(tmp_path: Path) -> None:
    path = manifest(tmp_path, 3)
    run_dir = tmp_path / "run"
    async with emulator() as emu:
        first = await run(emu, run_config(path, run_dir))
        second = await run(emu, run_config(path, run_dir))
        more = manifest(tmp_path, 4, name="more.csv")  # one new row: a submit, refused
        with pytest.raises(AuthError):
            await run(emu, run_config(more, run_dir, key=SecretStr("wrong:key")))
    entries = invocations(read_run_meta(run_dir))
    assert len(entries) == 3 and len({e["run_id"] for e in entries}) == 3
    one, two, refused = entries
    assert (one["exit_code"], one["completed"], one["spent_usd"]) == (0, 3, "0.105")
    assert (two["exit_code"], two["completed"], two["skipped"]) == (0, 0, 3)
    assert one["message"] == first.message and two["message"] == second.message
    assert refused["exit_code"] == 2 and refused["message"].startswith("error: ")
    assert all(re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{4}", e["run_id"]) for e in entries)
    events = read_events(run_dir).table
    assert set(events["run_id"].to_pylist()) <= {one["run_id"], two["run_id"], refused["run_id"]}
    assert events["run_id"].null_count == 0
    lines = build_report(load_jobs(run_dir), read_run_meta(run_dir),
                         events=load_events(run_dir)).invocations  # fmt: skip
    assert [line.status for line in lines] == ["exit 0", "exit 0", "exit 2"]
