"""``runner cancel``'s keys: an unsharded run directory's jobs cancelled with the key that
submitted them, and a sharded one's shard by shard, each with its own (the fingerprint its
run.json recorded). A key is asked for only where something is in flight."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import httpx
from pydantic import SecretStr

from runner.errors import UsageError
from runner.execution.cancel import CancelOutcome, cancel_in_flight
from runner.fal.retry import RetryPolicies
from runner.ledger.fold import shard_dirs
from runner.ledger.meta import read_run_meta
from runner.scale.keys import KeySpec, key_for_shard
from runner.scale.layout import recorded_keys, recorded_shards


def key_for_run(run_dir: Path, keys: Sequence[KeySpec]) -> KeySpec:
    """The key an unsharded run directory's jobs were submitted with, among ``keys``
    (``FAL_KEY``'s, then ``--keys-file``'s): the one whose fingerprint run.json recorded,
    else the first. UsageError, naming fingerprints only, when it is not among them."""
    meta = read_run_meta(run_dir)
    was = meta.get("key_fingerprint") if meta else None
    if not keys:
        raise UsageError("FAL_KEY is not set (or give --keys-file): cancelling needs the key")
    if not isinstance(was, str):
        return keys[0]
    for spec in keys:
        if spec.fingerprint == was:
            return spec
    given = ", ".join(spec.fingerprint for spec in keys)
    raise UsageError(
        f"{run_dir}'s jobs were submitted with key {was}, not with the key(s) given ({given}): "
        "set FAL_KEY to that key, or give --keys-file with it"
    )


async def cancel_run(
    run_dir: Path,
    *,
    keys: Sequence[KeySpec],
    queue_url: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    policies: RetryPolicies | None = None,
) -> CancelOutcome:
    """Cancel an unsharded run directory's in-flight requests with the key that submitted."""
    return await cancel_in_flight(
        run_dir, key=lambda: _named(key_for_run(run_dir, keys)), queue_url=queue_url,
        transport=transport, policies=policies,
    )  # fmt: skip


async def cancel_sharded(
    run_dir: Path,
    *,
    keys: Sequence[KeySpec],
    queue_url: str | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    policies: RetryPolicies | None = None,
) -> CancelOutcome:
    """Cancel every shard's in-flight requests, each shard with its own key; one outcome.

    Each shard asks its own run.json's queue unless ``queue_url`` is given. A shard whose
    key is missing counts its jobs in flight as failed and the others go on.
    """
    shards = recorded_shards(run_dir) or 0
    recorded = recorded_keys(run_dir, shards)
    total = CancelOutcome()
    for directory in shard_dirs(run_dir):
        done = await cancel_in_flight(
            directory, key=partial(_shard_key, int(directory.name), keys, recorded),
            queue_url=queue_url, transport=transport, policies=policies,
        )  # fmt: skip
        total.add(done, prefix=f"shard {directory.name}: ")
    return total


def _shard_key(
    shard: int, keys: Sequence[KeySpec], recorded: Mapping[int, str | None]
) -> tuple[SecretStr, str]:
    if not keys:
        raise UsageError("FAL_KEY is not set (or give --keys-file)")
    return _named(key_for_shard(shard, keys, recorded))


def _named(spec: KeySpec) -> tuple[SecretStr, str]:
    return spec.key, spec.name
