"""Versions of a row: which ledger jobs are *superseded* by a newer recording of their row.

A job's key is a hash of its row's identity, endpoint, request and variant
(:func:`runner.manifest.identity.job_key`), so a row whose content changed is recorded
under a new key while its old jobs stay in the ledger. Definitions:

- **identity**: a job's ``(row_id, variant)``. The row id comes from ``--id-column`` (or a
  column ``id``), or from the row's content (``~hex``); see :mod:`runner.manifest.identity`.
  An ``invalid`` record (a row that could not become a request; no variant) stands for its
  whole row, every variant.
- **version**: one job key of an identity: one content of the row (the job key already hashes
  the request, so ``payload_sha256``, which also covers upload URLs and changes between
  attempts, is not needed to tell versions apart).
- **current**: of an identity's versions, the one with the latest event (highest ``seq``).
  For an invalid record, the latest over it and every variant of its row; a variant is
  likewise superseded by a later invalid record of its row (the row was edited into a bad
  one).
- **superseded**: every other version. Rows without an id or content (``#n``, a bad row
  named by its number) are positions, not identities: never superseded.

What the ledger cannot know, and so does not claim:

- Which jobs the latest run's manifest held. The ledger records events, not each run's
  manifest, so a job whose row was deleted (or, with content identity, edited: an edited
  row is a new identity ``~hex``, with nothing linking it to the old one) stays current. Use
  ``--id-column`` to have edits supersede the old content.
- Variants a row no longer has (``variants`` lowered from 4 to 2): those identities have no
  newer version, so they stay current.
- A row reverted to content the ledger already completed: the rerun skips that job and writes
  no event, so the version recorded in between stays current until the reverted one gets a
  new event. Any later event counts (a retry, or ``runner cancel`` of an in-flight job).

Superseded jobs are left out of ``status``, ``export`` and ``report`` by default
(``--all-versions`` includes them); the money they were billed is still spent, so status and
the report show it on its own line.
Pure, vectorised (pyarrow; no Python loop over jobs).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SUPERSEDED = "superseded"
_ROW_NUMBER = r"^#[0-9]+$"
INVALID_VARIANT = -1  # an invalid record's (null) variant: its whole row


def superseded_mask(jobs: pa.Table) -> np.ndarray:
    """Whether each folded job (one row per job key) is superseded; see the module docstring."""
    n = jobs.num_rows
    mask = np.zeros(n, dtype=bool)
    if n == 0 or "row_id" not in jobs.column_names or "variant" not in jobs.column_names:
        return mask
    row_id = pc.cast(jobs["row_id"], pa.string())
    eligible = _bools(pc.is_valid(row_id))
    # The regex only where it can match: a million ids through it cost a second.
    hashed = np.flatnonzero(_bools(pc.starts_with(row_id, "#").fill_null(False)))
    if len(hashed):
        numbered = pc.match_substring_regex(row_id.take(pa.array(hashed)), _ROW_NUMBER)
        eligible[hashed[_bools(numbered)]] = False
    at = np.flatnonzero(eligible)
    if len(at) < 2:
        return mask
    taken = pa.array(at)
    rows = np.asarray(
        pc.dictionary_encode(row_id.take(taken).combine_chunks()).indices.to_numpy(), np.int64
    )
    variant = pc.cast(jobs["variant"].take(taken), pa.int64()).fill_null(INVALID_VARIANT)
    variants = np.asarray(variant.to_numpy(), np.int64)
    seq = np.asarray(jobs["seq"].take(taken).to_numpy(), np.int64)
    mask[at[outdone(seq, rows, variants)]] = True
    return mask


def outdone(seq: np.ndarray, rows: np.ndarray, variants: np.ndarray) -> np.ndarray:
    """Which jobs (their ``seq``, row number, variant; ``INVALID_VARIANT`` for an invalid
    record) a later record of their row supersedes. Pure.

    An invalid record is outdone by any later variant of its row; a variant by a later
    version of itself or a later invalid record of its row.
    """
    invalid = variants == INVALID_VARIANT
    newest = np.maximum(
        _group_max(seq, rows, variants),
        np.where(invalid, _row_max(seq, rows, ~invalid), _row_max(seq, rows, invalid)),
    )
    return np.asarray(seq < newest)


def _group_max(seq: np.ndarray, rows: np.ndarray, variants: np.ndarray) -> np.ndarray:
    """For each job, the highest seq among the jobs of its (row, variant)."""
    order = np.lexsort((variants, rows))
    r, v = rows[order], variants[order]
    starts = np.flatnonzero(np.concatenate(([True], (r[1:] != r[:-1]) | (v[1:] != v[:-1]))))
    group_max = np.maximum.reduceat(seq[order], starts)
    is_start = np.zeros(len(seq), dtype=bool)
    is_start[starts] = True
    group = np.empty(len(seq), dtype=np.int64)
    group[order] = np.cumsum(is_start) - 1
    return np.asarray(group_max[group])


def _row_max(seq: np.ndarray, rows: np.ndarray, among: np.ndarray) -> np.ndarray:
    """For each job, the highest seq among the jobs of its row selected by ``among`` (-1: none)."""
    best = np.full(int(rows.max()) + 1, -1, dtype=np.int64)
    np.maximum.at(best, rows[among], seq[among])
    return np.asarray(best[rows])


def _bools(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)


def mark_superseded(jobs: pa.Table) -> pa.Table:
    """``jobs`` with a ``superseded`` bool column (replaced if already there)."""
    flag = pa.array(superseded_mask(jobs), pa.bool_())
    if SUPERSEDED in jobs.column_names:
        return jobs.set_column(jobs.schema.get_field_index(SUPERSEDED), SUPERSEDED, flag)
    return jobs.append_column(pa.field(SUPERSEDED, pa.bool_(), nullable=False), flag)


@dataclass(frozen=True, slots=True)
class Versions:
    """A folded ledger split into the jobs to count and the superseded ones.

    ``every`` holds every job, marked; ``shown`` the same with ``all_versions``, else only
    the current ones; ``superseded`` always the superseded ones, so their spend is told apart.
    """

    every: pa.Table
    shown: pa.Table
    superseded: pa.Table
    all_versions: bool


def split_versions(jobs: pa.Table, *, all_versions: bool = False) -> Versions:
    """Mark ``jobs`` (unless they carry the mark already) and split them (:class:`Versions`)."""
    marked = jobs if SUPERSEDED in jobs.column_names else mark_superseded(jobs)
    flag = marked[SUPERSEDED]
    old = marked.filter(flag)
    shown = marked if all_versions else marked.filter(pc.invert(flag))
    return Versions(marked, shown, old, all_versions)
