"""The report's SVG charts: one mark per value, every text escaped, a frame when empty."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from decimal import Decimal

import pytest

from runner.report.charts import (
    MAX_BAR_W,
    bar_chart,
    cost_chart,
    empty_chart,
    line_chart,
    stacked_bar_chart,
)

SVG = "{http://www.w3.org/2000/svg}"


def parse(svg: str) -> ET.Element:
    """Well-formed XML, one <svg class="chart"> element."""
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg" and root.get("class") == "chart"
    return root


def marks(root: ET.Element, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in root.iter(f"{SVG}{tag}") if e.get("class") == cls]


def test_bar_chart_draws_one_bar_per_bucket_scaled_to_the_tallest() -> None:
    values = [0, 3, 6, 1]
    root = parse(bar_chart(values, labels=["a", "b", "c", "d"], title="completions"))
    bars = marks(root, "rect", "bar")
    assert len(bars) == 4
    heights = [float(b.get("height", "nan")) for b in bars]
    assert heights[0] == 0 and heights[2] == pytest.approx(2 * heights[1])
    assert max(float(b.get("width", "nan")) for b in bars) <= MAX_BAR_W
    assert [b.findtext(f"{SVG}title") for b in bars] == ["a: 0", "b: 3", "c: 6", "d: 1"]


def test_bar_chart_labels_at_most_six_ticks() -> None:
    labels = [f"{i:02d}:00" for i in range(100)]
    root = parse(bar_chart(list(range(100)), labels=labels, title="t"))
    ticks = [t.text for t in marks(root, "text", "axis") if t.get("text-anchor") == "middle"]
    assert 1 < len(ticks) <= 6 and ticks[0] == "00:00"


def test_text_is_escaped() -> None:
    evil = '<script>alert("x")</script> & co'
    svg = stacked_bar_chart([(evil, [1, 2])], labels=[evil, "b"], title=evil)
    root = parse(svg)  # parses: nothing broke out of its element
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    legend = [t.text for t in marks(root, "text", "legend")]
    assert legend == [evil]
    assert root.get("aria-label") == evil


def test_stacked_bars_stack_series_and_skip_zero_segments() -> None:
    series = [("timeout", [1, 0, 2]), ("flagged", [0, 0, 2])]
    root = parse(stacked_bar_chart(series, labels=["a", "b", "c"], title="failures"))
    s0, s1 = marks(root, "rect", "s0"), marks(root, "rect", "s1")
    # The legend's swatches, then the segments: 2 of timeout, 1 of flagged.
    assert (len(s0), len(s1)) == (1 + 2, 1 + 1)
    last_timeout, last_flagged = s0[-1], s1[-1]
    assert float(last_flagged.get("y", "0")) < float(last_timeout.get("y", "0"))  # on top
    with pytest.raises(ValueError, match="at most"):
        stacked_bar_chart([(str(i), [1]) for i in range(7)], labels=["a"], title="t")


def test_line_chart_has_one_point_per_bucket_and_the_estimate_line() -> None:
    values = [Decimal("0.1"), Decimal("0.1"), Decimal("0.4")]
    svg = line_chart(values, labels=["a", "b", "c"], title="spend", reference=Decimal("0.8"),
                     reference_label="estimate $0.80", fmt=lambda d: f"${d}")  # fmt: skip
    root = parse(svg)
    (line,) = marks(root, "polyline", "line")
    points = line.get("points", "").split()
    assert len(points) == 3 and len(marks(root, "circle", "dot")) == 3
    (ref,) = marks(root, "line", "ref")
    ys = [float(p.split(",")[1]) for p in points]
    # The estimate is twice the last value: twice as far above the baseline.
    base = float(marks(root, "line", "grid")[0].get("y1", "0"))
    assert base - float(ref.get("y1", "0")) == pytest.approx(2 * (base - ys[-1]), abs=0.2)
    assert ys[0] == ys[1] > ys[2]
    assert "estimate $0.80" in [t.text for t in marks(root, "text", "legend")]


def test_line_chart_without_a_reference_scales_to_its_values() -> None:
    root = parse(line_chart([Decimal(1), Decimal(2)], labels=["a", "b"], title="t"))
    assert not marks(root, "line", "ref")
    assert len(marks(root, "circle", "dot")) == 2


@pytest.mark.parametrize(
    "svg",
    [
        bar_chart([], labels=[], title="completions per minute"),
        bar_chart([0, 0], labels=["a", "b"], title="completions per minute"),
        stacked_bar_chart([], labels=[], title="failures"),
        line_chart([], labels=[], title="spend"),
        line_chart([Decimal(0)], labels=["a"], title="spend"),
        empty_chart("anything"),
    ],
)
def test_empty_runs_get_a_frame_that_says_so(svg: str) -> None:
    root = parse(svg)
    assert len(marks(root, "text", "empty")) == 1
    assert not re.search(r'class="(bar|line|s\d)"', svg)


def test_mismatched_labels_are_refused() -> None:
    with pytest.raises(ValueError, match="one label per value"):
        bar_chart([1, 2], labels=["a"], title="t")


def test_cost_chart_bars_scale_to_the_largest_amount() -> None:
    rows = [("fal-ai/a", [Decimal("0.2"), Decimal("0.1"), Decimal("0.4")])]
    root = parse(cost_chart(rows, str))
    widths = [float(r.get("width", "0")) for r in root.iter(f"{SVG}rect") if r.get("x") == "250"]
    assert widths[1:] == pytest.approx([210.0, 105.0, 420.0])  # after the legend swatch
