"""The cost plan: jobs, images, megapixels and dollars per endpoint over a stream of jobs.

Pure aggregation over :class:`runner.manifest.jobs.Job` items and :class:`runner.errors.RowError`
items; input image sizes come from an injected function so the plan itself does no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from runner.endpoints.cost import Estimate, PriceTable, estimate
from runner.errors import RowError, RowProblem
from runner.manifest.batches import JobBatch
from runner.manifest.jobs import Job

InputSizes = Callable[[Job], Sequence[tuple[int, int]]]
"""Sizes of a job's input images that could be read (missing ones are simply absent)."""

LoraBytes = Callable[[Job], int | None]

MAX_LISTED_PROBLEMS = 1000


@dataclass(slots=True)
class Totals:
    """Running totals for one endpoint (or for the whole plan)."""

    jobs: int = 0
    images: int = 0
    megapixels: int = 0
    usd: Decimal = Decimal(0)
    unpriced_jobs: int = 0
    approximate_jobs: int = 0
    unconfirmed_jobs: int = 0
    notes: set[str] = field(default_factory=set)

    def add(self, est: Estimate, count: int = 1) -> None:
        """Count ``count`` jobs of this estimate."""
        self.jobs += count
        self.images += est.images * count
        self.megapixels += est.megapixels * count
        if est.usd is None:
            self.unpriced_jobs += count
        else:
            self.usd += est.usd * count
        if est.approximate:
            self.approximate_jobs += count
        if est.unconfirmed:
            self.unconfirmed_jobs += count
        self.notes.update(est.notes)

    def as_json(self) -> dict[str, Any]:
        return {
            "jobs": self.jobs,
            "images": self.images,
            "megapixels": self.megapixels,
            "usd": str(self.usd),
            "unpriced_jobs": self.unpriced_jobs,
            "approximate_jobs": self.approximate_jobs,
            "unconfirmed_jobs": self.unconfirmed_jobs,
            "notes": sorted(self.notes),
        }


@dataclass(slots=True)
class Plan:
    by_endpoint: dict[str, Totals] = field(default_factory=dict)
    total: Totals = field(default_factory=Totals)
    bad_rows: int = 0
    problems: list[RowProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.bad_rows == 0

    def as_json(self) -> dict[str, Any]:
        return {
            "endpoints": {ep: t.as_json() for ep, t in sorted(self.by_endpoint.items())},
            "total": self.total.as_json(),
            "bad_rows": self.bad_rows,
            "problems": [
                {"file": p.file, "line": p.line, "column": p.column, "message": p.message}
                for p in self.problems
            ],
        }


def job_estimate(
    job: Job, prices: PriceTable, input_sizes: InputSizes, lora_bytes: LoraBytes
) -> Estimate:
    return estimate(
        job.endpoint,
        job.request,
        prices,
        input_sizes=input_sizes(job),
        lora_bytes=lora_bytes(job),
    )


def build_plan(
    items: Iterable[Job | RowError],
    prices: PriceTable,
    *,
    input_sizes: InputSizes,
    lora_bytes: LoraBytes = lambda _job: None,
) -> Plan:
    plan = Plan()
    _add_items(plan, items, prices, input_sizes, lora_bytes)
    return plan


def build_plan_batches(
    batches: Iterable[JobBatch],
    prices: PriceTable,
    *,
    input_sizes: InputSizes,
    lora_bytes: LoraBytes = lambda _job: None,
) -> Plan:
    """:func:`build_plan` over :func:`iter_job_batches`: jobs only counted are estimated once
    per cost group (no input file, no LoRA file: nothing to size, as ``input_sizes`` and
    ``lora_bytes`` would find)."""
    plan = Plan()
    # The batch reader gives one request object per kind of cost: one estimate for each.
    estimates: dict[tuple[str, int], tuple[Any, Estimate]] = {}
    for batch in batches:
        _add_items(plan, batch.items, prices, input_sizes, lora_bytes)
        for group in batch.groups:
            kind = (group.endpoint, id(group.request))
            known = estimates.get(kind)
            if known is None or known[0] is not group.request:
                known = estimates[kind] = (
                    group.request,
                    estimate(group.endpoint, group.request, prices),
                )
            est = known[1]
            plan.by_endpoint.setdefault(group.endpoint, Totals()).add(est, group.count)
            plan.total.add(est, group.count)
    return plan


def _add_items(
    plan: Plan,
    items: Iterable[Job | RowError],
    prices: PriceTable,
    input_sizes: InputSizes,
    lora_bytes: LoraBytes,
) -> None:
    for item in items:
        if isinstance(item, RowError):
            plan.bad_rows += 1
            room = MAX_LISTED_PROBLEMS - len(plan.problems)
            plan.problems.extend(item.problems[: max(room, 0)])
            continue
        est = job_estimate(item, prices, input_sizes, lora_bytes)
        plan.by_endpoint.setdefault(item.endpoint, Totals()).add(est)
        plan.total.add(est)


def _usd(totals: Totals) -> str:
    text = f"${totals.usd:.3f}"
    if totals.unpriced_jobs:
        text += f" + {totals.unpriced_jobs} unpriced"
    if totals.approximate_jobs:
        text = "~" + text
    return text


def render_text(plan: Plan) -> str:
    header = ("endpoint", "jobs", "images", "MP", "usd")
    rows = [
        (ep, str(t.jobs), str(t.images), str(t.megapixels), _usd(t))
        for ep, t in sorted(plan.by_endpoint.items())
    ]
    rows.append(
        (
            "total",
            str(plan.total.jobs),
            str(plan.total.images),
            str(plan.total.megapixels),
            _usd(plan.total),
        )
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(row: tuple[str, ...]) -> str:
        first = row[0].ljust(widths[0])
        rest = (cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    lines = [fmt(header), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    flagged = []
    for ep, t in sorted(plan.by_endpoint.items()):
        if t.unconfirmed_jobs:
            flagged.append(f"{ep}: price is unconfirmed ({t.unconfirmed_jobs} jobs)")
        if t.approximate_jobs:
            flagged.append(f"{ep}: {t.approximate_jobs} estimates are approximate")
        flagged.extend(f"{ep}: {note}" for note in sorted(t.notes))
    if flagged:
        lines.append("")
        lines.extend(f"note: {line}" for line in flagged)
    if plan.bad_rows:
        lines.append("")
        bad = "1 bad row is" if plan.bad_rows == 1 else f"{plan.bad_rows} bad rows are"
        lines.append(f"{bad} not in the plan (see `runner validate`)")
    return "\n".join(lines)
