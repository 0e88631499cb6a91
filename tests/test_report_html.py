"""The report page: self-contained (no network loads), gallery data, thumbnails, filters."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from PIL import Image

from runner.ledger import JobState, LedgerEvent, OutputImage, read_run_meta
from runner.ledger.meta import write_run_meta
from runner.report.data import build_report, load_jobs
from runner.report.gallery import Thumbnails, gallery
from runner.report.html import PAGE_SIZE, render_html, write_html
from tests.report_support import LORA, T0, edit_run, intent, png, sample_run, write_run


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return sample_run(tmp_path / "run")


def page_of(run_dir: Path, out: Path, **kwargs: Any) -> str:
    jobs = load_jobs(run_dir)
    report = build_report(jobs, read_run_meta(run_dir), run_dir=run_dir)
    limit = kwargs.pop("limit", 500)
    write_html(out, report, gallery(jobs, limit=limit), run_dir=run_dir, **kwargs)
    return out.read_text(encoding="utf-8")


def gallery_data(page: str) -> dict[str, Any]:
    match = re.search(
        r'<script type="application/json" id="gallery-data">(.*?)</script>', page, re.S
    )
    assert match is not None
    data: dict[str, Any] = json.loads(match.group(1))
    return data


def cards_by_row(page: str) -> dict[str, dict[str, Any]]:
    return {c["r"]: c for c in gallery_data(page)["cards"]}


def test_gallery_is_in_manifest_order_and_capped(run_dir: Path) -> None:
    jobs = load_jobs(run_dir)
    full = gallery(jobs, limit=None)
    assert [i.line for i in full.items] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert full.omitted == 0
    capped = gallery(jobs, limit=4)
    assert [i.row_id for i in capped.items] == ["mug-01", "mug-02", "vase-01", "lamp-01"]
    assert (capped.total, capped.omitted) == (10, 6)
    with pytest.raises(ValueError, match="limit"):
        gallery(jobs, limit=-1)


def test_gallery_item_splits_the_request(run_dir: Path) -> None:
    item = gallery(load_jobs(run_dir)).items[0]
    assert item.row_id == "mug-01" and item.state is JobState.COMPLETED
    assert item.prompt == "a red mug"
    assert item.loras == (("owner/mug-lora", 0.8),)
    assert item.seed == 7
    assert dict(item.parameters) == {"image_size": "square_hd"}
    assert dict(item.metadata) == {"sku": "SKU-2"}
    assert str(item.billed_usd) == "0.035" and len(item.outputs) == 1


def test_page_loads_nothing_from_the_network(run_dir: Path, tmp_path: Path) -> None:
    page = page_of(run_dir, tmp_path / "report.html")
    # No attribute or CSS fetches anything remote, and no external resource tags at all.
    assert not re.search(r"""\b(src|srcset|poster|data|action)\s*=\s*["']?\s*(https?:)?//""", page)
    assert not re.search(r"url\(\s*['\"]?\s*(https?:)?//", page)
    assert not re.search(r"<(link|iframe|object|embed|audio|video|source)\b", page, re.I)
    assert "@import" not in page
    assert "default-src 'none'" in page  # the CSP forbids loads even if a bug tried one
    # Remote output URLs are only ever link targets ("u"), never image sources ("t").
    for card in gallery_data(page)["cards"]:
        for im in card["imgs"]:
            assert im["t"] is None or im["t"].startswith("data:image/jpeg;base64,")
            assert im["u"] is None or im["u"].startswith("https://cdn.example/")
    # The only http(s) URLs anywhere are the outputs' own URLs and the SVG namespace.
    urls = set(re.findall(r"https?://[^\s\"'<>]+", page))
    outputs = {f"https://cdn.example/{n}" for n in ("a-0.png", "b-0.png", "b-1.png", "c-0.png")}
    assert urls <= outputs | {"https://cdn.example/lamp.jpg", "http://www.w3.org/2000/svg"}


def test_local_outputs_become_small_jpeg_thumbnails(run_dir: Path, tmp_path: Path) -> None:
    big = png(run_dir / "outputs" / "a-0.png", (1024, 768))  # replace a's output by a big one
    page = page_of(run_dir, tmp_path / "report.html")
    cards = cards_by_row(page)
    thumb = cards["mug-01"]["imgs"][0]
    assert thumb["z"] == "64x48"  # the size the endpoint reported
    data = base64.b64decode(thumb["t"].split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG" and image.size == (240, 180)
    # The link opens the full file, relative to the page.
    assert (tmp_path / unquote(thumb["h"])).resolve() == big.resolve()
    assert len(cards["mug-02"]["imgs"]) == 2


def test_outputs_without_a_local_file_get_a_placeholder_and_a_link(
    run_dir: Path, tmp_path: Path
) -> None:
    lamp = cards_by_row(page_of(run_dir, tmp_path / "report.html"))["lamp-01"]["imgs"][0]
    assert lamp == {"t": None, "h": None, "u": "https://cdn.example/lamp.jpg",
                    "n": "not downloaded", "z": "1024x768"}  # fmt: skip


def test_unreadable_local_file_is_a_placeholder(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "outputs" / "c-0.png").write_bytes(b"not a png at all")
    page = page_of(run_dir, tmp_path / "report.html")
    vase = cards_by_row(page)["vase-01"]["imgs"][0]
    assert vase["t"] is None and vase["n"] == "unreadable image" and vase["h"]


def test_thumbnails_are_cached_between_reports(run_dir: Path, tmp_path: Path) -> None:
    jobs = load_jobs(run_dir)
    report = build_report(jobs, None)
    cards = gallery(jobs)
    first = write_html(tmp_path / "1.html", report, cards, run_dir=run_dir)
    second = write_html(tmp_path / "2.html", report, cards, run_dir=run_dir)
    assert (first.thumbnails_made, first.thumbnails_cached) == (4, 0)
    assert (second.thumbnails_made, second.thumbnails_cached) == (0, 4)
    assert (tmp_path / "1.html").read_bytes().split(b"report made")[0] == (
        (tmp_path / "2.html").read_bytes().split(b"report made")[0]
    )


def test_cache_follows_the_file(tmp_path: Path) -> None:
    path = png(tmp_path / "x.png", (50, 50), (255, 0, 0))
    thumbs = Thumbnails(tmp_path)
    red = thumbs.data_uri(path)
    png(path, (50, 50), (0, 0, 255))
    import os

    os.utime(path, ns=(1, 1))  # a new mtime even on coarse clocks
    blue = thumbs.data_uri(path)
    assert red != blue and thumbs.made == 2


def test_read_only_cache_still_renders(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / ".report-cache").write_text("a file where the cache directory would go")
    jobs = load_jobs(run_dir)
    stats = write_html(
        tmp_path / "r.html", build_report(jobs, None), gallery(jobs), run_dir=run_dir
    )
    assert stats.thumbnails_made == 4 and stats.placeholders == 1


def test_link_images_points_at_the_files_relatively(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "site" / "report.html"
    out.parent.mkdir()
    page = page_of(run_dir, out, link_images=True)
    im = cards_by_row(page)["mug-01"]["imgs"][0]
    assert im["t"] == im["h"] and not im["t"].startswith(("/", "data:", "http"))
    assert (out.parent / unquote(im["t"])).resolve() == (run_dir / "outputs" / "a-0.png").resolve()


def test_user_text_cannot_break_out_of_the_data_script(tmp_path: Path) -> None:
    evil = '</script><script>alert(1)</script><!-- & "quotes"'
    run_dir = write_run(
        tmp_path / "run",
        [intent("k", evil, 2, LORA, at=T0, estimated="0.035", request={"prompt": evil})],
    )
    page = page_of(run_dir, tmp_path / "r.html")
    assert "<script>alert" not in page and "<!-- &" not in page
    card = gallery_data(page)["cards"][0]
    assert card["p"] == evil and card["r"] == evil
    assert "textContent" in page and "innerHTML" not in page


def test_page_has_filters_pagination_and_the_summary(run_dir: Path, tmp_path: Path) -> None:
    page = page_of(run_dir, tmp_path / "report.html")
    for marker in ('id="f-state"', 'id="f-endpoint"', 'id="f-text"', 'id="prev"', 'id="next"',
                   'id="gallery-count"', 'id="cards"', "<svg class=\"chart\"",
                   "Cost by endpoint", "What a resume would do", "Failures"):  # fmt: skip
        assert marker in page
    data = gallery_data(page)
    assert data["pageSize"] == PAGE_SIZE and data["total"] == 10 and data["omitted"] == 0
    assert {c["s"] for c in data["cards"]} == {
        "completed",
        "failed",
        "unknown",
        "queued",
        "invalid",
    }
    assert "file_download_error" in page and "chair-01" in page
    assert "$0.164" in page  # billed in the summary tiles


def test_cost_chart_scales_bars_to_the_largest_amount(run_dir: Path, tmp_path: Path) -> None:
    page = page_of(run_dir, tmp_path / "report.html")
    chart = page[page.index('<svg class="chart"') : page.index("</svg>")]
    widths = [
        float(w) for w in re.findall(r'<rect class="\w+" x="250" y="\d+" width="([\d.]+)"', chart)
    ]
    # The legend's swatch, then endpoints by name: flux-2 (0.048, 0.012, 0.024), flux-lora
    # (0.21, 0.14, 0.14), then the invalid row without one (0, 0, 0); the longest bar is 420.
    assert widths[1:] == pytest.approx([96.0, 24.0, 48.0, 420.0, 280.0, 280.0, 0.0, 0.0, 0.0])


def test_gallery_limit_is_announced(run_dir: Path, tmp_path: Path) -> None:
    page = page_of(run_dir, tmp_path / "report.html", limit=2)
    assert "2 of 10 jobs are in the gallery; 8 were left out" in page
    assert len(gallery_data(page)["cards"]) == 2


def test_render_without_thumbnails_shows_placeholders(run_dir: Path) -> None:
    jobs = load_jobs(run_dir)
    page, placeholders = render_html(
        build_report(jobs, None), gallery(jobs), thumbs=None, page_dir=run_dir
    )
    assert placeholders == 5
    assert all(im["t"] is None for c in gallery_data(page)["cards"] for im in c["imgs"])


def test_output_in_object_storage_says_where(tmp_path: Path) -> None:
    out = OutputImage(url="https://cdn.example/z.png", width=8, height=8,
                      local_path="s3://bucket/night/z.png")  # fmt: skip
    events = [
        intent("z", "z-01", 2, LORA, at=T0, estimated="0.035"),
        LedgerEvent(job_key="z", state=JobState.COMPLETED, at=T0, outputs=(out,)),
    ]
    page = page_of(write_run(tmp_path / "run", events), tmp_path / "r.html")
    assert cards_by_row(page)["z-01"]["imgs"][0]["n"] == "stored at s3://bucket/night/z.png"


def test_empty_run_renders_a_page(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "run", [], meta=False)
    page = page_of(run_dir, tmp_path / "r.html")
    assert "No failures." in page and "No completed job" in page
    assert gallery_data(page)["cards"] == [] and "<svg" in page


def test_gallery_can_hold_only_some_states(run_dir: Path, tmp_path: Path) -> None:
    jobs = load_jobs(run_dir)
    failed = gallery(jobs, limit=1, states=[JobState.FAILED, JobState.INVALID])
    assert [i.row_id for i in failed.items] == ["chair-01"]
    assert (failed.total, failed.omitted) == (4, 3)
    page, _ = render_html(build_report(jobs, None), failed, thumbs=None, page_dir=tmp_path)
    assert "Only failed or invalid jobs are in the gallery." in page
    assert "1 of 4 failed or invalid jobs are in the gallery; 3 were left out" in page


def test_edits_show_their_input_beside_the_output(tmp_path: Path) -> None:
    run_dir = edit_run(tmp_path)
    page = page_of(run_dir, tmp_path / "report.html")
    cards = cards_by_row(page)
    before = cards["chair-red"]["i"]
    assert [(p["f"], p["v"]) for p in before] == [
        ("image_url", "images/chair.png"), ("mask_url", "images/mask.png"),
    ]  # fmt: skip
    assert all(p["t"].startswith("data:image/jpeg;base64,") for p in before)
    data = base64.b64decode(before[0]["t"].split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (80, 60)  # the input itself, not the output
    assert (tmp_path / unquote(before[0]["h"])).resolve() == (
        tmp_path / "manifests" / "images" / "chair.png"
    )
    assert "image_url" not in dict(cards["chair-red"]["k"])  # shown as the "before", not twice
    # A remote input is a link, never loaded; a missing file says so.
    assert cards["chair-url"]["i"] == [{"f": "image_url", "v": "https://cdn.example/in.png",
                                        "t": None, "h": None, "u": "https://cdn.example/in.png",
                                        "n": "input at a URL (not loaded)"}]  # fmt: skip
    gone = cards["chair-gone"]["i"][0]
    assert gone["f"] == "image_urls[0]" and gone["t"] is None
    assert gone["n"] == "input file not found: images/none.png"
    assert cards["plain"]["i"] == []
    assert 'figure("before"' in page and "figcaption" in page  # the script draws the pair


def test_edit_inputs_link_relative_to_the_page_with_link_images(tmp_path: Path) -> None:
    run_dir = edit_run(tmp_path)
    out = tmp_path / "pages" / "report.html"
    out.parent.mkdir()
    page = page_of(run_dir, out, link_images=True)
    first = cards_by_row(page)["chair-red"]["i"][0]
    assert first["t"] == first["h"] and not first["t"].startswith("data:")
    assert (out.parent / unquote(first["t"])).resolve() == (
        tmp_path / "manifests" / "images" / "chair.png"
    )


def test_inputs_resolve_from_the_manifest_path_without_its_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = edit_run(tmp_path)
    write_run_meta(run_dir, {"manifest": {"path": "manifests/edits.csv"}})  # an older run.json
    monkeypatch.chdir(tmp_path)
    cards = cards_by_row(page_of(run_dir, tmp_path / "report.html"))
    assert cards["chair-red"]["i"][0]["t"].startswith("data:image/jpeg;base64,")


def test_page_shows_safety_invocations_and_charts_over_time(tmp_path: Path) -> None:
    from runner.report.data import load_events

    run_dir = sample_run(tmp_path / "run")
    jobs = load_jobs(run_dir)
    report = build_report(jobs, read_run_meta(run_dir), run_dir=run_dir,
                          events=load_events(run_dir))  # fmt: skip
    page, _ = render_html(report, gallery(jobs), thumbs=None, page_dir=tmp_path)
    for marker in ("Safety checker and cache", "re-rolls of flagged outputs", "re-rolls cost",
                   "from the cache ($0)", "Over time", "completions per minute",
                   "spend so far against the estimate", "failures per minute, by reason",
                   "Invocations"):  # fmt: skip
        assert marker in page
    # 4 charts: cost, completions, spend, failures; events of the sample span 60 minutes.
    assert page.count('<svg class="chart"') == 4
    assert page.count('<rect class="bar"') == report.timeline.buckets == 61
    assert 'class="line"' in page and 'class="ref"' in page
    # The sample's events carry no run id: one line for them.
    assert page.count('<tr class="inv') == 1 and "before run ids" in page
