"""The command line's flags and how they become typed options.

``add_manifest_args`` and ``add_run_args`` declare the flags; :func:`expand_options` and
:func:`run_config` turn parsed flags (plus a TOML file and the environment) into the
frozen :class:`runner.manifest.jobs.ExpandOptions` and :class:`runner.config.RunConfig`.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Declaring the flags needs neither: `runner --help` stays clear of pydantic's models.
if TYPE_CHECKING:
    from runner.config import RunConfig
    from runner.manifest.jobs import ExpandOptions

FORMATS = ("csv", "tsv", "jsonl", "parquet")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.strip(), value


def add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", type=Path, help="CSV, TSV, JSONL or Parquet manifest")
    p.add_argument("--format", choices=FORMATS, help="override the format from the suffix")
    p.add_argument("--endpoint", help="endpoint for rows without an `endpoint` column")
    p.add_argument(
        "--allow-endpoint",
        action="append",
        default=[],
        metavar="ID",
        help="send rows for this unknown endpoint id untyped (cost unknown)",
    )
    p.add_argument(
        "--set",
        dest="defaults",
        action="append",
        default=[],
        type=_key_value,
        metavar="KEY=VALUE",
        help="a default for every row; a row's own value wins",
    )
    p.add_argument("--prompt-template", help="fill `{column}` placeholders into `prompt`")
    p.add_argument(
        "--id-column",
        metavar="NAME",
        help="the column that identifies a row (e.g. sku); every row needs a value. "
        "Default: the column `id`, else each row's content",
    )


def _usd(text: str) -> Decimal:
    # Decimal("abc") raises InvalidOperation, which argparse does not turn into a usage error.
    try:
        return Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected dollars such as 12.50, got {text!r}") from None


def _endpoint_limit(text: str) -> tuple[str, int]:
    key, value = _key_value(text)
    try:
        return key, int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ENDPOINT=N, got {text!r}") from None


def add_run_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--ledger", type=Path, metavar="DIR", help="run directory (default: beside the manifest)")
    a("--config", type=Path, metavar="TOML", help="options from a TOML file; flags win")
    a("--emulator", action="store_true", help="run against the embedded local emulator")
    a("--queue-url", help="fal queue base URL (default https://queue.fal.run)")
    a("--rest-url", help="fal storage REST base URL (default https://rest.fal.ai; follows a "
      "local --queue-url)")  # fmt: skip
    a("--cdn-url", help="fal CDN upload base URL (default https://v3.fal.media; follows a "
      "local --queue-url)")  # fmt: skip
    a("--emulator-time-scale", type=float, metavar="X",
      help="with --emulator: multiply every emulated duration (default 1.0)")  # fmt: skip
    a("--emulator-concurrency", type=int, metavar="N",
      help="with --emulator: the emulated account's slots (default 4)")  # fmt: skip
    a(
        "--emulator-faults",
        metavar="SPEC",
        help='with --emulator: faults to inject, e.g. "submit_429=0.1,seed=7" (see README)',
    )
    a("--concurrency", type=int, help="the account's concurrency slots (default 2)")
    a("--max-in-flight", type=int, help="submitted, unfinished jobs (3x slots; 2x if streaming)")
    a("--rate", type=float, help="submits per second (default 10); halves on 429s")
    a("--endpoint-limit", action="append", type=_endpoint_limit, metavar="ID=N",
      help="at most N jobs of this endpoint in flight")  # fmt: skip
    a("--max-cost", type=_usd, metavar="USD",
      help="hard cap on what this invocation commits (earlier runs not counted)")  # fmt: skip
    a("--max-total-cost", type=_usd, metavar="USD",
      help="hard cap on the run directory's total spend, earlier runs included")  # fmt: skip
    a("--max-attempts", type=int, help="attempts per job for retryable failures (default 3)")
    a("--on-unknown", choices=["reconcile", "resubmit", "skip", "fail"],
      help="a submit of unknown outcome: settle it from fal's request history (default "
           "reconcile), resubmit (may pay twice), skip or fail")  # fmt: skip
    a("--reconcile-after", type=float, metavar="S",
      help="a request absent from fal's history this long after its submit was never "
           "accepted (default 60)")  # fmt: skip
    a("--api-url", help="fal Platform API base URL (default https://api.fal.ai)")
    a(
        "--output-lifetime",
        type=float,
        metavar="S",
        help="CDN lifetime asked for outputs (X-Fal-Object-Lifecycle-Preference; default 7 days)",
    )
    a(
        "--no-fallbacks",
        action="store_true",
        help="ask fal not to reroute to a fallback endpoint (x-fal-disable-fallbacks)",
    )
    a(
        "--no-store-io",
        action="store_true",
        help="ask fal not to keep payloads (X-Fal-Store-IO: 0); not with --on-unknown reconcile",
    )
    a("--retry-failed", action="store_true", help="run failed jobs again, even non-retryable")
    a("--completion", choices=["poll", "stream", "webhook"],
      help="how a finished job is noticed: poll (default; one look near the predicted end), "
           "stream (fal's status stream, polling if it fails) or webhook")  # fmt: skip
    a("--first-look", choices=["result", "status"],
      help="a poll reads the result URL first (default), or the status URL")  # fmt: skip
    a("--webhook-listen", metavar="HOST:PORT", help="where the webhook receiver listens")
    a("--webhook-url", help="the public URL fal calls (e.g. a tunnel to --webhook-listen)")
    a("--webhook-jwks-url", help="JWKS for webhook signatures (default fal's)")
    a("--job-timeout", type=float, metavar="S", help="cancel and fail a job after S seconds")
    a("--start-timeout", type=float, metavar="S", help="sent as X-Fal-Request-Timeout")
    a(
        "--priority",
        choices=["normal", "low"],
        help="fal queue priority sent as X-Fal-Queue-Priority (default: fal's, normal)",
    )
    a("--strict", action="store_true", help="refuse the manifest if any row is bad")
    a("--quiet", action="store_true", help="log lines instead of a progress bar")
    a("--log-format", choices=["text", "json"],
      help="stderr as text (default) or JSON lines: progress, failures, summary, exit")  # fmt: skip
    a(
        "--prices",
        type=Path,
        help="JSON price overrides; win over the account's prices and the built-in table",
    )
    a("--out", metavar="DIR|URL",
      help="where outputs are downloaded (default RUN_DIR/outputs; or s3://...)")  # fmt: skip
    a("--no-download", action="store_true", help="keep only the output URLs in the ledger")
    a("--download-concurrency", type=int, metavar="N", help="parallel downloads (default 8)")
    a("--inline-inputs", action="store_true",
      help="send small local images as data: URIs instead of uploading them")  # fmt: skip
    a("--inline-max-bytes", type=int, metavar="B", help="largest inlined image (default 2 MiB)")
    a("--probe-inputs", action="store_true",
      help="read remote input image sizes (Range request) so estimates are exact")  # fmt: skip


def expand_options(args: argparse.Namespace) -> ExpandOptions:
    from runner.manifest.jobs import ExpandOptions

    manifest: Path = args.manifest
    return ExpandOptions(
        manifest_dir=manifest.resolve().parent,
        default_endpoint=args.endpoint,
        allowed_endpoints=frozenset(args.allow_endpoint),
        defaults=dict(args.defaults),
        prompt_template=args.prompt_template,
        id_column=args.id_column,
    )


RUN_FLAGS = (
    "ledger", "emulator", "concurrency", "max_in_flight", "rate", "endpoint_limit", "max_cost",
    "max_total_cost", "max_attempts", "on_unknown", "retry_failed", "completion", "first_look",
    "webhook_listen", "webhook_url", "webhook_jwks_url", "job_timeout", "start_timeout",
    "priority", "strict", "quiet", "log_format", "prices",
    "queue_url", "rest_url", "cdn_url", "emulator_time_scale", "emulator_concurrency",
    "emulator_faults", "out", "download_concurrency", "inline_inputs", "inline_max_bytes",
    "probe_inputs", "reconcile_after", "api_url", "output_lifetime", "no_fallbacks",
    "id_column",
)  # fmt: skip


def default_run_dir(manifest: Path) -> Path:
    """Beside the manifest: ``demo.csv`` -> ``demo.runner/``."""
    return manifest.with_name(manifest.stem + ".runner")


def run_config(args: argparse.Namespace, environ: Mapping[str, str]) -> RunConfig:
    """Flags win over the TOML file, which wins over the defaults.

    A bad value is reported under the name it was given by: ``--max-cost`` for a flag,
    ``max-cost in run.toml`` for a key of the file.
    """
    from runner.config import RENAMED, build_config, key_from_env, load_toml

    values: dict[str, Any] = {}
    names: dict[str, str] = {}
    origins: dict[str, str] = {}
    for key, value in (load_toml(args.config) if args.config else {}).items():
        field = RENAMED.get(key, key)
        values[field], names[field], origins[field] = value, key.replace("_", "-"), str(args.config)
    for flag in RUN_FLAGS:
        given = getattr(args, flag, None)
        if given is not None and given is not False:
            field = RENAMED.get(flag, flag)
            values[field], names[field] = given, f"--{flag.replace('_', '-')}"
            origins.pop(field, None)
    if getattr(args, "no_download", False):
        values["download"] = False
    if getattr(args, "no_store_io", False):
        values["store_io"], names["store_io"] = False, "--no-store-io"
    if isinstance(values.get("endpoint_limits"), list):
        values["endpoint_limits"] = dict(values["endpoint_limits"])
    values.update(
        manifest=args.manifest,
        fmt=args.format,
        default_endpoint=args.endpoint,
        allowed_endpoints=frozenset(args.allow_endpoint),
        defaults=dict(args.defaults),
        prompt_template=args.prompt_template,
        # The embedded emulator brings its own key: FAL_KEY is neither read nor checked.
        key=None if values.get("emulator") is True else key_from_env(environ),
    )
    values.setdefault("run_dir", default_run_dir(args.manifest))
    return build_config(values, names=names, origins=origins)
