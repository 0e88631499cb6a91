"""run.json: what a run directory says about its runs (manifest fingerprint, version, the
configuration without secrets), written whole or not at all."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.errors import LedgerError
from runner.ledger.parts import atomic_write_bytes
from runner.ledger.redaction import Redact

RUN_META = "run.json"


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
