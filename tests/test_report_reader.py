"""The report read a bucket of jobs at a time (runner.report.reader) is the report of one fold
of the whole ledger and every event: superseded versions, re-rolls, flagged outputs, cache
hits, unknown outcomes, failures, retries, jobs only in the journal; in one bucket or many."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.ledger import JobState, ResumePolicy, read_run_meta
from runner.ledger.versions import split_versions
from runner.report.data import build_report, load_events, load_jobs
from runner.report.gallery import gallery
from runner.report.reader import read_gallery, read_report
from runner.report.text import render_text, report_json
from tests import versioned_support
from tests.report_support import sample_run

# The shared fixtures (tests/versioned_support.py).
buckets = versioned_support.buckets
versioned = versioned_support.versioned


def _both(run_dir: Path, **options: object) -> tuple[object, object]:
    meta = read_run_meta(run_dir)
    every = split_versions(load_jobs(run_dir)).every
    folded = build_report(every, meta, run_dir=run_dir, events=load_events(run_dir),
                          **options)  # type: ignore[arg-type]  # fmt: skip
    read = read_report(run_dir, meta, **options)  # type: ignore[arg-type]
    return folded, read


@pytest.mark.parametrize("all_versions", [False, True])
def test_the_read_report_is_the_folded_one(
    versioned: Path, buckets: str, all_versions: bool
) -> None:
    policy = ResumePolicy(on_unknown="resubmit", retry_failed=True)
    folded, read = _both(versioned, all_versions=all_versions, policy=policy, examples=2)
    assert read == folded
    assert render_text(read) == render_text(folded)  # type: ignore[arg-type]
    assert json.dumps(report_json(read)) == json.dumps(report_json(folded))  # type: ignore[arg-type]
    # The ledger has what the comparison is meant to cover.
    assert read.superseded > 0 and read.failed_jobs > 0 and read.unknown_outcomes > 0  # type: ignore[attr-defined]
    assert read.safety.flagged_jobs and read.safety.rerolls and read.safety.cached_jobs  # type: ignore[attr-defined]
    assert read.timeline.buckets > 1 and read.timeline.failures  # type: ignore[attr-defined]


def test_the_read_report_of_a_sample_night_is_the_folded_one(tmp_path: Path, buckets: str) -> None:
    run_dir = sample_run(tmp_path / "run")
    folded, read = _both(run_dir)
    assert read == folded


@pytest.mark.parametrize("limit", [0, 5, 500])
@pytest.mark.parametrize("states", [(), (JobState.COMPLETED, JobState.FAILED)])
def test_the_read_gallery_is_the_folded_one(
    versioned: Path, buckets: str, limit: int, states: tuple[JobState, ...]
) -> None:
    shown = split_versions(load_jobs(versioned)).shown
    assert read_gallery(versioned, limit=limit, states=states) == gallery(
        shown, limit=limit, states=states
    )
