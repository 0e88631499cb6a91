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
_INVALID_VARIANT = -1  # an invalid record's (null) variant: its whole row


def superseded_mask(jobs: pa.Table) -> np.ndarray:
    """Whether each folded job (one row per job key) is superseded; see the module docstring."""
    n = jobs.num_rows
    mask = np.zeros(n, dtype=bool)
    if n == 0 or "row_id" not in jobs.column_names or "variant" not in jobs.column_names:
        return mask
    row_id = pc.cast(jobs["row_id"], pa.string())
    eligible = pc.and_(
        pc.is_valid(row_id), pc.invert(pc.match_substring_regex(row_id, _ROW_NUMBER))
    )
    table = pa.table(
        {
            "i": pa.array(np.arange(n, dtype=np.int64)),
            "row_id": row_id,
            "variant": pc.cast(jobs["variant"], pa.int64()).fill_null(_INVALID_VARIANT),
            "seq": jobs["seq"],
        }
    ).filter(eligible.fill_null(False))
    if table.num_rows < 2:
        return mask
    invalid = pc.equal(table["variant"], _INVALID_VARIANT)
    by_identity = table.group_by(["row_id", "variant"]).aggregate([("seq", "max")])
    joined = (
        table.join(by_identity, ["row_id", "variant"])
        .join(_latest_per_row(table.filter(pc.invert(invalid)), "valid_max"), "row_id")
        .join(_latest_per_row(table.filter(invalid), "invalid_max"), "row_id")
    )
    # An invalid record is outdone by any later variant of its row; a variant by a later
    # version of itself or a later invalid record of its row.
    other = pc.if_else(
        pc.equal(joined["variant"], _INVALID_VARIANT), joined["valid_max"], joined["invalid_max"]
    )
    newest = pc.max_element_wise(joined["seq_max"], other, skip_nulls=True)
    older = pc.less(joined["seq"], newest).fill_null(False)
    mask[joined["i"].filter(older).to_numpy()] = True
    return mask


def _latest_per_row(table: pa.Table, name: str) -> pa.Table:
    latest = table.group_by("row_id").aggregate([("seq", "max")])
    return latest.select(["row_id", "seq_max"]).rename_columns(["row_id", name])


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
