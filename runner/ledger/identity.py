"""Superseded versions (:mod:`runner.ledger.versions`) found over a scan of the ledger,
without holding every job's row id.

The ledger is scanned a slice at a time (:func:`runner.ledger.scan.scan_folded`), and which
jobs are superseded depends on jobs of other slices. :class:`HashedIdentities` keeps, per
job that has an identity, its row id as a 64-bit hash (:func:`runner.ledger.keyhash.text_hashes`),
its variant and the seq of its last event: 20 bytes a job, not its texts. The rules of
:func:`runner.ledger.versions.superseded_mask` applied to those find every superseded job
(equal row ids hash alike, so a job superseded by its exact row is superseded by its hash
too); two row ids sharing a hash could only add jobs. So the rows whose hash group holds a
superseded job are the *candidates*, and :func:`exact_superseded` reads their exact row ids
in a second scan and applies :func:`~runner.ledger.versions.superseded_mask` to them alone:
the job keys it returns are exactly those one fold of the whole ledger marks. A ledger
whose rows were never recorded again has no candidates and takes no second scan.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger import keyhash
from runner.ledger.scan import scan_folded
from runner.ledger.versions import INVALID_VARIANT, outdone, superseded_mask

COLUMNS = ("row_id", "variant")
_ROW_NUMBER = r"^#[0-9]+$"
_NO_KEYS = pa.array([], pa.string())


def _identified(jobs: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(row id hashes, whether each job has an identity: a row id that is not ``#n``)."""
    row_id = pc.cast(jobs["row_id"], pa.string())
    hashes, eligible = keyhash.text_hashes(row_id)
    hashed = np.flatnonzero(
        np.asarray(pc.starts_with(row_id, "#").fill_null(False).to_numpy(zero_copy_only=False))
    )
    if len(hashed):
        numbered = pc.match_substring_regex(row_id.take(pa.array(hashed)), _ROW_NUMBER)
        numbered = numbered.to_numpy(zero_copy_only=False)
        eligible[hashed[np.asarray(numbered, dtype=bool)]] = False
    return hashes, eligible


class HashedIdentities:
    """The identities of the jobs of every slice added, as fixed-width numbers."""

    def __init__(self) -> None:
        self._rows: list[np.ndarray] = []
        self._variants: list[np.ndarray] = []
        self._seqs: list[np.ndarray] = []

    def add(self, jobs: pa.Table) -> None:
        """Keep the identity of each job of a folded slice (``seq``, ``row_id``, ``variant``)."""
        hashes, eligible = _identified(jobs)
        at = np.flatnonzero(eligible)
        variant = pc.cast(jobs["variant"], pa.int32()).fill_null(INVALID_VARIANT)
        self._rows.append(hashes[at])
        self._variants.append(np.asarray(variant.to_numpy(), np.int32)[at])
        self._seqs.append(np.asarray(jobs["seq"].to_numpy(), np.int64)[at])

    def candidates(self) -> np.ndarray:
        """The sorted row hashes of every row with a job the hashes say is superseded."""
        if not self._rows:
            return np.zeros(0, dtype=np.uint64)
        hashes = np.concatenate(self._rows)
        self._rows = [hashes]
        if len(hashes) < 2:
            return np.zeros(0, dtype=np.uint64)
        # One job per row (the usual ledger): nothing superseded. Told from a sorted copy, not
        # np.unique's inverse, which holds three more arrays of a number per job (at 10M jobs,
        # ~240 MB more at its peak).
        ordered = np.sort(hashes)
        repeated = bool(np.any(ordered[1:] == ordered[:-1]))
        del ordered
        if not repeated:
            return np.zeros(0, dtype=np.uint64)
        unique, rows = np.unique(hashes, return_inverse=True)
        variants = np.concatenate(self._variants).astype(np.int64)
        seq = np.concatenate(self._seqs)
        return np.asarray(unique[np.unique(rows[outdone(seq, rows, variants)])], dtype=np.uint64)


def in_sorted(values: np.ndarray, sorted_values: np.ndarray) -> np.ndarray:
    """Whether each of ``values`` is in ``sorted_values`` (sorted, unique)."""
    if len(sorted_values) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_values, values), len(sorted_values) - 1)
    return np.asarray(sorted_values[at] == values)


def exact_superseded(run_dir: Path, candidates: np.ndarray) -> pa.Array:
    """The job keys of the superseded jobs among the candidates' rows (a second scan that
    keeps the exact row id, variant and seq of those jobs only)."""
    if len(candidates) == 0:
        return _NO_KEYS

    def reduce(slices: Iterator[pa.Table]) -> list[pa.Table]:
        kept = []
        for jobs in slices:
            hashes, eligible = _identified(jobs)
            mine = np.flatnonzero(eligible & in_sorted(hashes, candidates))
            if len(mine):
                kept.append(jobs.select(["job_key", "row_id", "variant", "seq"]).take(mine))
        return kept

    kept, _info = scan_folded(run_dir, list(COLUMNS), reduce)
    if not kept:
        return _NO_KEYS
    jobs = pa.concat_tables(kept)
    return jobs["job_key"].filter(pa.array(superseded_mask(jobs))).combine_chunks()


def superseded_keys(run_dir: Path) -> pa.Array:
    """The job keys of every superseded job of the ledger (one scan of the identity columns;
    a second over the candidates' rows only when there are some)."""
    return superseded_and_last_seqs(run_dir, seqs=False)[0]


def superseded_and_last_seqs(run_dir: Path, *, seqs: bool = True) -> tuple[pa.Array, np.ndarray]:
    """:func:`superseded_keys`, and the seq of every job's last event, sorted (8 bytes a job,
    from the same scan; empty unless ``seqs``)."""

    def reduce(slices: Iterator[pa.Table]) -> tuple[np.ndarray, list[np.ndarray]]:
        identities = HashedIdentities()
        last: list[np.ndarray] = []
        for jobs in slices:
            identities.add(jobs)
            if seqs:
                last.append(np.asarray(jobs["seq"].to_numpy(), np.int64))
        return identities.candidates(), last

    (candidates, last), _info = scan_folded(run_dir, list(COLUMNS), reduce)
    ordered = np.sort(np.concatenate(last)) if last else np.zeros(0, np.int64)
    return exact_superseded(run_dir, candidates), ordered
