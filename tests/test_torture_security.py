"""Security torture: the key never leaks, hostile webhooks change nothing, outputs stay
inside the output directory.

- The real CLI runs as a subprocess against an emulator process whose faults produce
  error messages of every kind; the key must be absent from stdout, stderr, the ledger,
  run.json, the downloaded outputs and everything else in the run directory.
- During a real webhook-mode run an attacker posts forged (wrong key, tampered body),
  replayed (verbatim genuine deliveries, and genuine headers over another body), stale
  and future-dated deliveries, each claiming the job failed and each before the runner
  even knows the job's id, plus bodies many times the size cap. Each is refused (or, for
  a verbatim replay, acknowledged as a duplicate and ignored), and every job still
  completes with the genuine result.
- Row ids built to escape (``../../etc/passwd``, absolute paths, NUL, 5,000 characters)
  go through a real run with downloads on; every file written is under --out.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from runner.emulator import DEFAULT_KEY, Emulator, EmulatorConfig, serve
from runner.emulator.webhooks import WebhookSigner
from runner.errors import EXIT_JOBS_FAILED, EXIT_OK, EXIT_USAGE
from runner.execution.engine import Hooks, execute
from runner.fal.transport import open_transport
from runner.fal.webhook import DEFAULT_MAX_BODY_BYTES
from runner.ledger.state import LedgerState
from tests.scenario import emulator, manifest, run_config
from tests.torture_support import (
    check_terminal_once,
    emulator_process,
    free_port,
    manifest_jobs,
    secret_leaks,
    serve_app,
    start_run,
)

ERROR_FAULTS = (
    "gateway_502=0.1,gateway_504=0.05,submit_429=0.2,reset_after_accept=0.1,"
    "fail_internal_error=0.1,fail_runner_disconnected=0.1,fail_request_timeout=0.05,seed=3"
)


# -- the key ----------------------------------------------------------------------------------


@pytest.mark.torture
def test_key_is_in_no_log_ledger_run_json_or_output_even_when_everything_fails(
    tmp_path: Path,
) -> None:
    path = manifest(tmp_path, 30)
    run_dir, out_dir = tmp_path / "run", tmp_path / "out"
    logs: list[str] = []
    codes = []
    with emulator_process(tmp_path, time_scale=0.05, faults=ERROR_FAULTS) as emu:
        for completion in ("stream", "poll"):
            proc = start_run(path, run_dir, emu.url, "--completion", completion, "--out",
                             str(out_dir), "--concurrency", "8", "--rate", "1000",
                             "--max-attempts", "1")  # fmt: skip
            logs += proc.communicate(timeout=120)
            codes.append(proc.returncode)
        stats = emu.stats()
    assert set(codes) <= {EXIT_OK, EXIT_JOBS_FAILED}, logs
    assert EXIT_JOBS_FAILED in codes, "the faults produced no failure to report"
    assert stats["faults"], "no fault fired"
    assert (run_dir / "run.json").exists() and any(out_dir.rglob("*.*"))
    errors = [r for r in LedgerState.load(run_dir).jobs.to_pylist() if r["error_message"]]
    assert errors, "no error message was recorded"
    assert not secret_leaks(DEFAULT_KEY, *logs, root=run_dir)
    assert not secret_leaks(DEFAULT_KEY, root=out_dir)


def test_a_refused_key_is_named_nowhere(tmp_path: Path) -> None:
    secret = "wrong-id:s3cr3t-" + "q" * 20
    path = manifest(tmp_path, 3)
    with emulator_process(tmp_path, time_scale=0.05) as emu:
        proc = start_run(path, tmp_path / "run", emu.url, key=secret)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_USAGE, err
    assert "Traceback" not in err
    assert not secret_leaks(secret, out, err, root=tmp_path / "run")
    assert not secret_leaks(secret.split(":")[1], out, err, root=tmp_path / "run")


# -- hostile webhooks during a real run -------------------------------------------------------
#
# Every hostile post is made while the runner waits for the answer to one of its submits: the
# run cannot end then, so each post meets a receiver that is up. Posting on a timer raced the
# run instead: a post made before the receiver listened was refused a connection, and one
# made as the last job came in met the receiver closing its connections (ConnectError, or a
# ReadError for a request sent on a connection being closed).

HUGE = 8 * DEFAULT_MAX_BODY_BYTES


@dataclass
class Delivery:
    """A genuine delivery as it passed the relay."""

    headers: dict[str, str]
    body: bytes
    forwarded: anyio.Event = field(default_factory=anyio.Event)


class Attacker:
    """Posts hostile deliveries to the runner's receiver; counts the answers by kind."""

    def __init__(self, receiver: str, emu: Emulator, client: httpx.AsyncClient) -> None:
        self.receiver = receiver
        self.emu = emu
        self.client = client
        self.forger = WebhookSigner(Ed25519PrivateKey.generate(), user_id=emu.config.user_id)
        self.answers: dict[str, Counter[int]] = {}
        self.struck: dict[str, anyio.Event] = {}
        self.delivered: list[Delivery] = []
        self.replayed = 0
        self.went_huge = False

    def strike_done(self, request_id: str) -> anyio.Event:
        return self.struck.setdefault(request_id, anyio.Event())

    async def at_submit(self, request_id: str) -> None:
        """fal has accepted ``request_id`` and the runner does not know it yet."""
        first, self.went_huge = not self.went_huge, True
        await self.strike(request_id)
        self.strike_done(request_id).set()
        await self.replay()
        if first:
            await self.huge(request_id)

    async def post(self, kind: str, body: Any, headers: dict[str, str]) -> None:
        answer = await self.client.post(self.receiver, content=body, headers=headers)
        self.answers.setdefault(kind, Counter())[answer.status_code] += 1

    async def strike(self, request_id: str) -> None:
        body = error_body(request_id)
        now = int(time.time())
        genuine = self.emu.signer
        await self.post("forged", body, self.forger.sign(request_id, now, body))
        await self.post("stale", body, genuine.sign(request_id, now - 3600, body))
        await self.post("future", body, genuine.sign(request_id, now + 3600, body))
        await self.post("unsigned", body, {})
        signed = genuine.sign(request_id, now, b"{}")
        await self.post("tampered", body, signed)  # signature of another body

    async def replay(self) -> None:
        while self.replayed < len(self.delivered):
            delivery = self.delivered[self.replayed]
            self.replayed += 1
            await delivery.forwarded.wait()  # a replay comes after the genuine delivery
            await self.post("replayed", delivery.body, delivery.headers)
            other = error_body(delivery.headers["x-fal-webhook-request-id"])
            await self.post("replayed_other_body", other, delivery.headers)

    async def huge(self, request_id: str) -> None:
        """Bodies of many times the cap: refused on their headers, or at the cap."""

        async def chunks() -> Any:
            for _ in range(HUGE // (1 << 20)):
                yield b"x" * (1 << 20)

        fresh = self.forger.sign(request_id, int(time.time()), b"")  # well formed, unverified
        await self.post("huge_unsigned", b"x" * HUGE, {})
        await self.post("huge_declared", b"x" * HUGE, fresh)
        await self.post("huge_chunked", chunks(), fresh)


class Relay:
    """The public webhook URL: forwards each genuine delivery once its job has been struck,
    and keeps it for the attacker to replay."""

    def __init__(self, target: str, attacker: Attacker) -> None:
        self.target = target
        self.attacker = attacker
        self.app = Starlette(routes=[Route("/{p:path}", self.forward, methods=["POST"])])

    async def forward(self, request: Request) -> Response:
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.startswith("x-fal-webhook")}
        await self.attacker.strike_done(headers["x-fal-webhook-request-id"]).wait()
        delivery = Delivery(headers, body)
        self.attacker.delivered.append(delivery)
        try:
            async with httpx.AsyncClient() as client:
                answer = await client.post(self.target, content=body, headers=headers)
        except httpx.TransportError:
            return Response(status_code=502)  # the run is over (its job was polled)
        finally:
            delivery.forwarded.set()
        return Response(answer.content, status_code=answer.status_code)


class StrikeAtSubmit(httpx.AsyncBaseTransport):
    """The runner's transport: each submit's answer waits while the attacker strikes."""

    def __init__(self, inner: httpx.AsyncBaseTransport, attacker: Attacker) -> None:
        self.inner = inner
        self.attacker = attacker

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.method == "POST" and "fal_webhook" in request.url.params:
            await response.aread()
            if response.is_success:
                await self.attacker.at_submit(response.json()["request_id"])
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def error_body(request_id: str) -> bytes:
    return json.dumps({"request_id": request_id, "status": "ERROR", "payload": None,
                       "error": "forged: give up"}).encode()  # fmt: skip


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # uvicorn serves on asyncio only
async def test_forged_replayed_stale_and_oversized_webhooks_change_nothing(
    tmp_path: Path, anyio_backend: str
) -> None:
    rows = 16
    path = manifest(tmp_path, rows)
    jobs = manifest_jobs(path)
    emu = Emulator(EmulatorConfig(time_scale=0.005, concurrency=4))
    listen = free_port()
    receiver = f"http://127.0.0.1:{listen}/"
    # No keep-alive: a kept connection can be closed idle by the server as a post goes out.
    no_reuse = httpx.Limits(max_keepalive_connections=0)
    async with (
        serve(emu) as served,
        httpx.AsyncClient(timeout=30.0, limits=no_reuse) as client,
    ):
        attacker = Attacker(receiver, emu, client)
        relay = Relay(receiver, attacker)
        inner = open_transport(served.base_url, limits=httpx.Limits())
        async with serve_app(relay.app) as relay_url, StrikeAtSubmit(inner, attacker) as transport:
            config = run_config(
                path, tmp_path / "run", completion="webhook", emulator=True,
                queue_url=served.base_url, webhook_listen=f"127.0.0.1:{listen}",
                webhook_url=relay_url + "/hook", concurrency=4, download=False,
                webhook_jwks_url=served.base_url + "/rest/.well-known/jwks.json",
            )  # fmt: skip
            hooks = Hooks(transport=transport, stream=io.StringIO(), handle_signals=False)
            report = await execute(config, hooks=hooks)
        stats = emu.snapshot()
    assert report.exit_code == EXIT_OK, report.message
    check_terminal_once(tmp_path / "run", jobs, allowed=("completed",))
    polled = stats["calls"].get("result", 0)
    assert polled < rows, "results did not come by webhook"
    answers = attacker.answers
    for kind in ("forged", "stale", "future", "unsigned", "tampered"):
        assert answers[kind] == {401: rows}, (kind, answers[kind])
    # The last submit waited for rows - in_flight_limit jobs to finish, each by a delivery
    # (replayed before that submit was answered) or by a poll.
    replays = attacker.replayed
    assert replays >= max(1, rows - config.in_flight_limit - polled), (replays, polled)
    assert answers["replayed"] == {200: replays}  # a duplicate: ignored
    assert answers["replayed_other_body"] == {401: replays}
    huge = {kind: answers[kind] for kind in answers if kind.startswith("huge")}
    assert huge == {"huge_unsigned": {401: 1}, "huge_declared": {413: 1}, "huge_chunked": {413: 1}}


# -- output paths -----------------------------------------------------------------------------

HOSTILE_IDS = [
    "../../etc/passwd", "../../../../../../tmp/escape", "/etc/passwd", "/tmp/abs-escape",
    "..", ".", "...", "a/../../b", "..\\..\\windows", "C:\\Windows\\x", "a\u0000b", "nul",
    "CON", "x" * 5000, "／．．／ｅｔｃ", "~/.ssh/id", "\u202eevil", " ", "a\nb", "%2e%2e%2f",
]  # fmt: skip


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


@pytest.mark.anyio
async def test_hostile_row_ids_write_only_inside_the_output_directory(tmp_path: Path) -> None:
    base = tmp_path / "a" / "b" / "c"
    base.mkdir(parents=True)
    path = base / "hostile.jsonl"
    lines = [{"id": rid, "endpoint": "fal-ai/flux-lora", "prompt": f"p{i}", "image_size": "square"}
             for i, rid in enumerate(HOSTILE_IDS)]  # fmt: skip
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out_dir, run_dir = base / "out", base / "run"
    before = files_under(tmp_path)
    async with emulator(concurrency=4) as emu:
        hooks = Hooks(transport=httpx.ASGITransport(app=emu.app), stream=io.StringIO(),
                      handle_signals=False)  # fmt: skip
        config = run_config(path, run_dir, out_dir=str(out_dir), completion="stream")
        report = await execute(config, hooks=hooks)
    assert report.exit_code == EXIT_OK, report.message
    check_outputs(tmp_path, before, out_dir, run_dir)


def check_outputs(tmp_path: Path, before: set[Path], out_dir: Path, run_dir: Path) -> None:
    written = files_under(tmp_path) - before
    outside = [p for p in written if not (p.is_relative_to(out_dir) or p.is_relative_to(run_dir))]
    assert not outside, outside
    assert not any(p.is_relative_to(run_dir / "outputs") for p in written)
    state = LedgerState.load(run_dir)
    paths = [o["local_path"] for r in state.jobs.to_pylist() for o in r["outputs"]]
    assert len(paths) == len(HOSTILE_IDS)
    for local in paths:
        real = Path(os.path.realpath(local))
        assert real.is_relative_to(out_dir.resolve()) and real.is_file(), local
    assert len(set(paths)) == len(paths), "two rows share an output file"
