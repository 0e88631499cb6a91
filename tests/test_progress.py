"""The log line a person reads when stderr is not a terminal."""

from __future__ import annotations

import io
from decimal import Decimal

from runner.execution.progress import Progress, Tally


def test_log_line_counts_rate_eta_and_money() -> None:
    now = [100.0]
    tally = Tally(total=10, estimate_usd=Decimal("0.35"), skipped=2, completed=4, failed=1)
    tally.in_flight, tally.spent_usd = 3, Decimal("0.14")
    progress = Progress(tally, stream=io.StringIO(), quiet=True, clock=lambda: now[0])
    now[0] += 10.0
    line = progress.line()
    assert line.startswith("7/10 done (4 ok, 2 skipped, 1 failed, 0 invalid), 3 in flight, ")
    assert "0.5 jobs/s eta 6s" in line  # 5 finished here in 10 s; 3 left
    assert line.endswith("spent $0.14 of est. $0.35")


def test_jobs_seen_running_are_named_only_when_there_are_some() -> None:
    tally = Tally(total=None, in_flight=4)
    progress = Progress(tally, stream=io.StringIO(), quiet=True, clock=lambda: 1.0)
    assert "4 in flight, " in progress.line() and "seen running" not in progress.line()
    tally.remote_running = 2
    assert "4 in flight (2 seen running), " in progress.line()
    assert progress.line().startswith("0/? done")
