"""run.json: what a run directory says about its runs (manifest fingerprint, version, the
configuration without secrets, one entry per invocation of ``runner run``), written whole
or not at all.

Invocations: each ``runner run`` gets a run id (:func:`new_run_id`, time-sortable), stamped
on every ledger event it writes. :func:`start_invocation` appends an unfinished entry
(``run_id``, ``started_at``) when the run starts, keeping every earlier entry;
:func:`end_invocation` fills in ``ended_at``, ``exit_code``, ``message`` and the counts at
the end. An invocation killed outright (SIGKILL, power loss) keeps ``ended_at`` null.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner.errors import LedgerError
from runner.ledger.fold import SHARDS_DIR
from runner.ledger.parts import atomic_write_bytes
from runner.ledger.redaction import Redact

RUN_META = "run.json"
INVOCATIONS = "invocations"


def new_run_id(at: datetime, salt: int) -> str:
    """``20261202T051500Z-abcd``: the start time (UTC, sorts by time) and 16 random bits,
    so two invocations in one second still differ."""
    return f"{at.astimezone(UTC):%Y%m%dT%H%M%SZ}-{salt & 0xFFFF:04x}"


def invocations(meta: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """run.json's invocation entries (dicts with a string ``run_id``), in the order written."""
    found = (meta or {}).get(INVOCATIONS)
    if not isinstance(found, list):
        return []
    return [dict(e) for e in found if isinstance(e, Mapping) and isinstance(e.get("run_id"), str)]


def start_invocation(
    run_dir: Path | str,
    meta: Mapping[str, Any],
    *,
    run_id: str,
    started_at: datetime,
    redact: Redact | None = None,
) -> None:
    """Write run.json as ``meta`` plus every earlier invocation and this one, unfinished."""
    try:
        earlier = invocations(read_run_meta(run_dir))
    except LedgerError:
        earlier = []  # an unreadable run.json is replaced, as it always was
    entry = {"run_id": run_id, "started_at": started_at.isoformat(), "ended_at": None}
    write_run_meta(run_dir, {**meta, INVOCATIONS: [*earlier, entry]}, redact=redact)


def end_invocation(
    run_dir: Path | str,
    run_id: str,
    facts: Mapping[str, Any],
    *,
    ended_at: datetime,
    redact: Redact | None = None,
) -> None:
    """Fill in how invocation ``run_id`` ended (``facts``: exit code, counts, spend)."""
    meta = read_run_meta(run_dir) or {}
    entries = invocations(meta)
    mine = next((e for e in entries if e["run_id"] == run_id), None)
    if mine is None:  # run.json was replaced meanwhile: keep what is known
        mine = {"run_id": run_id}
        entries.append(mine)
    mine.update(facts)
    mine["ended_at"] = ended_at.isoformat()
    write_run_meta(run_dir, {**meta, INVOCATIONS: entries}, redact=redact)


def write_run_meta(
    run_dir: Path | str, meta: Mapping[str, Any], *, redact: Redact | None = None
) -> None:
    """Write run.json atomically (manifest fingerprint, version, config without secrets).

    ``redact``, when given, is applied to every string in ``meta`` (keys and values, at
    any depth) before it is written.
    """
    _refuse_secrets(meta, "run.json")
    if redact is not None:
        meta = _redacted_json(meta, redact)
    data = json.dumps(meta, indent=2, sort_keys=True, default=str).encode() + b"\n"
    atomic_write_bytes(Path(run_dir) / RUN_META, data)


def read_whole_run_meta(run_dir: Path | str) -> dict[str, Any] | None:
    """run.json as a reader of the whole run sees it. A sharded run directory's top run.json
    records no invocation (each shard's run is one, in the shard's own run.json): theirs
    are listed instead, each entry marked with its ``shard``."""
    meta = read_run_meta(run_dir)
    root = Path(run_dir) / SHARDS_DIR
    if not root.is_dir():
        return meta
    shards = sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())
    entries = [
        {**entry, "shard": k} for k in shards for entry in invocations(read_run_meta(root / str(k)))
    ]
    return {**(meta or {}), INVOCATIONS: entries}


def read_run_meta(run_dir: Path | str) -> dict[str, Any] | None:
    path = Path(run_dir) / RUN_META
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise LedgerError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise LedgerError(f"{path} does not hold a JSON object")
    return data


def _redacted_json(value: Any, redact: Redact) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {redact(str(k)): _redacted_json(v, redact) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted_json(item, redact) for item in value]
    if isinstance(value, int | float | bool) or value is None:
        return value
    return redact(str(value))  # what json.dumps(default=str) would write


def _refuse_secrets(value: Any, where: str) -> None:
    from pydantic import SecretBytes, SecretStr

    if isinstance(value, SecretStr | SecretBytes):
        raise ValueError(f"{where}: refusing to write a secret value")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _refuse_secrets(item, f"{where}.{key}")
    elif isinstance(value, list | tuple):
        for item in value:
            _refuse_secrets(item, where)
