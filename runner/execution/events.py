"""The run as JSON lines (``--log-format json``): one object per line for other programs.

Every line is an object with ``"schema": "runner.log/1"`` and an ``"event"``:

    progress   at the progress interval (and first and last): counts and dollars
    message    every message the run says (interrupts, budget, notices)
    failure    each job that did not complete, when it is recorded, with its reason
    summary    at the end: counts by outcome, reasons, spend, duplicates, reconciled
    exit       the exit status and its one-line message

Money is a string (exact decimal dollars); times are ISO 8601 in UTC. The JSON Schema of
the lines is :data:`runner.report.schemas.LOG_EVENT_SCHEMA`.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, TextIO

LOG_SCHEMA = "runner.log/1"


def usd(value: Decimal | None) -> str | None:
    """Dollars as an exact string (``"0.035"``), or None when unknown."""
    return None if value is None else str(value)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def write_event(stream: TextIO, event: str, **fields: Any) -> None:
    """One JSON object on one line, flushed so a watcher sees it at once."""
    doc = {"schema": LOG_SCHEMA, "event": event, **fields}
    # ASCII only: no U+2028 or the like that a reader might take for a line break.
    stream.write(json.dumps(doc) + "\n")
    stream.flush()
