"""What a rerun would do, before it does it: ``runner plan MANIFEST --ledger DIR``.

Each manifest job is put through the same resume decision a run makes
(:func:`runner.ledger.resume.decide`) and counted, with the dollars of what would be sent:

    new        never seen by the ledger
    changed    a row the ledger knows under another job key (its content changed)
    done       completed: skipped
    retry      failed at no cost (or --retry-failed): sent again
    re-attach  in flight with a request id: followed, not sent
    reconcile  unknown outcome: settled from fal's history (sent only if never accepted)
    resubmit   unknown outcome under --on-unknown resubmit: sent, may pay twice
    left       failed and may have been billed, or skipped by policy: not sent, not done
    invalid    rows that would be recorded invalid
Pure apart from reading the ledger; nothing is sent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from runner.endpoints.cost import PriceTable
from runner.endpoints.money import format_usd
from runner.errors import RowError
from runner.ledger.resume import Action, ResumePolicy, decide
from runner.ledger.schema import JobState
from runner.ledger.state import LedgerState
from runner.manifest.jobs import Job
from runner.manifest.plan import InputSizes, LoraBytes, job_estimate

ORDER = ("new", "changed", "retry", "reconcile", "resubmit", "re-attach", "done", "left", "invalid")


@dataclass
class Preview:
    jobs: Counter[str] = field(default_factory=Counter)
    usd: dict[str, Decimal] = field(default_factory=dict)

    def add(self, kind: str, usd: Decimal | None = None) -> None:
        self.jobs[kind] += 1
        if usd is not None:
            self.usd[kind] = self.usd.get(kind, Decimal(0)) + usd

    @property
    def would_send_usd(self) -> Decimal:
        return sum(
            (self.usd.get(k, Decimal(0)) for k in ("new", "changed", "retry", "resubmit")),
            Decimal(0),
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "jobs": {k: self.jobs[k] for k in ORDER if self.jobs[k]},
            "usd": {k: str(v) for k, v in self.usd.items()},
            "would_send_usd": str(self.would_send_usd),
        }


def _kind(action: Action, possible_duplicate: bool, state: JobState | None) -> str:
    if state is None:
        return "new"
    if action is Action.SKIP:
        return "done" if state is JobState.COMPLETED else "left"
    if action is Action.REATTACH:
        return "re-attach"
    if action is Action.RECONCILE:
        return "reconcile"
    if action is Action.FAIL:
        return "left"
    if possible_duplicate:
        return "resubmit"
    return "new" if state is JobState.INVALID else "retry"


def preview(
    items: Iterable[Job | RowError],
    state: LedgerState,
    prices: PriceTable,
    policy: ResumePolicy,
    *,
    input_sizes: InputSizes,
    lora_bytes: LoraBytes,
) -> Preview:
    """Count what a rerun would do with each manifest job, and the dollars it would send."""
    known_rows: set[str] = set()
    if len(state) and "row_id" in state.jobs.column_names:
        known_rows = {r for r in state.jobs["row_id"].to_pylist() if r is not None}
    out = Preview()
    for item in items:
        if isinstance(item, RowError):
            out.add("invalid")
            continue
        brief = state.brief(item.job_key)
        decision = decide(brief, policy)
        kind = _kind(decision.action, decision.possible_duplicate, brief.state if brief else None)
        if kind == "new" and brief is None and item.row_id in known_rows:
            kind = "changed"
        sends = kind in ("new", "changed", "retry", "resubmit", "reconcile")
        usd = job_estimate(item, prices, input_sizes, lora_bytes).usd if sends else None
        out.add(kind, usd)
    return out


def render_preview(p: Preview) -> str:
    words = {
        "new": "new rows, sent", "changed": "rows whose content changed, sent again",
        "retry": "failed at no cost, retried",
        "reconcile": "unknown outcome, settled from fal's history",
        "resubmit": "unknown outcome, resubmitted (may pay twice)",
        "re-attach": "in flight, re-attached", "done": "done, skipped",
        "left": "failed and maybe billed (--retry-failed), or skipped by policy",
        "invalid": "invalid rows",
    }  # fmt: skip
    lines = ["a run with this ledger would:"]
    for kind in ORDER:
        if p.jobs[kind]:
            money = f"  {format_usd(p.usd[kind])}" if kind in p.usd else ""
            lines.append(f"  {p.jobs[kind]:>8}  {words[kind]}{money}")
    lines.append(f"  would send about {format_usd(p.would_send_usd)} (reconciled jobs only if "
                 "fal never received them)")  # fmt: skip
    return "\n".join(lines)
