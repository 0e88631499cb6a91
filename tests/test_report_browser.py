"""The report page in a real headless Chromium: the gallery renders, filters and paginates,
the charts over time and the before/after pairs of edits render, and the page fetches
nothing from the network.

Skipped when Debian's ``chromium`` is not installed. Outputs that were never downloaded point
at a loopback HTTP server that counts requests: after the page has run, it must have none.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest
from PIL import Image

from runner.ledger import LedgerEvent, OutputImage, read_run_meta
from runner.report.data import build_report, load_events, load_jobs
from runner.report.gallery import gallery
from runner.report.html import PAGE_SIZE, write_html
from tests.report_support import (
    FLUX2,
    LORA,
    T0,
    completed,
    edit_run,
    failed,
    intent,
    local,
    write_run,
)

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (Debian package `chromium`)"
)
COMPLETED, FAILED = 100, 20


class Counting(BaseHTTPRequestHandler):
    paths: ClassVar[list[str]]

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def cdn() -> Iterator[tuple[str, list[str]]]:
    """A loopback 'CDN' that records every request it gets."""
    paths: list[str] = []
    handler = type("Handler", (Counting,), {"paths": paths})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def big_run(run_dir: Path, base: str) -> Path:
    """100 completed jobs on two endpoints (every other one downloaded) and 20 failures."""
    events: list[LedgerEvent] = []
    for i in range(COMPLETED):
        key, endpoint = f"ok{i:03d}", (LORA if i % 4 else FLUX2)
        events.append(intent(key, f"row-{i:03d}", i + 2, endpoint, at=T0, estimated="0.035"))
        if i % 2:
            output = OutputImage(url=f"{base}/out/{key}.jpg", width=1024, height=768)
        else:
            output = local(run_dir, f"{key}.png", (40 + i, 30))
        events += completed(key, submitted_s=i, done_s=i + 20, billed="0.035", queue_s=1.0,
                            inference_s=2.0, outputs=(output,), seed=i)  # fmt: skip
    for i in range(FAILED):
        key = f"bad{i:02d}"
        events.append(intent(key, f"bad-{i:02d}", 200 + i, LORA, at=T0, estimated="0.035"))
        events += failed(key, at_s=i, error_type="timeout", message=f"timed out after {i} s",
                         retryable=False)  # fmt: skip
    return write_run(run_dir, events)


@pytest.fixture
def page(tmp_path: Path, cdn: tuple[str, list[str]]) -> Path:
    run_dir = big_run(tmp_path / "run", cdn[0])
    jobs = load_jobs(run_dir)
    report = build_report(jobs, read_run_meta(run_dir), run_dir=run_dir,
                          events=load_events(run_dir))  # fmt: skip
    assert report.billed_usd == Decimal("3.5")
    out = tmp_path / "report.html"
    write_html(out, report, gallery(jobs), run_dir=run_dir)
    return out


def chromium(tmp_path: Path, url: str, *extra: str) -> str:
    assert CHROMIUM is not None
    args = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=2000", *extra, url,
    ]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def counts(dom: str) -> tuple[int, int]:
    tag = re.search(r'<p id="gallery-count"[^>]*>', dom)
    assert tag is not None, "the gallery count is missing from the DOM"
    matching = re.search(r'data-matching="(\d+)"', tag.group(0))
    rendered = re.search(r'data-rendered="(\d+)"', tag.group(0))
    assert matching and rendered
    return int(matching.group(1)), int(rendered.group(1))


def test_first_page_of_the_gallery_renders(
    page: Path, tmp_path: Path, cdn: tuple[str, list[str]]
) -> None:
    dom = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert counts(dom) == (COMPLETED + FAILED, PAGE_SIZE)
    assert len(re.findall(r'<article class="card ', dom)) == PAGE_SIZE
    assert f"120 of 120 cards match; showing 1–{PAGE_SIZE}" in dom
    assert "page 1 of 3" in dom
    # In manifest order: the first 48 rows, every other one with an embedded thumbnail.
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', dom)) == PAGE_SIZE // 2
    assert dom.count("not downloaded · open URL") == PAGE_SIZE // 2
    assert 'option value="fal-ai/flux-2/lora"' in dom
    assert cdn[1] == [], "the page fetched from the network"


@pytest.mark.parametrize(
    ("fragment", "matching", "rendered", "state"),
    [
        ("state=failed", FAILED, FAILED, "failed"),
        ("state=completed&page=3", COMPLETED, COMPLETED - 2 * PAGE_SIZE, "completed"),
        (f"endpoint={FLUX2}", COMPLETED // 4, COMPLETED // 4, "completed"),
        ("q=row-01", 10, 10, "completed"),  # row-010 … row-019
    ],
)
def test_filters_and_pages_from_the_url(
    page: Path, tmp_path: Path, fragment: str, matching: int, rendered: int, state: str
) -> None:
    dom = chromium(tmp_path, f"{page.as_uri()}#{fragment}", "--dump-dom")
    assert counts(dom) == (matching, rendered)
    states = re.findall(r'<article class="card [a-z_]+" data-state="([a-z_]+)"', dom)
    assert len(states) == rendered and set(states) == {state}


def test_page_fetches_nothing_even_without_its_csp(
    page: Path, tmp_path: Path, cdn: tuple[str, list[str]]
) -> None:
    # The CSP would block a stray load silently; without it, one would reach the loopback CDN.
    text = page.read_text(encoding="utf-8")
    csp = re.search(r'<meta http-equiv="Content-Security-Policy"[^>]*>', text)
    assert csp is not None
    bare = page.with_name("bare.html")
    bare.write_text(text.replace(csp.group(0), ""), encoding="utf-8")
    for fragment in ("", "#page=2", "#page=3", "#state=failed"):
        assert counts(chromium(tmp_path, bare.as_uri() + fragment, "--dump-dom"))[1] > 0
    assert cdn[1] == []


def test_screenshot_shows_the_page(page: Path, tmp_path: Path, cdn: tuple[str, list[str]]) -> None:
    shot = tmp_path / "shot.png"
    chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1280,2000")
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        colors = image.convert("RGB").getcolors(maxcolors=1_000_000)
    assert colors is not None and len(colors) > 50  # text, chart and thumbnails, not a blank
    assert cdn[1] == []


# Measures what the browser laid out and decoded, once the page has run, into #probe.
PROBE = """<script>
window.addEventListener("load", function () {
  function all(sel) { return Array.prototype.slice.call(document.querySelectorAll(sel)); }
  var line = document.querySelector("svg.chart polyline.line");
  var before = all("figure.before img");
  var found = {
    bars: all("svg.chart rect.bar").filter(function (r) { return r.getBBox().height > 0; }).length,
    segments: all("svg.chart rect[class^=s]").filter(function (r) {
      return r.getBBox().height > 0 && r.getBBox().y > 20; }).length,
    line: line ? line.getTotalLength() : 0,
    ref: all("svg.chart line.ref").length,
    before: before.length,
    decoded: before.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length,
    after: all("figure.after img").length,
    captions: all("figure.before figcaption").map(function (c) { return c.textContent; })
  };
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify(found);
  document.body.appendChild(out);
});
</script>"""


def probe(tmp_path: Path, page: Path) -> dict[str, object]:
    probed = page.with_name("probed.html")
    probed.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                      encoding="utf-8")  # fmt: skip
    dom = chromium(tmp_path, probed.as_uri(), "--dump-dom")
    found = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert found is not None, "the probe did not run"
    result: dict[str, object] = json.loads(found.group(1).replace("&amp;", "&"))
    return result


def test_charts_over_time_render(page: Path, tmp_path: Path, cdn: tuple[str, list[str]]) -> None:
    found = probe(tmp_path, page)
    # 100 completions over 100 s from 22:00: two minutes with bars; 20 failures in minute 0.
    assert found["bars"] == 2
    assert found["segments"] == 1
    assert isinstance(found["line"], float | int) and found["line"] > 0
    assert found["ref"] == 1
    assert cdn[1] == []


def test_edits_render_before_beside_after(tmp_path: Path) -> None:
    run_dir = edit_run(tmp_path)
    jobs = load_jobs(run_dir)
    report = build_report(jobs, read_run_meta(run_dir), run_dir=run_dir,
                          events=load_events(run_dir))  # fmt: skip
    out = tmp_path / "edits.html"
    write_html(out, report, gallery(jobs), run_dir=run_dir)
    found = probe(tmp_path, out)
    # chair-red: its input and mask, decoded; chair-url and chair-gone: placeholders.
    assert found["before"] == 2 and found["decoded"] == 2
    assert found["after"] == 1
    assert found["captions"] == ["before · image_url, mask_url", "before · image_url",
                                 "before · image_urls[0]"]  # fmt: skip
