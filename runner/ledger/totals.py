"""Counts and money of a folded ledger: the one computation behind status, report and export.

:func:`totals` takes the folded jobs (one latest row per job) and returns counts by state
and endpoint, images, megapixels, and the three sums of money: every job's estimate, the
estimates of the jobs that were billed, and what was billed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc

from runner.endpoints.money import format_usd, trim_usd
from runner.ledger.schema import JobState

_ZERO = Decimal(0)
STATE_ORDER = tuple(JobState)


@dataclass(frozen=True, slots=True)
class EndpointTotals:
    """One endpoint's jobs and money. ``estimated_done_usd`` covers the jobs that were billed."""

    endpoint: str | None
    jobs: int
    by_state: Mapping[JobState, int]
    images: int
    megapixels: int
    estimated_usd: Decimal  # every job's pre-run estimate
    estimated_done_usd: Decimal  # the estimates of the jobs that have a billed amount
    billed_usd: Decimal  # output-based cost of each job's latest attempt
    billed_jobs: int


@dataclass(frozen=True, slots=True)
class Totals:
    jobs: int
    by_state: Mapping[JobState, int]  # in JobState order, states with no job left out
    endpoints: tuple[EndpointTotals, ...]  # by endpoint id, the jobs with none last
    estimated_usd: Decimal
    estimated_done_usd: Decimal
    billed_usd: Decimal
    # Jobs resubmitted after a submit of unknown outcome: they may have been billed twice.
    # Durable: the flag stays on the job after it completes.
    possible_duplicates: int
    possible_duplicate_usd: Decimal  # their estimates
    unknown_outcomes: int  # jobs whose latest submit outcome is unknown (submitting/unknown)
    # How fal's history settled unknown outcomes (adopted, resubmitted_safe,
    # history_unavailable), and the other billed requests it showed, with their estimates.
    reconciled: Mapping[str, int]
    duplicates_found: int
    duplicates_found_usd: Decimal
    # Paid for flagged outputs that were re-rolled and discarded: spent, on top of billed_usd.
    reroll_usd: Decimal = _ZERO


def totals(jobs: pa.Table) -> Totals:
    """Counts and money of the folded ``jobs``. Pure."""
    per = _endpoint_sums(jobs)
    endpoints = tuple(
        EndpointTotals(
            endpoint=name,
            jobs=e["jobs"],
            by_state={s: e[s] for s in STATE_ORDER if e[s]},
            images=e["images"],
            megapixels=e["mp"],
            estimated_usd=trim_usd(Decimal(e["est"])),
            estimated_done_usd=trim_usd(Decimal(e["est_done"])),
            billed_usd=trim_usd(Decimal(e["billed"])),
            billed_jobs=e["billed_jobs"],
        )
        for name, e in sorted(per.items(), key=lambda kv: (kv[0] is None, kv[0] or ""))
    )
    flagged, flagged_usd = _possible_duplicates(jobs)
    by_state: Counter[JobState] = Counter()
    for endpoint in endpoints:
        by_state.update(endpoint.by_state)
    return Totals(
        jobs=jobs.num_rows,
        by_state={s: by_state[s] for s in STATE_ORDER if by_state[s]},
        endpoints=endpoints,
        estimated_usd=trim_usd(sum((e.estimated_usd for e in endpoints), _ZERO)),
        estimated_done_usd=trim_usd(sum((e.estimated_done_usd for e in endpoints), _ZERO)),
        billed_usd=trim_usd(sum((e.billed_usd for e in endpoints), _ZERO)),
        possible_duplicates=flagged,
        possible_duplicate_usd=trim_usd(flagged_usd),
        unknown_outcomes=by_state[JobState.SUBMITTING] + by_state[JobState.UNKNOWN],
        **_reconciliation(jobs),
        reroll_usd=_rerolls(jobs),
    )


def _rerolls(jobs: pa.Table) -> Decimal:
    if "reroll_usd" not in jobs.column_names:
        return _ZERO
    return trim_usd(Decimal(pc.sum(jobs["reroll_usd"]).as_py() or 0))


class SpendFacts(Protocol):
    """What status and the report know of spend that may have happened twice."""

    @property
    def possible_duplicates(self) -> int: ...
    @property
    def possible_duplicate_usd(self) -> Decimal: ...
    @property
    def reconciled(self) -> Mapping[str, int]: ...
    @property
    def duplicates_found(self) -> int: ...
    @property
    def duplicates_found_usd(self) -> Decimal: ...
    @property
    def unknown_outcomes(self) -> int: ...


def spend_notes(facts: SpendFacts) -> list[str]:
    """The sentences status and the report say about duplicate spend, worded once."""
    notes = []
    if facts.possible_duplicates:
        notes.append(
            f"possible duplicate spend: {_jobs(facts.possible_duplicates)} resubmitted after an "
            f"unknown outcome (est. {format_usd(facts.possible_duplicate_usd)})"
        )
    if facts.reconciled:
        ways = sorted(facts.reconciled.items())
        settled = ", ".join(f"{n} {how.replace('_', ' ')}" for how, n in ways)
        notes.append(f"unknown outcomes settled from fal's request history: {settled}")
    if facts.duplicates_found:
        notes.append(
            f"duplicates billed, found in fal's history: {facts.duplicates_found} requests "
            f"(est. {format_usd(facts.duplicates_found_usd)})"
        )
    if facts.unknown_outcomes:
        notes.append(
            f"{_jobs(facts.unknown_outcomes)} with an unknown submit outcome (a resume settles "
            "them; resubmitting may pay twice)"
        )
    return notes


class SupersededFacts(Protocol):
    """What status and the report know of superseded versions (runner.ledger.versions)."""

    @property
    def superseded(self) -> int: ...
    @property
    def superseded_billed_usd(self) -> Decimal: ...
    @property
    def superseded_estimated_usd(self) -> Decimal: ...
    @property
    def all_versions(self) -> bool: ...
    @property
    def spent_usd(self) -> Decimal: ...


def superseded_note(facts: SupersededFacts) -> str:
    """The sentence on superseded jobs: their money is spent whether they are counted or not."""
    billed = format_usd(facts.superseded_billed_usd)
    head = f"superseded: {_jobs(facts.superseded)} (older content of rows recorded again)"
    if facts.all_versions:
        return f"{head}, billed {billed}: counted above (--all-versions)"
    return (
        f"{head}, billed {billed} (est. {format_usd(facts.superseded_estimated_usd)}): not "
        f"counted above (--all-versions counts them); spent in all {format_usd(facts.spent_usd)}"
    )


def _jobs(n: int) -> str:
    return "1 job" if n == 1 else f"{n} jobs"


def _reconciliation(jobs: pa.Table) -> dict[str, Any]:
    if "reconciled" not in jobs.column_names:
        return {"reconciled": {}, "duplicates_found": 0, "duplicates_found_usd": _ZERO}
    counts = pc.value_counts(jobs["reconciled"].drop_null()).to_pylist()
    found = pc.list_value_length(jobs["duplicate_request_ids"]).fill_null(0)
    exact = _ZERO
    if pc.sum(found).as_py():
        # Exact dollars: one Decimal per job that has found duplicates (few).
        mask = pc.greater(found, 0)
        for est, n in zip(jobs.filter(mask)["estimated_usd"].to_pylist(),
                          found.filter(mask).to_pylist(), strict=True):  # fmt: skip
            exact += (est or _ZERO) * n
    return {
        "reconciled": {c["values"]: c["counts"] for c in counts},
        "duplicates_found": int(pc.sum(found).as_py() or 0),
        "duplicates_found_usd": trim_usd(exact),
    }


def _possible_duplicates(jobs: pa.Table) -> tuple[int, Decimal]:
    if "possible_duplicate" not in jobs.column_names:
        return 0, _ZERO
    mask = jobs["possible_duplicate"].fill_null(False)
    count = int(pc.sum(mask).as_py() or 0)
    if not count:
        return 0, _ZERO
    usd = pc.sum(jobs.filter(mask)["estimated_usd"]).as_py()
    return count, Decimal(usd or 0)


def _endpoint_sums(jobs: pa.Table) -> dict[str | None, dict[Any, Any]]:
    """Per endpoint: job counts (also keyed by JobState), money sums, images, megapixels."""
    # A job "was billed" when it completed with a price, or a failure cost something: a
    # failure recorded at 0 (certainly free) has no estimate to compare.
    billed = jobs["billed_usd"]
    zero = pa.scalar(0, billed.type)
    billed_valid = pc.and_(
        pc.is_valid(billed),
        pc.or_(pc.equal(jobs["state"], JobState.COMPLETED.value), pc.greater(billed, zero)),
    )
    table = pa.table(
        {
            "endpoint": jobs["endpoint"],
            "state": jobs["state"],
            "est": jobs["estimated_usd"],
            "est_done": pc.if_else(billed_valid, jobs["estimated_usd"], None),
            "billed": pc.if_else(billed_valid, billed, None),
            "images": pc.list_value_length(jobs["outputs"]),
            "mp": jobs["megapixels"],
        }
    )
    grouped = table.group_by(["endpoint", "state"]).aggregate(
        [
            ("state", "count"),
            ("est", "sum"),
            ("est_done", "sum"),
            ("billed", "sum"),
            ("billed", "count"),
            ("images", "sum"),
            ("mp", "sum"),
        ]
    )
    per: dict[str | None, dict[Any, Any]] = {}
    for row in grouped.to_pylist():
        e = per.setdefault(row["endpoint"], defaultdict(int))
        e["jobs"] += row["state_count"]
        e[JobState(row["state"])] += row["state_count"]
        e["est"] += row["est_sum"] or _ZERO
        e["est_done"] += row["est_done_sum"] or _ZERO
        e["billed"] += row["billed_sum"] or _ZERO
        e["billed_jobs"] += row["billed_count"]
        e["images"] += row["images_sum"] or 0
        e["mp"] += row["mp_sum"] or 0
    return per
