"""Attack review of the packed resume state: many key ranges (past the bound-by-bound
comparison, so each batch is bisected), hex keys packed beside capitalised spellings of the
same values, and uneven ranges, plan every job exactly as the full fold does."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest

from runner.ledger import resumescan
from runner.ledger import resumestate as resumestate_module
from tests.test_ledger_state import random_events, write
from tests.test_resume_state import assert_same_plan, hex_keys


@pytest.mark.parametrize("seed", range(2))
def test_many_bisected_ranges_of_hex_keys_plan_the_same(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(resumestate_module, "PENDING_CHUNK", 3)
    monkeypatch.setattr(resumescan, "_SAMPLE_ROWS", 64)  # few samples: uneven ranges
    monkeypatch.setattr(resumescan, "_COMPARED_BOUNDS", 4)
    events = hex_keys(random_events(random.Random(seed), jobs=400, events=1_000))
    capitals = {e.job_key.upper() for e in events[::9]}
    more = [e for e in events if e.job_key.upper() in capitals and e.job_key.islower()]
    events += [dataclasses.replace(e, job_key=e.job_key.upper()) for e in more]
    write(tmp_path, events, checkpoint_events=151)
    bounds: list[int] = []
    real = resumescan._boundaries

    def noted(snap: Any, ranges: int) -> list[str]:
        found = real(snap, ranges)
        bounds.append(len(found))
        return found

    monkeypatch.setattr(resumescan, "_boundaries", noted)
    for downloads in (True, False):
        assert_same_plan(tmp_path, downloads=downloads, pass_bytes=300)
    assert min(bounds) > 64, bounds
