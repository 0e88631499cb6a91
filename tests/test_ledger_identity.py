"""Superseded versions found over a scan (runner.ledger.identity) are exactly those one fold
of the whole ledger marks: with many buckets, with every row id hashed alike (so every job
is a candidate and only the exact check tells them apart), and in status."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from runner.ledger import keyhash, read_folded, status_summary
from runner.ledger.identity import superseded_keys
from runner.ledger.totals import totals
from runner.ledger.versions import split_versions, superseded_mask
from tests import versioned_support

# The shared fixtures (tests/versioned_support.py).
buckets = versioned_support.buckets
versioned = versioned_support.versioned


def _expected(run_dir: Path) -> list[str]:
    jobs = read_folded(run_dir).jobs
    return sorted(jobs["job_key"].filter(pa.array(superseded_mask(jobs))).to_pylist())


def test_the_ledger_has_superseded_versions_of_every_kind(versioned: Path) -> None:
    keys = _expected(versioned)
    assert len(keys) > 20
    assert "k004-v1-0" in keys  # made invalid
    assert "invalid-8" in keys  # made invalid, then fixed
    assert "k001-v1-0" in keys  # by a version still only in the journal
    assert "k003-v1-0" in keys and "k003-v2-0" not in keys  # edited
    assert not any(k.startswith("k029") for k in keys)  # "#31": a position, no identity


def test_superseded_keys_are_those_of_one_fold(versioned: Path, buckets: str) -> None:
    assert sorted(superseded_keys(versioned).to_pylist()) == _expected(versioned)


def test_rows_sharing_a_hash_are_told_apart_exactly(
    versioned: Path, buckets: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = keyhash.text_hashes

    def one_hash(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        hashes, valid = real(values)
        return np.zeros_like(hashes), valid

    monkeypatch.setattr(keyhash, "text_hashes", one_hash)  # the module identity reads it from
    assert sorted(superseded_keys(versioned).to_pylist()) == _expected(versioned)


def test_status_counts_superseded_apart_as_one_fold_does(versioned: Path, buckets: str) -> None:
    versions = split_versions(read_folded(versioned).jobs)
    shown, old = totals(versions.shown), totals(versions.superseded)
    status = status_summary(versioned)
    assert status.superseded == old.jobs > 0
    assert (status.superseded_billed_usd, status.superseded_estimated_usd) == (
        old.billed_usd, old.estimated_usd)  # fmt: skip
    assert status.jobs == shown.jobs
    assert status.by_endpoint == shown.endpoints
    assert (status.billed_usd, status.estimated_usd) == (shown.billed_usd, shown.estimated_usd)
    every = status_summary(versioned, all_versions=True)
    assert every.jobs == versions.every.num_rows
    assert every.spent_usd == status.spent_usd


def test_text_hashes_are_equal_for_equal_texts_only() -> None:
    values = pa.array(["row-1", "row-1", "row-2", "", None, "1-wor", "row-1" * 40])
    hashes, valid = keyhash.text_hashes(values)
    assert hashes[0] == hashes[1]
    assert len({int(h) for h in hashes[[0, 2, 3, 5, 6]]}) == 5
    assert valid.tolist() == [True, True, True, True, False, True, True]
    sliced, _ = keyhash.text_hashes(values.slice(1, 2))
    assert sliced.tolist() == hashes[1:3].tolist()
