"""The pure reading of fal's answers: success, or a failure with its reason and retryability."""

import pytest

from runner.execution.outcome import Failure, Success, expired, read_result, read_status
from runner.fal.protocol import Completed, ResultResponse

IMAGE = {"url": "https://cdn/x.png", "width": 1024, "height": 768, "content_type": "image/png"}
OK_BODY = {
    "images": [IMAGE, {**IMAGE, "width": 1920, "height": 1080}],
    "seed": 7,
    "has_nsfw_concepts": [False, True],
    "timings": {"inference": 2.5},
    "prompt": "x",
}


def test_success_reads_outputs_megapixels_and_timing() -> None:
    read = read_result(ResultResponse(status_code=200, body=OK_BODY))
    assert isinstance(read, Success)
    assert [o.width for o in read.outputs] == [1024, 1920]
    assert read.megapixels == 1 + 2
    assert read.inference_s == 2.5
    assert read.result.seed == 7


@pytest.mark.parametrize(
    ("code", "body", "error_type", "timeout_type", "expected"),
    [
        (422, {"detail": [{"loc": ["body", "prompt"], "msg": "required"}]}, None, None,
         ("validation", False)),
        (503, {"detail": "Runner disconnected"}, "runner_disconnected", None,
         ("runner_disconnected", True)),
        (504, {"detail": "Request timed out"}, "request_timeout", None, ("request_timeout", True)),
        (504, {"detail": "Request timed out"}, "request_timeout", "user",
         ("request_timeout", False)),  # the user's own start deadline: retrying repeats it
        (500, {"detail": "boom"}, "internal_error", None, ("internal_error", True)),
        (500, "not json", None, None, ("error", False)),
        (200, {"images": "nope"}, None, None, ("bad_result", False)),
    ],
)  # fmt: skip
def test_failures_carry_type_message_and_retryability(
    code: int, body: object, error_type: str | None, timeout_type: str | None,
    expected: tuple[str, bool],
) -> None:  # fmt: skip
    read = read_result(
        ResultResponse(
            status_code=code, body=body, error_type=error_type, timeout_type=timeout_type
        )
    )
    assert isinstance(read, Failure)
    assert (read.error_type, read.retryable) == expected
    assert read.message


def test_completed_status_with_error_needs_no_result_call() -> None:
    status = Completed(logs=None, error="Runner disconnected", error_type="runner_disconnected")
    failure = read_status(status)
    assert failure == Failure("runner_disconnected", "Runner disconnected", True)
    assert read_status(Completed(logs=None)) is None


def test_expired_is_permanent_and_says_why() -> None:
    failure = expired("abc", "HTTP 404")
    assert failure.error_type == "result_expired" and not failure.retryable
    assert "abc" in failure.message and "404" in failure.message
