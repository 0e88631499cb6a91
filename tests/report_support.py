"""Run directories for report tests, written through the public ledger API.

``sample_run`` writes a small night of work: completed jobs on two endpoints with real PNG
outputs on disk (one only at a remote URL), two failures that differ only by a path, a
retryable timeout, an unknown submit outcome, a job still queued and an invalid row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from PIL import Image

from runner.ledger import JobState, Ledger, LedgerEvent, OutputImage, encode_request
from runner.ledger.meta import write_run_meta

T0 = datetime(2026, 11, 20, 22, 0, 0, tzinfo=UTC)
LORA = "fal-ai/flux-lora"
FLUX2 = "fal-ai/flux-2/lora"


def png(
    path: Path, size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (200, 80, 40)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "PNG")
    return path


@dataclass(frozen=True)
class Job:
    """One job's story: the events it gets, in order."""

    key: str
    row_id: str
    line: int
    endpoint: str
    events: Sequence[LedgerEvent]


def intent(key: str, row_id: str, line: int, endpoint: str, *, at: datetime,
           estimated: str | None, request: dict[str, object] | None = None,
           attempt: int = 1) -> LedgerEvent:  # fmt: skip
    body = request if request is not None else {"prompt": f"photo of {row_id}", "seed": line}
    return LedgerEvent(
        job_key=key, state=JobState.SUBMITTING, at=at, row_id=row_id, line=line,
        source="night.csv", variant=0, endpoint=endpoint, request=encode_request(body),
        metadata={"sku": f"SKU-{line}"},
        estimated_usd=None if estimated is None else Decimal(estimated), attempt=attempt,
    )  # fmt: skip


def completed(key: str, *, submitted_s: float, done_s: float, billed: str | None,
              outputs: tuple[OutputImage, ...], queue_s: float | None, inference_s: float | None,
              seed: int | None = None, attempt: int = 1) -> list[LedgerEvent]:  # fmt: skip
    return [
        LedgerEvent(job_key=key, state=JobState.QUEUED, at=T0 + timedelta(seconds=submitted_s),
                    request_id=f"req-{key}", submitted_at=T0 + timedelta(seconds=submitted_s)),
        LedgerEvent(job_key=key, state=JobState.COMPLETED, at=T0 + timedelta(seconds=done_s),
                    completed_at=T0 + timedelta(seconds=done_s), queue_s=queue_s,
                    inference_s=inference_s, outputs=outputs, seed=seed,
                    megapixels=len(outputs), attempt=attempt,
                    billed_usd=None if billed is None else Decimal(billed)),
    ]  # fmt: skip


def failed(key: str, *, at_s: float, error_type: str, message: str, retryable: bool,
           attempt: int = 1) -> list[LedgerEvent]:  # fmt: skip
    at = T0 + timedelta(seconds=at_s)
    return [
        LedgerEvent(job_key=key, state=JobState.QUEUED, at=at, request_id=f"req-{key}",
                    submitted_at=at),
        LedgerEvent(job_key=key, state=JobState.FAILED, at=at + timedelta(seconds=1),
                    error_type=error_type, error_message=message, retryable=retryable,
                    attempt=attempt, billed_usd=Decimal(0) if retryable else None),
    ]  # fmt: skip


def write_run(run_dir: Path, events: Sequence[LedgerEvent], *, meta: bool = True) -> Path:
    with Ledger.open(run_dir) as ledger:
        for event in events:
            ledger.append(event)
        ledger.commit_sync()
    if meta:
        write_run_meta(
            run_dir,
            {
                "manifest": {"path": "night.csv", "sha256": "ab" * 32, "bytes": 10},
                "runner_version": "0.1.0",
                "config": {"on_unknown": "resubmit"},
            },
        )
    return run_dir


def completed_run(run_dir: Path, jobs: int, *, checkpoint: bool = False) -> Path:
    """A run directory of ``jobs`` jobs completed at once (keys k0.., row ids r0..); with
    ``checkpoint`` its events in a Parquet part, else in the journal."""
    with Ledger.open(run_dir) as ledger:
        for i in range(jobs):
            ledger.append(
                LedgerEvent(f"k{i}", JobState.COMPLETED, datetime.now(UTC), row_id=f"r{i}")
            )
        ledger.commit_sync()
        if checkpoint:
            ledger.checkpoint_sync()
    return run_dir


def local(run_dir: Path, name: str, size: tuple[int, int] = (64, 48)) -> OutputImage:
    path = png(run_dir / "outputs" / name, size)
    return OutputImage(url=f"https://cdn.example/{name}", width=size[0], height=size[1],
                       content_type="image/png", local_path=str(path))  # fmt: skip


def sample_events(run_dir: Path, *, remote_base: str = "https://cdn.example") -> list[LedgerEvent]:
    lora_req = {"prompt": "a red mug", "seed": 7, "image_size": "square_hd",
                "loras": [{"path": "owner/mug-lora", "scale": 0.8}]}  # fmt: skip
    ev: list[LedgerEvent] = []
    # Completed, flux-lora, one local output; the endpoint reports seed 7.
    ev.append(intent("a", "mug-01", 2, LORA, at=T0, estimated="0.035", request=lora_req))
    ev += completed("a", submitted_s=0, done_s=10, billed="0.035", queue_s=1.0, inference_s=2.0,
                    outputs=(local(run_dir, "a-0.png"),), seed=7)  # fmt: skip
    # Completed, flux-lora, two local outputs.
    ev.append(intent("b", "mug-02", 3, LORA, at=T0, estimated="0.07"))
    ev += completed("b", submitted_s=2, done_s=30, billed="0.07", queue_s=None, inference_s=4.0,
                    outputs=(local(run_dir, "b-0.png"), local(run_dir, "b-1.png")))  # fmt: skip
    # Completed, FLUX.2: billed more than estimated (bigger output than planned).
    ev.append(intent("c", "vase-01", 4, FLUX2, at=T0, estimated="0.012"))
    ev += completed("c", submitted_s=5, done_s=3605, billed="0.024", queue_s=3.0, inference_s=6.0,
                    outputs=(local(run_dir, "c-0.png", (96, 64)),))  # fmt: skip
    # Completed, only at a remote URL (never downloaded).
    ev.append(intent("j", "lamp-01", 5, LORA, at=T0, estimated="0.035"))
    remote = OutputImage(url=f"{remote_base}/lamp.jpg", width=1024, height=768,
                         content_type="image/jpeg")  # fmt: skip
    ev += completed("j", submitted_s=6, done_s=40, billed="0.035", queue_s=5.0, inference_s=8.0,
                    outputs=(remote,))  # fmt: skip
    # Two failures differing only by a path: one group.
    for key, row, line, path in (("d", "chair-01", 6, "images/chair.jpg"),
                                 ("e", "sofa-01", 7, "images/sofa.jpg")):  # fmt: skip
        ev.append(intent(key, row, line, LORA, at=T0, estimated="0.035"))
        ev += failed(key, at_s=8, error_type="file_download_error",
                     message=f"Failed to download the file: unsupported image URL {path}",
                     retryable=False)  # fmt: skip
    # A retryable timeout on its first attempt: a resume retries it.
    ev.append(intent("f", "rug-01", 8, FLUX2, at=T0, estimated="0.012"))
    ev += failed("f", at_s=9, error_type="timeout", message="timed out after 300 s", retryable=True)
    # The POST went out, its outcome is unknown: a resume resubmits (possible duplicate).
    ev.append(intent("g", "rug-02", 9, FLUX2, at=T0, estimated="0.012"))
    ev.append(LedgerEvent(job_key="g", state=JobState.UNKNOWN, at=T0 + timedelta(seconds=9)))
    # Still queued with a request id: a resume re-attaches.
    ev.append(intent("h", "rug-03", 10, FLUX2, at=T0, estimated="0.012"))
    ev.append(LedgerEvent(job_key="h", state=JobState.QUEUED, at=T0 + timedelta(seconds=9),
                          request_id="req-h", submitted_at=T0 + timedelta(seconds=9)))  # fmt: skip
    # A bad manifest row.
    ev.append(LedgerEvent(job_key="invalid-1", state=JobState.INVALID, at=T0, row_id="bad-01",
                          line=11, source="night.csv", error_type="invalid_row",
                          error_message="guidance_scale=40 is above the maximum 35",
                          retryable=False))  # fmt: skip
    return ev


def sample_run(run_dir: Path, *, remote_base: str = "https://cdn.example") -> Path:
    return write_run(run_dir, sample_events(run_dir, remote_base=remote_base))


def edit_run(tmp_path: Path) -> Path:
    """Edits: a local input beside its output, a remote input, a missing one, a mask."""
    folder = tmp_path / "manifests"
    png(folder / "images" / "chair.png", (80, 60), (10, 120, 200))
    png(folder / "images" / "mask.png", (80, 60), (255, 255, 255))
    run_dir = tmp_path / "run"
    out = local(run_dir, "edit-0.png")
    edits: list[tuple[str, str, dict[str, object]]] = [
        ("e1", "chair-red", {"prompt": "red", "image_url": "images/chair.png",
                             "mask_url": "images/mask.png"}),
        ("e2", "chair-url", {"prompt": "url", "image_url": "https://cdn.example/in.png"}),
        ("e3", "chair-gone", {"prompt": "gone", "image_urls": ["images/none.png"]}),
        ("e4", "plain", {"prompt": "no input"}),
    ]  # fmt: skip
    events: list[LedgerEvent] = []
    for i, (key, row, request) in enumerate(edits):
        events.append(intent(key, row, i + 2, LORA, at=T0, estimated="0.035", request=request))
    events.append(LedgerEvent(job_key="e1", state=JobState.COMPLETED, at=T0, outputs=(out,)))
    write_run(run_dir, events, meta=False)
    write_run_meta(run_dir, {"manifest": {"path": "manifests/edits.csv", "dir": str(folder)}})
    return run_dir
