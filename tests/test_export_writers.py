"""The CSV and JSONL exports of a real run (the embedded emulator) are byte for byte what the
writers they replaced write of the same rows: Arrow's ``CSVWriter`` over
:func:`runner.ledger.texts.flat_for_csv`, and ``json.dumps`` row by row
(:func:`runner.ledger.texts.write_jsonl_rows`). The rows are the export's own, read back from
its Parquet file; the run holds the values the vectors treat apart (NUL and other control
characters, quotes, backslashes, U+2028, emoji and combining marks, long prompts, numeric
texts, metadata names that need escaping, nested image sizes, LoRA lists, edits, failures,
invalid rows, re-rolls, superseded versions)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import runner
from runner.ledger import exportfile, jsonl, texts
from runner.ledger.views import export

HOSTILE = [
    'quote " and ""', "comma, here", "new\nline", "cr\rcrlf\r\n", "tab\t", "nul\x00byte",
    "ctl\x01\x1b\x1f", "bs\x08ff\x0cvt\x0b", "del\x7f", "back\\slash", "\\u0000 literal",
    "line\u2028para\u2029", "😀👍🏽 e\u0301", "日本語 مرحبا", "", " ", "007", "1e5", "NaN", "null",
    "x" * 3000,
]  # fmt: skip


def _manifest(path: Path, version: int) -> Path:
    lines = []
    for n, text in enumerate(HOSTILE):
        row: dict[str, object] = {
            "id": f"r{n}", "endpoint": "fal-ai/flux-lora", "prompt": f"p{version} {text}",
            "seed": n, 'note "q",\n': text, "tag": str(n * 1.5),
        }  # fmt: skip
        if n % 4 == 1:
            row["image_size"] = {"width": 512, "height": 768}
        if n % 4 == 2:
            row["loras"] = [{"path": f"owner/l{n}", "scale": 0.5 + n}]
        if n % 5 == 3:
            edit = "fal-ai/flux-lora/image-to-image"
            row = {"id": f"r{n}", "endpoint": edit, "prompt": f"edit{version} {text}",
                   "image_url": "chair.jpg", "strength": 0.6}  # fmt: skip
        if n == 7:
            row["seed"] = "not a number"  # an invalid row
        lines.append(json.dumps(row, ensure_ascii=n % 2 == 0))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("writers")
    image = Path(__file__).resolve().parents[1] / "manifests" / "images" / "chair.jpg"
    (root / "chair.jpg").write_bytes(image.read_bytes())
    for version in (1, 2):  # every row's content changes: version 1 is superseded
        runner.run(
            _manifest(root / "rows.jsonl", version), emulator=True, ledger=root / "run",
            no_download=True, quiet=True, id_column="id", emulator_time_scale=0.001,
            emulator_faults="flagged=0.3,fail_runner_disconnected=0.2,seed=4",
            flagged="reroll",
        )  # fmt: skip
    return root / "run"


def _rows(run_dir: Path, tmp_path: Path, all_versions: bool) -> pa.Table:
    export(run_dir, tmp_path / "rows.parquet", "parquet", all_versions=all_versions)
    return pq.read_table(tmp_path / "rows.parquet")


def _csv_as_before(table: pa.Table) -> bytes:
    out = io.BytesIO()
    with pacsv.CSVWriter(out, texts.flat_for_csv(table.schema.empty_table()).schema) as writer:
        for batch in table.to_batches(max_chunksize=2_000):
            writer.write_table(texts.flat_for_csv(pa.Table.from_batches([batch])))
    return out.getvalue()


def _jsonl_as_before(table: pa.Table) -> bytes:
    out = io.BytesIO()
    for batch in table.to_batches(max_chunksize=2_000):
        texts.write_jsonl_rows(batch, out)
    return out.getvalue()


@pytest.mark.parametrize("all_versions", [False, True])
@pytest.mark.parametrize("small_pieces", [False, True])
def test_a_runs_text_exports_are_the_bytes_of_the_writers_they_replaced(
    run_dir: Path,
    tmp_path: Path,
    all_versions: bool,
    small_pieces: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if small_pieces:
        monkeypatch.setattr(exportfile, "CSV_ROWS", 3)
        monkeypatch.setattr(jsonl, "PIECE_BYTES", 2_000)
    table = _rows(run_dir, tmp_path, all_versions)
    assert (table.num_rows > len(HOSTILE)) == all_versions
    assert set(table["superseded"].to_pylist()) == ({False, True} if all_versions else {False})
    states = set(table["state"].to_pylist())
    assert {"completed", "invalid"} <= states
    assert any(b"\x00" in (t or "").encode() for t in table["req_prompt"].to_pylist())
    export(run_dir, tmp_path / "rows.csv", "csv", all_versions=all_versions)
    assert (tmp_path / "rows.csv").read_bytes() == _csv_as_before(table)
    export(run_dir, tmp_path / "rows.jsonl", "jsonl", all_versions=all_versions)
    assert (tmp_path / "rows.jsonl").read_bytes() == _jsonl_as_before(table)
