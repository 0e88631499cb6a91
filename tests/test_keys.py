"""--keys-file: keys checked and never shown, each shard pinned to one, each key held to its
own limits (runner.scale.keys, runner.scale.shards)."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import httpx
import pytest

from runner.errors import AuthError, UsageError
from runner.execution.engine import Hooks
from runner.fal.key import fingerprint
from runner.ledger.inflight import in_flight_count
from runner.ledger.meta import read_run_meta, write_run_meta
from runner.ledger.schema import JobState, LedgerEvent, utcnow
from runner.ledger.store import Ledger
from runner.scale.cancel import cancel_sharded
from runner.scale.keys import KeySpec, key_for_shard, load_keys, parse_keys
from runner.scale.layout import shard_dir
from runner.scale.shards import execute_sharded, prepare
from tests.accounts_support import Accounts
from tests.scenario import FAST_POLICIES, manifest, run_config

pytestmark = pytest.mark.anyio

KEY_A = "alpha-key-id-0001:aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
KEY_B = "bravo-key-id-0002:bbbbbbbbbbbbbbbbbbbbbbbbbbbb"


def test_keys_file_lines_with_settings_and_comments() -> None:
    specs = parse_keys(f"# two accounts\n{KEY_A} concurrency=8\n\n{KEY_B} rate=2.5 concurrency=3\n")
    assert [(s.concurrency, s.rate_per_s) for s in specs] == [(8, None), (3, 2.5)]
    assert specs[0].fingerprint == fingerprint(KEY_A)
    assert KEY_A not in repr(specs) and "aaaaaaaaaa" not in repr(specs)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        (f"{KEY_A}\n{KEY_A} concurrency=2\n", "line 2: the same key is listed twice"),
        (f"{KEY_A} {KEY_B}\n", "line 1: after the key, expected settings"),
        (f"{KEY_A} concurrency=zero\n", "line 1: concurrency must be a number"),
        (f"{KEY_A} concurrency=0\n", "line 1: concurrency must be positive"),
        (f"{KEY_A} rate=nan\n", "line 1: rate must be positive"),  # was a ValueError later
        ("a:b:c\n", "line 1 has a colon but is not of the form id:secret"),
        # Lines for a shell or a .env file: refused, not taken as the key "FAL_KEY=alpha..."
        (f"FAL_KEY={KEY_A}\n", "line 1 looks like a variable assignment"),
        (f"# keys\nexport FAL_KEY={KEY_A}\n", "line 2 looks like a variable assignment"),
        (f'FAL_KEY="{KEY_A}" concurrency=2\n', "line 1 looks like a variable assignment"),
        (f'"{KEY_A}"\n', "line 1: the key is in quotes"),
        (f"'{KEY_A}' rate=2\n", "line 1: the key is in quotes"),
    ],
)
def test_a_bad_keys_file_names_the_line_never_the_key(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message) as caught:
        parse_keys(text, source="keys.txt")
    for secret in (KEY_A, KEY_B, "aaaaaaaaaaaa", "bbbbbbbbbbbb"):
        assert secret not in str(caught.value)


def test_a_keys_file_saved_with_a_bom_and_crlf_loads(tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_bytes(f"\ufeff{KEY_A} concurrency=1\r\n{KEY_B}\r\n".encode())
    specs = load_keys(path)
    assert [s.fingerprint for s in specs] == [fingerprint(KEY_A), fingerprint(KEY_B)]


def test_a_shard_keeps_the_key_its_ledger_recorded() -> None:
    a, b = parse_keys(f"{KEY_A}\n{KEY_B}\n")
    assert key_for_shard(0, [a, b], {}) == a
    assert key_for_shard(1, [a, b], {}) == b
    assert key_for_shard(0, [a, b], {0: b.fingerprint}) == b
    with pytest.raises(UsageError, match=f"shard 0 was submitted with key {a.fingerprint}"):
        key_for_shard(0, [b], {0: a.fingerprint})


def test_a_key_spec_repr_hides_the_key() -> None:
    spec = KeySpec.of(parse_keys(KEY_A)[0].key, concurrency=2)
    assert "alpha" not in repr(spec) and spec.fingerprint in repr(spec)


async def test_two_keys_each_held_to_their_own_limit(tmp_path: Path) -> None:
    path = manifest(tmp_path, 48)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_A} concurrency=1\n{KEY_B} concurrency=3\n")
    run_dir = tmp_path / "run"
    config = run_config(path, run_dir, shards=4, keys_file=keys, download=False, key=None)
    accounts = Accounts({KEY_A: 1, KEY_B: 3}, time_scale=0.01)
    hooks = Hooks(
        transport=httpx.ASGITransport(app=accounts.app), stream=io.StringIO(),
        handle_signals=False, policies=FAST_POLICIES,
    )  # fmt: skip
    async with accounts.running():
        report = await execute_sharded(config, hooks=hooks)
        specs = parse_keys(keys.read_text())
        # Nothing is left in flight: no key is needed, not even key A's (test_cancel has
        # a shard whose key is missing while its jobs are in flight).
        without_a = await cancel_sharded(run_dir, queue_url="http://emulator", keys=specs[1:],
                                         transport=hooks.transport)  # fmt: skip
        assert (without_a.in_flight, without_a.failed, without_a.errors) == (0, 0, [])
        cancelled = await cancel_sharded(
            run_dir, queue_url="http://emulator", keys=specs[::-1], transport=hooks.transport
        )
    assert (cancelled.cancelled, cancelled.not_found, cancelled.errors) == (0, 0, [])
    assert report.exit_code == 0, report.message
    a, b = accounts.by_key[KEY_A].stats, accounts.by_key[KEY_B].stats
    assert a.duplicates == b.duplicates == 0
    assert sum(a.endings.values()) + sum(b.endings.values()) == 48
    # Each key's window is 3 x its own slots (polling), shared by its two shards.
    assert 0 < a.peak_outstanding <= 3
    assert 0 < b.peak_outstanding <= 9
    for k, key in enumerate([KEY_A, KEY_B, KEY_A, KEY_B]):
        meta = read_run_meta(shard_dir(run_dir, k))
        assert meta is not None and meta["key_fingerprint"] == fingerprint(key)
    for file in run_dir.rglob("*"):
        if file.is_file():
            data = file.read_bytes()
            assert b"aaaaaaaaaaaa" not in data and b"bbbbbbbbbbbb" not in data, file


async def test_a_refused_key_from_a_keys_file_is_named_by_its_line_never_as_fal_key(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 4)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# two keys, the second unknown to the account\n{KEY_A}\n{KEY_B}\n")
    config = run_config(path, tmp_path / "run", shards=2, keys_file=keys, download=False,
                        key=None)  # fmt: skip
    accounts = Accounts({KEY_A: 1}, time_scale=0.01)  # KEY_B: 401
    hooks = Hooks(
        transport=httpx.ASGITransport(app=accounts.app), stream=io.StringIO(),
        handle_signals=False, policies=FAST_POLICIES,
    )  # fmt: skip
    async with accounts.running():
        with pytest.raises(BaseExceptionGroup) as caught:
            await execute_sharded(config, hooks=hooks)
    refused = caught.value.subgroup(AuthError)
    assert refused is not None
    message = str(_leaves(refused)[0])
    assert f"(check the key on {keys} line 3, {fingerprint(KEY_B)})" in message, message
    assert "FAL_KEY" not in message
    assert "bbbbbbbbbbbb" not in message and "bravo-key" not in message


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    return [
        leaf
        for exc in group.exceptions
        for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]


def _record(directory: Path, key: str, state: JobState) -> None:
    """A shard's ledger with one job in ``state``, and run.json naming ``key``'s fingerprint."""
    with Ledger.open(directory) as ledger:
        rid = None if state in (JobState.SUBMITTING, JobState.UNKNOWN) else "r"
        ledger.append(LedgerEvent(job_key="j", state=state, at=utcnow(), endpoint="fal-ai/x",
                                  request_id=rid))  # fmt: skip
        ledger.commit_sync()
    write_run_meta(directory, {"key_fingerprint": fingerprint(key)})


@pytest.mark.parametrize("state", [JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED])
def test_a_rerun_without_a_recorded_key_goes_on_when_nothing_of_it_is_in_flight(
    tmp_path: Path, state: JobState
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_B}\n")
    config = run_config(manifest(tmp_path, 2), tmp_path / "run", shards=2, keys_file=keys,
                        key=None)  # fmt: skip
    _record(shard_dir(config.run_dir, 0), KEY_A, state)  # key A is gone from the file
    _record(shard_dir(config.run_dir, 1), KEY_B, JobState.QUEUED)
    picks, chosen = prepare(config)
    assert picks == [0, 1]
    assert [chosen[k].fingerprint for k in picks] == [fingerprint(KEY_B)] * 2


@pytest.mark.parametrize(
    "state", [JobState.QUEUED, JobState.IN_PROGRESS, JobState.SUBMITTING, JobState.UNKNOWN]
)
def test_a_rerun_without_a_recorded_key_is_refused_while_its_jobs_are_in_flight(
    tmp_path: Path, state: JobState
) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_B}\n")
    config = run_config(manifest(tmp_path, 2), tmp_path / "run", shards=2, keys_file=keys,
                        key=None)  # fmt: skip
    _record(shard_dir(config.run_dir, 0), KEY_A, state)
    with pytest.raises(UsageError, match="1 of its jobs are in flight under it") as caught:
        prepare(config)
    assert f"shard 0 was submitted with key {fingerprint(KEY_A)}" in str(caught.value)
    assert in_flight_count(shard_dir(config.run_dir, 0)) == 1
    assert in_flight_count(shard_dir(config.run_dir, 1)) == 0  # no ledger yet


async def test_a_finished_sharded_run_reruns_with_one_of_its_keys_gone(tmp_path: Path) -> None:
    path = manifest(tmp_path, 8)
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{KEY_A}\n{KEY_B}\n")
    config = run_config(path, tmp_path / "run", shards=2, keys_file=keys, download=False,
                        key=None)  # fmt: skip
    accounts = Accounts({KEY_A: 2, KEY_B: 2}, time_scale=0.01)
    hooks = Hooks(
        transport=httpx.ASGITransport(app=accounts.app), stream=io.StringIO(),
        handle_signals=False, policies=FAST_POLICIES,
    )  # fmt: skip
    async with accounts.running():
        first = await execute_sharded(config, hooks=hooks)
        keys.write_text(f"{KEY_B}\n")  # key A retired: nothing of it is in flight
        again = await execute_sharded(config, hooks=hooks)
    assert (first.exit_code, again.exit_code) == (0, 0), again.message
    assert (
        sum(accounts.by_key[KEY_A].stats.endings.values())
        + sum(accounts.by_key[KEY_B].stats.endings.values())
        == 8
    )  # the rerun sent nothing again
    meta = read_run_meta(shard_dir(config.run_dir, 0))
    assert meta is not None and meta["key_fingerprint"] == fingerprint(KEY_B)


def test_a_named_refusal_survives_pickling_unchanged() -> None:
    """A Ray worker's error crosses processes pickled: it must read the same after."""
    named = AuthError("POST x: HTTP 401: the queue refused the key").naming(
        "the key on keys.txt line 2, fp-0123456789abcdef"
    )
    copy = pickle.loads(pickle.dumps(named))
    assert (
        str(copy)
        == str(named)
        == (
            "POST x: HTTP 401: the queue refused the key "
            "(check the key on keys.txt line 2, fp-0123456789abcdef)"
        )
    )
    assert str(AuthError("refused")) == "refused (check FAL_KEY)"
