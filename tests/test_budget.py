from decimal import Decimal as D

import pytest

from runner.run.budget import Budget


def test_no_cap_admits_everything_and_tracks_reservations() -> None:
    b = Budget(cap_usd=None)
    assert b.admit(D("1.5")) and b.admit(None)
    assert b.reserved_usd == D("1.5")
    b.settle(D("1.5"), D("1.4"))
    assert (b.reserved_usd, b.spent_usd) == (D(0), D("1.4"))


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


def test_unknown_cost_is_refused_under_a_cap() -> None:
    b = Budget(cap_usd=D(10))
    assert not b.admit(None)
    assert b.reason is not None and "unknown cost" in b.reason


def test_settling_frees_room_only_for_what_was_not_spent() -> None:
    b = Budget(cap_usd=D("0.07"))
    assert b.admit(D("0.035")) and b.admit(D("0.035"))
    b.settle(D("0.035"), D(0))  # a 5xx failure is not billed
    assert b.committed_usd == D("0.035")
    assert b.admit(D("0.035"))


def test_prior_spend_counts_against_the_cap() -> None:
    b = Budget(cap_usd=D("0.05"))
    b.add_prior(D("0.035"))
    assert not b.admit(D("0.035"))
