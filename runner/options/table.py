"""The one table of run options: every flag, TOML key and RunConfig field comes from here.

Each :class:`Option` row says, once: the long flag (``--max-cost``), which is also the TOML
key (``max-cost``, or ``max_cost``); the :class:`runner.config.RunConfig` field it sets; how a
flag's text is parsed; its help group and its help sentence (what it does and its default).
The parser (:func:`runner.options.add_options`), the TOML loader's accepted keys and the
mapping to RunConfig fields are all generated from :data:`OPTIONS`.

A boolean option has both forms, ``--X`` and ``--no-X`` (and TOML ``X = true`` or
``no-X = true``), so a flag can turn off what a file turned on.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

Kind = Literal["value", "bool", "list", "map"]

MANIFEST = "manifest"
WHERE = "where to send"
PACE = "pace and money"
COMPLETION = "completion"
IO = "inputs and outputs"
DISPLAY = "display"
GROUPS = (MANIFEST, WHERE, PACE, COMPLETION, IO, DISPLAY)

RUN: frozenset[str] = frozenset({"run"})
EVERY: frozenset[str] = frozenset({"validate", "plan", "run"})
PLAN_AND_RUN: frozenset[str] = frozenset({"plan", "run"})

FORMATS = ("csv", "tsv", "jsonl", "parquet")
_WEEK = "604800 s, 7 days"


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value


def usd(text: str) -> Decimal:
    # Decimal("abc") raises InvalidOperation, which argparse does not turn into a usage error.
    try:
        return Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected dollars such as 12.50, got {text!r}") from None


def endpoint_limit(text: str) -> tuple[str, int]:
    key, value = key_value(text)
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ENDPOINT=N, got {text!r}") from None


def _text(value: Any) -> Any:
    """A TOML value as the text a ``--set`` would give (``true``, ``3``, ``1.5``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value) if isinstance(value, int | float | str) else value


def text_map(value: Any) -> Any:
    """TOML ``set = {seed = 1}``: every value as text, as ``--set seed=1`` gives it."""
    return {str(k): _text(v) for k, v in value.items()} if isinstance(value, dict) else value


def text_list(value: Any) -> Any:
    """TOML ``allow-endpoint = "a/b"`` or ``["a/b", "c/d"]``."""
    return [value] if isinstance(value, str) else value


@dataclass(frozen=True, slots=True)
class Option:
    """One run option: a flag, its TOML key and the RunConfig field it sets."""

    name: str  # the long flag without dashes, and the TOML key: "max-cost"
    field: str  # the RunConfig field: "max_cost_usd"
    group: str
    help: str  # what it does, and its default
    kind: Kind = "value"
    parse: Callable[[str], Any] | None = None  # a flag's text to a value (argparse type)
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    invert: bool = False  # the field holds the opposite (--fallbacks sets no_fallbacks)
    from_toml: Callable[[Any], Any] | None = None  # a TOML value before validation
    commands: frozenset[str] = RUN

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def flag_for(self, value: Any) -> str:
        """The flag that gave ``value``: ``--no-download`` for a boolean turned off."""
        return f"--no-{self.name}" if self.kind == "bool" and value is False else self.flag


def _o(group: str, name: str, field: str, help: str, **kw: Any) -> Option:
    return Option(name=name, field=field, group=group, help=help, **kw)


OPTIONS: tuple[Option, ...] = (
    # manifest: how rows become jobs (validate and plan read these too)
    _o(MANIFEST, "format", "fmt", "the manifest's format when its suffix does not say it "
       "(default: from the suffix)", choices=FORMATS, commands=EVERY),
    _o(MANIFEST, "endpoint", "default_endpoint", "the endpoint for rows without an `endpoint` "
       "column (default none: such rows are invalid)", metavar="ID", commands=EVERY),
    _o(MANIFEST, "allow-endpoint", "allowed_endpoints", "send rows for this endpoint id though "
       "the catalog does not know it: untyped, cost unknown (repeatable; default none)",
       kind="list", metavar="ID", from_toml=text_list, commands=EVERY),
    _o(MANIFEST, "set", "defaults", "fill KEY with VALUE in every row that leaves it blank; a "
       "row's own value wins (repeatable; default none)", kind="map", parse=key_value,
       metavar="KEY=VALUE", from_toml=text_map, commands=EVERY),
    _o(MANIFEST, "prompt-template", "prompt_template", "build each row's prompt from this text, "
       "filling `{column}` placeholders from the row (default: the prompt column as it is)",
       metavar="TEXT", commands=EVERY),
    _o(MANIFEST, "id-column", "id_column", "the column that identifies a row across runs, e.g. "
       "sku; every row needs a value (default: the column `id`, else each row's content)",
       metavar="NAME", commands=EVERY),
    _o(MANIFEST, "strict", "strict", "refuse the whole manifest, sending nothing, if any row is "
       "bad (default off: bad rows are recorded invalid and the good ones run)", kind="bool"),
    # where to send
    _o(WHERE, "emulator", "emulator", "run against a local fal emulator started inside this "
       "process, with its own key: nothing leaves the machine (default off)", kind="bool"),
    _o(WHERE, "emulator-time-scale", "emulator_time_scale", "with --emulator: multiply every "
       "emulated duration, e.g. 0.01 for a quick rehearsal (default 1.0)", parse=float,
       metavar="X"),
    _o(WHERE, "emulator-concurrency", "emulator_concurrency", "with --emulator: the emulated "
       "account's concurrency slots (default 4)", parse=int, metavar="N"),
    _o(WHERE, "emulator-faults", "emulator_faults", "with --emulator: faults to inject, e.g. "
       '"submit_429=0.1,seed=7" (default none; see README)', metavar="SPEC"),
    _o(WHERE, "queue-url", "queue_url", "fal's queue base URL; point it at `runner emulator "
       "serve` to rehearse (default https://queue.fal.run)", metavar="URL"),
    _o(WHERE, "rest-url", "rest_url", "fal storage REST base URL, where local inputs are "
       "uploaded (default https://rest.fal.ai; follows a local --queue-url)", metavar="URL"),
    _o(WHERE, "cdn-url", "cdn_url", "fal CDN upload base URL (default https://v3.fal.media; "
       "follows a local --queue-url)", metavar="URL"),
    _o(WHERE, "api-url", "api_url", "fal Platform API base URL: request history for "
       "reconciling, and the account's own prices (default https://api.fal.ai; follows a local "
       "--queue-url)", metavar="URL", commands=PLAN_AND_RUN),
    _o(WHERE, "key-changed", "key_changed", "FAL_KEY is not the key the jobs left in flight "
       "were submitted with, but the account is the same (a rotated key): re-attach them with "
       "it (default off: refused, since another account's key cannot find them)", kind="bool"),
    _o(WHERE, "priority", "priority", "fal queue priority sent as X-Fal-Queue-Priority; low "
       "yields to normal traffic (default: not sent, so fal's normal)",
       choices=("normal", "low")),
    _o(WHERE, "output-lifetime", "output_lifetime_s", "how long fal's CDN keeps outputs, sent "
       f"as X-Fal-Object-Lifecycle-Preference (default {_WEEK})", parse=float, metavar="S"),
    _o(WHERE, "upload-lifetime", "upload_ttl_s", "how long fal's CDN keeps the local input "
       f"files a run uploads (default {_WEEK})", parse=float, metavar="S"),
    _o(WHERE, "fallbacks", "no_fallbacks", "--no-fallbacks asks fal not to reroute a request "
       "to a fallback endpoint (x-fal-disable-fallbacks), so outputs come from the model named "
       "(default: fal may reroute)", kind="bool", invert=True),
    _o(WHERE, "store-io", "store_io", "--no-store-io asks fal not to keep request payloads "
       "(X-Fal-Store-IO: 0); needs an --on-unknown other than reconcile (default: fal keeps "
       "them)", kind="bool"),
    # pace and money
    _o(PACE, "concurrency", "concurrency", "your fal account's concurrency slots: jobs fal "
       "runs at once (default 2)", parse=int, metavar="N"),
    _o(PACE, "max-in-flight", "max_in_flight", "jobs submitted but unfinished at any time "
       "(default 3x --concurrency when polling, 2x with stream or webhook)", parse=int,
       metavar="N"),
    _o(PACE, "rate", "rate_per_s", "a fixed cap on submits per second; halves on a 429 and "
       "recovers (default: no cap, the pace follows the slots and the observed job times)",
       parse=float, metavar="R"),
    _o(PACE, "endpoint-limit", "endpoint_limits", "at most N jobs of endpoint ID in flight "
       "(repeatable; default: no limit of its own)", kind="map", parse=endpoint_limit,
       metavar="ID=N"),
    _o(PACE, "max-cost", "max_cost_usd", "stop admitting jobs before this invocation commits "
       "more than USD; earlier runs do not count (default: no cap)", parse=usd, metavar="USD"),
    _o(PACE, "max-total-cost", "max_total_cost_usd", "the same cap on the run directory's "
       "total spend, earlier runs included (default: no cap)", parse=usd, metavar="USD"),
    _o(PACE, "max-attempts", "max_attempts", "attempts per job for retryable failures within "
       "a run (default 3)", parse=int, metavar="N"),
    _o(PACE, "retry-failed", "retry_failed", "run again the jobs an earlier run left failed "
       "even when the failure may have been billed, e.g. a 422 (default off: only failures "
       "that cost nothing are retried)", kind="bool", commands=PLAN_AND_RUN),
    _o(PACE, "shards", "shards", "split the jobs into N shards by a hash of each row's "
       "identity, a ledger each under RUN_DIR/shards/K; fixed for a run directory (default: "
       "not sharded)", parse=int, metavar="N"),
    _o(PACE, "shard", "shard", "with --shards: run shard K only (0..N-1), so other processes "
       "or machines can take the others (default: every shard, in this process)", parse=int,
       metavar="K"),
    _o(PACE, "keys-file", "keys_file", "fal keys, one a line, each with optional concurrency=N "
       "and rate=R; shards are spread over them (docs/SCALE.md; default: FAL_KEY)", parse=Path,
       metavar="FILE"),
    _o(PACE, "gate-dir", "gate_dir", "share each key's slots and submit rate, and the run's "
       "--max-cost/--max-total-cost budget, with other processes on this machine through "
       "locked files in DIR (default: this process only)", parse=Path, metavar="DIR"),
    _o(PACE, "flagged", "flagged", "an output fal's safety checker flagged (has_nsfw_concepts: "
       "a black image): keep it (default; counted), reroll it with a new seed (each re-roll a "
       "paid attempt) or fail the job (paid)", choices=("keep", "reroll", "fail")),
    _o(PACE, "max-rerolls", "max_rerolls", "with --flagged reroll: re-rolls per job, after "
       "which the last output is kept and counted as flagged (default 2)", parse=int,
       metavar="N"),
    _o(PACE, "on-unknown", "on_unknown", "a submit whose answer was lost: reconcile (default) "
       "looks it up in fal's request history; resubmit (may pay twice), skip or fail",
       choices=("reconcile", "resubmit", "skip", "fail"), commands=PLAN_AND_RUN),
    _o(PACE, "reconcile-after", "reconcile_after_s", "a submit of unknown outcome still absent "
       "from fal's request history this long after it was sent was never accepted, and is "
       "sent again (default 60)", parse=float, metavar="S"),
    _o(PACE, "prices", "prices", "a JSON file of price overrides, winning over the account's "
       "prices and the built-in table (default none; see README)", parse=Path, metavar="FILE",
       commands=PLAN_AND_RUN),
    # completion
    _o(COMPLETION, "completion", "completion", "how a finished job is noticed: poll (default; "
       "each job is checked once, near the end its queue position predicts), stream (fal's "
       "status stream, polling if it fails) or webhook (fal calls --webhook-url)",
       choices=("poll", "stream", "webhook")),
    _o(COMPLETION, "first-look", "first_look", "when polling, which URL a check of a job reads "
       "first: result (default; a finished job then costs a single read) or status (its "
       "status, then its result)", choices=("result", "status")),
    _o(COMPLETION, "webhook-listen", "webhook_listen", "with --completion webhook: where the "
       "receiver listens (default 127.0.0.1 on a free port)", metavar="HOST:PORT"),
    _o(COMPLETION, "webhook-url", "webhook_url", "with --completion webhook: the public URL "
       "fal calls, e.g. a tunnel to --webhook-listen (required for webhook)", metavar="URL"),
    _o(COMPLETION, "webhook-jwks-url", "webhook_jwks_url", "where the keys that sign webhooks "
       "are fetched (default fal's, https://rest.fal.ai/.well-known/jwks.json)",
       metavar="URL"),
    _o(COMPLETION, "job-timeout", "job_timeout_s", "cancel a job at fal and record it failed "
       "after S seconds (default: no limit)", parse=float, metavar="S"),
    _o(COMPLETION, "start-timeout", "start_timeout_s", "fal gives up on a job not started "
       "within S seconds, sent as X-Fal-Request-Timeout (default: not sent)", parse=float,
       metavar="S"),
    # inputs and outputs
    _o(IO, "ledger", "run_dir", "the run directory (ledger, upload cache, outputs); run again "
       "with the same one to resume (default: beside the manifest, demo.csv -> demo.runner)",
       parse=Path, metavar="DIR"),
    _o(IO, "out", "out_dir", "where outputs are downloaded: a directory or a URL such as "
       "s3://bucket/prefix (default RUN_DIR/outputs)", metavar="DIR|URL"),
    _o(IO, "cache", "cache_dir", "a cache shared by run directories: a job with a fixed seed "
       "on a deterministic endpoint, already done in any run using it, is copied from it at $0 "
       "(default none)", parse=Path, metavar="DIR"),
    _o(IO, "nondeterministic-endpoint", "nondeterministic_endpoints", "never serve this "
       "endpoint from --cache though the catalog takes it as deterministic (repeatable; "
       "default none)", kind="list", metavar="ID", from_toml=text_list),
    _o(IO, "download", "download", "--no-download keeps only the output URLs in the ledger "
       "(default: each output is downloaded when its job completes)", kind="bool"),
    _o(IO, "download-concurrency", "download_concurrency", "how many outputs are downloaded at "
       "once (default 8)",
       parse=int, metavar="N"),
    _o(IO, "inline-inputs", "inline_inputs", "send small local images inside the request as "
       "data: URIs instead of uploading them (default off)", kind="bool"),
    _o(IO, "inline-max-bytes", "inline_max_bytes", "with --inline-inputs: the largest image "
       "sent inline, in bytes (default 2097152, 2 MiB)", parse=int, metavar="B"),
    _o(IO, "probe-inputs", "probe_inputs", "read remote input images' sizes with a Range "
       "request so estimates are exact (default off: assumed sizes)", kind="bool"),
    # display
    _o(DISPLAY, "quiet", "quiet", "log lines instead of a progress bar (default: a bar on a "
       "terminal, log lines otherwise)", kind="bool"),
    _o(DISPLAY, "log-format", "log_format", "stderr as text (default) or json: one JSON object "
       "a line (progress, failures, summary, exit status; schema runner.log/1)",
       choices=("text", "json")),
)  # fmt: skip

BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}
# How a user names each field: its flag (errors never show an internal field name).
FLAG_OF_FIELD: Mapping[str, str] = {o.field: o.flag for o in OPTIONS}
