"""The run report as one self-contained HTML page that loads nothing from the network.

Everything is inline: CSS, a few lines of JavaScript, the charts (SVG from
:mod:`runner.report.charts`: cost by endpoint, and the run over time) and the gallery's data
(JSON in a ``<script type="application/json">``). Output images appear as JPEG thumbnails
embedded as data URIs, or (``link_images``) by a path relative to the page; an output that
was never downloaded shows a placeholder and a plain link to its URL, never an ``<img>``
pointing at the network. An edit's card shows its input images ("before",
:mod:`runner.report.pairs`) beside its outputs ("after"), the same way. The gallery is
filtered by state and endpoint and paginated in the browser; user text reaches the DOM
only through ``textContent``.
"""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from runner.endpoints.money import format_usd
from runner.ledger import JobState
from runner.ledger.totals import spend_notes, superseded_note
from runner.report.assets import CSS, JS, PAGE
from runner.report.cards import card
from runner.report.charts import cost_chart
from runner.report.data import Percentiles, Report
from runner.report.gallery import Gallery, Thumbnails
from runner.report.pairs import InputPictures, manifest_dir
from runner.report.panels import invocations_panel, safety_panel, timeline_panel
from runner.report.text import NEW_JOBS_NOTE, count, seconds

PAGE_SIZE = 48


@dataclass(frozen=True, slots=True)
class PageStats:
    cards: int
    omitted: int
    thumbnails_made: int
    thumbnails_cached: int
    placeholders: int  # outputs shown without an image (not downloaded or unreadable)


def write_html(
    path: Path,
    report: Report,
    cards: Gallery,
    *,
    run_dir: Path,
    link_images: bool = False,
    generated_at: datetime | None = None,
) -> PageStats:
    """Render the page and write it to ``path`` whole (temp file, then rename)."""
    path = Path(path)
    thumbs = Thumbnails(run_dir)
    page, placeholders = render_html(
        report,
        cards,
        thumbs=thumbs,
        page_dir=path.resolve().parent,
        link_images=link_images,
        generated_at=generated_at,
    )
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return PageStats(len(cards.items), cards.omitted, thumbs.made, thumbs.cached, placeholders)


def render_html(
    report: Report,
    cards: Gallery,
    *,
    thumbs: Thumbnails | None,
    page_dir: Path,
    link_images: bool = False,
    generated_at: datetime | None = None,
) -> tuple[str, int]:
    """(the page, how many outputs got a placeholder instead of an image)."""
    base = manifest_dir(report.manifest_dir, report.manifest)
    inputs = InputPictures(base, thumbs, page_dir, link_images)
    data = [card(item, thumbs, page_dir, link_images, inputs) for item in cards.items]
    placeholders = sum(1 for card in data for im in card["imgs"] if not im["t"])
    doc = {
        "cards": data,
        "total": cards.total,
        "omitted": cards.omitted,
        "pageSize": PAGE_SIZE,
        "states": [s.value for s in JobState],
    }
    title = f"Run report: {report.run_dir or report.manifest or 'run'}"
    body = "\n".join(
        [
            f"<header><h1>{_e(title)}</h1>{_meta(report, generated_at)}</header>",
            _summary(report),
            _section("Cost by endpoint", _cost_chart(report) + _endpoint_table(report)),
            _section("Safety checker and cache", safety_panel(report)),
            _section("Over time", timeline_panel(report.timeline)),
            _section("Invocations", invocations_panel(report.invocations)),
            _section("Timing", _timing(report)),
            _section("Failures", _failures(report)),
            _section("What a resume would do", _resume(report)),
            _section("Gallery", _gallery_shell(cards)),
        ]
    )
    page = PAGE.format(title=_e(title), css=CSS, body=body, data=_script_json(doc), js=JS)
    return page, placeholders


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _script_json(value: Any) -> str:
    # Inside <script> only "</" and "<!--" matter; escaping every "<" covers both.
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def _section(title: str, inner: str) -> str:
    anchor = title.lower().replace(" ", "-")
    return f'<section id="{_e(anchor)}"><h2>{_e(title)}</h2>{inner}</section>'


def _meta(report: Report, generated_at: datetime | None) -> str:
    parts = []
    if report.manifest:
        parts.append(f"manifest <code>{_e(report.manifest)}</code>")
    if report.manifest_sha256:
        parts.append(f"sha256 <code>{_e(report.manifest_sha256[:12])}</code>")
    if report.runner_version:
        parts.append(f"runner {_e(report.runner_version)}")
    if generated_at:
        parts.append(f"report made {_e(generated_at.strftime('%Y-%m-%d %H:%M UTC'))}")
    return f'<p class="meta">{" · ".join(parts)}</p>'


def _summary(report: Report) -> str:
    t = report.timing
    failed = report.by_state.get(JobState.FAILED, 0) + report.by_state.get(JobState.INVALID, 0)
    tiles = [
        ("jobs", str(report.jobs)),
        ("completed", str(report.by_state.get(JobState.COMPLETED, 0))),
        ("failed / invalid", str(failed)),
        ("images", str(t.images)),
        ("billed", format_usd(report.billed_usd)),
        ("estimated (all jobs)", format_usd(report.estimated_usd)),
        ("wall time", seconds(t.wall_s)),
        ("images / hour", "-" if t.images_per_hour is None else f"{t.images_per_hour:,.0f}"),
    ]
    cells = "".join(f'<div class="tile"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in tiles)
    states = ", ".join(f"{s.value} {n}" for s, n in report.by_state.items())
    notes = "".join(f'<p class="note">{_e(n)}</p>' for n in report.notes)
    if report.superseded:
        notes += f'<p class="note">{_e(superseded_note(report))}</p>'
    notes += "".join(f'<p class="warn">{_e(note)}</p>' for note in spend_notes(report))
    tiles_html = f'<div class="tiles">{cells}</div>'
    return f'<section id="summary">{tiles_html}<p>{_e(states)}</p>{notes}</section>'


def _cost_chart(report: Report) -> str:
    rows = [
        (ep.endpoint or "(no endpoint)",
         [Decimal(ep.estimated_usd), Decimal(ep.estimated_done_usd), Decimal(ep.billed_usd)])
        for ep in report.endpoints
    ]  # fmt: skip
    return cost_chart(rows, format_usd)


def _table(head: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    def cell(tag: str, i: int, value: str) -> str:
        cls = ' class="n"' if i >= numeric_from else ""
        return f"<{tag}{cls}>{value}</{tag}>"

    thead = "".join(cell("th", i, _e(h)) for i, h in enumerate(head))
    body = "".join(
        "<tr>" + "".join(cell("td", i, v) for i, v in enumerate(row)) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{thead}</tr></thead><tbody>{body}</tbody></table>"


def _endpoint_table(report: Report) -> str:
    states = list(report.by_state)
    head = ["endpoint", "jobs", *[s.value for s in states], "images", "MP"]
    head += ["estimated", "est. billed jobs", "billed"]
    rows = [
        [
            _e(ep.endpoint or "(no endpoint)"),
            str(ep.jobs),
            *[str(ep.by_state.get(s, 0)) for s in states],
            str(ep.images),
            str(ep.megapixels),
            format_usd(ep.estimated_usd),
            format_usd(ep.estimated_done_usd),
            format_usd(ep.billed_usd),
        ]
        for ep in report.endpoints
    ]
    return _table(head, rows)


def _percentile_row(name: str, p: Percentiles) -> list[str]:
    values = [seconds(v) for v in (p.p50, p.p90, p.p99, p.max)]
    return [_e(name), *values, f"{p.known} of {p.of}"]


def _timing(report: Report) -> str:
    t = report.timing
    if t.wall_s is None or t.first_submitted_at is None or t.last_completed_at is None:
        head = "<p>No completed job with submit and completion times yet.</p>"
    else:
        head = (
            f"<p>Wall time {_e(seconds(t.wall_s))}, from "
            f"{_e(t.first_submitted_at.strftime('%Y-%m-%d %H:%M:%S'))} to "
            f"{_e(t.last_completed_at.strftime('%H:%M:%S'))} UTC: "
            f"{t.jobs_per_hour or 0:,.0f} jobs/hour, {t.images_per_hour or 0:,.0f} images/hour.</p>"
        )
    rows = [_percentile_row("queue time", t.queue), _percentile_row("inference time", t.inference)]
    table = _table(["", "p50", "p90", "p99", "max", "known for (completed jobs)"], rows)
    return head + table


def _failures(report: Report) -> str:
    if not report.failed_jobs:
        return "<p>No failures.</p>"
    groups = count(report.failure_groups, "group")
    intro = f"<p>{count(report.failed_jobs, 'job')} failed, in {groups}"
    if len(report.failures) < report.failure_groups:
        intro += f" (the top {len(report.failures)} shown)"
    rows = []
    for g in report.failures:
        examples = "<br>".join(
            f"row <code>{_e(x.row_id or '?')}</code> ({_e(x.source or '?')}:{_e(x.line or '?')}"
            f"{', ' + _e(x.endpoint) if x.endpoint else ''})"
            for x in g.examples
        )
        on = "<br>".join(f"<code>{_e(ep)}</code> ({n})" for ep, n in g.endpoints)
        message = _e(g.summary or g.message)
        rows.append([str(g.count), _e(g.error_type), message, on, str(g.retryable), examples])
    head = ["jobs", "error type", "message (what differs blanked)", "endpoints", "retryable",
            "examples"]  # fmt: skip
    return intro + ".</p>" + _table(head, rows, numeric_from=9)


def _resume(report: Report) -> str:
    r = report.resume
    p = r.policy
    counts = [
        ("re-attach to the request id (queued / in progress)", r.reattach),
        ("retry (failed, retryable)", r.retry),
        ("settle from fal's request history: unknown outcome", r.reconcile),
        ("resubmit: unknown outcome, may pay twice", r.resubmit),
        ("validate again (invalid rows)", r.revalidate),
        ("record as failed (unknown outcome)", r.fail),
        ("skip", r.skip),
    ]
    items = "".join(f"<li><b>{n}</b> {_e(label)}</li>" for label, n in counts if n)
    policy = (
        f"With the default policy (on-unknown {p.on_unknown}, max attempts {p.max_attempts}"
        f"{', retry-failed' if p.retry_failed else ''}), running the same manifest again would:"
    )
    return f"<p>{_e(policy)}</p><ul>{items}</ul><p class=note>{_e(NEW_JOBS_NOTE)}.</p>"


def _gallery_shell(cards: Gallery) -> str:
    which = " or ".join(s.value for s in cards.states)
    left_out = f'<p class="note">Only {_e(which)} jobs are in the gallery.</p>' if which else ""
    if cards.omitted:
        left_out += (
            f'<p class="warn" id="gallery-omitted">{len(cards.items)} of {cards.total} '
            f"{_e(which + ' ' if which else '')}jobs are in the gallery; {cards.omitted} were "
            "left out (raise --gallery-limit).</p>"
        )
    return (
        left_out + '<div class="controls">'
        '<label>state <select id="f-state"><option value="">all</option></select></label>'
        '<label>endpoint <select id="f-endpoint"><option value="">all</option></select></label>'
        '<label>search <input id="f-text" type="search" placeholder="row id, prompt"></label>'
        '<button id="prev" type="button">&larr; prev</button><span id="page"></span>'
        '<button id="next" type="button">next &rarr;</button></div>'
        '<p id="gallery-count" data-matching="0" data-rendered="0"></p>'
        '<noscript><p class="warn">The gallery needs JavaScript.</p></noscript>'
        '<div id="cards" class="grid"></div>'
    )
