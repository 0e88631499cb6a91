"""What a person watching a run sees: a tqdm bar on a terminal, periodic log lines otherwise.

The engine owns a :class:`Tally` and calls :meth:`Progress.refresh` when it changes; the
display decides how often to draw. ``--quiet`` or a stderr that is not a terminal gives one
log line every ``interval_s`` instead of a bar. ``--log-format json`` gives JSON lines
instead (:mod:`runner.execution.events`): progress, messages and each job that did not
complete, as the tally records it.

Both take the run's redaction function (``redact=``, :meth:`runner.config.RunConfig.redactor`):
every message :meth:`Progress.say` prints, and every example a :class:`Tally` keeps for the
summary, passes it first.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Literal, TextIO

from runner.endpoints.money import format_usd
from runner.execution.events import now_iso, usd, write_event

if TYPE_CHECKING:  # the bar is drawn on a terminal only: tqdm loads then
    from tqdm import tqdm

LogFormat = Literal["text", "json"]
# Told of each job that did not complete: (reason, row id or None, message), unredacted.
NoteListener = Callable[[str, str | None, str], None]


@dataclass(slots=True)
class Tally:
    """Counts of a run, by what happened to each job in *this* run.

    ``reasons`` counts every job that did not complete by why (an error type, or
    ``left_failed`` and the like for jobs an earlier run left that this run does not
    retry); ``examples`` keeps the first few messages verbatim for the summary.
    """

    total: int | None = None  # jobs in the manifest, once counted
    estimate_usd: Decimal | None = None  # the plan's total, once counted
    skipped: int = 0  # already completed in an earlier run
    completed: int = 0
    failed: int = 0
    invalid: int = 0
    unknown: int = 0
    lost: int = 0  # lost contact; re-attached by the next run
    left: int = 0  # an earlier run's failure, cancel or unknown outcome, not retried now
    in_flight: int = 0
    remote_queued: int = 0
    remote_running: int = 0
    spent_usd: Decimal = Decimal(0)
    # Of it, on jobs earlier runs submitted (re-attached or settled): outside --max-cost.
    earlier_usd: Decimal = Decimal(0)
    retries: int = 0
    # fal's safety checker: flagged images kept (or failed) at the end of their job, the
    # flagged outputs re-rolled and what those discarded attempts cost (runner.execution.flagged).
    flagged_images: int = 0
    rerolls: int = 0
    reroll_usd: Decimal = Decimal(0)
    cached: int = 0  # completed from the cross-run cache (--cache), at $0
    possible_duplicates: int = 0  # submits after an unknown outcome (may be billed twice)
    possible_duplicate_usd: Decimal = Decimal(0)
    # How fal's history settled unknown outcomes: adopted, resubmitted_safe,
    # history_unavailable; and the other billed requests it showed.
    reconciled: Counter[str] = field(default_factory=Counter)
    duplicates_found: int = 0
    duplicates_found_usd: Decimal = Decimal(0)
    by_state: dict[str, int] = field(default_factory=dict)
    reasons: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    # Every invalid row's reasons, as `validate` prints them: the first 20, then a count.
    invalid_reasons: list[str] = field(default_factory=list)
    max_invalid_shown: int = 20
    max_examples: int = 5
    # Applied to each example before it is kept: the summary prints them.
    redact: Callable[[str], str] | None = field(default=None, repr=False, compare=False)
    listener: NoteListener | None = field(default=None, repr=False, compare=False)

    @property
    def finished(self) -> int:
        return self.skipped + self.completed + self.failed + self.invalid + self.unknown + self.left

    @property
    def not_completed(self) -> int:
        """Jobs of the manifest seen by this run that are not completed at its end."""
        return self.failed + self.invalid + self.unknown + self.lost + self.left

    def note(self, reason: str, example: str) -> None:
        """One more job that did not complete, and why.

        ``example`` reads ``"<row id>: <message>"``, as every caller writes it.
        """
        row_id, sep, message = example.partition(": ")
        self._count(reason, example, row_id if sep else None, message if sep else example)

    def _count(self, reason: str, example: str, row_id: str | None, message: str) -> None:
        if self.listener is not None:
            self.listener(reason, row_id, message)
        self.reasons[reason] += 1
        if len(self.examples) < self.max_examples:
            # Redacted before it is cut: a cut could leave a piece of the key unrecognised.
            kept = example if self.redact is None else self.redact(example)
            self.examples.append(kept[:300])

    def bad_row(self, problems: list[str]) -> None:
        """An invalid row: counted, and its reasons kept (the first ``max_invalid_shown``)."""
        self.invalid += 1
        first = problems[0] if problems else "invalid row"
        # ``file:line: message``: no row id to split off.
        self._count("invalid_row", first, None, first)
        for problem in problems:
            if len(self.invalid_reasons) >= self.max_invalid_shown:
                break
            self.invalid_reasons.append(problem if self.redact is None else self.redact(problem))

    def fail(self, reason: str, example: str) -> None:
        self.failed += 1
        self.note(reason, example)


class Progress:
    """A bar or log lines, drawn at most every ``interval_s`` (bar: tqdm's own pacing)."""

    def __init__(
        self,
        tally: Tally,
        *,
        stream: TextIO | None = None,
        quiet: bool = False,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        redact: Callable[[str], str] | None = None,
        log_format: LogFormat = "text",
    ) -> None:
        self.tally = tally
        self._redact = redact
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.interval_s = interval_s
        self.started_s = clock()
        self._last_line_s = self.started_s
        self._json = log_format == "json"
        if self._json:
            tally.listener = self._failure
            self._last_line_s = float("-inf")  # a watcher sees the first counts at once
        use_bar = not quiet and not self._json and self.stream.isatty()
        self._bar: tqdm[int] | None = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(
                total=tally.total, file=self.stream, unit="job", dynamic_ncols=True, smoothing=0.1
            )

    def line(self) -> str:
        t = self.tally
        elapsed = max(self.clock() - self.started_s, 1e-9)
        rate = (t.completed + t.failed) / elapsed
        total = "?" if t.total is None else str(t.total)
        eta = ""
        if t.total is not None and rate > 0:
            eta = f" eta {max(t.total - t.finished, 0) / rate:.0f}s"
        # Result-first looks rarely see a job running, so "(0 seen running)" would say nothing.
        running = f" ({t.remote_running} seen running)" if t.remote_running else ""
        return (
            f"{t.finished}/{total} done ({t.completed} ok, {t.skipped} skipped, {t.failed} failed"
            f", {t.invalid} invalid), {t.in_flight} in flight{running}, "
            f"{rate:.1f} jobs/s{eta}, "
            f"spent {format_usd(t.spent_usd)} of est. {format_usd(t.estimate_usd)}"
        )

    def due(self) -> bool:
        """Whether :meth:`refresh` would draw now (a caller summing a tally may skip it)."""
        return self._bar is not None or self.clock() - self._last_line_s >= self.interval_s

    def refresh(self) -> None:
        t = self.tally
        if self._bar is not None:
            if t.total is not None and self._bar.total != t.total:
                self._bar.total = t.total
            self._bar.n = t.finished
            self._bar.set_postfix_str(
                f"ok={t.completed} fail={t.failed} inflight={t.in_flight} "
                f"{format_usd(t.spent_usd)}/{format_usd(t.estimate_usd)}",
                refresh=False,
            )
            self._bar.refresh()
            return
        now = self.clock()
        if now - self._last_line_s >= self.interval_s:
            self._last_line_s = now
            if self._json:
                self._progress_event()
            else:
                self.say(self.line())

    def _progress_event(self) -> None:
        t = self.tally
        write_event(
            self.stream, "progress", at=now_iso(), done=t.finished, completed=t.completed,
            skipped=t.skipped, failed=t.failed, invalid=t.invalid, in_flight=t.in_flight,
            total=t.total, spent_usd=usd(t.spent_usd), estimate_usd=usd(t.estimate_usd),
            elapsed_s=round(self.clock() - self.started_s, 3),
        )  # fmt: skip

    def _failure(self, reason: str, row_id: str | None, message: str) -> None:
        write_event(
            self.stream, "failure", at=now_iso(), row_id=self._clean(row_id),
            reason=reason, message=self._clean(message),
        )  # fmt: skip

    def _clean(self, text: str | None) -> str | None:
        return text if text is None or self._redact is None else self._redact(text)

    def say(self, message: str) -> None:
        """A message that must be seen (interrupts, budget), above the bar if there is one.

        Every log line goes through here, so the redaction function is applied here once.
        """
        if self._redact is not None:
            message = self._redact(message)
        if self._json:
            write_event(self.stream, "message", at=now_iso(), text=message)
        elif self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(f"runner: {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._json:
            self._progress_event()  # the last counts, before the summary
        if self._bar is not None:
            self._bar.n = self.tally.finished
            self._bar.close()
            self._bar = None
