"""A big ledger written straight as Parquet parts in the ledger's schema, for the read benchmarks.

Each job has three events, the way a run records them: the intent (``submitting``, with the
manifest row, request, metadata and estimate), the acknowledgement (``queued``, with the
request id and the acknowledged URLs) and the end (``completed`` with its outputs, seed,
nsfw flags, megapixels and billed amount; one job in ``FAIL_EVERY`` ``failed`` instead, with
an error). Jobs run ``BLOCK`` at a time: a block's intents, then its acknowledgements, then its
ends, so a job's events fall in neighbouring parts, as in a real ledger. Parts hold
``PART_EVENTS`` events (a checkpoint's worth) and are written with
:func:`runner.ledger.parts.write_part`. Vectorised: about a million events a second.

    PYTHONPATH=. python bench/ledger_gen.py --jobs 1000000 /tmp/l1m
"""

from __future__ import annotations

import argparse
import time
from decimal import Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger.parts import write_part
from runner.ledger.schema import LEDGER_SCHEMA, MONEY, OUTPUT_TYPE, TIMESTAMP

BLOCK = 2_000
PART_EVENTS = 50_000
FAIL_EVERY = 97
STEPS = 3
ENDPOINTS = pa.array(["fal-ai/flux/dev", "fal-ai/flux/schnell", "fal-ai/flux-pro/v1.1"])
PRICES = pa.array([Decimal("0.025"), Decimal("0.003"), Decimal("0.04")], MONEY)
T0_US = 1_780_000_000_000_000
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64: a well-spread 64-bit number per input."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return np.asarray(z ^ (z >> np.uint64(31)))


def _hex(jobs: np.ndarray, salt: int, chars: int) -> pa.Array:
    """A fixed-width lowercase hex string per job (``chars`` of them, up to 64)."""
    seeds = [jobs * np.uint64(16) + np.uint64(salt * 4 + k) for k in range(4)]
    words = np.stack([_mix(seed) for seed in seeds], axis=1)
    nibbles = words.view(np.uint8).reshape(len(jobs), 32)
    text = np.empty((len(jobs), 64), dtype=np.uint8)
    text[:, 0::2] = _HEX[nibbles >> 4]
    text[:, 1::2] = _HEX[nibbles & 15]
    return _fixed(text[:, :chars])


# The real job keys of a manifest's first jobs (``--manifest``), by job number; else made up.
_MANIFEST_KEYS: pa.Array | None = None


def job_keys(jobs: np.ndarray) -> pa.Array:
    """The job_key of each job number."""
    if _MANIFEST_KEYS is not None:
        return _MANIFEST_KEYS.take(pa.array(jobs))
    return _hex(jobs, 0, 32)


def use_manifest_keys(manifest: Path, jobs: int) -> None:
    """Give the generated jobs the job keys of ``manifest``'s first ``jobs`` jobs, so a run of
    that manifest over the ledger finds them done (a resume of a partly run manifest)."""
    global _MANIFEST_KEYS
    from itertools import islice

    from runner.manifest.batches import iter_manifest_jobs
    from runner.manifest.jobs import ExpandOptions, Job

    options = ExpandOptions(manifest_dir=manifest.resolve().parent)
    items = islice(iter_manifest_jobs(manifest, None, options), jobs)
    keys = [item.job_key for item in items if isinstance(item, Job)]
    if len(keys) < jobs:
        raise SystemExit(f"{manifest} has {len(keys)} jobs, fewer than {jobs}")
    _MANIFEST_KEYS = pa.array(keys, pa.string())


def _fixed(text: np.ndarray) -> pa.Array:
    n, width = text.shape
    offsets = np.arange(n + 1, dtype=np.int32) * width
    data = np.ascontiguousarray(text).tobytes()
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets.tobytes()), pa.py_buffer(data))


def _join(*parts: pa.Array | str) -> pa.Array:
    return pc.binary_join_element_wise(*parts, "")


def _text(values: np.ndarray) -> pa.Array:
    return pc.cast(pa.array(values), pa.string())


def _job_columns(jobs: np.ndarray) -> dict[str, pa.Array]:
    """What every event of these jobs shares, and what each step adds."""
    n = len(jobs)
    number = _text(jobs)
    key = job_keys(jobs)
    which = pa.array(jobs % len(ENDPOINTS))
    fails = pa.array(jobs % FAIL_EVERY == FAIL_EVERY - 1)
    start = T0_US + (jobs // BLOCK) * 4_000_000
    submitted = pa.array(start + (jobs % BLOCK) * 500).cast(TIMESTAMP)
    done = pa.array(start + 3_000_000 + (jobs % 1000) * 1000).cast(TIMESTAMP)
    rid = _hex(jobs, 1, 32)
    url = _join("https://v3.fal.media/files/out/", _hex(jobs, 2, 32), ".jpg")
    outputs = pa.StructArray.from_arrays(
        [url, pa.repeat(1024, n).cast(pa.int32()), pa.repeat(1024, n).cast(pa.int32()),
         pa.repeat("image/jpeg", n), pa.nulls(n, pa.string()), pa.nulls(n, pa.string())],
        fields=list(OUTPUT_TYPE),
    )  # fmt: skip
    offsets = pa.array(np.arange(n + 1, dtype=np.int32))
    base = "https://queue.fal.run/fal-ai/flux/requests/"
    return {
        "job_key": key,
        "row_id": _join("row-", number),
        "line": pa.array(jobs + 2),
        "source": pa.repeat("bench.csv", n),
        "variant": pa.repeat(0, n).cast(pa.int32()),
        "endpoint": ENDPOINTS.take(which),
        "request": _join(
            '{"image_size":"square_hd","prompt":"Studio photo of product ',
            number,
            ' in matte black, white background","seed":',
            number,
            "}",
        ),
        "metadata": _join(
            '{"color": "matte black", "sku": "SKU-', number, '", "title": "ceramic coffee mug"}'
        ),
        "estimated_usd": PRICES.take(which),
        "attempt": pa.repeat(1, n).cast(pa.int32()),
        "price_source": pa.repeat("catalog", n),
        "payload_sha256": _hex(jobs, 3, 64),
        "request_id": rid,
        "submitted_at": submitted,
        "status_url": _join(base, rid, "/status"),
        "response_url": _join(base, rid),
        "cancel_url": _join(base, rid, "/cancel"),
        "started_at": pa.array(start + 1_000_000).cast(TIMESTAMP),
        "completed_at": done,
        "queue_s": pa.array(1.0 + (jobs % 7) * 0.1),
        "inference_s": pa.array(2.0 + (jobs % 11) * 0.05),
        "outputs": pa.ListArray.from_arrays(offsets, outputs),
        "seed": pa.array(jobs),
        "nsfw": pa.ListArray.from_arrays(offsets, pa.repeat(False, n)),
        "megapixels": pa.repeat(1, n),
        "billed_usd": PRICES.take(which),
        "_fails": fails,
        "_done_at": done,
        "_submitted_at": submitted,
    }


_STEP_COLUMNS = (
    # submitting
    ("job_key", "row_id", "line", "source", "variant", "endpoint", "request", "metadata",
     "estimated_usd", "attempt", "price_source", "payload_sha256"),
    # queued
    ("job_key", "attempt", "request_id", "submitted_at", "status_url", "response_url",
     "cancel_url"),
    # completed (or failed)
    ("job_key", "attempt", "request_id", "started_at", "completed_at", "queue_s",
     "inference_s", "outputs", "seed", "nsfw", "megapixels", "billed_usd"),
)  # fmt: skip
_STATES = ("submitting", "queued", "completed")


def _step_table(cols: dict[str, pa.Array], step: int) -> pa.Table:
    n = len(cols["job_key"])
    fails = cols["_fails"]
    arrays = []
    for field in LEDGER_SCHEMA:
        name = field.name
        if name == "state":
            column = pa.repeat(_STATES[step], n)
            if step == 2:
                column = pc.if_else(fails, "failed", column)
        elif name == "at":
            column = cols["_submitted_at"] if step < 2 else cols["_done_at"]
        elif name == "seq":
            column = pa.repeat(0, n)
        elif name in _STEP_COLUMNS[step]:
            column = cols[name]
            if step == 2 and name in ("outputs", "nsfw", "seed", "megapixels", "billed_usd"):
                column = pc.if_else(fails, pa.nulls(n, column.type), column)
        elif step == 2 and name == "error_type":
            column = pc.if_else(fails, "http_500", pa.nulls(n, pa.string()))
        elif step == 2 and name == "error_message":
            message = _join("server error 500 for request ", cols["request_id"])
            column = pc.if_else(fails, message, pa.nulls(n, pa.string()))
        elif step == 2 and name == "retryable":
            column = pc.if_else(fails, True, pa.nulls(n, pa.bool_()))
        else:
            column = pa.nulls(n, field.type)
        arrays.append(column.cast(field.type))
    return pa.Table.from_arrays(arrays, schema=LEDGER_SCHEMA)


def part_table(first: int, last: int, jobs: int) -> pa.Table:
    """Events ``first`` .. ``last`` (0-based event numbers) of a ledger of ``jobs`` jobs."""
    events = np.arange(first, last + 1, dtype=np.int64)
    block, within = np.divmod(events, STEPS * BLOCK)
    block_jobs = np.minimum(BLOCK, jobs - block * BLOCK)
    step, offset = np.divmod(within, block_jobs)
    job = block * BLOCK + offset
    low, high = int(job.min()), int(job.max())
    cols = _job_columns(np.arange(low, high + 1, dtype=np.int64))
    width = high - low + 1
    stacked = pa.concat_tables([_step_table(cols, s) for s in range(STEPS)])
    table = stacked.take(pa.array(step * width + (job - low)))
    columns = [pa.array(events + 1), *table.columns[1:]]
    return pa.Table.from_arrays(columns, schema=LEDGER_SCHEMA)


def generate(run_dir: Path, jobs: int, part_events: int = PART_EVENTS) -> int:
    """Write the parts of a ``jobs``-job ledger into run_dir; returns the events written."""
    ledger_dir = run_dir / "ledger"
    ledger_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "journal").mkdir(exist_ok=True)
    total = jobs * STEPS
    for first in range(0, total, part_events):
        last = min(first + part_events, total) - 1
        write_part(ledger_dir, part_table(first, last, jobs))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--manifest", type=Path, help="the job keys of its first --jobs jobs")
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    t0 = time.perf_counter()
    if args.manifest:
        use_manifest_keys(args.manifest, args.jobs)
        print(f"job keys of {args.manifest}'s first {args.jobs:,} jobs in "
              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    events = generate(args.run_dir, args.jobs)
    size = sum(p.stat().st_size for p in (args.run_dir / "ledger").glob("*.parquet"))
    print(f"{args.jobs:,} jobs, {events:,} events, {size / 2**20:.0f} MiB of parts "
          f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
