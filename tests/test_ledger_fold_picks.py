"""The fold finds the rows to take once for columns with the same nulls: a job-level and an
attempt-level column with the same nulls still fold each by its own rule, and a fold that
keeps none of them (a budget of 0 bytes) folds alike."""

from __future__ import annotations

import pyarrow as pa
import pytest

from runner.ledger import folding

EVENTS = pa.table(
    {
        "seq": pa.array([1, 2, 3, 4, 5, 6, 7], pa.int64()),
        "job_key": ["a", "b", "a", "a", "b", "a", "c"],
        "state": [
            "submitting",
            "submitting",
            "queued",
            "submitting",
            "queued",
            "queued",
            "submitting",
        ],
        # the same nulls in both: set by each job's first event (and c's)
        "row_id": ["ra", "rb", None, None, None, None, "rc"],
        "request_id": ["qa", "qb", None, None, None, None, "qc"],
        "source": ["s", "s", None, None, None, None, None],
    }
)
EXPECTED = {
    "job_key": ["b", "a", "c"],
    "row_id": ["rb", "ra", "rc"],  # job-level: the job's last value
    "request_id": ["qb", None, "qc"],  # attempt-level: a's second attempt set none
    "source": ["s", "s", None],
}


@pytest.mark.parametrize("budget", [folding._PICKS_BYTES, 0])
def test_columns_with_the_same_nulls_fold_by_their_own_rule(
    budget: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(folding, "_PICKS_BYTES", budget)
    jobs = folding.fold(EVENTS)
    assert {name: jobs[name].to_pylist() for name in EXPECTED} == EXPECTED
