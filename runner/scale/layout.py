"""A sharded run directory: ``run.json`` fixes the shard count, ``shards/K/`` is shard K.

    run_dir/
      run.json          {"shards": N, "manifest": ..., "runner_version": ...}
      shards/0/         a whole run directory (ledger/, journal/, run.json with the
      shards/1/           fingerprint of the key that submitted), one per shard
      ...

Readers (``status``, ``report``, ``export``, ``plan --ledger``) read it as one run
(:func:`runner.ledger.fold.shard_dirs`). N never changes: a job's shard is a hash of its
row identity modulo N, so another N would look for a job's record in the wrong ledger.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Any

from runner import __version__
from runner.config import RunConfig
from runner.errors import UsageError
from runner.ledger.fold import SHARDS_DIR
from runner.ledger.inflight import has_ledger
from runner.ledger.meta import read_run_meta, write_run_meta


def shard_dir(run_dir: Path, shard: int) -> Path:
    return run_dir / SHARDS_DIR / str(shard)


def recorded_shards(run_dir: Path) -> int | None:
    """The shard count run.json fixed, or None for an unsharded (or new) run directory."""
    meta = read_run_meta(run_dir)
    shards = meta.get("shards") if meta else None
    return shards if isinstance(shards, int) else None


def refuse_mismatch(run_dir: Path, shards: int | None) -> None:
    """Refuse to run a run directory with another shard count than it was made with."""
    was = recorded_shards(run_dir)
    if was == shards:
        return
    if was is None and shards is not None and has_ledger(run_dir):
        raise UsageError(
            f"{run_dir} holds an unsharded run: run it without --shards, or use a new "
            "run directory (--ledger) for a sharded run"
        )
    if was is not None and shards is None:
        raise UsageError(f"{run_dir} is split into {was} shards: run it with --shards {was}")
    if was is not None:
        raise UsageError(
            f"{run_dir} is split into {was} shards, not {shards}: the shard count of a run "
            f"directory is fixed (a job's shard is a hash of its row modulo it); run it with "
            f"--shards {was}, or use a new run directory (--ledger)"
        )


def claim(config: RunConfig, manifest: dict[str, Any]) -> None:
    """Check the shard count and write the top run.json, under a lock: processes taking
    other shards (``--shard K``) may start at the same instant."""
    config.run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(config.run_dir / ".shards.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        refuse_mismatch(config.run_dir, config.shards)
        write_sharded_meta(config, manifest)
    finally:
        os.close(fd)  # closing drops the lock


def write_sharded_meta(config: RunConfig, manifest: dict[str, Any]) -> None:
    """The top run.json of a sharded run directory (each shard writes its own)."""
    assert config.shards is not None
    public = config.public_dict()
    public.pop("shard", None)  # which shard one process runs is not a fact of the run
    write_run_meta(
        config.run_dir,
        {"runner_version": __version__, "manifest": manifest, "shards": config.shards,
         "config": public},
        redact=config.redactor(),
    )  # fmt: skip


def recorded_keys(run_dir: Path, shards: int) -> dict[int, str | None]:
    """The fingerprint of the key each shard's ledger was submitted with, by shard."""
    found: dict[int, str | None] = {}
    for k in range(shards):
        meta = read_run_meta(shard_dir(run_dir, k))
        fp = meta.get("key_fingerprint") if meta else None
        found[k] = fp if isinstance(fp, str) else None
    return found
