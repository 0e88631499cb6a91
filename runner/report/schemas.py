"""The JSON Schemas (draft 2020-12) of what the runner writes for other programs.

    runner.status/1   ``runner status --json``            STATUS_SCHEMA
    runner.report/1   ``runner report --json``            REPORT_SCHEMA
    runner.log/1      each line of ``run --log-format json``  LOG_EVENT_SCHEMA

Each document names its schema in a ``"schema"`` field. Within a version, fields are only
ever added (readers should ignore unknown keys); a removal or a change of meaning bumps the
number. Money is a string of decimal dollars, times are ISO 8601, seconds are numbers.
"""

from __future__ import annotations

from typing import Any

from runner.execution.events import LOG_SCHEMA

STATUS = "runner.status/1"
REPORT = "runner.report/1"
LOG = LOG_SCHEMA

DRAFT = "https://json-schema.org/draft/2020-12/schema"

_USD: dict[str, Any] = {"type": "string", "pattern": r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$"}
_USD_OR_NULL: dict[str, Any] = {"anyOf": [_USD, {"type": "null"}]}
_COUNT: dict[str, Any] = {"type": "integer", "minimum": 0}
_COUNTS: dict[str, Any] = {"type": "object", "additionalProperties": _COUNT}
_TIME: dict[str, Any] = {"type": "string", "format": "date-time"}


def _object(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    """An object with these keys required (and any others allowed)."""
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **optional},
    }


def _document(name: str, title: str, required: dict[str, Any]) -> dict[str, Any]:
    return {
        "$schema": DRAFT,
        "$id": f"https://runner.invalid/schemas/{name}",
        "title": title,
        **_object({"schema": {"const": name}, **required}),
    }


# Superseded jobs (older content of rows recorded again): left out of the counts and sums
# unless all_versions; spent_usd is everything billed, superseded versions included.
_VERSIONS: dict[str, Any] = {
    "superseded": _COUNT,
    "superseded_billed_usd": _USD,
    "superseded_estimated_usd": _USD,
    "all_versions": {"type": "boolean"},
    "spent_usd": _USD,  # re-rolls of flagged outputs included
}

STATUS_SCHEMA: dict[str, Any] = _document(
    STATUS,
    "runner status --json",
    {
        "run_dir": {"type": "string"},
        "jobs": _COUNT,
        "events": _COUNT,
        "by_state": _COUNTS,
        "by_endpoint": {
            "type": "array",
            "items": _object(
                {
                    "endpoint": {"type": ["string", "null"]},  # null: invalid rows
                    "jobs": _COUNT,
                    "by_state": _COUNTS,
                    "estimated_usd": _USD,
                    "billed_usd": _USD,
                }
            ),
        },
        "estimated_usd": _USD,
        "billed_usd": _USD,
        "possible_duplicates": _COUNT,
        "possible_duplicate_usd": _USD,
        "unknown_outcomes": _COUNT,
        "reconciled": _COUNTS,
        "duplicates_found": _COUNT,
        "duplicates_found_usd": _USD,
        **_VERSIONS,
        "reroll_usd": _USD,  # re-rolls of flagged outputs, on top of billed_usd; in spent_usd
    },
)

_PERCENTILES = _object(
    {"known": _COUNT, "of": _COUNT},
    **{k: {"type": ["number", "null"]} for k in ("p50", "p90", "p99", "max")},
)

REPORT_SCHEMA: dict[str, Any] = _document(
    REPORT,
    "runner report --json",
    {
        "run_dir": {"type": ["string", "null"]},
        "manifest": {"type": ["string", "null"]},
        "runner_version": {"type": ["string", "null"]},
        "jobs": _COUNT,
        "by_state": _COUNTS,
        "endpoints": {
            "type": "array",
            "items": _object(
                {"endpoint": {"type": ["string", "null"]}, "jobs": _COUNT, "by_state": _COUNTS}
            ),
        },
        "estimated_usd": _USD,
        "estimated_done_usd": _USD,
        "billed_usd": _USD,
        "possible_duplicates": _COUNT,
        "possible_duplicate_usd": _USD,
        "unknown_outcomes": _COUNT,
        "reconciled": _COUNTS,
        "duplicates_found": _COUNT,
        "duplicates_found_usd": _USD,
        "timing": _object(
            {
                "first_submitted_at": {"anyOf": [_TIME, {"type": "null"}]},
                "last_completed_at": {"anyOf": [_TIME, {"type": "null"}]},
                "wall_s": {"type": ["number", "null"]},
                "completed": _COUNT,
                "images": _COUNT,
                "queue": _PERCENTILES,
                "inference": _PERCENTILES,
            }
        ),
        "failed_jobs": _COUNT,
        "failure_groups": _COUNT,
        "failures": {
            "type": "array",
            "items": _object(
                {
                    "error_type": {"type": "string"},
                    "message": {"type": "string"},
                    "count": _COUNT,
                    "retryable": _COUNT,
                    "examples": {"type": "array", "items": {"type": "object"}},
                }
            ),
        },
        "resume": _object({"policy": {"type": "object"}, "note": {"type": "string"}}),
        "notes": {"type": "array", "items": {"type": "string"}},
        "safety": _object(
            {
                "flagged_jobs": _COUNT,
                "flagged_images": _COUNT,
                "rerolls": _COUNT,
                "reroll_usd": _USD,
                "cached_jobs": _COUNT,
            }
        ),
        **_VERSIONS,
        # One entry per `runner run` on the directory (runner.report.invocations).
        "invocations": {
            "type": "array",
            "items": _object(
                {
                    "run_id": {"type": ["string", "null"]},
                    "started_at": {"anyOf": [_TIME, {"type": "null"}]},
                    "ended_at": {"anyOf": [_TIME, {"type": "null"}]},
                    "exit_code": {"type": ["integer", "null"]},
                    "message": {"type": ["string", "null"]},
                    "finished": {"type": "boolean"},
                    "status": {"type": "string"},
                    "completed": _COUNT,
                    "failed": _COUNT,
                    "spent_usd": _USD,
                    "events": _COUNT,
                    "counts_from": {"enum": ["run.json", "ledger"]},
                },
                skipped=_COUNT,
                last_event_at={"anyOf": [_TIME, {"type": "null"}]},
                shard={"type": ["integer", "null"], "minimum": 0},
            ),
        },
        # The run over time, per bucket of bucket_s seconds from start (runner.report.timeline).
        "timeline": _object(
            {
                "start": {"anyOf": [_TIME, {"type": "null"}]},
                "bucket_s": _COUNT,
                "completions": {"type": "array", "items": _COUNT},
                "failures": {"type": "array", "items": {"type": "array"}},
                "spend_usd": {"type": "array", "items": _USD},
                "estimate_usd": _USD,
            }
        ),
    },
)


def _event(name: str, fields: dict[str, Any], **optional: Any) -> dict[str, Any]:
    required = {"schema": {"const": LOG}, "event": {"const": name}, "at": _TIME, **fields}
    return _object(required, **optional)


_NULLABLE_COUNT: dict[str, Any] = {"type": ["integer", "null"], "minimum": 0}
_OUTCOMES = ("completed", "skipped", "failed", "invalid", "unknown", "lost", "left")

LOG_EVENT_SCHEMA: dict[str, Any] = {
    "$schema": DRAFT,
    "$id": f"https://runner.invalid/schemas/{LOG}",
    "title": "one line of runner run --log-format json",
    "oneOf": [
        _event(
            "progress",
            {
                "done": _COUNT,
                "completed": _COUNT,
                "failed": _COUNT,
                "in_flight": _COUNT,
                "total": _NULLABLE_COUNT,
                "spent_usd": _USD,
                "estimate_usd": _USD_OR_NULL,
            },
        ),
        _event("message", {"text": {"type": "string"}}),
        _event(
            "failure",
            {
                "row_id": {"type": ["string", "null"]},
                "reason": {"type": "string"},
                "message": {"type": "string"},
            },
        ),
        _event(
            "summary",
            {
                "outcomes": _object(dict.fromkeys(_OUTCOMES, _COUNT)),
                "retries": _COUNT,
                "flagged_images": _COUNT,
                "rerolls": _object({"count": _COUNT, "usd": _USD}),
                "cached": _COUNT,
                "total": _NULLABLE_COUNT,
                "spent_usd": _USD,
                "estimate_usd": _USD_OR_NULL,
                "reasons": _COUNTS,
                "examples": {"type": "array", "items": {"type": "string"}},
                "invalid_reasons": {"type": "array", "items": {"type": "string"}},
                "possible_duplicates": _object({"jobs": _COUNT, "usd": _USD}),
                "reconciled": _COUNTS,
                "duplicates_found": _object({"requests": _COUNT, "usd": _USD}),
                "notes": {"type": "array", "items": {"type": "string"}},
                "run_dir": {"type": "string"},
            },
        ),
        # run_dir is absent when the command line or the configuration was refused
        # before a run directory was settled.
        _event(
            "exit",
            {"code": {"type": "integer"}, "message": {"type": "string"}},
            run_dir={"type": "string"},
        ),
    ],
}

SCHEMAS: dict[str, dict[str, Any]] = {
    STATUS: STATUS_SCHEMA,
    REPORT: REPORT_SCHEMA,
    LOG: LOG_EVENT_SCHEMA,
}
