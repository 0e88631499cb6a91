"""The emulator's queue protocol, in-process over httpx's ASGI transport with a fake clock."""

from __future__ import annotations

import hashlib
import io
import json
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from PIL import Image
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runner.emulator import Emulator, ServiceTime
from runner.emulator.queue import Ending, Job, QueueModel
from runner.emulator.routes import route_kind
from runner.emulator.stats import canonical_input
from runner.endpoints import catalog
from tests.emulator_support import JOB_CLOCK_S, T0, FakeClock, data_uri, in_process, make_emulator

pytestmark = pytest.mark.anyio
LORA = "fal-ai/flux-lora"


async def submit(
    client: httpx.AsyncClient, body: dict[str, Any] | None = None, path: str = LORA, **kw: Any
) -> dict[str, Any]:
    response = await client.post(f"/{path}", json=body or {"prompt": "a cat"}, **kw)
    assert response.status_code == 200, response.text
    return dict(response.json())


async def status(client: httpx.AsyncClient, sub: dict[str, Any], logs: str = "1") -> httpx.Response:
    return await client.get(sub["status_url"], params={"logs": logs})


async def test_submit_answers_spec_shape_with_own_origin_and_no_subpath() -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        response = await client.post(
            "/fal-ai/flux-2/lora/edit", json={"prompt": "x", "image_urls": [data_uri(64, 48)]}
        )
    body = response.json()
    rid = body["request_id"]
    root = f"http://emulator/fal-ai/flux-2/requests/{rid}"
    assert response.status_code == 200
    assert response.headers["x-fal-request-id"] == rid
    assert body == {
        "status": "IN_QUEUE",
        "request_id": rid,
        "response_url": root,
        "status_url": root + "/status",
        "cancel_url": root + "/cancel",
        "queue_position": 0,
        "logs": None,
        "metrics": {},
    }


async def test_status_goes_queued_in_progress_completed_with_202_then_sticky_200() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        first = await submit(client)
        second = await submit(client)
        queued = await status(client, second)
        running = await status(client, first)
        clock.advance(JOB_CLOCK_S)
        done = await status(client, first)
        again = await status(client, first)
    assert (queued.status_code, queued.json()["status"]) == (202, "IN_QUEUE")
    assert queued.json()["queue_position"] == 0
    assert (running.status_code, running.json()["status"]) == (202, "IN_PROGRESS")
    assert isinstance(running.json()["logs"], list)
    assert (done.status_code, done.json()["status"]) == (200, "COMPLETED")
    assert done.json()["metrics"] == {"inference_time": pytest.approx(JOB_CLOCK_S)}
    assert "error" not in done.json()
    assert again.json() == done.json()


async def test_queue_positions_are_true_counts_and_shift_as_jobs_start() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        subs = [await submit(client, {"prompt": f"p{i}"}) for i in range(4)]
        before = [(await status(client, s)).json().get("queue_position") for s in subs]
        clock.advance(JOB_CLOCK_S)
        after = [(await status(client, s)).json().get("queue_position") for s in subs]
    assert [s["queue_position"] for s in subs] == [0, 0, 1, 2]
    assert before == [None, 0, 1, 2]
    assert after == [None, None, 0, 1]


async def test_low_priority_requests_start_after_every_normal_one() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    low = {"X-Fal-Queue-Priority": "low"}
    async with in_process(emu) as client:
        await submit(client, {"prompt": "running"})
        slow = await submit(client, {"prompt": "low"}, headers=low)
        normal = await submit(client, {"prompt": "normal"})
        positions = [(await status(client, s)).json()["queue_position"] for s in (slow, normal)]
        clock.advance(JOB_CLOCK_S)
        phases = [(await status(client, s)).json()["status"] for s in (slow, normal)]
    assert positions == [1, 0]
    assert phases == ["IN_QUEUE", "IN_PROGRESS"]


@pytest.mark.parametrize(
    ("logs", "want_list"),
    [("1", True), ("true", True), ("True", True), ("0", False), ("false", False), (None, False)],
)
async def test_logs_key_is_present_list_or_null_per_logs_param(
    logs: str | None, want_list: bool
) -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        sub = await submit(client)
        params = {} if logs is None else {"logs": logs}
        running = (await client.get(sub["status_url"], params=params)).json()
        clock.advance(JOB_CLOCK_S)
        done = (await client.get(sub["status_url"] + "/", params=params)).json()
    for body in (running, done):
        assert "logs" in body
        assert isinstance(body["logs"], list) if want_list else body["logs"] is None
    if want_list:
        entry = done["logs"][-1]
        assert set(entry) == {"message", "level", "source", "timestamp"}
        assert entry["timestamp"].startswith("2030-")


async def test_result_replays_stored_answer_and_refuses_before_completion() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        sub = await submit(client, {"prompt": "a fox", "seed": 42, "num_images": 2})
        early = await client.get(sub["response_url"])
        clock.advance(JOB_CLOCK_S)
        result = await client.get(sub["response_url"] + "/")
        again = await client.get(sub["response_url"])
        image = await client.get(result.json()["images"][1]["url"])
    assert (early.status_code, early.json()) == (400, {"detail": "Request is still in progress"})
    assert result.status_code == 200
    assert result.headers["x-fal-request-id"] == sub["request_id"]
    body = result.json()
    assert body["seed"] == 42 and body["prompt"] == "a fox"
    assert body["has_nsfw_concepts"] == [False, False]
    assert body["timings"] == {"inference": pytest.approx(JOB_CLOCK_S)}
    assert [(i["width"], i["height"], i["content_type"]) for i in body["images"]] == [
        (1024, 768, "image/jpeg")
    ] * 2
    assert again.json() == body
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(image.content)).size == (1024, 768)


@pytest.mark.parametrize(
    "path",
    ["/fal-ai/flux-lora/requests/{rid}", "/fal-ai/flux-lora/requests/{rid}/status",
     "/fal-ai/other/requests/{known}", "/fal-ai/other/requests/{known}/status"],
)  # fmt: skip
async def test_unknown_request_or_wrong_app_answers_404(path: str) -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        known = (await submit(client))["request_id"]
        response = await client.get(path.format(rid="0000-unknown", known=known))
    assert (response.status_code, response.json()) == (404, {"detail": "Request not found"})


async def test_seed_is_random_when_missing_reported_and_reproducible_under_config_seed() -> None:
    async def seeds(config_seed: int) -> list[int]:
        clock = FakeClock()
        emu = make_emulator(clock, seed=config_seed, concurrency=2)
        async with in_process(emu) as client:
            subs = [await submit(client) for _ in range(2)]
            clock.advance(JOB_CLOCK_S)
            return [(await client.get(s["response_url"])).json()["seed"] for s in subs]

    first, again, other = await seeds(1), await seeds(1), await seeds(2)
    assert first == again and first != other and first[0] != first[1]


async def test_cancel_queued_never_runs_running_ends_completed_400_unknown_404() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        running = await submit(client, {"prompt": "a"})
        queued = await submit(client, {"prompt": "b"})
        cancel_queued = await client.put(queued["cancel_url"])
        clock.advance(JOB_CLOCK_S / 2)
        cancel_running = await client.put(running["cancel_url"] + "/")
        again = await client.put(running["cancel_url"])
        unknown = await client.put("/fal-ai/flux-lora/requests/nope/cancel")
        final = (await status(client, queued)).json()
        result = await client.get(queued["response_url"])
    assert (cancel_queued.status_code, cancel_queued.json()) == (
        202,
        {"status": "CANCELLATION_REQUESTED"},
    )
    assert cancel_running.status_code == 202
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})
    assert (unknown.status_code, unknown.json()) == (404, {"status": "NOT_FOUND"})
    assert final["status"] == "COMPLETED" and final["error_type"] == "request_cancelled"
    assert final["logs"] == [] and final["metrics"] == {"inference_time": 0.0}
    assert result.status_code == 400
    job = emu.scheduler.jobs[queued["request_id"]]
    assert job.started_at is None and job.ending is Ending.CANCELLED
    assert emu.snapshot()["billing"] == {}
    assert emu.scheduler.jobs[running["request_id"]].finished_at == pytest.approx(
        T0 + JOB_CLOCK_S / 2
    )


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/fal-ai/flux-lora"), ("GET", "/fal-ai/flux-lora/requests/x/status"),
     ("GET", "/fal-ai/flux-lora/requests/x/status/stream"), ("GET", "/fal-ai/flux-lora/requests/x"),
     ("PUT", "/fal-ai/flux-lora/requests/x/cancel"),
     ("POST", "/rest/storage/auth/token?storage_type=fal-cdn-v3"),
     ("POST", "/rest/storage/upload/initiate?storage_type=gcs")],
)  # fmt: skip
@pytest.mark.parametrize("header", [None, "Key wrong:key", "Bearer emulator:local-key"])
async def test_queue_and_storage_routes_refuse_missing_or_wrong_key(
    method: str, path: str, header: str | None
) -> None:
    emu = make_emulator(FakeClock())
    headers = {} if header is None else {"Authorization": header}
    async with in_process(emu, auth=False) as client:
        response = await client.request(method, path, json={"prompt": "x"}, headers=headers)
    assert response.status_code == 401


async def test_cdn_downloads_and_jwks_need_no_key() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        sub = await submit(client)
        clock.advance(JOB_CLOCK_S)
        url = (await client.get(sub["response_url"])).json()["images"][0]["url"]
    async with in_process(emu, auth=False) as anonymous:
        image = await anonymous.get(url)
        jwks = await anonymous.get("/rest/.well-known/jwks.json")
    assert image.status_code == 200
    assert jwks.json()["keys"][0]["crv"] == "Ed25519"


@pytest.mark.parametrize(
    ("path", "body", "loc", "kind"),
    [(LORA, {}, ["body", "prompt"], "missing"),
     (LORA, {"prompt": "x", "guidance_scale": 99}, ["body", "guidance_scale"], "less_than_equal"),
     (LORA, {"prompt": "x", "nonsense": 1}, ["body", "nonsense"], "extra_forbidden"),
     ("fal-ai/flux-lora/image-to-image", {"prompt": "x"}, ["body", "image_url"], "missing"),
     (LORA, [1, 2], ["body"], "dict_type")],
)  # fmt: skip
async def test_invalid_bodies_answer_422_with_fal_detail_list(
    path: str, body: Any, loc: list[str], kind: str
) -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        response = await client.post(f"/{path}", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert {"loc": loc, "type": kind} == {k: detail[0][k] for k in ("loc", "type")}
    assert isinstance(detail[0]["msg"], str)
    assert emu.snapshot()["submits"]["accepted"] == 0


async def test_unknown_endpoint_answers_404() -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        response = await client.post("/fal-ai/not-a-model", json={"prompt": "x"})
    assert response.status_code == 404


async def test_start_deadline_expiry_completes_as_user_timeout_504_without_running() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        await submit(client, {"prompt": "blocker"})
        sub = await submit(client, {"prompt": "late"}, headers={"X-Fal-Request-Timeout": "3"})
        clock.advance(0.02)  # 2 emulated seconds: not yet
        waiting = (await status(client, sub)).json()["status"]
        clock.advance(0.02)
        done = (await status(client, sub)).json()
        result = await client.get(sub["response_url"])
        bad = await client.post(f"/{LORA}", json={"prompt": "x"},
                                headers={"X-Fal-Request-Timeout": "soon"})  # fmt: skip
    assert waiting == "IN_QUEUE"
    assert done["status"] == "COMPLETED" and done["error_type"] == "request_timeout"
    assert result.status_code == 504
    assert result.headers["x-fal-request-timeout-type"] == "user"
    assert result.headers["x-fal-error-type"] == "request_timeout"
    assert result.json() == {"detail": "Request timed out", "error_type": "request_timeout"}
    job = emu.scheduler.jobs[sub["request_id"]]
    assert job.started_at is None and job.finished_at == pytest.approx(T0 + 0.03)
    assert bad.status_code == 400


async def test_an_output_larger_than_the_emulator_renders_is_a_422_not_a_crash() -> None:
    # 100000x100000 once raised inside the emulator's completion and hung the run.
    clock = FakeClock()
    emu = make_emulator(clock)
    body = {"prompt": "x", "image_size": {"width": 100_000, "height": 100_000}}
    async with in_process(emu) as client:
        sub = await submit(client, body)
        clock.advance(JOB_CLOCK_S)
        done = (await status(client, sub)).json()
        result = await client.get(sub["response_url"])
    assert done["status"] == "COMPLETED" and done["error_type"] == "value_error"
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body", "image_size"]


async def test_unreadable_input_completes_with_422_naming_the_field() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    body = {"prompt": "x", "image_url": "data:image/png;base64,bm90IGFuIGltYWdl"}
    async with in_process(emu) as client:
        sub = await submit(client, body, path="fal-ai/flux-lora/image-to-image")
        clock.advance(JOB_CLOCK_S)
        done = (await status(client, sub)).json()
        result = await client.get(sub["response_url"])
    assert done["status"] == "COMPLETED" and done["error_type"] == "file_download_error"
    assert result.status_code == 422
    assert result.json()["detail"][0]["loc"] == ["body", "image_url"]


@pytest.mark.parametrize(
    ("path", "extra"),
    [("fal-ai/flux-lora/image-to-image", {}), ("fal-ai/flux-kontext/dev", {}),
     ("fal-ai/flux-kontext-lora", {"resolution_mode": "auto"})],
)  # fmt: skip
async def test_output_size_follows_catalog_rule_for_real_input_size(
    path: str, extra: dict[str, Any]
) -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    body = {"prompt": "x", "image_url": data_uri(1000, 750), **extra}
    async with in_process(emu) as client:
        sub = await submit(client, body, path=path)
        clock.advance(JOB_CLOCK_S)
        image = (await client.get(sub["response_url"])).json()["images"][0]
    want = catalog.output_size(catalog.parse_request(path, body), (1000, 750))
    assert (image["width"], image["height"]) == want


async def test_input_on_own_cdn_is_read_without_network() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        first = await submit(client, {"prompt": "x", "image_size": {"width": 640, "height": 480}})
        clock.advance(JOB_CLOCK_S)
        url = (await client.get(first["response_url"])).json()["images"][0]["url"]
        body = {"prompt": "y", "image_url": url}
        second = await submit(client, body, path="fal-ai/flux-lora/image-to-image")
        clock.advance(JOB_CLOCK_S)
        image = (await client.get(second["response_url"])).json()["images"][0]
    assert (image["width"], image["height"]) == (640, 480)


async def test_sync_mode_returns_data_uris() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    async with in_process(emu) as client:
        sub = await submit(client, {"prompt": "x", "sync_mode": True, "image_size": "square"})
        clock.advance(JOB_CLOCK_S)
        image = (await client.get(sub["response_url"])).json()["images"][0]
    assert image["url"].startswith("data:image/jpeg;base64,")
    assert (image["width"], image["height"], image["content_type"]) == (512, 512, "image/jpeg")


async def test_results_expire_after_retention() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, result_retention_s=60.0)
    async with in_process(emu) as client:
        sub = await submit(client)
        clock.advance(JOB_CLOCK_S + 0.59)
        kept = await client.get(sub["response_url"])
        clock.advance(0.02)
        gone = await client.get(sub["response_url"])
        cancel = await client.put(sub["cancel_url"])
    assert kept.status_code == 200
    assert gone.status_code == 404 and cancel.status_code == 404


async def test_sse_stream_sends_each_change_keepalives_and_closes_after_completed() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, keepalive_s=2.0)  # 20 ms of real time at this scale
    async with in_process(emu) as client:
        await submit(client, {"prompt": "blocker"})
        sub = await submit(client, {"prompt": "watched"})
        chunks: list[str] = []

        async def read() -> None:
            url = sub["status_url"] + "/stream"
            async with client.stream("GET", url, params={"logs": "0"}) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                await response.aread()
                chunks.append(response.text)

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(read)
                await anyio.sleep(0.05)  # real time, for keep-alives at 20 ms
                for _ in range(2):
                    clock.advance(JOB_CLOCK_S)
                    emu.advance()
                    await anyio.sleep(0.03)
    text = chunks[0]
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: ")]
    assert [e["status"] for e in events] == ["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    assert events[0]["queue_position"] == 0 and events[1]["logs"] is None
    assert ": keep-alive\n\n" in text
    assert text.endswith("\n\n") and text.rstrip().split("\n")[-1].startswith("data: ")


async def test_stats_count_duplicate_inputs_calls_and_billing() -> None:
    clock = FakeClock()
    emu = make_emulator(clock, concurrency=2)
    async with in_process(emu) as client:
        await submit(client, {"prompt": "same", "num_images": 2})
        await submit(client, {"num_images": 2, "prompt": "same"})  # same input, other key order
        await submit(client, {"prompt": "other", "image_size": {"width": 1920, "height": 1080}})
        clock.advance(3 * JOB_CLOCK_S)
        stats = (await client.get("/_emulator/stats")).json()
    digest = canonical_input(LORA, {"prompt": "same", "num_images": 2})
    assert stats["submits"]["by_input"][digest] == 2
    assert stats["submits"]["duplicates"] == 1 and stats["submits"]["accepted"] == 3
    assert stats["calls"]["submit"] == 3
    assert stats["billing"][LORA] == {
        "images": 5, "megapixels": 6, "usd": "0.210", "unpriced_images": 0
    }  # fmt: skip
    assert stats["slots"]["busy_s"] == pytest.approx(3 * JOB_CLOCK_S)
    assert stats["slots"]["makespan_s"] == pytest.approx(2 * JOB_CLOCK_S)
    assert stats["slots"]["utilization"] == pytest.approx(0.75)


async def test_reset_forgets_accounting_not_the_queue() -> None:
    emu = make_emulator(FakeClock())
    async with in_process(emu) as client:
        sub = await submit(client)
        await client.post("/_emulator/reset")
        stats = (await client.get("/_emulator/stats")).json()
        still = await status(client, sub)
    assert stats["submits"]["accepted"] == 0 and still.status_code == 202


@pytest.mark.parametrize(
    ("method", "path", "kind"),
    [("POST", "/fal-ai/flux-lora/image-to-image", "submit"),
     ("GET", "/a/b/requests/x/status/", "status"),
     ("GET", "/a/b/requests/x/status/stream", "stream"),
     ("GET", "/a/b/requests/x", "result"), ("PUT", "/a/b/requests/x/cancel", "cancel"),
     ("POST", "/rest/storage/auth/token", "storage"), ("POST", "/cdn/files/upload", "storage"),
     ("GET", "/cdn/files/out/x.jpg", "cdn"), ("GET", "/rest/.well-known/jwks.json", "jwks"),
     ("GET", "/_emulator/stats", "emulator")],
)  # fmt: skip
def test_calls_are_bucketed_by_route_kind(method: str, path: str, kind: str) -> None:
    assert route_kind(method, path) == kind


async def test_webhook_posts_signed_body_on_completion() -> None:
    received: list[tuple[dict[str, str], bytes]] = []
    arrived = anyio.Event()

    async def hook(request: Request) -> Response:
        received.append((dict(request.headers), await request.body()))
        arrived.set()
        return Response(b"ok")

    receiver = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    clock = FakeClock()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=receiver)) as http:
        emu = make_emulator(clock, http_client=http)
        async with emu.running(), in_process(emu) as client:
            sub = await submit(client, params={"fal_webhook": "http://receiver/hook"})
            clock.advance(JOB_CLOCK_S)
            emu.advance()
            with anyio.fail_after(5):
                await arrived.wait()
            result = (await client.get(sub["response_url"])).json()
    headers, raw = received[0]
    body = json.loads(raw)
    assert body["request_id"] == sub["request_id"] and body["status"] == "OK"
    assert body["payload"] == result
    message = "\n".join(
        [headers["x-fal-webhook-request-id"], headers["x-fal-webhook-user-id"],
         headers["x-fal-webhook-timestamp"], hashlib.sha256(raw).hexdigest()]
    ).encode()  # fmt: skip
    public = emu.signer.jwks()["keys"][0]["x"]
    key = Ed25519PublicKey.from_public_bytes(_b64url_decode(public))
    key.verify(bytes.fromhex(headers["x-fal-webhook-signature"]), message)
    assert int(headers["x-fal-webhook-timestamp"]) == int(T0 + JOB_CLOCK_S)


def _b64url_decode(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize(
    ("megapixels", "steps", "images", "u", "want"),
    [(1.0, 28, 1, 0.5, 3.3), (2.0, 28, 1, 0.5, 6.1), (1.0, 28, 2, 0.5, 6.1),
     (1.0, 10, 1, 0.0, 1.5 * 0.8), (1.0, 10, 1, 1.0, 1.5 * 1.2)],
)  # fmt: skip
def test_service_time_grows_with_megapixels_steps_and_images(
    megapixels: float, steps: int, images: int, u: float, want: float
) -> None:
    model = ServiceTime()
    got = model.seconds(megapixels=megapixels, steps=steps, num_images=images, u=u)
    assert got == pytest.approx(want)


def _job(rid: str, service_s: float, at: float = 0.0, **kw: Any) -> Job:
    return Job(request_id=rid, endpoint=LORA, app_path=LORA, submitted_at=at,
               service_s=service_s, **kw)  # fmt: skip


def test_scheduler_replays_events_exactly_however_rarely_polled() -> None:
    sparse, dense = QueueModel(concurrency=2, now=0.0), QueueModel(concurrency=2, now=0.0)
    for sched in (sparse, dense):
        for i, service in enumerate([3.0, 1.0, 2.0, 1.5, 0.5]):
            sched.submit(_job(f"j{i}", service))
    ended = sparse.advance(100.0)
    for step in range(1, 1001):
        dense.advance(step * 0.1)
    times = {j.request_id: (j.started_at, j.finished_at) for j in ended}
    assert times == {j: (dense.jobs[j].started_at, dense.jobs[j].finished_at) for j in times}
    assert times == {"j1": (0.0, 1.0), "j2": (1.0, 3.0), "j0": (0.0, 3.0), "j3": (3.0, 4.5),
                     "j4": (3.0, 3.5)}  # fmt: skip
    assert sparse.busy_s() == pytest.approx(8.0)


def test_reprs_never_show_the_key() -> None:
    emu: Emulator = make_emulator(FakeClock(), key=SecretStr("kid:very-secret-value"))
    for text in (repr(emu), repr(emu.config), str(emu.config), repr(emu.signer)):
        assert "very-secret-value" not in text


async def test_object_lifecycle_preference_limits_how_long_outputs_are_served() -> None:
    clock = FakeClock()
    emu = make_emulator(clock)
    lifecycle = {"X-Fal-Object-Lifecycle-Preference": '{"expiration_duration_seconds": 30}'}
    async with in_process(emu) as client:
        sub = await submit(client, {"prompt": "short-lived"}, headers=lifecycle)
        clock.advance(JOB_CLOCK_S)
        url = (await client.get(sub["response_url"])).json()["images"][0]["url"]
        fresh = await client.get(url)
        clock.advance(0.31)  # 31 emulated seconds
        stale = await client.get(url)
    assert (fresh.status_code, stale.status_code) == (200, 404)
