"""Reconcile, don't resubmit: fal's request history settles unknown outcomes exactly and
recovers results the queue no longer has; the account's own prices win."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from runner.config import build_config
from runner.emulator import parse_faults
from runner.endpoints.cost import ACCOUNT_PRICE_SOURCE
from runner.errors import EXIT_BUDGET, EXIT_OK, UsageError
from runner.execution.reconcile import Absent, Adopt, Intent, matches, settle_from
from runner.fal.history import HistoryItem
from runner.ledger import status_summary
from runner.ledger.schema import JobState, payload_fingerprint
from runner.ledger.state import LedgerState
from tests.scenario import emulator, manifest, run, run_config
from tests.torture_support import left_submitting, manifest_jobs

pytestmark = pytest.mark.anyio

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
SENT = {"prompt": "a red chair", "seed": 1}
SHA = payload_fingerprint(SENT)


def item(request_id: str, json_input: Any, at_s: float = 0.0) -> HistoryItem:
    return HistoryItem(
        request_id=request_id, endpoint_id="fal-ai/flux-lora",
        sent_at=T0 + timedelta(seconds=at_s), json_input=json_input,
    )  # fmt: skip


INTENT = Intent("fal-ai/flux-lora", T0, T0 + timedelta(seconds=1), SHA)


# --- the pure decision -----------------------------------------------------------------


def test_a_match_is_the_same_canonical_json_whatever_the_key_order() -> None:
    reordered = {"seed": 1, "prompt": "a red chair"}
    other = {"prompt": "a red chair", "seed": 2}
    found = matches([item("a", other), item("b", reordered), item("c", None)], SHA)
    assert [i.request_id for i in found] == ["b"]


SETTLE_CASES = [
    # id, history, seconds after the intent, expected
    ("one match adopts it", [item("r1", SENT)], 0.5, Adopt(item("r1", SENT))),
    ("several: the earliest, the others billed", [item("r2", SENT, 2), item("r1", SENT, 1)],
     0.5, Adopt(item("r1", SENT, 1), ("r2",))),
    ("none yet, inside the settle delay", [item("x", {"prompt": "other"})], 10.0, None),
    ("none after the settle delay: never accepted", [], 61.5, Absent()),
    ("a payload-less item never matches", [item("r1", None)], 61.5, Absent()),
]  # fmt: skip


@pytest.mark.parametrize(("items", "after_s", "expected"), [c[1:] for c in SETTLE_CASES],
                         ids=[c[0] for c in SETTLE_CASES])  # fmt: skip
def test_settle_from(items: list[HistoryItem], after_s: float, expected: object) -> None:
    now = T0 + timedelta(seconds=after_s)
    assert settle_from(items, INTENT, now, settle_s=60.0) == expected


def test_no_store_io_cannot_be_combined_with_reconcile(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--no-store-io"):
        run_config(manifest(tmp_path, 1), tmp_path / "run", store_io=False)
    config = run_config(manifest(tmp_path, 1), tmp_path / "r", store_io=False, on_unknown="skip")
    assert config.submit_headers["X-Fal-Store-IO"] == "0"


def test_a_local_queue_brings_storage_and_the_platform_api_with_it(tmp_path: Path) -> None:
    base = {"manifest": manifest(tmp_path, 1), "run_dir": tmp_path / "run"}
    config = build_config({**base, "queue_url": "http://127.0.0.1:9/"})
    assert (config.rest_url, config.cdn_url, config.api_url) == (
        "http://127.0.0.1:9/rest", "http://127.0.0.1:9/cdn", "http://127.0.0.1:9/api",
    )  # fmt: skip
    given = build_config({**base, "queue_url": "http://localhost:9", "api_url": "http://a"})
    assert given.api_url == "http://a" and given.rest_url == "http://localhost:9/rest"
    remote = build_config({**base, "queue_url": "https://q.example"})
    assert (remote.api_url, remote.rest_url) == ("https://api.fal.ai", "https://rest.fal.ai")


# --- against the emulator ---------------------------------------------------------------


async def test_answers_lost_after_accept_are_adopted_from_the_history_not_paid_twice(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 10)
    run_dir = tmp_path / "run"
    faults = parse_faults("reset_after_accept=@2+5,timeout_after_accept=@7,timeout_hang_s=1")
    async with emulator(faults=faults) as emu:
        report = await run(emu, run_config(path, run_dir))
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK and report.tally.completed == 10
    assert report.tally.reconciled == {"adopted": 3}
    assert stats["submits"]["accepted"] == 10 and stats["submits"]["duplicates"] == 0
    rows = LedgerState.load(run_dir).jobs.select(["reconciled", "possible_duplicate"])
    assert sorted(r["reconciled"] or "" for r in rows.to_pylist()).count("adopted") == 3
    assert not any(r["possible_duplicate"] for r in rows.to_pylist())
    summary = status_summary(run_dir)
    assert summary.possible_duplicates == 0 and summary.reconciled == {"adopted": 3}


async def test_a_rerun_settles_what_a_crash_left_unknown(tmp_path: Path) -> None:
    """The first run leaves unknown outcomes (as a kill between POST and commit would);
    the rerun finds them in fal's history and re-attaches: nothing is sent twice."""
    path = manifest(tmp_path, 6)
    run_dir = tmp_path / "run"
    async with emulator(faults=parse_faults("reset_after_accept=@1+4")) as emu:
        first = await run(emu, run_config(path, run_dir, on_unknown="skip"))
        assert first.tally.unknown == 2
        again = await run(emu, run_config(path, run_dir))
        stats = emu.snapshot()
    assert again.exit_code == EXIT_OK and again.tally.reconciled == {"adopted": 2}
    assert stats["submits"]["accepted"] == 6 and stats["submits"]["duplicates"] == 0


async def test_a_retry_in_a_later_run_never_adopts_an_earlier_attempts_request(
    tmp_path: Path,
) -> None:
    """Attempt 1 is accepted and fails for free (the first run stops there); the next run's
    retry is accepted but its answer is lost. fal's history lists both under the same
    payload: the retry's own request is adopted, not attempt 1's failed one (which would
    fail the job again, send a third submit and pay twice). Seen in the torture chain."""
    path = manifest(tmp_path, 1)
    run_dir = tmp_path / "run"
    faults = parse_faults("fail_runner_disconnected=@1,reset_after_accept=@2")
    async with emulator(faults=faults) as emu:
        first = await run(emu, run_config(path, run_dir, max_attempts=1))
        assert first.tally.failed == 1
        again = await run(emu, run_config(path, run_dir))
        stats = emu.snapshot()
    assert again.exit_code == EXIT_OK and again.tally.reconciled == {"adopted": 1}
    assert stats["submits"]["accepted"] == 2
    billed = sum(b["images"] for b in stats["billing"].values())
    assert billed == 1
    summary = status_summary(run_dir)
    assert summary.duplicates_found == 0 and summary.possible_duplicates == 0


async def test_an_intent_never_sent_is_resubmitted_safely_after_the_settle_delay(
    tmp_path: Path,
) -> None:
    """A kill right after the intent's commit, before the POST: the history has nothing, so
    once the settle delay has passed the job is sent again, and not as a duplicate."""
    path = manifest(tmp_path, 3)
    run_dir = tmp_path / "run"
    job = next(iter(manifest_jobs(path).values()))
    left_submitting(run_dir, job)
    async with emulator() as emu:
        report = await run(emu, run_config(path, run_dir, reconcile_after_s=1.0))
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK and report.tally.reconciled == {"resubmitted_safe": 1}
    assert report.tally.possible_duplicates == 0
    assert stats["submits"]["accepted"] == 3 and stats["submits"]["duplicates"] == 0
    record = LedgerState.load(run_dir).get(job.job_key)
    assert record is not None and record.reconciled == "resubmitted_safe"
    assert not record.possible_duplicate


async def test_a_budget_stop_still_settles_what_earlier_runs_left_unknown(
    tmp_path: Path,
) -> None:
    """The rerun's budget is reached at its first new row, before admission reaches the
    job a crash left unknown (accepted and billed by fal). Admission goes on for that job
    alone: fal's history shows it, so it is followed to completion; nothing new is sent.
    It used to stay unsettled, billed on fal but not on the ledger (seen with shards)."""
    path = manifest(tmp_path, 3)
    run_dir = tmp_path / "run"
    async with emulator(faults=parse_faults("reset_after_accept=@3")) as emu:
        first = await run(emu, run_config(path, run_dir, on_unknown="skip", concurrency=1))
        assert first.tally.unknown == 1 and first.tally.completed == 2
        # New rows ahead of the old ones, and a cap below one job.
        rows = path.read_text().splitlines()
        new = [f"n{i},fal-ai/flux-lora,new prompt {i},square,{i}" for i in range(3)]
        path.write_text("\n".join([rows[0], *new, *rows[1:]]) + "\n")
        again = await run(emu, run_config(path, run_dir, max_cost_usd=Decimal("0.01")))
        stats = emu.snapshot()
    assert again.exit_code == EXIT_BUDGET, again.message
    assert again.tally.reconciled == {"adopted": 1} and again.tally.completed == 1
    # Its cost is this run's spend, all of it on a job an earlier run submitted.
    assert again.tally.spent_usd == again.tally.earlier_usd == Decimal("0.035")
    assert stats["submits"]["accepted"] == 3 and stats["submits"]["duplicates"] == 0
    billed = sum(b["images"] for b in stats["billing"].values())
    summary = status_summary(run_dir)
    assert summary.by_state == {JobState.COMPLETED: 3}
    assert billed == 3 and summary.spent_usd == 3 * Decimal("0.035")


async def test_after_a_budget_stop_an_intent_not_in_the_history_is_left_unsent(
    tmp_path: Path,
) -> None:
    """Settling after the budget is reached never sends: an intent fal's history does not
    show stays as it was, for a rerun with budget to send."""
    path = manifest(tmp_path, 2)
    run_dir = tmp_path / "run"
    job = list(manifest_jobs(path).values())[1]
    left_submitting(run_dir, job)
    async with emulator() as emu:
        config = run_config(path, run_dir, reconcile_after_s=1.0, max_cost_usd=Decimal("0.01"))
        report = await run(emu, config)
        stats = emu.snapshot()
    assert report.exit_code == EXIT_BUDGET, report.message
    assert stats["submits"]["accepted"] == 0
    assert report.tally.left == 1 and not report.tally.reconciled
    record = LedgerState.load(run_dir).get(job.job_key)
    assert record is not None and record.state is JobState.SUBMITTING


async def test_a_request_listed_late_is_still_found_within_the_settle_delay(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 4)
    # Listed 20 emulated seconds (0.1 s here) after it was sent; the delay covers that.
    faults = parse_faults("reset_after_accept=@2,history_delay_s=20")
    async with emulator(faults=faults) as emu:
        report = await run(emu, run_config(path, tmp_path / "run", reconcile_after_s=2.0))
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK and report.tally.reconciled == {"adopted": 1}
    assert stats["submits"]["duplicates"] == 0


async def test_unordered_paged_history_is_read_whole(tmp_path: Path) -> None:
    path = manifest(tmp_path, 12)
    faults = parse_faults("reset_after_accept=@11,history_unordered=1,history_page_limit=2")
    async with emulator(faults=faults) as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
        stats = emu.snapshot()
    assert report.tally.reconciled == {"adopted": 1}
    assert stats["submits"]["duplicates"] == 0


async def test_without_the_history_the_run_says_so_and_records_possible_duplicates(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 6)
    run_dir = tmp_path / "run"
    faults = parse_faults("reset_after_accept=@1+3,history_unavailable=1")
    async with emulator(faults=faults) as emu:
        report = await run(emu, run_config(path, run_dir))
        billed_twice = emu.snapshot()["submits"]["duplicates"]
    assert report.exit_code == EXIT_OK
    assert report.tally.reconciled == {"history_unavailable": 2}
    assert report.tally.possible_duplicates == 2 == billed_twice
    summary = status_summary(run_dir)
    assert summary.possible_duplicates == 2 and summary.reconciled == {"history_unavailable": 2}


async def test_a_result_gone_from_the_queue_is_recovered_from_the_history(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 3)
    async with emulator(faults=parse_faults("result_retention_s=0")) as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
    assert report.exit_code == EXIT_OK and report.tally.completed == 3
    rows = LedgerState.load(tmp_path / "run").jobs.to_pylist()
    assert all(r["outputs"] and r["outputs"][0]["local_path"] for r in rows)


async def test_the_accounts_own_prices_win_and_each_job_records_its_source(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 2)
    prices = {"fal-ai/flux-lora": Decimal("0.02")}
    async with emulator(account_prices=prices) as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
    assert report.exit_code == EXIT_OK
    rows = LedgerState.load(tmp_path / "run").jobs.to_pylist()
    assert {r["price_source"] for r in rows} == {ACCOUNT_PRICE_SOURCE}
    assert {r["estimated_usd"] for r in rows} == {Decimal("0.02")}


async def test_an_account_price_finer_than_the_ledger_keeps_is_said_and_not_used(
    tmp_path: Path,
) -> None:
    """fal's price is a JSON number: one of 22 places would have stopped the run with a
    traceback at the first job's estimate."""
    from pydantic import SecretStr

    from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, serve
    from runner.execution.prices import plan_prices

    fine = Decimal("0.0200000000000000000001")
    path = manifest(tmp_path, 2)
    async with emulator(account_prices={"fal-ai/flux-lora": fine}) as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
    assert report.exit_code == EXIT_OK and report.tally.completed == 2
    rows = LedgerState.load(tmp_path / "run").jobs.to_pylist()
    assert {r["estimated_usd"] for r in rows} == {Decimal("0.035")}
    assert all(r["price_source"] != ACCOUNT_PRICE_SOURCE for r in rows)

    said: list[str] = []
    prices = {"fal-ai/flux-lora": fine, "fal-ai/flux-kontext/dev": Decimal("0.03")}
    async with serve(Emulator(EmulatorConfig(account_prices=prices))) as served:
        table = await plan_prices(
            served.base_url + "/api", SecretStr(DEFAULT_KEY), None, said.append
        )
    assert said == [
        f"the account's price for fal-ai/flux-lora ({fine}) has more decimal places than the "
        "ledger keeps (18): using the built-in price"
    ]
    kept, other = table.get("fal-ai/flux-lora"), table.get("fal-ai/flux-kontext/dev")
    assert kept is not None and kept.usd == Decimal("0.035")
    assert other is not None and other.usd == Decimal("0.03")  # the others still the account's
    assert other.source == ACCOUNT_PRICE_SOURCE


async def test_without_access_to_prices_the_built_in_table_is_used(tmp_path: Path) -> None:
    path = manifest(tmp_path, 2)
    async with emulator(faults=parse_faults("history_unavailable=1")) as emu:
        report = await run(emu, run_config(path, tmp_path / "run"))
    assert report.exit_code == EXIT_OK
    rows = LedgerState.load(tmp_path / "run").jobs.to_pylist()
    assert {r["estimated_usd"] for r in rows} == {Decimal("0.035")}
    assert all(r["price_source"] != ACCOUNT_PRICE_SOURCE for r in rows)


async def test_plan_prices_with_the_accounts_own_prices_when_a_key_is_set() -> None:
    from pydantic import SecretStr

    from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, serve
    from runner.execution.prices import plan_prices

    said: list[str] = []
    emu = Emulator(EmulatorConfig(account_prices={"fal-ai/flux-lora": Decimal("0.02")}))
    async with serve(emu) as served:
        api = served.base_url + "/api"
        table = await plan_prices(api, SecretStr(DEFAULT_KEY), None, said.append)
        refused = await plan_prices(api, SecretStr("emulator:wrong"), None, said.append)
        keyless = await plan_prices(api, None, None, said.append)
    price = table.get("fal-ai/flux-lora")
    assert price is not None and price.usd == Decimal("0.02")
    assert price.source == ACCOUNT_PRICE_SOURCE
    for fallback in (refused, keyless):
        builtin = fallback.get("fal-ai/flux-lora")
        assert builtin is not None and builtin.source != ACCOUNT_PRICE_SOURCE
    assert len(said) == 1 and "built-in table" in said[0]  # the refused key, said once


def test_a_request_the_job_already_followed_is_not_this_submit() -> None:
    """A retry sends the same JSON: the earlier attempt's request is in the history too."""
    earlier, this = item("r-old", SENT, 0.1), item("r-new", SENT, 0.6)
    intent = Intent(INTENT.endpoint, INTENT.first_at, INTENT.last_at, SHA, frozenset({"r-old"}))
    assert settle_from([earlier, this], intent, T0, settle_s=60.0) == Adopt(this)
    gone = settle_from([earlier], intent, T0 + timedelta(seconds=90), settle_s=60.0)
    assert gone == Absent()
