"""run.json for one invocation of ``runner run``: the manifest's fingerprint, the
configuration without secrets, the key's fingerprint, and how the invocation ended."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from runner import __version__
from runner.config import RunConfig
from runner.errors import LedgerError, UsageError
from runner.execution.progress import Tally
from runner.fal.key import fingerprint
from runner.ledger.inflight import in_flight_count
from runner.ledger.meta import read_run_meta, start_invocation


def manifest_fingerprint(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    stat = path.stat()
    # dir: where its relative input paths start, for a report made from elsewhere.
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": stat.st_size,
            "dir": str(path.resolve().parent)}  # fmt: skip


def write_run_metadata(
    config: RunConfig,
    *,
    run_id: str,
    started_at: datetime,
    redact: Callable[[str], str] | None = None,
) -> None:
    """run.json, with this invocation appended unfinished to the earlier ones."""
    meta = {
        "runner_version": __version__,
        "manifest": manifest_fingerprint(config.manifest),
        "config": config.public_dict(),
        # Which key submitted (its fingerprint, never the key): re-attach and cancel of a
        # sharded run pick the same key again (runner.scale.keys).
        "key_fingerprint": fingerprint(config.key) if config.key is not None else None,
    }
    start_invocation(config.run_dir, meta, run_id=run_id, started_at=started_at, redact=redact)


def refuse_another_key(config: RunConfig) -> None:
    """Refuse a key other than the one the jobs left in flight were submitted with: another
    account's key finds none of them (fal answers 404), so each would be sent, and paid,
    again. ``--key-changed`` says the key was rotated within the same account."""
    if config.key is None or config.key_changed:
        return
    try:
        meta = read_run_meta(config.run_dir)
    except LedgerError:
        return  # unreadable: replaced by this run's, as it always was
    was, now = (meta or {}).get("key_fingerprint"), fingerprint(config.key)
    if not isinstance(was, str) or was == now:
        return
    left = in_flight_count(config.run_dir)
    if left:
        raise UsageError(
            f"{left} {'job' if left == 1 else 'jobs'} of {config.run_dir} "
            f"{'is' if left == 1 else 'are'} in flight under key {was}, not the key given "
            f"({now}): run with that key to re-attach them, or pass --key-changed if this key "
            "is of the same account (another account's key cannot find them: they would be "
            "sent, and paid for, again)"
        )


def invocation_facts(tally: Tally, exit_code: int | None, message: str) -> dict[str, Any]:
    """What run.json keeps of how one invocation ended: its exit, its jobs, its spend."""
    return {
        "exit_code": exit_code, "message": message, "completed": tally.completed,
        "skipped": tally.skipped, "failed": tally.failed, "invalid": tally.invalid,
        "unknown": tally.unknown, "cached": tally.cached, "rerolls": tally.rerolls,
        "spent_usd": str(tally.spent_usd),
    }  # fmt: skip
