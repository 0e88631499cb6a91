"""Budget: --max-cost caps this invocation, --max-total-cost the run directory's total."""

from __future__ import annotations

import re
from decimal import Decimal as D

import pytest

from runner.execution.budget import Budget


def test_no_cap_admits_everything_and_tracks_reservations() -> None:
    b = Budget(cap_usd=None)
    assert b.admit(D("1.5")) and b.admit(None)
    assert b.reserved_usd == D("1.5")
    b.settle(D("1.5"), D("1.4"))
    assert (b.reserved_usd, b.spent_usd) == (D(0), D("1.4"))
    assert not b.exhausted and b.refused == 0


@pytest.mark.parametrize(
    ("cap", "estimates", "admitted"),
    [
        ("0.10", ["0.035", "0.035", "0.035"], 2),  # the third would make 0.105
        ("0.105", ["0.035", "0.035", "0.035"], 3),  # exactly at the cap is allowed
        ("0", ["0.035"], 0),
        ("1", ["0.5", "0.6", "0.1"], 1),  # once refused, later cheaper jobs are refused too
    ],
)
def test_cap_counts_completed_plus_in_flight(cap: str, estimates: list[str], admitted: int) -> None:
    b = Budget(cap_usd=D(cap))
    results = [b.admit(D(e)) for e in estimates]
    assert sum(results) == admitted
    assert b.committed_usd <= D(cap)
    assert b.exhausted == (admitted < len(estimates))
    assert b.refused == len(estimates) - admitted


# Each case: the caps, prior spend (add_prior), re-attached estimates (reserve_committed),
# then new estimates offered to admit(), and how many of those are admitted.
# (max_cost, max_total_cost, prior, reattached, new, admitted)
CAP_CASES = [
    # --max-cost ignores earlier runs: the second night gets the same allowance.
    ("0.07", None, "100", [], ["0.035", "0.035", "0.035"], 2),
    # ... and re-attached jobs, already paid for by an earlier invocation.
    ("0.07", None, "0", ["0.035", "0.035"], ["0.035", "0.035", "0.035"], 2),
    # --max-total-cost counts prior spend ...
    (None, "0.10", "0.035", [], ["0.035", "0.035", "0.035"], 1),
    # ... and re-attached jobs.
    (None, "0.10", "0", ["0.035", "0.035"], ["0.035", "0.035"], 0),
    (None, "0.105", "0", ["0.035", "0.035"], ["0.035", "0.035"], 1),
    # prior spend alone already past the total: nothing new.
    (None, "1", "1.5", [], ["0.01"], 0),
    # Both caps: the total binds here (0.05 prior leaves room for one) ...
    ("1", "0.09", "0.05", [], ["0.035", "0.035"], 1),
    # ... and --max-cost binds here.
    ("0.035", "10", "5", ["1"], ["0.035", "0.035"], 1),
]


@pytest.mark.parametrize(("cap", "total_cap", "prior", "reattached", "new", "admitted"), CAP_CASES)
def test_each_cap_counts_what_it_promises(
    cap: str | None,
    total_cap: str | None,
    prior: str,
    reattached: list[str],
    new: list[str],
    admitted: int,
) -> None:
    b = Budget(None if cap is None else D(cap), None if total_cap is None else D(total_cap))
    b.add_prior(D(prior))
    for usd in reattached:
        b.reserve_committed(D(usd))
    assert sum(b.admit(D(usd)) for usd in new) == admitted
    assert b.exhausted == (admitted < len(new))
    if cap is not None:
        assert b.run_committed_usd <= D(cap)
    expected_total = D(prior) + sum(map(D, reattached)) + sum(map(D, new[:admitted]))
    assert b.committed_usd == expected_total


def test_reattached_jobs_are_committed_whatever_the_caps() -> None:
    b = Budget(D("0.01"), D("0.01"))
    b.reserve_committed(D("0.035"))
    assert not b.exhausted  # already sent by an earlier run: nothing to refuse
    assert b.committed_usd == D("0.035") and b.run_committed_usd == D(0)
    assert not b.admit(D("0.001"))  # but the total is past its cap now


def test_settling_a_reattached_job_never_frees_room_under_max_cost() -> None:
    b = Budget(D("0.035"))
    b.reserve_committed(D("0.035"))
    assert b.admit(D("0.035"))
    b.settle(D("0.035"), D(0), reattached=True)  # the re-attached one failed unbilled
    assert b.run_committed_usd == D("0.035")  # the new job still holds its reservation
    assert b.committed_usd == D("0.035")
    assert not b.admit(D("0.035"))


def test_settling_a_new_job_frees_only_what_was_not_spent() -> None:
    b = Budget(cap_usd=D("0.07"))
    assert b.admit(D("0.035")) and b.admit(D("0.035"))
    b.settle(D("0.035"), D(0))  # a 5xx failure is not billed
    assert b.committed_usd == D("0.035")
    assert b.admit(D("0.035"))


def test_reattached_spend_counts_toward_the_total_once_settled() -> None:
    b = Budget(None, D("0.07"))
    b.reserve_committed(D("0.035"))
    b.settle(D("0.035"), D("0.035"), reattached=True)
    assert (b.spent_usd, b.reserved_usd) == (D("0.035"), D(0))
    assert b.admit(D("0.035"))
    assert not b.admit(D("0.035"))


@pytest.mark.parametrize(
    ("cap", "total_cap", "flags"),
    [
        ("10", None, "under --max-cost"),
        (None, "10", "under --max-total-cost"),
        ("10", "10", "under --max-cost and --max-total-cost"),
    ],
)
def test_unknown_cost_is_refused_under_any_cap(
    cap: str | None, total_cap: str | None, flags: str
) -> None:
    b = Budget(None if cap is None else D(cap), None if total_cap is None else D(total_cap))
    assert not b.admit(None)
    assert b.reason == f"a job of unknown cost cannot be admitted {flags}"
    assert not b.admit(D("0.01"))  # once refused, refuse all after
    assert b.refused == 2


# (max_cost, max_total_cost, prior, admitted before, next job, reason)
MESSAGES = [
    ("10", None, "0", ["9.975"], "0.035",
     "the next job ($0.035) would exceed --max-cost $10.00 (committed in this run: $9.975)"),
    (None, "10", "9.9", ["0.075"], "0.035",
     "the next job ($0.035) would exceed --max-total-cost $10.00 "
     "(committed in total, earlier runs included: $9.975)"),
    # sums of Decimals with more places still render to 1/100 of a cent
    ("0.1", None, "0", ["0.0315", "0.0315", "0.0315"], "0.0315",
     "the next job ($0.0315) would exceed --max-cost $0.10 (committed in this run: $0.0945)"),
    # both caps set: the one that is exceeded is named
    ("10", "10", "5", ["4.975"], "0.035",
     "the next job ($0.035) would exceed --max-total-cost $10.00 "
     "(committed in total, earlier runs included: $9.975)"),
]  # fmt: skip


@pytest.mark.parametrize(("cap", "total_cap", "prior", "before", "job", "reason"), MESSAGES)
def test_refusal_says_would_exceed_in_dollars(
    cap: str | None, total_cap: str | None, prior: str, before: list[str], job: str, reason: str
) -> None:
    b = Budget(None if cap is None else D(cap), None if total_cap is None else D(total_cap))
    b.add_prior(D(prior))
    assert all(b.admit(D(usd)) for usd in before)
    assert not b.admit(D(job))
    assert b.reason == reason


def test_refusal_never_shows_decimals_raw_form() -> None:
    b = Budget(D("10.000000000000000000"))
    assert b.admit(D("9.975000000000000000"))
    assert not b.admit(D("0.035000000000000000"))
    assert b.reason is not None
    assert "000000" not in b.reason and not re.search(r"\dE[+-]?\d", b.reason)
    assert "$9.975" in b.reason and "would exceed" in b.reason
