"""Fault injection for the emulator: what goes wrong, when, reproducibly.

Every fault is independent and is either a *rate* (a probability in 0..1, drawn
from its own seeded random stream) or a *schedule* (the 1-based ordinals of the
events it hits). Each kind counts its own events and draws exactly one number
per event, so the same seed always gives the same sequence for that kind, no
matter which other faults are on.

Text syntax (the CLI's ``--faults``): comma-separated ``name=value`` pairs::

    submit_429=0.1,reset_after_accept=@2+5,fail_runner_disconnected=0.05,seed=7

``@2+5`` is a schedule (the 2nd and 5th event of that kind). Durations end in
``_s`` and are emulated seconds (multiplied by the emulator's time scale).

Kinds and the events they count:

- ``submit_429``: authorised submits to a known endpoint answered 429, not queued.
- ``gateway_502|503|504``: any queue call answered by "nginx" with an HTML body
  and no ``x-fal-request-id``; a submit hit this way is not queued.
- ``reset_after_accept`` / ``timeout_after_accept``: accepted submits (queued and
  billed) whose answer is lost: the connection is reset, or hangs for
  ``timeout_hang_s`` and is then dropped.
- ``slow``: any queue call delayed by ``slow_s`` before it is answered.
- ``result_5xx`` / ``result_reset``: authorised result reads (GET of the
  ``response_url``) answered by "nginx" (502 and 503 by turns, the first hit 502;
  HTML body, no ``x-fal-request-id``), or whose connection is reset mid-answer as
  ``reset_after_accept`` does. The job is untouched: a later read may succeed, and
  a rate of 1 fails every read, so a client's retries run out.
- ``stream_not_sse``: authorised status-stream requests (``.../status/stream``)
  answered as a plain status GET is (JSON, 202 or 200), not as ``text/event-stream``.
- ``stream_drop_after``: not a rate but a count N (0, the default, is off): every
  status stream ends its body cleanly after its Nth ``data:`` event, without the
  COMPLETED event; a stream whose first N events include COMPLETED ends as usual.
- ``fail_<error_type>``: accepted jobs that end COMPLETED with that error.
- ``webhook_lost`` / ``webhook_duplicate``: rates handed to the webhook dispatcher;
  ``webhook_delay_s`` holds every delivery that long, ``webhook_reorder_s`` holds each for
  a random time within that window so later deliveries overtake earlier ones.
- ``result_retention_s``: results (and status) answer 404 this long after completion.
- ``flagged``: output images the safety checker flags, as FLUX does: the image is black and
  its ``has_nsfw_concepts`` entry ``true`` (billed all the same). A schedule counts output
  images in the order they are made; a rate is drawn from the image itself (the request,
  its seed, the image's index), not from a stream, so the same request with the same seed
  is flagged again, as FLUX's checker would flag the same picture. A request with
  ``enable_safety_checker: false`` is never flagged.

Platform API faults (:mod:`runner.emulator.platform_api`, the request history and prices):

- ``history_unavailable``: authorised history or pricing calls answered 403 ``{"detail"}``,
  as for a key or plan without access.
- ``history_unordered``: listings (counted at their first page, a call without ``cursor``)
  whose items come shuffled across all their pages instead of in sent order; the
  cursor carries the shuffle, so every item still comes exactly once.
- ``history_delay_s``: an accepted request is listed only this long after its ``sent_at``.
- ``history_page_limit``: not a rate but a count N (0, the default, is off): the server
  caps every page's ``limit`` at N, forcing pagination.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Literal

from runner.errors import UsageError

# error_type -> HTTP status of the stored result (spec: fal-queue.md, "Result").
FAILURE_STATUS: Mapping[str, int] = MappingProxyType(
    {
        "request_timeout": 504,
        "startup_timeout": 504,
        "runner_scheduling_failure": 503,
        "runner_connection_timeout": 503,
        "runner_disconnected": 503,
        "runner_connection_refused": 503,
        "internal_error": 500,
    }
)

FAILURE_DETAIL: Mapping[str, str] = MappingProxyType(
    {
        "request_timeout": "Request timed out",
        "startup_timeout": "Runner startup timed out",
        "runner_scheduling_failure": "Failed to schedule a runner for the request",
        "runner_connection_timeout": "Timed out connecting to the runner",
        "runner_disconnected": "Runner disconnected while processing the request",
        "runner_connection_refused": "Runner refused the connection",
        "internal_error": "Internal server error",
    }
)


@dataclass(frozen=True, slots=True)
class Trigger:
    """When one fault fires: a rate, an explicit schedule of ordinals, or both."""

    rate: float = 0.0
    at: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise UsageError(f"fault rate must be within 0..1, got {self.rate}")
        if any(n < 1 for n in self.at):
            raise UsageError("fault schedules count events from 1")

    @property
    def active(self) -> bool:
        return self.rate > 0.0 or bool(self.at)

    def fires(self, ordinal: int, draw: float) -> bool:
        return ordinal in self.at or draw < self.rate


NEVER = Trigger()


@dataclass(frozen=True, slots=True)
class FaultConfig:
    """All fault knobs, frozen. The default injects nothing."""

    seed: int = 0
    submit_429: Trigger = NEVER
    gateway_502: Trigger = NEVER
    gateway_503: Trigger = NEVER
    gateway_504: Trigger = NEVER
    reset_after_accept: Trigger = NEVER
    timeout_after_accept: Trigger = NEVER
    slow: Trigger = NEVER
    slow_s: float = 2.0
    timeout_hang_s: float = 30.0
    result_5xx: Trigger = NEVER
    result_reset: Trigger = NEVER
    stream_not_sse: Trigger = NEVER
    stream_drop_after: int = 0
    failures: Mapping[str, Trigger] = field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )
    webhook_lost: float = 0.0
    webhook_duplicate: float = 0.0
    webhook_delay_s: float = 0.0
    webhook_reorder_s: float = 0.0
    result_retention_s: float | None = None
    history_unavailable: Trigger = NEVER
    history_unordered: Trigger = NEVER
    history_delay_s: float = 0.0
    history_page_limit: int = 0
    flagged: Trigger = NEVER

    def __post_init__(self) -> None:
        unknown = set(self.failures) - set(FAILURE_STATUS)
        if unknown:
            raise UsageError(f"unknown failure type(s): {', '.join(sorted(unknown))}")
        for name in ("webhook_lost", "webhook_duplicate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise UsageError(f"{name} must be within 0..1, got {value}")
        for name in ("stream_drop_after", "history_page_limit", "history_delay_s"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be 0 or more, got {getattr(self, name)}")


_TRIGGER_FIELDS = frozenset(f.name for f in fields(FaultConfig) if f.type == "Trigger")
_FLOAT_FIELDS = frozenset(
    {"slow_s", "timeout_hang_s", "result_retention_s"}
    | {"webhook_lost", "webhook_duplicate", "webhook_delay_s", "webhook_reorder_s"}
    | {"history_delay_s"}
)
_INT_FIELDS = frozenset({"stream_drop_after", "history_page_limit"})


def parse_trigger(text: str) -> Trigger:
    """``0.1`` -> a rate; ``@3`` or ``@2+5+9`` -> a schedule of 1-based ordinals."""
    text = text.strip()
    try:
        if text.startswith("@"):
            return Trigger(at=frozenset(int(part) for part in text[1:].split("+")))
        return Trigger(rate=float(text))
    except ValueError as exc:
        raise UsageError(f"bad fault value {text!r}: want a rate like 0.1 or @2+5") from exc


def parse_faults(spec: str) -> FaultConfig:
    """Parse the compact ``--faults`` text into a :class:`FaultConfig`."""
    values: dict[str, Any] = {}
    failures: dict[str, Trigger] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, raw = item.partition("=")
        name = name.strip()
        if not sep:
            raise UsageError(f"fault {item!r} needs a value: name=value")
        if name == "seed" or name in _INT_FIELDS:
            values[name] = _parse_number(name, raw, int)
        elif name in _TRIGGER_FIELDS:
            values[name] = parse_trigger(raw)
        elif name.startswith("fail_") and name[5:] in FAILURE_STATUS:
            failures[name[5:]] = parse_trigger(raw)
        elif name in _FLOAT_FIELDS:
            values[name] = _parse_number(name, raw, float)
        else:
            known = sorted(
                _TRIGGER_FIELDS
                | _FLOAT_FIELDS
                | _INT_FIELDS
                | {f"fail_{t}" for t in FAILURE_STATUS}
            )
            raise UsageError(f"unknown fault {name!r}; known: seed, {', '.join(known)}")
    return replace(FaultConfig(**values), failures=MappingProxyType(failures))


def _parse_number(name: str, raw: str, kind: type[int] | type[float]) -> Any:
    try:
        return kind(raw.strip())
    except ValueError as exc:
        raise UsageError(f"fault {name} wants a number, got {raw!r}") from exc


class FaultInjector:
    """Counts events per fault kind and decides, reproducibly, which ones fail."""

    def __init__(self, config: FaultConfig) -> None:
        self.config = config
        self._ordinals: dict[str, int] = {}
        self._streams: dict[str, random.Random] = {}
        self._result_5xx_hits = 0

    def _fires(self, kind: str, trigger: Trigger) -> bool:
        ordinal = self._ordinals.get(kind, 0) + 1
        self._ordinals[kind] = ordinal
        stream = self._streams.get(kind)
        if stream is None:
            stream = self._streams[kind] = random.Random(f"{self.config.seed}/{kind}")
        return trigger.fires(ordinal, stream.random())

    def gateway_error(self) -> int | None:
        """One queue call: the gateway status code to answer with, if any."""
        hit = None
        for code, trigger in (
            (502, self.config.gateway_502),
            (503, self.config.gateway_503),
            (504, self.config.gateway_504),
        ):
            if self._fires(f"gateway_{code}", trigger) and hit is None:
                hit = code
        return hit

    def slow(self) -> bool:
        return self._fires("slow", self.config.slow)

    def submit_429(self) -> bool:
        return self._fires("submit_429", self.config.submit_429)

    def lost_answer(self) -> str | None:
        """One accepted submit: ``"reset"``, ``"timeout"`` or None (answered)."""
        reset = self._fires("reset_after_accept", self.config.reset_after_accept)
        timeout = self._fires("timeout_after_accept", self.config.timeout_after_accept)
        return "reset" if reset else "timeout" if timeout else None

    def result_fault(self) -> int | Literal["reset"] | None:
        """One result read: ``"reset"``, a gateway status code (502, 503 by turns) or None.

        Both kinds draw on every read; when both hit, the reset wins.
        """
        reset = self._fires("result_reset", self.config.result_reset)
        gateway = self._fires("result_5xx", self.config.result_5xx)
        if reset:
            return "reset"
        if not gateway:
            return None
        self._result_5xx_hits += 1
        return 502 if self._result_5xx_hits % 2 else 503

    def stream_not_sse(self) -> bool:
        """One status-stream request: answer it as a plain status GET?"""
        return self._fires("stream_not_sse", self.config.stream_not_sse)

    def history_unavailable(self) -> bool:
        """One authorised history or pricing call: answer it 403?"""
        return self._fires("history_unavailable", self.config.history_unavailable)

    def history_unordered(self) -> bool:
        """One new listing (its first page): shuffle its items across pages?"""
        return self._fires("history_unordered", self.config.history_unordered)

    def flagged(self, image_key: str) -> bool:
        """One output image (``image_key`` names its request, seed and index): flagged?"""
        ordinal = self._ordinals.get("flagged", 0) + 1
        self._ordinals["flagged"] = ordinal
        text = f"{self.config.seed}/flagged/{image_key}".encode()
        draw = int.from_bytes(hashlib.sha256(text).digest()[:8]) / 2**64
        return self.config.flagged.fires(ordinal, draw)

    def failure(self) -> str | None:
        """One accepted job: the error_type it will end with, if any."""
        hit = None
        for error_type in FAILURE_STATUS:
            trigger = self.config.failures.get(error_type, NEVER)
            if self._fires(f"fail_{error_type}", trigger) and hit is None:
                hit = error_type
        return hit
