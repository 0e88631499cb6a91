"""The run report as data, text and JSON, over ledgers written through the public API."""

from __future__ import annotations

import importlib
import json
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from runner.cli import main
from runner.endpoints.money import format_usd
from runner.ledger import (
    JobState,
    Ledger,
    LedgerEvent,
    ResumePolicy,
    read_events,
    read_run_meta,
    status_summary,
    write_run_meta,
)
from runner.ledger.folding import _fold as real_fold
from runner.report.data import Report, build_report, load_jobs, percentiles
from runner.report.failures import common_message, normalise_message
from runner.report.text import render_text, report_json
from tests.report_support import (
    FLUX2,
    LORA,
    T0,
    completed,
    intent,
    sample_events,
    sample_run,
    write_run,
)

# The module, not the function runner.ledger re-exports under the same name.
fold_module = importlib.import_module("runner.ledger.folding")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return sample_run(tmp_path / "run")


@pytest.fixture
def report(run_dir: Path) -> Report:
    return build_report(load_jobs(run_dir), read_run_meta(run_dir), run_dir=run_dir)


def test_counts_by_state_and_endpoint_agree_with_status(run_dir: Path, report: Report) -> None:
    status = status_summary(run_dir)
    assert report.jobs == status.jobs == 10
    assert dict(report.by_state) == dict(status.by_state)
    assert dict(report.by_state) == {
        JobState.UNKNOWN: 1, JobState.QUEUED: 1, JobState.COMPLETED: 4,
        JobState.FAILED: 3, JobState.INVALID: 1,
    }  # fmt: skip
    assert {e.endpoint: (e.jobs, dict(e.by_state)) for e in report.endpoints} == {
        ep.endpoint: (ep.jobs, dict(ep.by_state)) for ep in status.by_endpoint
    }
    assert [e.endpoint for e in report.endpoints] == [FLUX2, LORA, None]  # no endpoint last
    assert report.unknown_outcomes == status.unknown_outcomes == 1
    assert report.possible_duplicates == status.possible_duplicates == 0


@pytest.mark.parametrize(
    ("endpoint", "jobs", "images", "estimated", "estimated_done", "billed", "billed_jobs"),
    [
        (LORA, 5, 4, "0.21", "0.14", "0.14", 3),
        (FLUX2, 4, 1, "0.048", "0.012", "0.024", 1),
        (None, 1, 0, "0", "0", "0", 0),  # the invalid row has no endpoint
    ],
)
def test_cost_per_endpoint_is_exact_decimal(
    report: Report, endpoint: str | None, jobs: int, images: int, estimated: str,
    estimated_done: str, billed: str, billed_jobs: int,
) -> None:  # fmt: skip
    ep = next(e for e in report.endpoints if e.endpoint == endpoint)
    assert (ep.jobs, ep.images, ep.billed_jobs) == (jobs, images, billed_jobs)
    assert ep.estimated_usd == Decimal(estimated)
    assert ep.estimated_done_usd == Decimal(estimated_done)
    assert ep.billed_usd == Decimal(billed)
    assert isinstance(ep.billed_usd, Decimal)


def test_totals_sum_endpoints(report: Report) -> None:
    assert report.estimated_usd == Decimal("0.258")
    assert report.estimated_done_usd == Decimal("0.152")
    assert report.billed_usd == Decimal("0.164")


@pytest.mark.parametrize(
    ("values", "p50", "p90", "p99", "top"),
    [
        ([5.0], 5.0, 5.0, 5.0, 5.0),
        ([1.0, 2.0], 1.5, 1.9, 1.99, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 2.5, 3.7, 3.97, 4.0),
        ([float(i) for i in range(1, 101)], 50.5, 90.1, 99.01, 100.0),
        ([10.0, 0.0, 5.0], 5.0, 9.0, 9.9, 10.0),  # order does not matter
    ],
)
def test_percentiles_interpolate_linearly(
    values: list[float], p50: float, p90: float, p99: float, top: float
) -> None:
    p = percentiles(np.array(values), of=len(values) + 2)
    assert (p.known, p.of) == (len(values), len(values) + 2)
    assert (p.p50, p.p90, p.p99, p.max) == pytest.approx((p50, p90, p99, top))


def test_percentiles_of_nothing_are_none() -> None:
    p = percentiles(np.array([]), of=3)
    assert (p.known, p.of, p.p50, p.p90, p.p99, p.max) == (0, 3, None, None, None, None)


def test_queue_time_counts_only_jobs_that_know_it(report: Report) -> None:
    queue, inference = report.timing.queue, report.timing.inference
    assert (queue.known, queue.of) == (3, 4)  # job b never learnt its queue time
    assert queue.p50 == pytest.approx(3.0) and queue.max == pytest.approx(5.0)
    assert (inference.known, inference.of) == (4, 4)
    assert inference.p50 == pytest.approx(5.0)
    assert inference.p90 == pytest.approx(7.4)


def test_wall_time_runs_from_first_submit_to_last_completion(report: Report) -> None:
    t = report.timing
    assert t.first_submitted_at == T0
    assert t.last_completed_at == T0 + timedelta(seconds=3605)
    assert t.wall_s == pytest.approx(3605.0)
    assert (t.completed, t.images) == (4, 5)
    assert t.jobs_per_hour == pytest.approx(4 * 3600 / 3605)
    assert t.images_per_hour == pytest.approx(5 * 3600 / 3605)


def test_failures_group_by_type_and_normalised_message(report: Report) -> None:
    assert report.failed_jobs == 4 and report.failure_groups == 3
    top = report.failures[0]
    assert (top.error_type, top.count, top.retryable) == ("file_download_error", 2, 0)
    assert top.message == "Failed to download the file: unsupported image URL <path>"
    assert [(x.row_id, x.line) for x in top.examples] == [("chair-01", 6), ("sofa-01", 7)]
    assert top.examples[0].message == (
        "Failed to download the file: unsupported image URL images/chair.jpg"
    )
    by_type = {g.error_type: g for g in report.failures}
    assert by_type["timeout"].retryable == 1
    assert by_type["invalid_row"].examples[0].state is JobState.INVALID


def test_failure_list_is_capped_but_group_count_is_not(run_dir: Path) -> None:
    capped = build_report(load_jobs(run_dir), None, top_failures=1, examples=1)
    assert len(capped.failures) == 1 and capped.failure_groups == 3
    assert len(capped.failures[0].examples) == 1


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (None, ""),
        ("timed out after 300 s", "timed out after <n> s"),
        ("GET https://v3.fal.media/files/x/abc.png: HTTP 404", "GET <url> HTTP <n>"),
        ("request 3f2b1c9e-1d2a-4b3c-8d4e-5f6a7b8c9d0e failed", "request <id> failed"),
        ("job a8e3673c12092a0efa4c8453d8dc149b lost", "job <id> lost"),
        ("unsupported image URL images/sofa.jpg", "unsupported image URL <path>"),
        (
            "guidance_scale=40 is above the maximum 35",
            "guidance_scale=<n> is above the maximum <n>",
        ),
        ("bad   spacing\n here", "bad spacing here"),
        ("request k10092 failed after 3.5s", "request <id> failed after <n>"),
        ("size 1024x768 for flux2 on gpu0", "size <id> for <id> on <id>"),
        ("HTTP 502 from upstream", "HTTP <n> from upstream"),
        ("x" * 400, "x" * 299 + "…"),
    ],
)
def test_normalise_message_blanks_what_differs_per_row(message: str | None, expected: str) -> None:
    assert normalise_message(message) == expected


def test_failure_groups_show_what_their_messages_share(report: Report) -> None:
    top = report.failures[0]
    # The two rows failed on different files of one folder: the folder and suffix stay.
    assert top.summary == "Failed to download the file: unsupported image URL images/<…>.jpg"
    assert top.endpoints == (("fal-ai/flux-lora", 2),)
    by_type = {g.error_type: g for g in report.failures}
    # A group of one message shows it whole.
    assert by_type["timeout"].summary == "timed out after 300 s"
    text = render_text(report)
    assert "file_download_error: Failed to download the file: unsupported image URL " \
        "images/<…>.jpg" in text  # fmt: skip
    assert "on fal-ai/flux-lora (2)" in text


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], ""),
        (["no such file: images/chair.jpg"] * 3, "no such file: images/chair.jpg"),
        (["timed out after 300 s", "timed out after 20 s"], "timed out after <n> s"),
        (
            [
                f"GET https://queue.fal.run/fal-ai/flux-lora/requests/{rid}/status: HTTP 500"
                for rid in (
                    "3f2b1c9e-1d2a-4b3c-8d4e-5f6a7b8c9d0e",
                    "1f2b1c9e-1d2a-4b3c-8d4e-5f6a7b8c9d0f",
                )
            ],
            "GET https://queue.fal.run/fal-ai/flux-lora/requests/<id>/status: HTTP 500",
        ),
        (
            ["input /data/in/a1.png is not a PNG", "input /data/in/b22.png is not a PNG"],
            "input /data/in/<id>.png is not a PNG",
        ),
        (
            ["model fal-ai/flux-2 refused", "model fal-ai/flux-lora refused"],
            "model fal-ai/flux-<…> refused",
        ),
        # Word counts differ: no word-by-word merge, the normalised message.
        (["bad file a/b.png", "bad file a/c.png now"], "bad file <path>"),
    ],
)
def test_common_message_blanks_only_what_differs(messages: list[str], expected: str) -> None:
    assert common_message(messages) == expected


def test_resume_outlook_counts_what_decide_would_do(report: Report) -> None:
    r = report.resume
    assert r.policy == ResumePolicy()
    assert (r.reattach, r.retry, r.resubmit, r.revalidate, r.fail) == (1, 1, 1, 1, 0)
    assert r.skip == 6  # 4 completed, 2 failed for good
    assert r.new_jobs is None
    assert r.reasons["completed"] == 4
    assert r.reasons["unknown outcome: resubmit"] == 1


@pytest.mark.parametrize(
    ("policy", "resubmit", "fail", "retry", "skip"),
    [
        (ResumePolicy(on_unknown="skip"), 0, 0, 1, 7),
        (ResumePolicy(on_unknown="fail"), 0, 1, 1, 6),
        (ResumePolicy(retry_failed=True), 1, 0, 3, 4),
        # --max-attempts bounds one run; a rerun retries a failure that cost nothing.
        (ResumePolicy(max_attempts=1), 1, 0, 1, 6),
    ],
)
def test_resume_outlook_follows_the_policy(
    run_dir: Path, policy: ResumePolicy, resubmit: int, fail: int, retry: int, skip: int
) -> None:
    r = build_report(load_jobs(run_dir), None, policy=policy).resume
    assert (r.resubmit, r.fail, r.retry, r.skip) == (resubmit, fail, retry, skip)
    assert r.reattach == 1 and r.revalidate == 1


def test_run_meta_names_the_manifest(report: Report) -> None:
    assert report.manifest == "night.csv"
    assert report.manifest_sha256 == "ab" * 32
    assert report.runner_version == "0.1.0"


def test_empty_ledger_gives_an_empty_report(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", [], meta=False)
    report = build_report(load_jobs(run_dir), None)
    assert report.jobs == 0 and report.endpoints == () and report.failures == ()
    assert report.timing.wall_s is None and report.timing.jobs_per_hour is None
    assert report.billed_usd == Decimal(0)
    assert "0 jobs" in render_text(report)


def test_not_yet_completed_run_has_no_wall_time(tmp_path: Path) -> None:
    event = LedgerEvent(job_key="q", state=JobState.QUEUED, at=T0, endpoint=LORA,
                        request_id="r", submitted_at=T0)  # fmt: skip
    report = build_report(load_jobs(write_run(tmp_path / "run", [event])), None)
    assert report.timing.wall_s is None
    assert "wall time: -" in render_text(report)


def test_load_jobs_folds_group_by_group_as_if_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = sample_run(tmp_path / "run")  # one part
    # A run still writing: the timeout retried and completed, a new job; left in the journal.
    retry = [intent("f", "rug-01", 8, FLUX2, at=T0 + timedelta(seconds=20), estimated="0.012",
                    attempt=2)]  # fmt: skip
    retry += completed("f", submitted_s=21, done_s=50, billed="0.012", queue_s=2.0,
                       inference_s=3.0, outputs=(), attempt=2)  # fmt: skip
    retry.append(intent("k", "rug-04", 12, FLUX2, at=T0 + timedelta(seconds=30), estimated="1"))
    sizes: list[int] = []

    def spy(box: list[pa.Table], resets: np.ndarray | None) -> tuple[pa.Table, np.ndarray]:
        sizes.append(box[0].num_rows)
        return real_fold(box, resets)

    with Ledger.open(run_dir) as ledger:
        for event in retry:
            ledger.append(event)
        ledger.commit_sync()
        history = read_events(run_dir)
        assert history.parts == 1 and history.journal_events == len(retry)
        monkeypatch.setattr(fold_module, "FOLD_GROUP_EVENTS", 1)
        monkeypatch.setattr(fold_module, "_fold", spy)
        jobs = load_jobs(run_dir)
    # Each group folded alone, then the folded rows: never every event at once.
    assert len(sizes) == 3 and max(sizes) < history.table.num_rows
    assert jobs.equals(fold_module.fold(history.table))
    record = jobs.filter(pc.equal(jobs["job_key"], "f")).to_pylist()[0]
    assert record["state"] == "completed" and record["error_type"] is None
    assert record["request_id"] == "req-f" and record["attempt"] == 2
    report = build_report(jobs, None)
    assert report.jobs == 11 and report.by_state[JobState.COMPLETED] == 5


def test_load_jobs_refuses_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    from runner.errors import LedgerError

    with pytest.raises(LedgerError, match="not a run directory"):
        load_jobs(tmp_path)


def test_text_tells_the_story(report: Report) -> None:
    text = render_text(report)
    assert "10 jobs from night.csv" in text
    assert "unknown 1, queued 1, completed 4, failed 3, invalid 1" in text
    assert "fal-ai/flux-2/lora     4     1       1     $0.048       $0.012  $0.024" in text
    assert "wall time: 60.1min" in text
    assert "queue time: p50 3.0s" in text and "(known for 3 of 4 completed jobs)" in text
    assert "failures: 4 jobs in 3 groups" in text
    assert "e.g. row chair-01 (night.csv:6, fal-ai/flux-lora)" in text
    assert "resubmit (possible duplicate)  1" in text
    assert "their number is unknown" in text


def test_json_keeps_money_exact_and_names_states(report: Report) -> None:
    doc = json.loads(json.dumps(report_json(report)))
    assert doc["billed_usd"] == "0.164"
    assert doc["by_state"]["completed"] == 4
    flux2 = next(e for e in doc["endpoints"] if e["endpoint"] == FLUX2)
    assert flux2["billed_usd"] == "0.024" and flux2["by_state"] == {
        "unknown": 1, "queued": 1, "completed": 1, "failed": 1,
    }  # fmt: skip
    assert doc["timing"]["first_submitted_at"] == "2026-11-20T22:00:00+00:00"
    assert doc["timing"]["queue"]["known"] == 3
    assert doc["failures"][0]["examples"][0]["row_id"] == "chair-01"
    assert doc["resume"]["resubmit"] == 1 and doc["resume"]["new_jobs"] is None
    assert "unknown" in doc["resume"]["note"]
    assert doc["resume"]["policy"] == {"on_unknown": "resubmit", "retry_failed": False,
                                       "max_attempts": 3}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "text"),
    [("0", "$0.00"), ("0.385", "$0.385"), ("12.5", "$12.50"), ("1234.56789", "$1234.5679"),
     ("9.975", "$9.975"), ("-0.5", "-$0.50"), ("0.00012345", "$0.0001"), ("3", "$3.00")],
)  # fmt: skip
def test_usd_shows_cents_and_sub_cent_prices(value: str, text: str) -> None:
    assert format_usd(Decimal(value)) == text


def test_cli_report_prints_text_by_default(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"run {run_dir}: 10 jobs")


def test_cli_report_json(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["jobs"] == 10


@pytest.mark.parametrize(
    ("config", "on_unknown", "resubmit", "reconcile"),
    [({}, "reconcile", 0, 1), ({"on_unknown": "resubmit"}, "resubmit", 1, 0)],
)
def test_cli_report_resume_follows_the_runs_own_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config: dict[str, str],
    on_unknown: str, resubmit: int, reconcile: int,
) -> None:  # fmt: skip
    # A plain rerun reconciles an unknown outcome (run's default), so the report must not
    # promise a resubmit the rerun would not do.
    run_dir = write_run(tmp_path / "run", sample_events(tmp_path / "run"), meta=False)
    write_run_meta(run_dir, {"config": config})
    assert main(["report", str(run_dir), "--json"]) == 0
    resume = json.loads(capsys.readouterr().out)["resume"]
    assert resume["policy"]["on_unknown"] == on_unknown
    assert (resume["resubmit"], resume["reconcile"]) == (resubmit, reconcile)


def test_cli_report_html_writes_the_page(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "report.html"
    assert main(["report", str(run_dir), "--html", str(page), "--gallery-limit", "3"]) == 0
    err = capsys.readouterr().err
    assert "3 jobs in the gallery (7 left out)" in err
    assert "4 thumbnails made" in err  # a, b (two outputs) and c; the rest are not local
    assert "7 were left out" in page.read_text(encoding="utf-8")


def test_cli_report_html_gallery_of_one_state(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "failed.html"
    argv = ["report", str(run_dir), "--html", str(page), "--gallery-state", "failed"]
    assert main(argv) == 0
    assert "3 jobs in the gallery (0 left out), 0 thumbnails made" in capsys.readouterr().err
    assert "Only failed jobs are in the gallery." in page.read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--gallery-limit", "-1"], 2, "--gallery-limit must be 0 or more"),
        (["--gallery-state", "done"], 2, "--gallery-state done: not one of submitting, unknown"),
        ([], 2, "not a run directory"),
    ],
)
def test_cli_report_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str
) -> None:
    if argv:
        (tmp_path / "ledger").mkdir()  # a run directory, so the flag is what is wrong
    assert main(["report", str(tmp_path), *argv]) == code
    assert message in capsys.readouterr().err
