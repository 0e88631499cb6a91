"""What a run says about itself at the end: the exit status (pure) and the summary lines.

    verdict(Ending) -> (exit code, message)

Exit 0 only when every job of the manifest is completed, in this run or an earlier one.
The table, first match wins:

    interrupted (Ctrl-C, SIGTERM)                         130
    stopped at the budget                                   3
    admission stopped early (lost slots, local disk)        1
    any job failed, invalid, unknown, lost or left over     1
      from an earlier run without a retry
    outputs not downloaded                                  1
    otherwise                                               0

:func:`print_summary` writes the summary for a person; :func:`print_summary_json` the
``summary`` and ``exit`` lines of ``--log-format json``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from runner.endpoints.money import format_usd
from runner.errors import EXIT_BUDGET, EXIT_INTERRUPTED, EXIT_JOBS_FAILED, EXIT_OK
from runner.execution.events import now_iso, usd, write_event
from runner.execution.progress import Tally


@dataclass(frozen=True, slots=True)
class Ending:
    """The facts a verdict is drawn from."""

    interrupted: bool = False
    budget_reason: str | None = None
    stopped_reason: str | None = None  # admission stopped for another reason
    failed: int = 0
    invalid: int = 0
    unknown: int = 0
    lost: int = 0
    left: int = 0  # not completed in an earlier run and not retried now
    downloads_failed: int = 0


def verdict(end: Ending) -> tuple[int, str]:
    """The exit code and one-line message of a run. Pure."""
    if end.interrupted:
        return EXIT_INTERRUPTED, "interrupted; rerun the same command to resume"
    if end.budget_reason is not None:
        return EXIT_BUDGET, f"stopped at the budget: {end.budget_reason}"
    if end.stopped_reason is not None:
        return EXIT_JOBS_FAILED, f"stopped early: {end.stopped_reason}"
    parts = [
        (end.failed, "failed"),
        (end.invalid, "invalid"),
        (end.unknown, "with an unknown outcome"),
        (end.lost, "lost contact (re-attached next run)"),
        (end.left, "left from earlier runs"),
    ]
    named = [f"{n} {what}" for n, what in parts if n]
    if named:
        return EXIT_JOBS_FAILED, "not every job completed: " + ", ".join(named)
    if end.downloads_failed:
        return EXIT_JOBS_FAILED, "some outputs were not downloaded; rerun to fetch only those"
    return EXIT_OK, "all jobs completed"


@dataclass(slots=True)
class RunReport:
    """What a finished (or stopped) run says about itself."""

    tally: Tally
    exit_code: int
    message: str
    run_dir: Path
    lines: list[str] = field(default_factory=list)

    @property
    def duplicates_possible(self) -> int:
        """Submits of this run that followed one of unknown outcome (may be billed twice)."""
        return self.tally.possible_duplicates


def reason_lines(reasons: Mapping[str, int], examples: list[str]) -> list[str]:
    """Counts by reason, most first, then the first few messages verbatim."""
    ranked = sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))
    lines = [f"{count:>6}  {reason}" for reason, count in ranked]
    if examples:
        lines.append("first reasons:")
        lines += [f"  {example}" for example in examples]
    return lines


def count(n: int, noun: str) -> str:
    """``1 job``, ``2 jobs``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def print_summary(report: RunReport, out: TextIO = sys.stderr) -> None:
    t = report.tally
    rows = [
        ("completed", t.completed),
        ("skipped (done before)", t.skipped),
        ("failed", t.failed),
        ("invalid rows", t.invalid),
        ("unknown outcome", t.unknown),
        ("lost contact (re-attach next run)", t.lost),
        ("left from earlier runs", t.left),
        ("retries", t.retries),
        ("flagged images (safety checker)", t.flagged_images),
    ]
    if t.cached:
        rows.insert(1, ("from the cache ($0)", t.cached))
    width = max(len(name) for name, _ in rows)
    print("", file=out)
    for name, value in rows:
        print(f"  {name.ljust(width)}  {value}", file=out)
    earlier = ""
    if t.earlier_usd:
        earlier = f" ({format_usd(t.earlier_usd)} of it on jobs earlier runs submitted)"
    print(f"  {'spent'.ljust(width)}  {format_usd(t.spent_usd)}{earlier}", file=out)
    if t.rerolls:
        print(
            f"  {'re-rolls of flagged outputs'.ljust(width)}  {t.rerolls} "
            f"({format_usd(t.reroll_usd)} of the spend)",
            file=out,
        )
    if t.possible_duplicates:
        print(
            f"  {'possible duplicate spend'.ljust(width)}  {count(t.possible_duplicates, 'job')} "
            f"resubmitted after an unknown outcome (est. {format_usd(t.possible_duplicate_usd)})",
            file=out,
        )
    if t.reconciled:
        settled = ", ".join(
            f"{n} {how.replace('_', ' ')}" for how, n in sorted(t.reconciled.items())
        )
        print(f"  {'unknown outcomes settled'.ljust(width)}  {settled}", file=out)
    if t.duplicates_found:
        print(
            f"  {'duplicates billed (history)'.ljust(width)}  {t.duplicates_found} requests "
            f"(est. {format_usd(t.duplicates_found_usd)})",
            file=out,
        )
    if t.invalid_reasons:
        print("  invalid rows (fix them; the good rows ran):", file=out)
        for reason in t.invalid_reasons:
            print(f"    {reason}", file=out)
        hidden = t.invalid - len({r.split(": ", 1)[0] for r in t.invalid_reasons})
        if hidden > 0:
            print(f"    ... and {count(hidden, 'more row')} (runner validate lists all)", file=out)
    if t.reasons:
        print("  not completed, by reason:", file=out)
        for line in reason_lines(t.reasons, t.examples):
            print(f"    {line}", file=out)
    for line in report.lines:
        print(f"  {line}", file=out)
    print(f"runner: {report.message} (ledger: {report.run_dir})", file=out)


def summary_json(report: RunReport) -> dict[str, Any]:
    """The end of a run as JSON-ready values: what :func:`print_summary` says, money as strings."""
    t = report.tally
    return {
        "outcomes": {
            "completed": t.completed, "skipped": t.skipped, "failed": t.failed,
            "invalid": t.invalid, "unknown": t.unknown, "lost": t.lost, "left": t.left,
        },
        "retries": t.retries,
        "flagged_images": t.flagged_images,
        "rerolls": {"count": t.rerolls, "usd": usd(t.reroll_usd)},
        "cached": t.cached,
        "total": t.total,
        "spent_usd": usd(t.spent_usd),
        "earlier_usd": usd(t.earlier_usd),
        "estimate_usd": usd(t.estimate_usd),
        "reasons": dict(sorted(t.reasons.items())),
        "examples": list(t.examples),
        "invalid_reasons": list(t.invalid_reasons),
        "possible_duplicates": {"jobs": t.possible_duplicates,
                                "usd": usd(t.possible_duplicate_usd)},
        "reconciled": dict(sorted(t.reconciled.items())),
        "duplicates_found": {"requests": t.duplicates_found, "usd": usd(t.duplicates_found_usd)},
        "notes": list(report.lines),
        "run_dir": str(report.run_dir),
    }  # fmt: skip


def print_summary_json(report: RunReport, out: TextIO = sys.stderr) -> None:
    """``--log-format json``: the summary line, then the exit line."""
    write_event(out, "summary", at=now_iso(), **summary_json(report))
    write_event(out, "exit", at=now_iso(), code=report.exit_code, message=report.message,
                run_dir=str(report.run_dir))  # fmt: skip
