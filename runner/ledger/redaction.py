"""The redaction of what the ledger writes: every text of an event passes the run's
redaction function (``runner.fal.key.redactor``) before it reaches the journal or a part.

Exports and reports read only the ledger and run.json, so what is removed here never
reaches them either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields, replace
from operator import attrgetter
from typing import Any

from runner.ledger.schema import LedgerEvent, OutputImage

Redact = Callable[[str], str]


# The text fields of an event and of an output, but for the digests the runner computes
# itself (job_key, payload_sha256, an output's sha256): hex that cannot carry a key, and
# job_key ties the event to its job.
_DIGESTS = frozenset({"job_key", "payload_sha256", "sha256"})


def _text_fields(cls: type[Any]) -> tuple[str, ...]:
    texts = ("str", "str | None")  # annotations are strings here (postponed evaluation)
    return tuple(f.name for f in fields(cls) if f.type in texts and f.name not in _DIGESTS)


_TEXT_FIELDS = _text_fields(LedgerEvent)
_OUTPUT_TEXT_FIELDS = _text_fields(OutputImage)


def redacted_event(event: LedgerEvent, redact: Redact) -> LedgerEvent:
    """``event`` with ``redact`` applied to every text it holds: each string field, the
    metadata's keys and values, the outputs' URLs and paths, the duplicate request ids.

    The event itself when nothing changes: the usual case, found with one pass of
    ``redact`` over all the texts joined, so an append pays a few microseconds for it.
    """
    text = _all_text(event)
    if redact(text) == text:
        return event
    changes: dict[str, Any] = {}
    for name in _TEXT_FIELDS:
        value = getattr(event, name)
        if value is not None and (clean := redact(value)) != value:
            changes[name] = clean
    if event.metadata:
        metadata = {redact(k): redact(v) for k, v in event.metadata.items()}
        if metadata != dict(event.metadata):
            changes["metadata"] = metadata
    if event.outputs:
        outputs = tuple(_redacted_output(o, redact) for o in event.outputs)
        if outputs != event.outputs:
            changes["outputs"] = outputs
    if event.duplicate_request_ids:
        ids = tuple(redact(i) for i in event.duplicate_request_ids)
        if ids != event.duplicate_request_ids:
            changes["duplicate_request_ids"] = ids
    return replace(event, **changes) if changes else event


_event_texts = attrgetter(*_TEXT_FIELDS)
_output_texts = attrgetter(*_OUTPUT_TEXT_FIELDS)


def _all_text(event: LedgerEvent) -> str:
    texts = [value for value in _event_texts(event) if value is not None]
    if event.metadata:
        texts += [*event.metadata.keys(), *event.metadata.values()]
    for output in event.outputs or ():
        texts += [value for value in _output_texts(output) if value is not None]
    texts += event.duplicate_request_ids or ()
    return "\n".join(texts)


def _redacted_output(output: OutputImage, redact: Redact) -> OutputImage:
    changes: dict[str, Any] = {}
    for name in _OUTPUT_TEXT_FIELDS:
        value = getattr(output, name)
        if value is not None and (clean := redact(value)) != value:
            changes[name] = clean
    return replace(output, **changes) if changes else output
