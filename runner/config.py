"""The one frozen run configuration, built by the CLI from flags, a TOML file and the environment.

Nothing reads ``os.environ`` at import time: :func:`key_from_env` is called by the CLI and
its result travels down inside :class:`RunConfig`. The key is a ``SecretStr``: it never
appears in a repr, a log line, the ledger (``public_dict`` drops it) or an error message.
Its shape is checked once, here (:func:`runner.fal.key.key_problem`): a bad key is a
:class:`UsageError` before anything is sent, and :meth:`RunConfig.redactor` gives the one
function that removes it from every text the run writes.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from runner.endpoints.catalog import CATALOG
from runner.errors import UsageError
from runner.fal.key import key_problem, redactor
from runner.fal.urls import FAL_API_URL as FAL_API_URL
from runner.fal.urls import FAL_CDN_URL as FAL_CDN_URL
from runner.fal.urls import FAL_JWKS_URL as FAL_JWKS_URL
from runner.fal.urls import FAL_QUEUE_URL as FAL_QUEUE_URL
from runner.fal.urls import FAL_REST_URL as FAL_REST_URL

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

Completion = Literal["poll", "stream", "webhook"]
OnUnknown = Literal["reconcile", "resubmit", "skip", "fail"]
# What to do with an output fal's safety checker flagged (has_nsfw_concepts: a black image).
OnFlagged = Literal["keep", "reroll", "fail"]
# How long after a submit of unknown outcome its absence from fal's request history means
# "never accepted". fal does not document how soon an accepted request is listed
# (shared/spec/fal-platform.md), so this is configuration, conservative by default.
RECONCILE_AFTER_S = 60.0
# The CDN lifetime asked for outputs: long enough to outlive a crash and a late resume.
OUTPUT_LIFETIME_S = 7 * 86_400.0


class RunConfig(BaseModel):
    """Everything a run needs, explicit and immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    manifest: Path
    run_dir: Path
    fmt: str | None = None
    default_endpoint: str | None = None
    allowed_endpoints: frozenset[str] = frozenset()
    defaults: Mapping[str, str] = Field(default_factory=dict)
    prompt_template: str | None = None
    id_column: str | None = None
    strict: bool = False
    prices: Path | None = None

    key: SecretStr | None = None
    queue_url: str = FAL_QUEUE_URL
    rest_url: str = FAL_REST_URL
    cdn_url: str = FAL_CDN_URL
    api_url: str = FAL_API_URL

    concurrency: int = Field(default=2, ge=1, le=10_000)
    max_in_flight: int | None = Field(default=None, ge=1)
    rate_per_s: float | None = Field(default=None, gt=0)  # None: follow the account
    endpoint_limits: Mapping[str, int] = Field(default_factory=dict)
    # --max-cost caps what this invocation commits; --max-total-cost the run directory's
    # total, earlier runs included (runner.execution.budget).
    max_cost_usd: Decimal | None = Field(default=None, ge=0)
    max_total_cost_usd: Decimal | None = Field(default=None, ge=0)
    max_attempts: int = Field(default=3, ge=1, le=100)
    on_unknown: OnUnknown = "reconcile"
    reconcile_after_s: float = Field(default=RECONCILE_AFTER_S, ge=0)
    retry_failed: bool = False
    # The key differs from the one jobs left in flight were submitted with, knowingly.
    key_changed: bool = False
    # Submit headers: X-Fal-Object-Lifecycle-Preference (None: fal's default lifetime),
    # x-fal-disable-fallbacks, and X-Fal-Store-IO: 0 when store_io is off.
    output_lifetime_s: float | None = Field(default=OUTPUT_LIFETIME_S, gt=0)
    no_fallbacks: bool = False
    store_io: bool = True

    completion: Completion = "poll"
    # A look reads the result URL first (one call when the job is done) or the status URL.
    first_look: Literal["result", "status"] = "result"
    webhook_listen: str = "127.0.0.1:0"
    webhook_url: str | None = None
    webhook_jwks_url: str = FAL_JWKS_URL

    job_timeout_s: float | None = Field(default=None, gt=0)
    start_timeout_s: float | None = Field(default=None, gt=0)
    priority: Literal["normal", "low"] | None = None

    emulator: bool = False  # the embedded local emulator stands in for fal
    emulator_time_scale: float = Field(default=1.0, gt=0)
    emulator_concurrency: int | None = Field(default=None, ge=1)
    emulator_faults: str = ""

    # --out: a directory or a filesystem URL (s3://bucket/prefix, file:///...); None means
    # outputs/ in the run directory. --no-download keeps only the URLs.
    out_dir: str | None = None
    download: bool = True
    download_concurrency: int = Field(default=8, ge=1, le=256)
    inline_inputs: bool = False  # small local images go as data: URIs instead of uploads
    inline_max_bytes: int = Field(default=2 * 1024 * 1024, ge=0)
    probe_inputs: bool = False  # read remote input sizes with a Range request, for exact costs
    upload_ttl_s: float = Field(default=7 * 86_400.0, gt=0)  # CDN lifetime asked for uploads
    # --flagged: keep a flagged output (counted), re-roll it with a new seed up to
    # --max-rerolls times (each a paid attempt), or fail the job (paid).
    flagged: OnFlagged = "keep"
    max_rerolls: int = Field(default=2, ge=0, le=20)
    # --cache DIR: the cross-run output cache shared by run directories (runner.media.cache).
    cache_dir: Path | None = None
    # Endpoints whose output the cache must not trust to repeat for a fixed seed (the
    # catalog assumes every FLUX endpoint does; an unknown endpoint never does).
    nondeterministic_endpoints: frozenset[str] = frozenset()
    # --shards N: jobs split by a hash of their row identity, a ledger per shard under
    # RUN_DIR/shards/K; --shard K runs that shard only (runner.scale).
    shards: int | None = Field(default=None, ge=1, le=65_536)
    shard: int | None = Field(default=None, ge=0)
    keys_file: Path | None = None  # several keys, one per shard group (runner.scale.keys)
    gate_dir: Path | None = None  # file-lock leases shared by processes on one machine
    quiet: bool = False
    log_format: Literal["text", "json"] = "text"  # json: one object per line on stderr

    @field_validator("key")
    @classmethod
    def _key_is_well_formed(cls, key: SecretStr | None) -> SecretStr | None:
        # The message names what is wrong, never the key (build_config drops the cause).
        problem = None if key is None else key_problem(key.get_secret_value())
        if problem:
            raise ValueError(problem)
        return key

    @model_validator(mode="after")
    def _reconcile_needs_payloads(self) -> RunConfig:
        if self.on_unknown == "reconcile" and not self.store_io:
            raise ValueError(
                "--no-store-io keeps fal from storing payloads, which --on-unknown reconcile "
                "(the default) needs to recognise a request: choose another --on-unknown"
            )
        return self

    @model_validator(mode="after")
    def _webhook_needs_url(self) -> RunConfig:
        if self.completion == "webhook" and not self.webhook_url and not self.emulator:
            raise ValueError("--completion webhook needs --webhook-url (the public URL fal calls)")
        return self

    @model_validator(mode="after")
    def _shard_within_shards(self) -> RunConfig:
        if self.shard is not None and (self.shards is None or self.shard >= self.shards):
            raise ValueError(f"--shard {self.shard} needs --shards N with N > {self.shard}")
        return self

    @property
    def submit_headers(self) -> dict[str, str]:
        """The batch's own submit headers (fal's Platform headers), from the options."""
        headers: dict[str, str] = {}
        if self.output_lifetime_s is not None:
            lifetime = {"expiration_duration_seconds": int(self.output_lifetime_s)}
            headers["X-Fal-Object-Lifecycle-Preference"] = json.dumps(lifetime)
        if self.no_fallbacks:
            headers["x-fal-disable-fallbacks"] = "true"
        if not self.store_io:
            headers["X-Fal-Store-IO"] = "0"
        return headers

    @model_validator(mode="before")
    @classmethod
    def _local_queue_keeps_everything_local(cls, values: Any) -> Any:
        """A queue on this machine (an emulator) brings storage, CDN and the Platform API
        with it, at the emulator's paths, unless they are given: a local run never
        reaches a real fal host by default."""
        if not isinstance(values, dict) or not values.get("queue_url"):
            return values
        base = str(values["queue_url"]).rstrip("/")
        host = urlsplit(base).hostname or ""
        if host not in LOCAL_HOSTS:
            return values
        local = {"rest_url": "/rest", "cdn_url": "/cdn", "api_url": "/api",
                 "webhook_jwks_url": "/rest/.well-known/jwks.json"}  # fmt: skip
        return {**{k: base + path for k, path in local.items()}, **values}

    @property
    def output_target(self) -> str:
        """Where downloaded outputs go: --out, or ``outputs/`` in the run directory."""
        return self.out_dir or str(self.run_dir / "outputs")

    def deterministic(self, endpoint: str) -> bool:
        """May a fixed seed's output on ``endpoint`` be reused (the cross-run cache)?"""
        spec = CATALOG.get(endpoint)
        return (
            spec is not None
            and spec.deterministic
            and (endpoint not in self.nondeterministic_endpoints)
        )

    @property
    def in_flight_limit(self) -> int:
        """Jobs submitted but unfinished: enough to keep every slot busy.

        Twice the slots when completion is noticed at once (stream, webhook); three times
        when polling, because a finished job keeps its place until its poll comes, and with
        only twice the slots the queue behind them ran dry (makespan 1.10-1.13 x the bound
        against 1.01 with three times, bench/README.md).
        """
        return self.max_in_flight or (3 if self.completion == "poll" else 2) * self.concurrency

    def redactor(self) -> Callable[[str], str]:
        """The run's one redaction function: text without the key or its parts.

        :func:`runner.fal.key.redactor` of this config's key (identity when there is none).
        """
        return redactor(self.key)

    def public_dict(self) -> dict[str, Any]:
        """The configuration as JSON for run metadata, without the key."""
        data = self.model_dump(mode="json", exclude={"key"})
        data["key_set"] = self.key is not None
        return data


def key_from_env(environ: Mapping[str, str]) -> SecretStr | None:
    """``FAL_KEY`` without surrounding whitespace; None when unset or blank.

    Checked once, here: a key with a newline, whitespace or characters outside printable
    ASCII inside it, or with a colon but not of the form ``id:secret``, is a
    :class:`UsageError` (exit 2) whose message says what is wrong and never shows the key.
    """
    value = environ.get("FAL_KEY", "").strip()
    if not value:
        return None
    problem = key_problem(value)
    if problem:
        raise UsageError(problem)
    return SecretStr(value)


def load_toml(path: Path) -> dict[str, Any]:
    """The options table of a TOML file (``[runner]``, else the top level), keys as written.

    Which keys are options, and what they set, is :mod:`runner.options`' business."""
    import tomllib  # here: only a run given a config file reads TOML (~2 ms of CPU to import)

    try:
        with path.open("rb") as fh:
            raw = tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from exc
    section = raw.get("runner", raw)
    if not isinstance(section, dict):
        raise UsageError(f"{path}: [runner] must be a table")
    return {str(k): v for k, v in section.items()}


# How a user names the fields no option of the table sets (runner.options passes the rest).
_NAMES = {"manifest": "MANIFEST", "key": "FAL_KEY"}
_BOUNDS = {
    "greater_than_equal": ("ge", "at least"),
    "greater_than": ("gt", "more than"),
    "less_than_equal": ("le", "at most"),
    "less_than": ("lt", "less than"),
}
_SHOWN_INPUT_CHARS = 60


def option_name(field: str) -> str:
    """How the user names a RunConfig field that ``names`` did not name."""
    return _NAMES.get(field, f"--{field.replace('_', '-')}")


def build_config(
    values: Mapping[str, Any],
    *,
    names: Mapping[str, str] | None = None,
    origins: Mapping[str, str] | None = None,
) -> RunConfig:
    """Validate options into a RunConfig, turning pydantic errors into one UsageError.

    Errors name options as the user gave them: ``names`` maps a field to the name it was
    given by (``--max-cost``, or the TOML key ``max-cost``) and ``origins`` to the file it
    came from (:mod:`runner.options` names every field of its table).
    """
    try:
        return RunConfig.model_validate(dict(values))
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        parts = [_problem(err, names or {}, origins or {}) for err in errors]
        if any(err["loc"][:1] == ("key",) for err in errors):
            # pydantic's own text of a key error holds the key (its input): not chained.
            raise UsageError("; ".join(parts)) from None
        raise UsageError("; ".join(parts)) from exc


def _problem(err: Any, names: Mapping[str, str], origins: Mapping[str, str]) -> str:
    """One pydantic error as ``--max-cost must be at least 0, not -5``."""
    loc = [str(p) for p in err["loc"]]
    msg = str(err["msg"]).split(", unable to ", 1)[0]
    if not loc:  # a model validator: its message is already written for the user
        return msg.removeprefix("Value error, ")
    field = loc[0]
    # A nested key (an endpoint of --endpoint-limit) follows the option's name.
    name = " ".join([names.get(field) or option_name(field), *loc[1:]])
    if field in origins:
        name += f" in {origins[field]}"
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown option {name}"
    if kind == "missing":
        return f"{name} is required"
    if kind == "value_error" and field == "key":  # key_problem names FAL_KEY itself
        return msg.removeprefix("Value error, ")
    shown = "" if field == "key" else f", not {_shown(err.get('input'))}"
    if kind in _BOUNDS:
        bound, words = _BOUNDS[kind]
        return f"{name} must be {words} {_shown(err['ctx'][bound])}{shown}"
    if msg.startswith("Input should be "):
        return f"{name} must be {msg.removeprefix('Input should be ')}{shown}"
    return f"{name}: {msg}"


def _shown(value: Any) -> str:
    """A rejected value as the user typed it: ``-5``, not ``Decimal('-5')``."""
    if isinstance(value, Decimal):
        text = format(value, "f")
    elif isinstance(value, float):
        text = format(value, "g")  # 0.0 was typed as 0
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = str(value)
    return text if len(text) <= _SHOWN_INPUT_CHARS else text[: _SHOWN_INPUT_CHARS - 3] + "..."
