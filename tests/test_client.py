"""QueueClient against a tiny fake queue that speaks the real protocol over MockTransport."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import pytest
from pydantic import SecretStr

from runner.errors import AuthError, HTTPStatusError, ProtocolError, TransportError, UsageError
from runner.fal.client import QueueClient
from runner.fal.protocol import Completed, FluxResult, InProgress, Queued, SubmitAck
from runner.fal.retry import UNKNOWN_OUTCOME, RetryPolicy, call_with_retry, classify
from runner.fal.transport import CallTimeouts, open_transport

QUEUE = "https://queue.fal.test"
SECRET = "key-id-1234:very-secret-value-5678"
NGINX = "<html><head><title>502 Bad Gateway</title></head><center>nginx/1.25</center></html>"
RESULT = {
    "images": [
        {
            "url": "https://v3.fal.media/files/x.png",
            "width": 512,
            "height": 512,
            "content_type": "image/png",
        }
    ],
    "timings": {"inference": 0.8},
    "seed": 7,
    "has_nsfw_concepts": [False],
    "prompt": "a fox",
}
REQUEST_PATH = re.compile(r"^/(?P<app>[^/]+/[^/]+)/requests/(?P<id>[^/]+)(?P<rest>/.*)?$")


@dataclass
class Job:
    app: str
    polls: int = 0
    cancelled: bool = False
    # What GET status returns on successive polls; the last one repeats (COMPLETED is sticky).
    script: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"status": "IN_QUEUE", "queue_position": 1},
            {"status": "IN_QUEUE", "queue_position": 0},
            {"status": "IN_PROGRESS", "logs": None},
            {"status": "COMPLETED", "logs": None, "metrics": {"inference_time": 0.8}},
        ]
    )
    result: tuple[int, Any, dict[str, str]] = (200, RESULT, {})

    def status(self) -> dict[str, Any]:
        self.polls += 1
        return self.script[min(self.polls, len(self.script)) - 1]

    @property
    def done(self) -> bool:
        return self.polls >= len(self.script)


@dataclass
class FakeQueue:
    """Enough of fal's queue to exercise every call: jobs progress as they are polled."""

    jobs: dict[str, Job] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)
    faults: list[Callable[[httpx.Request], httpx.Response]] = field(default_factory=list)
    stream_chunks: list[bytes] | None = None

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Key {SECRET}":
            return httpx.Response(401, json={"detail": "Unauthorized"})
        if self.faults:
            return self.faults.pop(0)(request)
        match = REQUEST_PATH.match(request.url.path)
        if request.method == "POST":
            return self.submit(request)
        if match is None or match["id"] not in self.jobs:
            return httpx.Response(
                404,
                json={"status": "NOT_FOUND"}
                if request.method == "PUT"
                else {"detail": "Request not found"},
            )
        job, rest, rid = self.jobs[match["id"]], match["rest"] or "", match["id"]
        if request.method == "PUT" and rest == "/cancel":
            if job.done:
                return httpx.Response(400, json={"status": "ALREADY_COMPLETED"})
            job.cancelled = True
            return httpx.Response(202, json={"status": "CANCELLATION_REQUESTED"})
        if rest.rstrip("/") == "/status":
            body = job.status()
            return httpx.Response(200 if body["status"] == "COMPLETED" else 202, json=body)
        if rest == "/status/stream":
            return httpx.Response(
                200, headers={"content-type": "text/event-stream"}, content=self.sse(job)
            )
        code, body, headers = job.result
        return httpx.Response(code, json=body, headers={"x-fal-request-id": rid, **headers})

    def submit(self, request: httpx.Request) -> httpx.Response:
        rid = f"req-{len(self.jobs) + 1}"
        app = "/".join(request.url.path.strip("/").split("/")[:2])
        self.jobs[rid] = Job(app=app)
        base = f"{QUEUE}/{app}/requests/{rid}"
        return httpx.Response(
            200,
            json={
                "status": "IN_QUEUE",
                "request_id": rid,
                "response_url": base,
                "status_url": f"{base}/status",
                "cancel_url": f"{base}/cancel",
                "queue_position": 0,
                "logs": None,
                "metrics": {},
                "unknown_extra": True,
            },
        )

    async def sse(self, job: Job) -> AsyncIterator[bytes]:
        if self.stream_chunks is not None:
            for chunk in self.stream_chunks:
                yield chunk
            return
        text = ": connected\n\n"
        for body in job.script:
            text += f": keep-alive\n\ndata: {json.dumps(body)}\n\n"
        text += 'data: {"status": "COMPLETED", "logs": null}\n\n'  # after the end: never read
        raw = text.encode()
        for i in range(0, len(raw), 5):  # cut lines mid-way on purpose
            yield raw[i : i + 5]


NOWHERE = httpx.MockTransport(lambda request: httpx.Response(599))  # for URL-only tests


@pytest.fixture
def fake() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
async def client(fake: FakeQueue) -> AsyncIterator[QueueClient]:
    async with httpx.MockTransport(fake) as transport:
        yield QueueClient(transport, queue_url=QUEUE, key=SecretStr(SECRET))


def respond(
    code: int, body: str = "", headers: dict[str, str] | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    return lambda request: httpx.Response(code, text=body, headers=headers or {})


def fail(
    exc_type: type[httpx.TransportError], text: str = "boom"
) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(text, request=request)

    return handler


# --- submit -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_submit_posts_the_full_id_with_headers_and_webhook(
    client: QueueClient, fake: FakeQueue
) -> None:
    ack = await client.submit(
        "fal-ai/flux-lora/image-to-image",
        {"prompt": "a fox", "seed": 1},
        webhook_url="https://hooks.example/fal?run=1",
        priority="low",
        start_timeout_s=30,
        extra_headers={"X-Fal-Store-IO": "0"},
    )
    sent = fake.requests[0]
    assert sent.method == "POST"
    assert sent.url.path == "/fal-ai/flux-lora/image-to-image"
    assert sent.url.params["fal_webhook"] == "https://hooks.example/fal?run=1"
    assert json.loads(sent.content) == {"prompt": "a fox", "seed": 1}
    assert sent.headers["x-fal-queue-priority"] == "low"
    assert sent.headers["x-fal-request-timeout"] == "30.0"
    assert sent.headers["x-fal-store-io"] == "0"
    assert sent.extensions["timeout"]["connect"] == CallTimeouts().connect_s
    assert isinstance(ack, SubmitAck)
    assert ack.request_id == "req-1"
    assert ack.status_url == f"{QUEUE}/fal-ai/flux-lora/requests/req-1/status"  # no sub-path


@pytest.mark.anyio
async def test_submit_without_options_sends_no_optional_headers(
    client: QueueClient, fake: FakeQueue
) -> None:
    await client.submit("fal-ai/flux-lora", {"prompt": "x"})
    sent = fake.requests[0]
    assert "fal_webhook" not in sent.url.params
    assert "x-fal-queue-priority" not in sent.headers
    assert "x-fal-request-timeout" not in sent.headers


@pytest.mark.parametrize(
    "kwargs",
    [
        {"priority": "urgent"},
        {"start_timeout_s": 1.0},
        {"extra_headers": {"authorization": "Key other"}},
    ],
)
@pytest.mark.anyio
async def test_submit_rejects_bad_options_before_sending(
    client: QueueClient, fake: FakeQueue, kwargs: dict[str, Any]
) -> None:
    with pytest.raises(UsageError):
        await client.submit("fal-ai/flux-lora", {}, **kwargs)
    assert fake.requests == []


@pytest.mark.parametrize(
    "endpoint", ["flux-lora", "fal-ai/", "fal-ai/../x", "fal-ai/flux?x=1", "workflows/a"]
)
@pytest.mark.anyio
async def test_submit_rejects_malformed_endpoint_ids(client: QueueClient, endpoint: str) -> None:
    with pytest.raises(UsageError, match="owner/app"):
        await client.submit(endpoint, {})


@pytest.mark.anyio
async def test_submit_ack_without_request_id_is_a_protocol_error(
    client: QueueClient, fake: FakeQueue
) -> None:
    fake.faults.append(respond(200, '{"status": "IN_QUEUE"}'))
    with pytest.raises(ProtocolError, match="request_id") as info:
        await client.submit("fal-ai/flux-lora", {})
    assert classify(info.value, kind="submit") == UNKNOWN_OUTCOME


@pytest.mark.parametrize(
    ("exc_type", "sent"),
    [
        (httpx.ConnectError, False),
        (httpx.ConnectTimeout, False),
        (httpx.PoolTimeout, False),
        (httpx.ReadTimeout, True),
        (httpx.WriteError, True),
        (httpx.ReadError, True),
        (httpx.RemoteProtocolError, True),
    ],
)
@pytest.mark.anyio
async def test_transport_errors_become_transport_error_saying_whether_sent(
    client: QueueClient, fake: FakeQueue, exc_type: type[httpx.TransportError], sent: bool
) -> None:
    fake.faults.append(fail(exc_type))
    with pytest.raises(TransportError) as info:
        await client.submit("fal-ai/flux-lora", {})
    assert info.value.sent is sent
    assert isinstance(info.value.__cause__, exc_type)


@pytest.mark.anyio
async def test_submit_retried_through_the_policy_after_a_gateway_502(
    client: QueueClient, fake: FakeQueue
) -> None:
    fake.faults += [respond(502, NGINX), fail(httpx.ConnectError)]
    sleeps: list[float] = []

    async def sleep(s: float) -> None:
        sleeps.append(s)

    ack = await call_with_retry(
        lambda: client.submit("fal-ai/flux-lora", {"prompt": "x"}),
        policy=RetryPolicy(attempts=5),
        kind="submit",
        sleep=sleep,
        rng=lambda: 0.5,
    )
    assert ack.request_id == "req-1"
    assert len(fake.jobs) == 1  # exactly one accepted request
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    "fault",
    [
        respond(503, NGINX, {"x-fal-request-id": "req-x"}),
        respond(500, '{"detail": "internal"}'),
        fail(httpx.ReadTimeout),
        fail(httpx.RemoteProtocolError),
    ],
    ids=["503 with request id", "500 from the app", "read timeout", "reset after send"],
)
@pytest.mark.anyio
async def test_submit_with_unknown_outcome_is_not_resubmitted(
    client: QueueClient, fake: FakeQueue, fault: Callable[[httpx.Request], httpx.Response]
) -> None:
    fake.faults.append(fault)
    with pytest.raises((HTTPStatusError, TransportError)) as info:
        await call_with_retry(
            lambda: client.submit("fal-ai/flux-lora", {}),
            policy=RetryPolicy(attempts=5),
            kind="submit",
            sleep=_no_sleep,
        )
    assert len(fake.requests) == 1
    assert classify(info.value, kind="submit") == UNKNOWN_OUTCOME


async def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"should not wait {seconds}")


@pytest.mark.anyio
async def test_http_error_carries_code_request_id_retry_after_and_truncated_body(
    client: QueueClient, fake: FakeQueue
) -> None:
    fake.faults.append(respond(429, "x" * 10_000, {"retry-after": "7", "x-fal-request-id": "r-1"}))
    with pytest.raises(HTTPStatusError) as info:
        await client.submit("fal-ai/flux-lora", {})
    err = info.value
    assert (err.status_code, err.request_id, err.retry_after_s) == (429, "r-1", 7.0)
    assert len(err.body) == 2000
    assert len(str(err)) < 400


# On trio, leaving an httpx stream before its end makes trio warn (ResourceWarning) when
# httpx's own nested byte iterators are garbage collected: httpx does not close them, and
# they are out of the client's reach. The client closes the response and its own iterators.
httpx_stream_gc = pytest.mark.filterwarnings(
    "ignore:Async generator 'httpx.*was garbage collected:ResourceWarning"
)


# --- status and stream ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_status_progresses_through_the_protocol(client: QueueClient, fake: FakeQueue) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    seen = [await client.status(ack) for _ in range(5)]
    assert seen == [
        Queued(position=1),
        Queued(position=0),
        InProgress(logs=None),
        Completed(logs=None, inference_time_s=0.8),
        Completed(logs=None, inference_time_s=0.8),
    ]
    polls = [r for r in fake.requests if r.method == "GET"]
    assert {r.url.params["logs"] for r in polls} == {"0"}
    assert polls[0].url.path == "/fal-ai/flux-lora/requests/req-1/status"


@pytest.mark.anyio
async def test_status_with_logs_asks_for_them(client: QueueClient, fake: FakeQueue) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    await client.status(ack, logs=True)
    assert fake.requests[-1].url.params["logs"] == "1"


@pytest.mark.parametrize(
    ("code", "body", "headers", "error"),
    [
        (202, '{"status": "RUNNING"}', {}, ProtocolError),
        (202, '{"status": "IN_QUEUE"}', {}, ProtocolError),
        (200, "<html>", {}, ProtocolError),
        (504, "{}", {"x-fal-request-timeout-type": "user"}, ProtocolError),
        (401, '{"detail": "bad key"}', {}, AuthError),
        (403, "", {}, AuthError),
        (404, '{"detail": "Request not found"}', {}, HTTPStatusError),
        (503, NGINX, {}, HTTPStatusError),
    ],
)
@pytest.mark.anyio
async def test_status_answers_outside_the_protocol_raise(
    client: QueueClient,
    fake: FakeQueue,
    code: int,
    body: str,
    headers: dict[str, str],
    error: type[Exception],
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    fake.faults.append(respond(code, body, headers))
    with pytest.raises(error):
        await client.status(ack)


@httpx_stream_gc
@pytest.mark.anyio
async def test_stream_yields_each_status_through_keepalives_and_split_lines(
    client: QueueClient, fake: FakeQueue
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    async with client.stream(ack) as events:
        seen = [status async for status in events]
    assert seen == [
        Queued(position=1),
        Queued(position=0),
        InProgress(logs=None),
        Completed(logs=None, inference_time_s=0.8),
    ]
    sent = fake.requests[-1]
    assert sent.url.path == "/fal-ai/flux-lora/requests/req-1/status/stream"
    assert sent.url.params["logs"] == "0"
    assert sent.headers["accept"] == "text/event-stream"
    assert sent.extensions["timeout"]["read"] == CallTimeouts().stream_idle_s


@pytest.mark.anyio
async def test_stream_closed_before_completed_is_a_transport_error(
    client: QueueClient, fake: FakeQueue
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    fake.stream_chunks = [b'data: {"status": "IN_QUEUE", "queue_position": 3}\n\n', b": bye\n\n"]
    seen = []
    with pytest.raises(TransportError, match="before COMPLETED") as info:
        async with client.stream(ack) as events:
            async for status in events:
                seen.append(status)
    assert seen == [Queued(position=3)]
    assert info.value.sent is True
    assert classify(info.value, kind="read").action.value == "retry"


@httpx_stream_gc
@pytest.mark.anyio
async def test_stream_with_a_bad_event_is_a_protocol_error(
    client: QueueClient, fake: FakeQueue
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    fake.stream_chunks = [b'data: {"status": "PAUSED"}\n\n']
    with pytest.raises(ProtocolError, match="PAUSED"):
        async with client.stream(ack) as events:
            async for _ in events:
                pass


@pytest.mark.anyio
async def test_stream_refused_raises_before_yielding(client: QueueClient, fake: FakeQueue) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    fake.faults.append(respond(503, NGINX))
    with pytest.raises(HTTPStatusError) as info:
        async with client.stream(ack):
            pass
    assert info.value.status_code == 503


@httpx_stream_gc
@pytest.mark.anyio
async def test_stream_left_early_closes_cleanly(client: QueueClient) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    async with client.stream(ack) as events:
        async for status in events:
            assert status == Queued(position=1)
            break


@httpx_stream_gc
@pytest.mark.anyio
async def test_cancelling_a_stream_while_it_waits_for_data_ends_cleanly(
    client: QueueClient, fake: FakeQueue
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    fake.stream_chunks = None
    fake.jobs[ack.request_id].script = [{"status": "IN_QUEUE", "queue_position": 4}]

    async def first_then_silence(job: Job) -> AsyncIterator[bytes]:
        yield b'data: {"status": "IN_QUEUE", "queue_position": 4}\n\n'
        await anyio.sleep_forever()

    fake.sse = first_then_silence  # type: ignore[method-assign]
    seen = []
    with anyio.CancelScope() as scope:
        async with client.stream(ack) as events:
            async for status in events:
                seen.append(status)
                scope.cancel()  # the next read is pending when the cancel lands
    assert scope.cancelled_caught
    assert seen == [Queued(position=4)]


# --- result and cancel ---------------------------------------------------------------------


@pytest.mark.anyio
async def test_result_returns_the_body_with_its_request_id(client: QueueClient) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    result = await client.result(ack)
    assert result.ok
    assert result.status_code == 200
    assert result.request_id == "req-1"
    assert FluxResult.from_payload(result.body).images[0].width == 512


@pytest.mark.parametrize(
    ("code", "body", "headers", "error_type"),
    [
        (
            422,
            {"detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "missing"}]},
            {},
            None,
        ),
        (
            503,
            {"detail": "Runner disconnected", "error_type": "runner_disconnected"},
            {"x-fal-error-type": "runner_disconnected"},
            "runner_disconnected",
        ),
        (
            504,
            {"detail": "Request timed out", "error_type": "request_timeout"},
            {"x-fal-request-timeout-type": "user"},
            "request_timeout",
        ),
        (500, {"detail": "boom", "error_type": "internal_error"}, {}, "internal_error"),
    ],
)
@pytest.mark.anyio
async def test_stored_error_results_are_results_not_exceptions(
    client: QueueClient,
    fake: FakeQueue,
    code: int,
    body: Any,
    headers: dict[str, str],
    error_type: str | None,
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    fake.jobs[ack.request_id].result = (code, body, headers)
    result = await client.result(ack)
    assert (result.status_code, result.body, result.error_type) == (code, body, error_type)
    assert not result.ok
    assert result.request_id == ack.request_id


@pytest.mark.parametrize(
    ("code", "body", "headers", "error"),
    [
        (404, '{"detail": "Request not found"}', {}, HTTPStatusError),
        (502, NGINX, {}, HTTPStatusError),
        (429, "slow down", {"x-fal-request-id": "r"}, HTTPStatusError),
        (401, "", {}, AuthError),
        (200, "not json", {}, ProtocolError),
    ],
)
@pytest.mark.anyio
async def test_result_answers_that_are_not_results_raise(
    client: QueueClient,
    fake: FakeQueue,
    code: int,
    body: str,
    headers: dict[str, str],
    error: type[Exception],
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    fake.faults.append(respond(code, body, headers))
    with pytest.raises(error):
        await client.result(ack)


@pytest.mark.anyio
async def test_cancel_reports_each_outcome(client: QueueClient, fake: FakeQueue) -> None:
    queued = await client.submit("fal-ai/flux-lora", {})
    assert await client.cancel(queued) == "CANCELLATION_REQUESTED"
    assert fake.jobs[queued.request_id].cancelled
    done = await client.submit("fal-ai/flux-lora", {})
    fake.jobs[done.request_id].polls = 4
    assert await client.cancel(done) == "ALREADY_COMPLETED"
    gone = client.urls_for("fal-ai/flux-lora", "req-404")
    assert await client.cancel(gone) == "NOT_FOUND"
    assert fake.requests[-1].method == "PUT"


@pytest.mark.anyio
async def test_cancel_404_without_a_cancel_body_is_an_error(
    client: QueueClient, fake: FakeQueue
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    fake.faults.append(respond(404, "<html>not found</html>"))
    with pytest.raises(HTTPStatusError):
        await client.cancel(ack)


# --- URLs, re-attach and origins -------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "base"),
    [
        ("fal-ai/flux-lora", "fal-ai/flux-lora"),
        ("fal-ai/flux-2/lora/edit", "fal-ai/flux-2"),
        ("fal-ai/flux-lora/image-to-image", "fal-ai/flux-lora"),
        ("workflows/me/my-flow/run", "workflows/me/my-flow"),
    ],
)
def test_urls_for_uses_owner_and_app_only(endpoint: str, base: str) -> None:
    client = QueueClient(
        httpx.MockTransport(FakeQueue()), queue_url=QUEUE + "/", key=SecretStr(SECRET)
    )
    urls = client.urls_for(endpoint, "0f1e-2d3c")
    assert urls.response_url == f"{QUEUE}/{base}/requests/0f1e-2d3c"
    assert urls.status_url == urls.response_url + "/status"
    assert urls.cancel_url == urls.response_url + "/cancel"


@pytest.mark.anyio
async def test_reattach_from_a_request_id_polls_the_same_request(client: QueueClient) -> None:
    ack = await client.submit("fal-ai/flux-2/lora/edit", {})
    again = client.urls_for("fal-ai/flux-2/lora/edit", ack.request_id)
    assert again.status_url == ack.status_url
    assert await client.status(again) == Queued(position=1)


def test_urls_for_rejects_a_request_id_that_would_change_the_path() -> None:
    client = QueueClient(NOWHERE, queue_url=QUEUE, key=SecretStr(SECRET))
    with pytest.raises(UsageError):
        client.urls_for("fal-ai/flux-lora", "../../other")


@pytest.mark.anyio
async def test_key_is_never_sent_to_a_url_off_the_queue_origin(
    client: QueueClient, fake: FakeQueue
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    evil = ack.model_copy(update={"status_url": "https://evil.example/steal/status"})
    with pytest.raises(ProtocolError, match="refusing"):
        await client.status(evil)
    with pytest.raises(ProtocolError, match="refusing"):
        async with client.stream(evil):
            pass
    assert all(r.url.host == "queue.fal.test" for r in fake.requests)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "url",
    [
        "https://queue.fal.test.evil.example/fal-ai/flux-lora/requests/x/status",
        "https://queue.fal.test@evil.example/fal-ai/flux-lora/requests/x/status",
        "https://queue.fal.test:8443/fal-ai/flux-lora/requests/x/status",
        "http://queue.fal.test/fal-ai/flux-lora/requests/x/status",
    ],
)
async def test_lookalike_origins_are_refused_too(
    client: QueueClient, fake: FakeQueue, url: str
) -> None:
    ack = await client.submit("fal-ai/flux-lora", {})
    with pytest.raises(ProtocolError, match="refusing"):
        await client.status(ack.model_copy(update={"status_url": url}))
    with pytest.raises(ProtocolError, match="refusing"):
        await client.peek_result(ack.model_copy(update={"response_url": url}))
    assert all(r.url.host == "queue.fal.test" and r.url.port is None for r in fake.requests)


@pytest.mark.anyio
async def test_a_refused_origin_is_named_with_its_port(client: QueueClient) -> None:
    # On loopback two origins differ only by port: a message without them reads "x is not x".
    ack = await client.submit("fal-ai/flux-lora", {})
    other = "https://queue.fal.test:8443/fal-ai/flux-lora/requests/x/status"
    with pytest.raises(ProtocolError) as caught:
        await client.status(ack.model_copy(update={"status_url": other}))
    assert str(caught.value) == (
        "refusing to send the key to https://queue.fal.test:8443: "
        "not the queue origin https://queue.fal.test"
    )


# --- the key ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_key_is_absent_from_repr_and_every_error_message(
    client: QueueClient, fake: FakeQueue
) -> None:
    assert SECRET not in repr(client)
    assert "very-secret" not in repr(client)
    messages = []
    fake.faults += [
        respond(500, f"echo: Authorization: Key {SECRET}"),
        fail(httpx.ReadError, f"reset while sending Key {SECRET}"),
        respond(401, f"bad key {SECRET}"),
    ]
    for error in (HTTPStatusError, TransportError, AuthError):
        with pytest.raises(error) as info:
            await client.submit("fal-ai/flux-lora", {})
        messages.append(str(info.value))
        messages.append(getattr(info.value, "body", ""))
    assert messages[0].startswith("POST https://queue.fal.test/fal-ai/flux-lora: HTTP 500")
    for text in messages:
        assert "very-secret-value" not in text
    # the key does go where it belongs
    assert fake.requests[0].headers["authorization"] == f"Key {SECRET}"


def test_queue_url_must_be_http() -> None:
    with pytest.raises(UsageError):
        QueueClient(
            httpx.MockTransport(FakeQueue()), queue_url="ftp://queue", key=SecretStr(SECRET)
        )


# --- against the real emulator over loopback -------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn serves on asyncio only
@pytest.mark.anyio
async def test_client_speaks_to_the_emulator_end_to_end() -> None:
    """Real HTTP and SSE on 127.0.0.1: a gateway 502 is resubmitted, a reset after accept is
    an unknown outcome (and was queued), a failed job is a result, a good one parses."""
    from runner.emulator import (
        DEFAULT_KEY,
        Emulator,
        EmulatorConfig,
        ServiceTime,
        parse_faults,
        serve,
    )

    config = EmulatorConfig(
        time_scale=0.01,
        service=ServiceTime(fixed_s=1.0),
        faults=parse_faults("gateway_502=@1,reset_after_accept=@2,fail_runner_disconnected=@1"),
    )
    payload = {"prompt": "a fox", "image_size": "square", "num_inference_steps": 4}
    async with (
        serve(Emulator(config)) as served,
        open_transport(served.base_url, limits=httpx.Limits()) as transport,
    ):
        client = QueueClient(transport, queue_url=served.base_url, key=SecretStr(DEFAULT_KEY))

        async def submit() -> SubmitAck:
            return await call_with_retry(
                lambda: client.submit("fal-ai/flux-lora", payload),
                policy=RetryPolicy(attempts=3),
                kind="submit",
                sleep=lambda s: anyio.lowlevel.checkpoint(),
            )

        failing = await submit()  # first POST hits the gateway 502, the retry is accepted
        with pytest.raises(TransportError) as lost:
            await submit()
        assert classify(lost.value, kind="submit") == UNKNOWN_OUTCOME
        good = await submit()

        async with client.stream(failing) as events:
            last = [status async for status in events][-1]
        assert isinstance(last, Completed) and last.error_type == "runner_disconnected"
        failed = await client.result(failing)
        assert (failed.status_code, failed.error_type) == (503, "runner_disconnected")

        status = await client.status(good)
        while not isinstance(status, Completed):
            await anyio.sleep(0.005)  # a real server: jobs take 10 ms here
            status = await client.status(good)
        result = await client.result(good)
        assert result.ok and result.request_id == good.request_id
        assert FluxResult.from_payload(result.body).images[0].width == 512
        assert await client.cancel(good) == "ALREADY_COMPLETED"
        async with httpx.AsyncClient() as http:
            stats = (await http.get(f"{served.base_url}/_emulator/stats")).json()
    # Four POSTs, three queued: the gateway 502 queued nothing, the reset one was queued.
    assert stats["submits"]["accepted"] == 3
