"""No key travels through Ray: what the driver sends a shard's worker holds no key, and the
worker finds its key on its own machine (runner.scale.ray_driver.shard_call,
runner.scale.keys.find_key). Fast: Ray is imported, never started."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from pydantic import SecretStr

from runner.config import RunConfig
from runner.errors import UsageError
from runner.fal.key import fingerprint, secret_forms
from runner.scale.keys import KeyRef, KeySpec, find_key
from runner.scale.shards import run_keys
from tests.scenario import manifest, run_config

# fal-shaped keys (a UUID and a long hex secret): each part is long enough to be looked for.
CANARY = "5f0c2a9e-1b7d-4c3e-9a8f-canary000001:9d8c7b6a5f4e3d2c1b0a99887766554433221100"
OTHER = "0a1b2c3d-4e5f-6a7b-8c9d-otherkey0002:ffeeddccbbaa00998877665544332211aabbccdd"


def _leaks(blob: bytes, *keys: str) -> list[str]:
    """The forms of ``keys`` (whole, id, secret; as is, escaped, base64) found in ``blob``."""
    return [form for key in keys for form in secret_forms(key) if form.encode() in blob]


def _keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys.txt"
    path.write_text(f"{CANARY} concurrency=3\n{OTHER} concurrency=5 rate=7\n")
    return path


def _config(tmp_path: Path, *, keys_file: Path | None) -> RunConfig:
    return run_config(manifest(tmp_path, 4), tmp_path / "run", key=SecretStr(CANARY),
                      keys_file=keys_file, shards=4)  # fmt: skip


@pytest.mark.parametrize("with_keys_file", [False, True], ids=["FAL_KEY", "keys-file"])
def test_what_the_driver_sends_a_worker_holds_no_key(tmp_path: Path, with_keys_file: bool) -> None:
    pytest.importorskip("ray")
    import ray.cloudpickle

    from runner.scale.ray_driver import shard_call

    config = _config(tmp_path, keys_file=_keys_file(tmp_path) if with_keys_file else None)
    specs = run_keys(config)  # as run_ray's prepare picks them
    assert specs[0].key.get_secret_value() == CANARY
    calls = [shard_call(config, shard, specs[shard % len(specs)], ("budget", "board"), 5.0)
             for shard in range(config.shards or 0)]  # fmt: skip
    blobs = (pickle.dumps(calls), ray.cloudpickle.dumps(calls))  # type: ignore[no-untyped-call]
    for blob in blobs:
        assert _leaks(blob, CANARY, OTHER) == []
    wire, ref, keys_path, gate, names, ttl = calls[1]
    assert wire.key is None and wire.shard == 1 and wire.keys_file is None
    assert ref == specs[1 % len(specs)].ref()
    assert (gate, names, ttl) == (f"runner-gate-{ref.fingerprint}", ("budget", "board"), 5.0)
    # The worker's side: its own FAL_KEY or the keys file gives the key back.
    assert keys_path == (config.keys_file.resolve() if config.keys_file else None)
    env = {} if with_keys_file else {"FAL_KEY": CANARY}
    found = find_key(pickle.loads(pickle.dumps(ref)), environ=env, keys_file=keys_path)
    assert found.key.get_secret_value() == (OTHER if with_keys_file else CANARY)


def test_a_key_ref_has_no_place_for_a_key() -> None:
    ref = KeySpec.of(SecretStr(CANARY), concurrency=3, rate_per_s=2.0).ref()
    assert ref == KeyRef(fingerprint(CANARY), 3, 2.0)
    assert _leaks(pickle.dumps(ref), CANARY) == []


def test_the_worker_finds_its_key_in_fal_key(tmp_path: Path) -> None:
    ref = KeyRef(fingerprint(CANARY), concurrency=4, rate_per_s=2.5)
    spec = find_key(ref, environ={"FAL_KEY": f" {CANARY}\n"}, keys_file=None)
    assert spec.key.get_secret_value() == CANARY
    assert (spec.fingerprint, spec.concurrency, spec.rate_per_s) == (ref.fingerprint, 4, 2.5)


def test_the_worker_finds_its_key_in_the_keys_file(tmp_path: Path) -> None:
    # The driver's limits travel in the ref; the file's line only has to hold the key.
    ref = KeyRef(fingerprint(OTHER), concurrency=9)
    spec = find_key(ref, environ={"FAL_KEY": CANARY}, keys_file=_keys_file(tmp_path))
    assert spec.key.get_secret_value() == OTHER
    assert (spec.concurrency, spec.rate_per_s) == (9, None)


@pytest.mark.parametrize("where", ["nothing", "another FAL_KEY", "keys file", "missing file"])
def test_no_matching_key_fails_naming_the_fingerprint_never_a_key(
    tmp_path: Path, where: str
) -> None:
    wanted = "0c0c0c0c-0000-4000-8000-wantedkey003:0123456789abcdef0123456789abcdef01234567"
    ref = KeyRef(fingerprint(wanted))
    env = {"FAL_KEY": CANARY} if where == "another FAL_KEY" else {}
    keys_file = {"keys file": _keys_file(tmp_path), "missing file": tmp_path / "no-such.txt"}
    with pytest.raises(UsageError) as caught:
        find_key(ref, environ=env, keys_file=keys_file.get(where))
    message = str(caught.value)
    assert ref.fingerprint in message
    assert "set FAL_KEY or --keys-file" in message and "every node" in message
    assert _leaks(message.encode(), wanted, CANARY, OTHER) == []
    if where == "missing file":
        assert "cannot read --keys-file" in message
    if where == "keys file":
        assert "2 keys, none of them it" in message


def test_a_malformed_fal_key_on_the_worker_is_a_usage_error_without_the_key() -> None:
    bad = CANARY.replace(":", " ")
    with pytest.raises(UsageError, match="FAL_KEY contains whitespace") as caught:
        find_key(KeyRef(fingerprint(CANARY)), environ={"FAL_KEY": bad}, keys_file=None)
    assert _leaks(str(caught.value).encode(), CANARY) == []
