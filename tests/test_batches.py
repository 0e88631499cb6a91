"""The batch reader (Arrow blocks, vector typing) gives what the per-row path gives.

Every manifest here is read twice: ``iter_jobs(read_rows(...))``, the per-row path whose
messages the other manifest tests pin, and :func:`iter_manifest_jobs`. Jobs must agree to
the byte (job key, row id, payload, metadata), bad rows to the message, in the same order;
the counting mode (``validate``, ``plan``) must count the same jobs, list the same bad rows
and plan the same cost. Blocks are made small so one manifest spans many of them.
"""

from __future__ import annotations

import csv
import io
import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.endpoints.cost import PriceTable
from runner.errors import ManifestError, RowError
from runner.manifest import arrowcsv
from runner.manifest.batches import iter_job_batches, iter_manifest_jobs
from runner.manifest.jobs import ExpandOptions, Job, iter_jobs
from runner.manifest.plan import build_plan, build_plan_batches
from runner.manifest.reader import read_rows
from tests.torture_support import LONG

COLUMNS = ["id", "endpoint", "title", "prompt_template", "prompt", "image_size", "num_images",
           "seed", "guidance_scale", "strength", "image_url", "output_format", "sync_mode",
           "loras", "variants", "note"]  # fmt: skip
# fmt: off
CELLS: dict[str, list[str]] = {
    "id": ["", "a", "b", "c", "  d ", "#3", "~abc", "~ab.2", "x-1", "x-2", "17"],
    "endpoint": ["", "fal-ai/flux-lora", "fal-ai/flux-lora/image-to-image", " fal-ai/flux-2/lora",
                 "fal-ai/flux-kontext/dev", "fal-ai/nope"],
    "title": ["", "mug", "lamp, brass", "rug\nwool", 'say "hi"'],
    "prompt_template": ["", "Photo of {title}", " {title} and {note} ", "bad {", "{nope}",
                        "{title!r}"],
    "prompt": ["", "a cat", "  a dog  ", "line\nbreak", "   ", "ünïcödé ✓"],
    "image_size": ["", "square_hd", "landscape_4_3", "1024x768", "300X300", "0x10", "big",
                   "3000x3000", " square ", '{"width": 64, "height": 64}'],
    "num_images": ["", "1", "4", "5", "0", "2.0", "two", "-1", " 3 ", "+2"],
    "seed": ["", "0", "42", "-7", "1e3", "9999999999999999999", "x", "0x10", "007", "-0",
             "12345678901234567", "+3"],
    "guidance_scale": ["", "3.5", "0", "35", "36", ".5", "5.", "nan", "inf", "1e1", "-0"],
    "strength": ["", "0.5", "1", "0", "2"],
    "image_url": ["", "https://x/a.png", "http://x/b.jpg", "images/none.png", "data:x"],
    "output_format": ["", "jpeg", "png", "webp", "JPEG"],
    "sync_mode": ["", "true", "no", "Yes", "maybe", "1"],
    "loras": ["", "", "", "owner/lora:0.7", '[{"path": "p", "scale": 2}]',
              "https://h/l.safetensors:0.8", " https://h:8080/a/b:1.25 ", "http://h/x",
              "https://h/a : 0.5", "https://h/a:+1", "https://h/a:1e2", "https://h/a:nan",
              "https://h:8080", "https://h:8080:2", "https://h/a:0.5;https://h/b",
              "https://h/ü:1", "https://h/a:0.10000000000000000555"],
    "variants": ["", "", "", "", "2", "0"],
    "note": ["", "n1", " n2 ", "x,y"],
}
# fmt: on
FUZZ = settings(
    max_examples=60 if LONG else 12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def common(draw: Any) -> dict[str, str]:
    return {name: draw(st.sampled_from(values)) for name, values in CELLS.items()}


@st.composite
def manifests(draw: Any) -> tuple[bytes, ExpandOptions]:
    columns = draw(st.lists(st.sampled_from(COLUMNS), min_size=3, max_size=12, unique=True))
    plain = draw(st.integers(0, 3)) == 0  # a manifest of only good rows: all on the fast path
    rows = []
    for _ in range(draw(st.integers(1, 60))):
        row = common(draw)
        if plain:
            row.update(endpoint="fal-ai/flux-lora", prompt="p", prompt_template="",
                       loras="", variants="", image_url="", id="")  # fmt: skip
        rows.append([row[c] for c in columns])
    out = io.StringIO()
    writer = csv.writer(out, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(columns)
    writer.writerows(rows)
    defaults = draw(st.sampled_from([{}, {"num_images": "2"}, {"note": "d", "sync_mode": "yes"}]))
    options = ExpandOptions(
        manifest_dir=Path("."),
        default_endpoint=draw(st.sampled_from([None, "fal-ai/flux-lora"])),
        allowed_endpoints=draw(st.sampled_from([frozenset(), frozenset({"fal-ai/nope"})])),
        defaults=defaults,
        prompt_template=draw(st.sampled_from([None, "Of {title}"])),
        id_column=draw(st.sampled_from([None, None, "note"])),
    )
    return out.getvalue().encode(), options


def shown(item: Job | RowError) -> tuple[Any, ...]:
    if isinstance(item, RowError):
        return ("bad", [(p.file, p.line, p.column, p.message, p.row_id) for p in item.problems])
    return ("job", item.job_key, item.row_id, item.line, item.source, item.variant,
            item.endpoint, dict(item.payload), item.request, dict(item.metadata))  # fmt: skip


def per_row(path: Path, options: ExpandOptions) -> list[Job | RowError]:
    return list(iter_jobs(read_rows(path), options))


def check_same(path: Path, options: ExpandOptions) -> None:
    try:
        expected = per_row(path, options)
    except ManifestError as exc:  # e.g. only blank rows: both readers refuse the file alike
        with pytest.raises(ManifestError) as raised:
            list(iter_manifest_jobs(path, None, options))
        assert str(raised.value) == str(exc)
        return
    fast = list(iter_manifest_jobs(path, None, options))
    assert [shown(i) for i in fast] == [shown(i) for i in expected]
    # Counting: the same jobs counted, the same bad rows in order, the same plan.
    counted = made = 0
    bad: list[RowError] = []
    for batch in iter_job_batches(path, None, options, materialize=False):
        counted += batch.counted
        made += sum(isinstance(i, Job) for i in batch.items)
        bad += [i for i in batch.items if isinstance(i, RowError)]
    assert counted + made == sum(isinstance(i, Job) for i in expected)
    assert [shown(b) for b in bad] == [shown(i) for i in expected if isinstance(i, RowError)]
    prices = PriceTable.default()
    batches = iter_job_batches(path, None, options, materialize=False)
    slow_plan = build_plan(expected, prices, input_sizes=lambda job: [])
    assert build_plan_batches(batches, prices, input_sizes=lambda job: []).as_json() == (
        slow_plan.as_json()
    )


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(arrowcsv, "BLOCK_BYTES", 700)


@FUZZ
@given(manifests())
def test_batches_match_the_per_row_path(
    tmp_path: Path, small_blocks: None, case: tuple[bytes, ExpandOptions]
) -> None:
    data, options = case
    path = tmp_path / "m.csv"
    path.write_bytes(data)
    check_same(path, options)


def test_plain_rows_take_the_vector_path(tmp_path: Path, small_blocks: None) -> None:
    """A manifest of plain rows is counted without a job object, and agrees."""
    lines = ["id,endpoint,prompt,image_size,num_images,guidance_scale,note"]
    lines += [f"r{i},fal-ai/flux-lora,cat {i},{'1024x768' if i % 2 else 'square'},{1 + i % 4},"
              f"{i % 30}.5,n{i}" for i in range(200)]  # fmt: skip
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    options = ExpandOptions(manifest_dir=tmp_path)
    batches = list(iter_job_batches(path, None, options, materialize=False))
    assert len(batches) > 3
    assert sum(b.counted for b in batches) == 200
    assert all(not b.items for b in batches)
    check_same(path, options)


def test_remote_lora_shorthand_takes_the_vector_path(tmp_path: Path, small_blocks: None) -> None:
    """One remote LoRA as ``url[:scale]`` is typed as a vector, and costs what the row costs."""
    cells = ["https://h:8080/l{i}.safetensors:0.{i}", "https://h/l{i}", " https://h/l : {i} ",
             "https://h/l{i}:{i}.25"]  # fmt: skip
    lines = ["id,endpoint,prompt,loras"]
    lines += [f"r{i},fal-ai/flux-lora,cat {i},{cells[i % 4].format(i=i % 10)}" for i in range(120)]
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    options = ExpandOptions(manifest_dir=tmp_path)
    batches = list(iter_job_batches(path, None, options, materialize=False))
    assert sum(b.counted for b in batches) == 120
    assert all(not b.items for b in batches)
    check_same(path, options)
    jobs = [job for job in iter_manifest_jobs(path, None, options) if isinstance(job, Job)]
    assert len(jobs) == 120
    assert jobs[0].payload["loras"] == [{"path": "https://h:8080/l0.safetensors", "scale": 0.0}]
    assert jobs[2].payload["loras"] == [{"path": "https://h/l : 2", "scale": 1.0}]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_columns_of_few_distinct_cells_are_typed_once_each(tmp_path: Path, seed: int) -> None:
    """Whole blocks of many rows (cells of a column typed per distinct cell) agree too."""
    rng = random.Random(seed)
    columns = ["id", "endpoint", "prompt", "image_size", "num_images", "seed", "guidance_scale",
               "output_format", "sync_mode", "loras", "note"]  # fmt: skip
    rows = []
    for n in range(3000):
        row = {name: rng.choice(CELLS[name][:3] if n % 50 else CELLS[name]) for name in columns}
        row.update(id=f"r{n % 2900}", endpoint="fal-ai/flux-lora", prompt=f"cat {n}")
        if n % 3:  # most rows plain: the first rows of a block decide how a column is typed
            row.update(seed=str(n), image_size="square", num_images="2", guidance_scale="3.5")
        rows.append([row[c] for c in columns])
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows([columns, *rows])
    path = tmp_path / "m.csv"
    path.write_text(out.getvalue())
    check_same(path, ExpandOptions(manifest_dir=tmp_path))


@pytest.mark.parametrize(
    "body",
    [
        'a,"b"c,3\n',  # a quoted cell continued: the csv module refuses, pyarrow would join
        'a,15" sleeve,3\n',  # a quote in unquoted text
        "a,2,3\rb,4,5\n",  # a bare carriage return
        "\n\n   \na,2,3\n,,\n",  # blank lines and rows
        "a,2\nb,3,4,5\n",  # short and long rows
        'a,"never closed,3\nb,4,5\n',
        "a,\xff\xfe,3\n",
        'a,"x,""y""",3\n',  # an escaped quote after a separator
    ],
)
def test_irregular_csv_reads_as_the_csv_module_does(tmp_path: Path, body: str) -> None:
    head = "id,prompt,num_images\nz,ok,1\n"
    path = tmp_path / "m.csv"
    data = (head + body + "y,fine,2\n").encode("utf-8", "surrogateescape")
    if "\xff" in body:  # invalid UTF-8: the bytes themselves
        data = head.encode() + b"a,\xff\xfe,3\ny,fine,2\n"
    path.write_bytes(data)
    options = ExpandOptions(manifest_dir=tmp_path, default_endpoint="fal-ai/flux-lora")
    check_same(path, options)
