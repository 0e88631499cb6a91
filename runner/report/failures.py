"""Failure groups of a run report: the same failure on different rows counted once.

A group is ``error_type`` (or the job's state when fal gave no type) plus the message with
ids, URLs, data URIs, paths and numbers replaced by placeholders (:func:`normalise_message`).
Groups are ordered by count, largest first; each keeps a few example rows, in manifest order.
Pure: a folded ledger table in, frozen groups out.

What a group *shows* (``summary``) keeps what makes it actionable: the text its messages
share, verbatim. A group of one distinct message shows it whole (the missing file's path,
the endpoint in a URL); where messages differ, only the differing part of each word is
blanked, keeping its common start and end (``images/<…>.jpg``,
``https://queue.fal.run/fal-ai/flux-lora/requests/<id>``) (:func:`common_message`). Each
group also counts its jobs per endpoint.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from runner.ledger import JobState

# Ordered most specific first: a URL would otherwise be half-eaten by the path rule.
_NORMALISERS = (
    (re.compile(r"\b[a-z][a-z0-9+.-]*://\S+", re.I), "<url>"),
    (re.compile(r"\bdata:[^\s,]*,\S*"), "<data>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I), "<id>"),
    (re.compile(r"\b[0-9a-f]{16,}\b", re.I), "<id>"),
    (re.compile(r"(?<![\w<])[\w.~-]*/[\w./~-]+"), "<path>"),
    (re.compile(r"(?<![\w<])-?\d+(?:\.\d+)?[A-Za-z%]{0,3}(?![\w.])"), "<n>"),  # 40, 3.5s, 2MB
    # What is left with a digit in it is an identifier of some kind: k10092, r2d2, 1024x768.
    (re.compile(r"(?<![\w<])[A-Za-z_]*\d[\w-]*"), "<id>"),
    (re.compile(r"\s+"), " "),
)
_MESSAGE_CHARS = 300
_DISTINCT_KEPT = 64  # distinct messages a group's summary is drawn from
_BLANK = "<…>"
# Where a word's common start may end and its common end may begin.
_HEAD_BREAKS = "/:=.@?&#-_"
_TAIL_BREAKS = "/.:?&#-_"
_FAILED_STATES = [s.value for s in (JobState.FAILED, JobState.CANCELLED, JobState.INVALID)]
COLUMNS = ["error_type", "error_message", "retryable", "row_id", "line", "source", "endpoint",
            "state"]  # fmt: skip


@dataclass(frozen=True, slots=True)
class FailureExample:
    row_id: str | None
    line: int | None
    source: str | None
    endpoint: str | None
    state: JobState
    message: str | None


@dataclass(frozen=True, slots=True)
class FailureGroup:
    error_type: str
    message: str  # normalised
    count: int
    retryable: int
    examples: tuple[FailureExample, ...]
    summary: str = ""  # what its messages share, verbatim; only what differs is blanked
    endpoints: tuple[tuple[str, int], ...] = ()  # (endpoint, jobs), most first


def normalise_message(message: str | None) -> str:
    """A failure message with the parts that differ per row (ids, URLs, numbers) blanked."""
    if not message:
        return ""
    text = message[:2000]
    for pattern, replacement in _NORMALISERS:
        text = pattern.sub(replacement, text)
    text = text.strip()
    return text if len(text) <= _MESSAGE_CHARS else text[: _MESSAGE_CHARS - 1] + "…"


def _cut(text: str, limit: int = _MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _common_start(texts: list[str]) -> int:
    """How many leading characters every text shares."""
    shortest = min(len(t) for t in texts)
    for i in range(shortest):
        if len({t[i] for t in texts}) > 1:
            return i
    return shortest


def _merge_word(words: set[str]) -> str:
    """One word of several messages: their common start and end around a blank."""
    first = min(words)
    head = _common_start(list(words))
    while head and first[head - 1] not in _HEAD_BREAKS:
        head -= 1
    rest = [w[head:] for w in words]
    tail = _common_start([w[::-1] for w in rest])
    shortest = min(len(w) for w in rest)
    tail = min(tail, shortest)
    while tail and rest[0][len(rest[0]) - tail] not in _TAIL_BREAKS:
        tail -= 1
    # The middles' own placeholder when they agree on one (all numbers: <n>), else <…>.
    blanks = {normalise_message(w[head : len(w) - tail]) for w in words}
    blank = blanks.pop() if len(blanks) == 1 else _BLANK
    if not blank.startswith("<") or len(blank) > 12:
        blank = _BLANK
    return first[:head] + blank + first[len(first) - tail :]


def common_message(messages: Collection[str]) -> str:
    """What ``messages`` (of one group) say alike: the whole message when there is one,
    else word by word, the shared words verbatim and each differing word merged
    (:func:`_merge_word`); the normalised message when their word counts differ."""
    distinct = {m for m in messages if m}
    if not distinct:
        return ""
    if len(distinct) == 1:
        return _cut(" ".join(next(iter(distinct)).split()))
    split = [m.split() for m in distinct]
    if len({len(words) for words in split}) != 1:
        return normalise_message(min(distinct))
    merged = [
        column[0] if len(set(column)) == 1 else _merge_word(set(column))
        for column in zip(*split, strict=True)
    ]
    return _cut(" ".join(merged))


def failed_rows(jobs: pa.Table) -> pa.Table:
    """Jobs that failed, were cancelled or invalid, or are unfinished after an error."""
    mask = pc.or_(
        pc.is_in(jobs["state"], pa.array(_FAILED_STATES)),
        pc.and_(
            pc.is_valid(jobs["error_type"]),
            pc.not_equal(jobs["state"], JobState.COMPLETED.value),
        ),
    )
    return jobs.filter(mask).sort_by([("source", "ascending"), ("line", "ascending")])


def failure_groups(jobs: pa.Table, examples: int) -> tuple[list[FailureGroup], int]:
    """Every failure group, largest first, and the number of failed jobs."""
    failed = failed_rows(jobs)
    cols = failed.select(COLUMNS).to_pydict()
    counts: Counter[tuple[str, str]] = Counter()
    retryable: Counter[tuple[str, str]] = Counter()
    samples: dict[tuple[str, str], list[FailureExample]] = {}
    distinct: dict[tuple[str, str], set[str]] = {}
    endpoints: dict[tuple[str, str], Counter[str]] = {}
    cache: dict[str | None, str] = {}
    for i, raw in enumerate(cols["error_message"]):
        if raw not in cache:
            cache[raw] = normalise_message(raw)
        error_type = cols["error_type"][i] or cols["state"][i]
        key = (error_type, cache[raw])
        counts[key] += 1
        retryable[key] += bool(cols["retryable"][i])
        found = samples.setdefault(key, [])
        if len(found) < examples:
            found.append(_example(cols, i))
        seen = distinct.setdefault(key, set())
        if raw and len(seen) < _DISTINCT_KEPT:
            seen.add(raw[:2000])
        endpoints.setdefault(key, Counter())[cols["endpoint"][i] or "(no endpoint)"] += 1
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    groups = [
        FailureGroup(
            key[0],
            key[1],
            count,
            retryable[key],
            tuple(samples[key]),
            summary=common_message(distinct[key]) or key[1],
            endpoints=tuple(sorted(endpoints[key].items(), key=lambda kv: (-kv[1], kv[0]))),
        )
        for key, count in ordered
    ]
    return groups, failed.num_rows


def _example(cols: dict[str, list[Any]], i: int) -> FailureExample:
    return FailureExample(
        row_id=cols["row_id"][i],
        line=cols["line"][i],
        source=cols["source"][i],
        endpoint=cols["endpoint"][i],
        state=JobState(cols["state"][i]),
        message=cols["error_message"][i],
    )
