"""``runner cancel`` of a sharded run directory: each shard's in-flight requests cancelled
with the key that submitted them (the fingerprint its run.json recorded)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx

from runner.execution.cancel import CancelOutcome, cancel_in_flight
from runner.ledger.fold import shard_dirs
from runner.scale.keys import KeySpec, key_for_shard
from runner.scale.layout import recorded_keys, recorded_shards


async def cancel_sharded(
    run_dir: Path,
    *,
    queue_url: str,
    keys: Sequence[KeySpec],
    transport: httpx.AsyncBaseTransport | None = None,
) -> CancelOutcome:
    """Cancel every shard's in-flight requests, each shard with its own key; one outcome."""
    shards = recorded_shards(run_dir) or 0
    recorded = recorded_keys(run_dir, shards)
    total = CancelOutcome()
    for directory in shard_dirs(run_dir):
        spec = key_for_shard(int(directory.name), keys, recorded)
        done = await cancel_in_flight(directory, queue_url=queue_url, key=spec.key,
                                      transport=transport)  # fmt: skip
        total.cancelled += done.cancelled
        total.already_completed += done.already_completed
        total.not_found += done.not_found
        total.errors += [f"shard {directory.name}: {e}" for e in done.errors]
    return total
