"""The queue wire models: status shapes, acks, results, error types, Retry-After, SSE."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runner.errors import ProtocolError
from runner.fal.protocol import (
    ERROR_TYPES,
    Completed,
    FluxResult,
    InProgress,
    LogEntry,
    Queued,
    is_gateway_error,
    is_retryable_error_type,
    parse_ack,
    parse_cancel,
    parse_retry_after,
    parse_status,
)
from runner.fal.sse import SSEParser, parse_event_status

LOG = {
    "message": "step 3/28",
    "level": "INFO",
    "source": "user",
    "timestamp": "2026-01-01T00:00:00",
}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"status": "IN_QUEUE", "queue_position": 0}, Queued(position=0)),
        ({"status": "IN_QUEUE", "queue_position": 7, "logs": None, "x": 1}, Queued(position=7)),
        ({"status": "IN_PROGRESS", "logs": None}, InProgress(logs=None)),
        ({"status": "IN_PROGRESS", "logs": []}, InProgress(logs=())),
        ({"status": "IN_PROGRESS", "logs": [LOG]}, InProgress(logs=(LogEntry(**LOG),))),
        (
            {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 1.25}},
            Completed(logs=None, inference_time_s=1.25),
        ),
        ({"status": "COMPLETED", "logs": None}, Completed(logs=None)),
        (
            {
                "status": "COMPLETED",
                "logs": None,
                "metrics": {},
                "error": "Request timed out",
                "error_type": "request_timeout",
                "response_url": "ignored",
            },
            Completed(logs=None, error="Request timed out", error_type="request_timeout"),
        ),
    ],
)
def test_every_status_shape_parses_to_its_model(data: dict[str, Any], expected: object) -> None:
    assert parse_status(data) == expected


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"status": "IN_QUEUE"}, "queue_position"),
        ({"status": "IN_PROGRESS"}, "logs"),
        ({"status": "COMPLETED", "metrics": {}}, "logs"),
        ({"status": "FAILED", "logs": None}, "unknown status 'FAILED'"),
        ({"queue_position": 1}, "unknown status None"),
        ({"status": "IN_QUEUE", "queue_position": -1}, "malformed IN_QUEUE"),
        ({"status": "IN_QUEUE", "queue_position": "soon"}, "malformed IN_QUEUE"),
        ({"status": "IN_PROGRESS", "logs": "text"}, "malformed IN_PROGRESS"),
        (["IN_QUEUE"], "not a JSON object"),
    ],
)
def test_status_that_breaks_the_protocol_raises_protocol_error(data: Any, fragment: str) -> None:
    with pytest.raises(ProtocolError, match=fragment.replace("(", r"\(")):
        parse_status(data)


def test_status_models_are_frozen() -> None:
    status = parse_status({"status": "IN_QUEUE", "queue_position": 2})
    with pytest.raises(ValueError, match="frozen"):
        status.position = 3  # type: ignore[union-attr]


ACK = {
    "status": "IN_QUEUE",
    "request_id": "abc-123",
    "response_url": "https://queue.fal.run/fal-ai/flux-lora/requests/abc-123",
    "status_url": "https://queue.fal.run/fal-ai/flux-lora/requests/abc-123/status",
    "cancel_url": "https://queue.fal.run/fal-ai/flux-lora/requests/abc-123/cancel",
    "queue_position": 0,
    "logs": None,
    "metrics": {},
}


def test_ack_keeps_urls_verbatim_and_ignores_extras() -> None:
    ack = parse_ack({**ACK, "gateway_request_id": "gw-1", "new_field": [1]})
    assert ack.request_id == "abc-123"
    assert ack.status_url == ACK["status_url"]
    assert ack.gateway_request_id == "gw-1"
    assert ack.queue_position == 0


@pytest.mark.parametrize("missing", ["request_id", "status_url", "response_url", "cancel_url"])
def test_ack_without_a_required_key_is_a_protocol_error(missing: str) -> None:
    data = {k: v for k, v in ACK.items() if k != missing}
    with pytest.raises(ProtocolError, match=missing):
        parse_ack(data)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"status": "CANCELLATION_REQUESTED"}, "CANCELLATION_REQUESTED"),
        ({"status": "ALREADY_COMPLETED"}, "ALREADY_COMPLETED"),
        ({"status": "NOT_FOUND"}, "NOT_FOUND"),
        ({"status": "OK"}, "CANCELLATION_REQUESTED"),
        ({"status": "WHATEVER"}, None),
        ({"detail": "Not Found"}, None),
        ("NOT_FOUND", None),
    ],
)
def test_cancel_body_names_its_outcome(body: Any, expected: str | None) -> None:
    assert parse_cancel(body) == expected


FLUX = {
    "images": [
        {
            "url": "https://v3.fal.media/files/a.jpg",
            "width": 1024,
            "height": 768,
            "content_type": "image/jpeg",
        }
    ],
    "timings": {"inference": 1.5},
    "seed": 42,
    "has_nsfw_concepts": [False],
    "prompt": "a cat",
    "extra_field": {"kept": True},
}


def test_flux_result_parses_known_fields_and_keeps_the_raw_payload() -> None:
    result = FluxResult.from_payload(FLUX)
    assert result.images[0].width == 1024
    assert result.images[0].file_size is None
    assert result.seed == 42
    assert result.has_nsfw_concepts == (False,)
    assert result.raw["extra_field"] == {"kept": True}


def test_flux_result_missing_images_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="images"):
        FluxResult.from_payload({k: v for k, v in FLUX.items() if k != "images"})


def test_error_type_table_lists_the_known_types_with_their_codes() -> None:
    assert set(ERROR_TYPES) == {
        "request_timeout",
        "startup_timeout",
        "runner_scheduling_failure",
        "runner_connection_timeout",
        "runner_disconnected",
        "runner_connection_refused",
        "internal_error",
    }
    assert ERROR_TYPES["startup_timeout"].status_code == 504
    assert ERROR_TYPES["runner_disconnected"].status_code == 503
    assert ERROR_TYPES["runner_connection_refused"].status_code is None


@pytest.mark.parametrize(
    ("error_type", "timeout_type", "retryable"),
    [
        ("runner_scheduling_failure", None, True),
        ("startup_timeout", None, True),
        ("request_timeout", None, True),
        ("request_timeout", "user", False),
        ("some_new_type", None, False),
        (None, None, False),
    ],
)
def test_retryable_error_types(
    error_type: str | None, timeout_type: str | None, retryable: bool
) -> None:
    assert is_retryable_error_type(error_type, timeout_type=timeout_type) is retryable


@pytest.mark.parametrize(
    ("code", "body", "request_id", "gateway"),
    [
        (502, "<html><center>nginx</center></html>", None, True),
        (504, "<hr><center>nginx/1.25</center>", None, True),
        (503, "<center>nginx</center>", "req-1", False),
        (500, "<center>nginx</center>", None, False),
        (502, '{"detail": "bad gateway"}', None, False),
    ],
)
def test_gateway_error_heuristic(
    code: int, body: str, request_id: str | None, gateway: bool
) -> None:
    assert is_gateway_error(code, body, request_id) is gateway


NOW = 1_700_000_000.0  # 2023-11-14 22:13:20 GMT


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("3", 3.0),
        (" 1.5 ", 1.5),
        ("-4", 0.0),
        ("Tue, 14 Nov 2023 22:13:30 GMT", 10.0),
        ("Tue, 14 Nov 2023 22:13:00 GMT", 0.0),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_accepts_seconds_and_http_dates(
    value: str | None, expected: float | None
) -> None:
    assert parse_retry_after(value, now_s=NOW) == expected


def _events(chunks: list[bytes]) -> list[str]:
    parser = SSEParser()
    out: list[str] = []
    for chunk in chunks:
        out.extend(parser.feed(chunk))
    return out


STREAM = (
    b": keep-alive\n\n"
    b'data: {"status": "IN_QUEUE", "queue_position": 1}\n\n'
    b": ping\n"
    b'event: status\nid: 7\ndata: {"status": "IN_PROGRESS", "logs": null}\n\n'
    b'data: {"status": "COMPLETED",\ndata: "logs": null}\n\n'
)
EXPECTED = [
    '{"status": "IN_QUEUE", "queue_position": 1}',
    '{"status": "IN_PROGRESS", "logs": null}',
    '{"status": "COMPLETED",\n"logs": null}',
]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, len(STREAM)])
def test_sse_parser_is_independent_of_chunk_boundaries(size: int) -> None:
    chunks = [STREAM[i : i + size] for i in range(0, len(STREAM), size)]
    assert _events(chunks) == EXPECTED


@pytest.mark.parametrize("newline", [b"\r\n", b"\r"])
def test_sse_parser_accepts_crlf_and_cr_line_ends_split_anywhere(newline: bytes) -> None:
    stream = STREAM.replace(b"\n", newline)
    for size in (1, 2, 5):
        chunks = [stream[i : i + size] for i in range(0, len(stream), size)]
        assert _events(chunks) == EXPECTED


def test_sse_parser_handles_multibyte_characters_split_across_chunks() -> None:
    payload = json.dumps(
        {"status": "IN_PROGRESS", "logs": [{"message": "café ☕"}]}, ensure_ascii=False
    )
    raw = f"data: {payload}\n\n".encode()
    cut = raw.index("☕".encode()) + 1
    status = parse_event_status(_events([raw[:cut], raw[cut:]])[0])
    assert isinstance(status, InProgress)
    assert status.logs is not None
    assert status.logs[0].message == "café ☕"


def test_sse_parser_drops_an_unterminated_event() -> None:
    assert _events([b'data: {"status": "IN_QUEUE"']) == []


def test_sse_event_that_is_not_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="not JSON"):
        parse_event_status("<html>")


def test_a_result_seed_past_int64_is_a_protocol_error_not_a_ledger_crash() -> None:
    with pytest.raises(ProtocolError, match="seed"):
        FluxResult.from_payload({**FLUX, "seed": 10**23})
