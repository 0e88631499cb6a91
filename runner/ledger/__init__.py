"""The ledger: the run's durable memory, and the plan for resuming it.

Layout of a run directory::

    run_dir/
      run.json                       manifest fingerprint, runner version, config (no secrets)
      .lock                          fcntl.flock of the one writer; holds its pid
      ledger/part-<first>-<last>.parquet   immutable Parquet parts (seq range in the name)
      journal/segment-<first>.jsonl  append-only journal of events not yet in a part

``ledger/*.parquet`` is plain Parquet, readable as-is by pyarrow, pandas,
polars and DuckDB (``SELECT * FROM 'run/ledger/*.parquet'``). Temporary part
files are hidden (``.part-….parquet.tmp``) and the journal lives outside
``ledger/``, so no glob or dataset scan picks up anything but whole parts.
The latest few events may still be only in the journal: ``runner export`` (or
:func:`export`) gives the complete folded view.

Schema (version 1, in the Parquet key-value metadata
``runner.ledger.schema_version``). Each row is an *event*:

    seq                int64, not null   monotonic per run directory; orders events
    at                 timestamp[us,UTC] event time, not null
    job_key            string, not null  stable id of the job (hash of its request)
    state              string, not null  see States below
    row_id, line       string, int64     the manifest row (join key) and its 1-based line
    source, variant    string, int32     manifest file; variant index within the row
    endpoint           string            fal endpoint id
    request            string            canonical JSON of the request body
    metadata           string            JSON object str->str: non-parameter columns
    estimated_usd      decimal128(38,18) pre-run estimate (exact Decimal)
    attempt            int32             1 for the first submission, +1 per retry
    request_id         string            fal's queue request id
    gateway_request_id string            fal's gateway id, when given
    submitted_at, started_at, completed_at   timestamp[us,UTC]
    queue_s, inference_s float64         seconds waiting in queue / running
    outputs            list<struct<url, width int32, height int32, content_type,
                       local_path, sha256>>
    seed               int64             seed reported by the endpoint
    nsfw               list<bool>        has_nsfw_concepts, one per image
    megapixels         int64             billed megapixel units
    billed_usd         decimal128(38,18) output-based cost (exact Decimal)
    error_type, error_message string; retryable bool
    ... (versions 2 and 3: see runner.ledger.schema)
    run_id             string            the `runner run` invocation that wrote the event
                                         (version 4; run.json's ``invocations``)

Money is decimal128 with scale 18, so every Decimal with up to 18 decimal
places round-trips exactly (LedgerEvent refuses more). DuckDB, polars and
pandas read it as a decimal.

States: ``submitting`` (intent recorded and committed before the POST),
``unknown`` (POST sent, outcome unknown), ``queued`` (acknowledged: has a
request_id), ``in_progress``, ``completed``, ``failed``, ``cancelled``,
``invalid`` (the manifest row could not become a request).

Folding: a job's latest state is its last event by seq; every other column
carries forward its last non-null value from earlier events, job-level
columns (row_id … attempt) over the whole job, attempt-level ones
(request_id … billed_usd) only since the latest ``submitting`` event, so a new
attempt starts clean while request_id survives into ``completed``. The outcome
columns (error_type, error_message, retryable) come from the latest event only:
a reason is never carried into a later success. ``run_id`` too comes from the latest
event only.

Durability:

- ``append()`` buffers an event under the next seq; ``await commit()`` writes
  and fsyncs every buffered event in one go, coalescing all concurrent
  committers into one fsync (anyio lock, fsync in a worker thread). A line is
  ``crc32 json``; a torn tail is detected and ignored.
- The engine appends ``submitting`` and commits before each POST, so a crash
  between POST and acknowledgement leaves a visible unknown outcome.
- ``checkpoint()`` (every N committed events and at close): switch to a new
  journal segment, read the old one back (events wait for a checkpoint on
  disk, not in memory; a segment that does not read back whole is an error
  and is kept), write its events as a part under a temp name, fsync, rename,
  fsync the directory, and only then delete the old segment. A newest part
  smaller than a checkpoint's (left by a close or a recovery) is merged into
  the next part, which covers its seq range, so small parts do not pile up
  run after run. Journal events with a seq at or below the newest part's
  last seq are already in a part, so a crash between any two steps neither
  loses nor double counts.
- Opening a writer takes the lock (LedgerLockedError when held), removes
  temp files and parts covered by a wider part (an interrupted compaction),
  folds the surviving journal into a part and starts a fresh segment: a
  writer never appends after a torn tail.
- ``compact()`` replaces all parts with one part holding only each job's
  folded latest row: earlier events (history) are dropped by design.
- A part that cannot be read raises LedgerCorruptError naming the file.

Versions (:mod:`runner.ledger.versions`): a job whose identity (row id, variant) was
recorded later with other content is *superseded*; status, export and report leave such jobs
out unless asked for all versions, and count what they were billed apart. The export's
columns (request fields as ``req_*``, metadata as ``meta_*``, money as ``decimal(18,6)``)
are :mod:`runner.ledger.exports`.

Reading (status, export, resume) takes no lock: it reads the journal, then
lists the parts, drops journal events a part already holds, and starts over
if a file vanishes under it (a checkpoint or compaction in between).
:func:`read_folded` folds in groups of events so memory stays near one group
plus one row per job; :func:`read_events` returns the full history.
``Ledger.state()`` folds only the columns admission reads
(:func:`runner.ledger.fold.read_admission`); ``runner run`` reads less still, a range of
job keys at a time (:func:`runner.ledger.resumescan.load_resume_state`: a few bytes a job).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Names are imported on first use: a run imports the writer's modules, not the readers'
# (views, exports, totals: pyarrow.csv and the rest), tests/test_startup.py. The functions
# fold() and totals() share their modules' names, which the package attribute holds once
# the module is imported: import them from runner.ledger.fold and runner.ledger.totals.
if TYPE_CHECKING:
    from runner.ledger.fold import read_events, read_folded
    from runner.ledger.folding import fold_tables
    from runner.ledger.lock import RunLock
    from runner.ledger.meta import read_run_meta, write_run_meta
    from runner.ledger.resume import (
        Action,
        Decision,
        ResumePolicy,
        ResumeSummary,
        decide,
        plan_resume,
    )
    from runner.ledger.schema import (
        LEDGER_SCHEMA,
        SCHEMA_VERSION,
        JobRecord,
        JobState,
        LedgerEvent,
        OutputImage,
        encode_request,
    )
    from runner.ledger.state import JobBrief, LedgerState
    from runner.ledger.store import Ledger, compact
    from runner.ledger.totals import EndpointTotals, Totals
    from runner.ledger.views import StatusSummary, export, status_summary

__all__ = [
    "LEDGER_SCHEMA",
    "SCHEMA_VERSION",
    "Action",
    "Decision",
    "EndpointTotals",
    "JobBrief",
    "JobRecord",
    "JobState",
    "Ledger",
    "LedgerEvent",
    "LedgerState",
    "OutputImage",
    "ResumePolicy",
    "ResumeSummary",
    "RunLock",
    "StatusSummary",
    "Totals",
    "compact",
    "decide",
    "encode_request",
    "export",
    "fold_tables",
    "plan_resume",
    "read_events",
    "read_folded",
    "read_run_meta",
    "status_summary",
    "write_run_meta",
]

_WHERE = {
    "Action": "runner.ledger.resume",
    "Decision": "runner.ledger.resume",
    "EndpointTotals": "runner.ledger.totals",
    "JobBrief": "runner.ledger.state",
    "JobRecord": "runner.ledger.schema",
    "JobState": "runner.ledger.schema",
    "LEDGER_SCHEMA": "runner.ledger.schema",
    "Ledger": "runner.ledger.store",
    "LedgerEvent": "runner.ledger.schema",
    "LedgerState": "runner.ledger.state",
    "OutputImage": "runner.ledger.schema",
    "ResumePolicy": "runner.ledger.resume",
    "ResumeSummary": "runner.ledger.resume",
    "RunLock": "runner.ledger.lock",
    "SCHEMA_VERSION": "runner.ledger.schema",
    "StatusSummary": "runner.ledger.views",
    "Totals": "runner.ledger.totals",
    "compact": "runner.ledger.store",
    "decide": "runner.ledger.resume",
    "encode_request": "runner.ledger.schema",
    "export": "runner.ledger.views",
    "fold_tables": "runner.ledger.fold",
    "plan_resume": "runner.ledger.resume",
    "read_events": "runner.ledger.fold",
    "read_folded": "runner.ledger.fold",
    "read_run_meta": "runner.ledger.meta",
    "status_summary": "runner.ledger.views",
    "write_run_meta": "runner.ledger.meta",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        raise AttributeError(f"module 'runner.ledger' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(where), name)
