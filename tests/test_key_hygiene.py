"""The key: checked once at start, and removed from every text the run writes.

- A key with a newline, whitespace or characters outside printable ASCII, or a colon
  without the ``id:secret`` shape, is a usage error (exit 2) before anything is sent, and
  the message never holds the key or any part of it (the issue's reproduction: h11 put a
  newline key into the ledger, the export and the report, and a non-ASCII key crashed).
- The one redaction function removes the key and its parts in every form a server or a
  library may echo them; the ledger, run.json, the log lines and the summary's examples
  pass it.
- A canary key drives every error path of a run against the emulator, behind a server that
  echoes the key into every error it gives; no file of the run directory, no export, no
  report and no log line holds the key, its parts, or their encoded forms.
"""

from __future__ import annotations

import base64
import io
import json
import socket
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from runner.cli import main
from runner.config import key_from_env
from runner.emulator import DEFAULT_KEY, Emulator
from runner.emulator.faults import parse_faults
from runner.errors import EXIT_USAGE, AuthError, TransportError, UsageError
from runner.execution.engine import Hooks, execute
from runner.execution.progress import Progress, Tally
from runner.execution.summary import RunReport, print_summary
from runner.fal.client import QueueClient
from runner.fal.key import (
    MIN_KEY_CHARS,
    MIN_PART_CHARS,
    REDACTED,
    key_problem,
    redact,
    redactor,
    secret_forms,
)
from runner.fal.retry import RetryPolicy
from runner.fal.storage import UploadSettings
from runner.ledger.meta import read_run_meta, write_run_meta
from runner.ledger.redaction import redacted_event
from runner.ledger.schema import JobState, LedgerEvent, OutputImage
from runner.ledger.store import Ledger
from runner.ledger.views import export
from runner.report.data import build_report, load_jobs
from runner.report.dataset_writers import write_dataset
from runner.report.datasets import DatasetOptions, current_jobs, select_images
from runner.report.gallery import gallery
from runner.report.html import write_html
from runner.report.text import render_text, report_json
from tests.scenario import FAST_POLICIES, manifest, run_config
from tests.scenario import emulator as emulator_running
from tests.torture_support import secret_leaks

# Parts long enough to be removed; each unlike anything else a run writes.
CANARY = "canary-id-5f1c2e:canary-SECRET-1234"
# Characters that percent-encoding and base64 change (not JSON's: a byte grep of a JSON
# file would miss an escaped key, and the check would prove less).
SYMBOLS = "canary+id/5f1c=2e:canary%SECRET!1234~"
REFUSED = "refused-id-3b9d:refused-SECRET-5678"
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)


def needles(key: str) -> list[str]:
    """The key and each part long enough to be removed (secret_leaks adds their encodings)."""
    key_id, _, secret = key.partition(":")
    whole = [key] if len(key) >= MIN_KEY_CHARS else []
    return [*whole, *(p for p in (key_id, secret) if len(p) >= MIN_PART_CHARS)]


def leaks(key: str, *texts: str, root: Path | None = None) -> list[str]:
    found = []
    for needle in needles(key):
        found += [f"{needle!r} in {where}" for where in secret_leaks(needle, *texts, root=root)]
    return found


def parquet_texts(root: Path) -> list[str]:
    """Each Parquet file's rows as text: a compressed column hides a key from a byte grep."""
    return [
        json.dumps(pq.read_table(path).to_pylist(), default=str)
        for path in sorted(root.rglob("*.parquet"))
    ]


# -- the check at start -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "words"),
    [
        ("emulator:local-key\nX", "contains a newline"),
        ("emulator:local-key\r\nX", "contains a newline"),
        ("emulator:local key", "contains whitespace"),
        ("emulator:local\tkey", "contains whitespace"),
        ("emulator:lócal-key", "outside printable ASCII"),
        ("emulator:local\u200b-key", "outside printable ASCII"),
        ("\u201cemulator:local-key\u201d", "outside printable ASCII"),
        ("emulator:local\x00key", "outside printable ASCII"),
        ("emulator:local\x7fkey", "outside printable ASCII"),
        (":local-key", "not of the form id:secret"),
        ("emulator:", "not of the form id:secret"),
        ("emulator:local:key", "not of the form id:secret"),
        (":", "not of the form id:secret"),
    ],
)  # fmt: skip
def test_a_bad_key_is_named_by_what_is_wrong_never_by_its_text(key: str, words: str) -> None:
    problem = key_problem(key)
    assert problem is not None and problem.startswith("FAL_KEY ") and words in problem
    with pytest.raises(UsageError) as caught:
        key_from_env({"FAL_KEY": key})
    assert str(caught.value) == problem
    pieces = [key, *key.replace("\n", ":").split(":")]
    assert not [p for p in pieces if len(p) >= 3 and p in problem]


@pytest.mark.parametrize(
    "key", ["emulator:local-key", "plain-key-without-colon", "a:b", "id:s3cr!t/+=%\"'\\~"]
)
def test_a_well_formed_key_passes(key: str) -> None:
    assert key_problem(key) is None
    found = key_from_env({"FAL_KEY": f"  {key}\n"})  # surrounding whitespace is not the key's
    assert found is not None and found.get_secret_value() == key


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """A queue URL whose socket counts connections: the kernel queues any, unaccepted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        sock.setblocking(False)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", sock


def connected(sock: socket.socket) -> bool:
    try:
        sock.accept()[0].close()
    except BlockingIOError:
        return False
    return True


@pytest.mark.parametrize("key", ["emulator:local-key\nX", "emulator:lócal-key"])
@pytest.mark.parametrize("command", ["run", "plan", "cancel"])
def test_the_cli_refuses_a_bad_key_with_exit_2_before_sending_anything(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    listener: tuple[str, socket.socket],
    command: str,
    key: str,
) -> None:
    url, sock = listener
    path = manifest(tmp_path, 3)
    run_dir = tmp_path / "run"
    if command == "cancel":
        (run_dir / "journal").mkdir(parents=True)  # cancel needs a run directory to name
    monkeypatch.setenv("FAL_KEY", key)
    argv = {
        "run": ["run", str(path), "--queue-url", url, "--ledger", str(run_dir), "--quiet"],
        "plan": ["plan", str(path), "--api-url", url],
        "cancel": ["cancel", str(run_dir), "--queue-url", url],
    }[command]
    assert main(argv) == EXIT_USAGE
    out, err = capsys.readouterr()
    assert err.startswith("runner: error: FAL_KEY "), err
    assert "Traceback" not in out + err
    assert not connected(sock), "something was sent"
    # Nothing created: no run directory, and cancel took no lock in the one it was given.
    assert (
        [p.name for p in run_dir.iterdir()] == ["journal"]
        if command == "cancel"
        else (not run_dir.exists())
    )
    for piece in (key, *key.replace("\n", ":").split(":")):
        assert piece not in out + err


# -- the redaction function ---------------------------------------------------------------------


def test_redaction_removes_the_key_and_its_parts_in_every_echoed_form() -> None:
    key = "key-id-5f1c2e:very-secret/part+="
    key_id, _, secret = key.partition(":")
    texts = [
        f"Illegal header value b'Key {key}'",
        f"Authorization: Basic {base64.b64encode(key.encode()).decode()}",
        f"Basic {base64.b64encode((key + ':x').encode()).decode()}",  # a longer encoded text
        f"https://x/?key={quote(key, safe='')}&id={key_id}",
        json.dumps({"detail": f"bad secret {secret}"}),
        repr({"key": key}),
        f"id={key_id} secret={secret}",
        base64.urlsafe_b64encode(secret.encode()).decode(),
    ]
    clean = redactor(SecretStr(key))
    for text in texts:
        out = clean(text)
        assert REDACTED in out, text
        assert not secret_leaks(key, out) and not secret_leaks(secret, out), out
        assert key_id not in out and secret not in out
    assert clean("nothing to see") == "nothing to see"
    assert redact(f"a {key} b", key) == f"a {REDACTED} b"


def test_a_part_too_short_to_mean_anything_is_left_alone() -> None:
    """The emulator's key id is its tests' host name: removing it would rewrite URLs."""
    clean = redactor(DEFAULT_KEY)
    assert (
        clean("GET http://emulator/fal-ai/x: local-key")
        == "GET http://emulator/fal-ai/x: local-key"
    )
    assert clean(f"Key {DEFAULT_KEY}") == f"Key {REDACTED}"
    assert redactor(None)("any text") == "any text"
    assert redactor("abc")("abc abc") == "abc abc"


def test_the_redaction_function_does_not_show_the_key() -> None:
    clean = redactor(SecretStr(CANARY))
    assert not leaks(CANARY, repr(clean), str(clean))


KEY_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="[]:")


@settings(max_examples=300, deadline=None)
@given(
    key_id=st.text(KEY_CHARS, min_size=1, max_size=40),
    secret=st.text(KEY_CHARS, min_size=1, max_size=70),
    before=st.text(max_size=30),
    after=st.text(max_size=30),
    which=st.sampled_from(["key", "id", "secret"]),
    form=st.sampled_from(["plain", "quoted", "base64", "json", "repr"]),
)
def test_no_echoed_form_of_a_well_formed_key_survives_redaction(
    key_id: str, secret: str, before: str, after: str, which: str, form: str
) -> None:
    key = f"{key_id}:{secret}"
    assert key_problem(key) is None
    piece = {"key": key, "id": key_id, "secret": secret}[which]
    encoded = {
        "plain": piece,
        "quoted": quote(piece, safe=""),
        "base64": base64.b64encode(piece.encode()).decode(),
        "json": json.dumps(piece)[1:-1],
        "repr": repr(piece)[1:-1],
    }[form]
    out = redactor(key)(before + encoded + after)
    for meaningful in needles(key):
        assert meaningful not in out
    if len(piece) >= MIN_PART_CHARS and encoded not in before + after:
        assert REDACTED in out


def test_the_forms_are_worked_out_longest_first() -> None:
    forms = secret_forms(CANARY)
    assert forms[0] != CANARY or len(forms) == 1
    assert [len(f) for f in forms] == sorted((len(f) for f in forms), reverse=True)
    assert CANARY in forms and "canary-id-5f1c2e" in forms and "canary-SECRET-1234" in forms


@pytest.mark.anyio
async def test_the_queue_client_removes_the_key_id_from_a_library_error() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        header = request.headers["authorization"]
        raise httpx.LocalProtocolError(f"Illegal header value b'{header}' (id {CANARY[:16]})")

    client = QueueClient(
        httpx.MockTransport(refuse), queue_url="http://queue", key=SecretStr(CANARY)
    )
    with pytest.raises(TransportError) as caught:
        await client.status(client.urls_for("fal-ai/flux-lora", "r1"))
    assert not leaks(CANARY, str(caught.value)) and REDACTED in str(caught.value)


# -- the ledger, run.json, the log lines and the summary pass it --------------------------------


def dirty_event(key: str) -> LedgerEvent:
    """An event whose every kind of text holds the key."""
    return LedgerEvent(
        "job-1", JobState.FAILED, T0, row_id=f"row {key}", source="m.csv", endpoint="fal-ai/x",
        request=json.dumps({"prompt": f"a cat {key}"}), metadata={"note": f"k={key}"},
        estimated_usd=Decimal("0.025"), attempt=1, request_id="r1",
        status_url=f"http://q/s?k={quote(key, safe='')}",
        outputs=(OutputImage(f"http://cdn/{key}.png", 8, 8, "image/png", None, "ab" * 32),),
        error_type="submit_failed", retryable=False,
        error_message=f"h11: Illegal header value b'Key {key}' "
                      f"({base64.b64encode(key.encode()).decode()})",
        duplicate_request_ids=(f"id-{key}",), payload_sha256="cd" * 32,
    )  # fmt: skip


def test_an_event_is_redacted_field_by_field_and_kept_when_clean() -> None:
    clean = redactor(CANARY)
    event = dirty_event(CANARY)
    out = redacted_event(event, clean)
    assert not leaks(CANARY, repr(out))
    assert out.job_key == "job-1" and out.payload_sha256 == "cd" * 32
    assert out.outputs is not None and out.outputs[0].sha256 == "ab" * 32
    assert out.error_message is not None and out.error_message.startswith("h11: Illegal header")
    assert out.metadata == {"note": f"k={REDACTED}"}
    tidy = replace(dirty_event("nothing"), status_url=None)
    assert redacted_event(tidy, clean) is tidy


def test_the_ledger_writes_no_key_to_the_journal_parts_exports_or_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    clean = redactor(SecretStr(CANARY))
    with Ledger.open(run_dir, redact=clean) as ledger:
        ledger.append(dirty_event(CANARY))
        ledger.commit_sync()
        journal = b"".join(p.read_bytes() for p in (run_dir / "journal").iterdir())
        assert b"Illegal header" in journal and not leaks(CANARY, journal.decode())
    write_run_meta(run_dir, {"config": {"queue_url": f"http://{CANARY}@q/"}}, redact=clean)
    assert read_run_meta(run_dir) == {"config": {"queue_url": f"http://{REDACTED}@q/"}}
    texts = written_views(run_dir, tmp_path / "views", images=True)
    assert not leaks(CANARY, *texts, *parquet_texts(tmp_path), root=tmp_path)


def written_views(run_dir: Path, out: Path, *, images: bool = False) -> list[str]:
    """Every export format and both reports of ``run_dir``, written under ``out``;
    ``images``: the run has output images, so the dataset export has something to check."""
    out.mkdir(parents=True, exist_ok=True)
    for fmt in ("csv", "jsonl", "parquet"):
        export(run_dir, out / f"export.{fmt}", fmt)
    everything = DatasetOptions(include_failed=True, include_flagged=True)
    chosen = select_images(current_jobs(run_dir), run_dir, everything)
    assert bool(chosen.images) is images, chosen
    write_dataset(chosen, out / "images.parquet", "parquet")
    jobs = load_jobs(run_dir)
    report = build_report(jobs, read_run_meta(run_dir), run_dir=run_dir)
    write_html(out / "report.html", report, gallery(jobs), run_dir=run_dir, generated_at=T0)
    return [render_text(report), json.dumps(report_json(report), default=str)]


def test_log_lines_and_summary_examples_pass_the_redaction_function() -> None:
    clean = redactor(CANARY)
    stream = io.StringIO()
    tally = Tally(redact=clean)
    progress = Progress(tally, stream=stream, quiet=True, redact=clean)
    progress.say(f"prices cannot be read (403 {CANARY.split(':')[0]}): using the built-in table")
    tally.fail("submit_failed", "x" * 290 + CANARY)  # cut at 300 only after the redaction
    assert not leaks(CANARY, stream.getvalue(), *tally.examples)
    assert tally.examples == ["x" * 290 + REDACTED]
    assert "prices cannot be read (403 [redacted])" in stream.getvalue()


# -- every error path of a run, with a canary key ------------------------------------------------


class EchoingServer(httpx.AsyncBaseTransport):
    """The emulator behind a server and a library that echo the key in every error.

    An error answer gets the Authorization header, the key's id and secret, and their
    base64 and percent-encoded forms appended (inside ``detail`` for a JSON answer, so the
    protocol still parses), and so does the ``error`` of a status; a transport error's
    message gets them too, as h11's did. Every storage call fails, so every upload fails.
    """

    def __init__(self, inner: httpx.AsyncBaseTransport, key: str) -> None:
        self.inner = inner
        key_id, _, secret = key.partition(":")
        self.echo = (
            f" [echo: id={key_id} secret={secret} b64={base64.b64encode(key.encode()).decode()}"
            f" url={quote(key, safe='')}]"
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        echo = f" [{request.headers.get('authorization', '')}]{self.echo}"
        if "/storage/" in request.url.path:
            return httpx.Response(500, text="storage is down" + echo, request=request)
        try:
            response = await self.inner.handle_async_request(request)
        except httpx.TransportError as exc:
            exc.args = (f"{exc}{echo}",)
            raise
        kind = response.headers.get("content-type", "")
        if response.status_code < 400 and not kind.startswith("application/json"):
            return response  # images, event streams
        body = await response.aread()
        headers = {k: v for k, v in response.headers.items()
                   if k.lower() not in ("content-length", "content-encoding")}  # fmt: skip
        try:
            data: Any = json.loads(body)
        except ValueError:
            return httpx.Response(response.status_code, headers=headers,
                                  content=body + echo.encode(), request=request)  # fmt: skip
        if isinstance(data, dict):
            if isinstance(data.get("error"), str):
                data["error"] += echo
            if response.status_code >= 400 and isinstance(data.get("detail"), str):
                data["detail"] += echo
        return httpx.Response(response.status_code, headers=headers, json=data, request=request)


# Each phase its own emulator and run directory: faults that would otherwise mask each other.
PHASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gateway": ("gateway_503=1.0", {"max_attempts": 1}),
    "lost_answers": ("reset_after_accept=1.0,history_unavailable=1.0", {"max_attempts": 2}),
    "job_failures": ("fail_runner_disconnected=1.0", {}),
    "result_reads": ("result_5xx=1.0,history_unavailable=1.0", {"max_attempts": 1}),
    "inputs": ("history_unavailable=1.0", {}),
}


def i2i_manifest(tmp_path: Path) -> Path:
    from PIL import Image

    Image.new("RGB", (64, 48), "red").save(tmp_path / "good.png")
    path = tmp_path / "inputs.csv"
    edit = "fal-ai/flux-lora/image-to-image"
    path.write_text(
        "id,endpoint,prompt,image_url,strength,seed\n"
        f"gone,{edit},edit,missing.png,0.5,1\nup1,{edit},edit,good.png,0.5,2\n"
        f"up2,{edit},edit,good.png,0.6,3\n"
    )
    return path


async def run_phase(
    emu: Emulator, tmp_path: Path, name: str, key: str, **overrides: Any
) -> tuple[RunReport | BaseException, str]:
    path = i2i_manifest(tmp_path) if name == "inputs" else manifest(tmp_path, 4, name=f"{name}.csv")
    stream = io.StringIO()
    hooks = Hooks(
        transport=EchoingServer(httpx.ASGITransport(app=emu.app), key), stream=stream,
        handle_signals=False, policies=FAST_POLICIES,
        upload_settings=UploadSettings(policy=RetryPolicy(attempts=2, base_s=0.001, max_s=0.01)),
    )  # fmt: skip
    config = run_config(path, tmp_path / "runs" / name, key=SecretStr(key),
                        reconcile_after_s=0.0, **overrides)  # fmt: skip
    try:
        report: RunReport | BaseException = await execute(config, hooks=hooks)
    except AuthError as exc:
        report = exc
    summary = io.StringIO()
    if isinstance(report, RunReport):
        print_summary(report, summary)
        summary.write(report.message)
    else:
        summary.write(str(report))
    return report, stream.getvalue() + summary.getvalue()


@pytest.mark.anyio
@pytest.mark.parametrize("canary", [CANARY, SYMBOLS], ids=["plain", "symbols"])
async def test_a_canary_key_is_nowhere_after_every_error_path(tmp_path: Path, canary: str) -> None:
    logs: list[str] = []
    reasons: set[str] = set()
    for name, (faults, overrides) in PHASES.items():
        async with emulator_running(key=SecretStr(canary), faults=parse_faults(faults)) as emu:
            report, log = await run_phase(emu, tmp_path, name, canary, **overrides)
        assert isinstance(report, RunReport), report
        logs.append(log)
        reasons |= set(report.tally.reasons)
        run_dir = tmp_path / "runs" / name
        logs += written_views(run_dir, tmp_path / "views" / name)
    # The refused key: the emulator knows only its own.
    async with emulator_running(faults=parse_faults("history_unavailable=1.0")) as emu:
        refused, log = await run_phase(emu, tmp_path, "refused", REFUSED)
    assert isinstance(refused, AuthError), refused
    logs.append(log)
    # Every kind of recorded failure came with the key echoed into its text.
    assert reasons == {"submit_http_503", "unknown_outcome", "runner_disconnected",
                       "lost_contact", "input_error", "upload_failed"}  # fmt: skip
    texts = [*logs, *parquet_texts(tmp_path)]
    assert "[redacted]" in "".join(texts), "no echo reached a text: the test tests nothing"
    assert not leaks(canary, *texts, root=tmp_path)
    assert not leaks(REFUSED, *texts, root=tmp_path)
