"""Dataset exports of a run: the demo manifest on the emulator, exported as ImageFolder,
WebDataset shards and per-image Parquet, each read back with its own reader."""

from __future__ import annotations

import hashlib
import io
import json
import os
from contextlib import ExitStack, redirect_stderr
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from runner.cli import main
from runner.emulator import parse_faults
from runner.errors import EXIT_LEDGER, EXIT_OK, EXIT_USAGE, LedgerError, UsageError
from runner.ledger import JobState, Ledger, LedgerEvent
from runner.report.dataset_writers import export_dataset
from runner.report.datasets import (
    DatasetOptions,
    columns_table,
    current_jobs,
    flatten,
    parse_size,
    select_images,
)
from tests.scenario import emulator, run, run_config

DEMO = Path(__file__).resolve().parents[1] / "manifests" / "demo.csv"
DEMO_IMAGES = 14  # 13 rows, the vase asks for 2 images
FLUX_LORA, BLACK = "fal-ai/flux-lora", "matte black"


def _run(manifest: Path, run_dir: Path, faults: str = "", **overrides: Any) -> Path:
    async def go() -> None:
        async with emulator(faults=parse_faults(faults) if faults else None) as emu:
            await run(emu, run_config(manifest, run_dir, **overrides))

    anyio.run(go)
    return run_dir


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo manifest, run once on the emulator for every test here that only reads it."""
    return _run(DEMO, tmp_path_factory.mktemp("demo") / "run")


def _export(run_dir: Path, out: Path, *flags: str) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err):
        code = main(["export", str(run_dir), "--out", str(out), *flags])
    return code, err.getvalue()


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _load_imagefolder(folder: Path, cache: Path) -> Any:
    os.environ["HF_HUB_OFFLINE"] = "1"  # the packaged loader needs no network; never ask
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    import datasets

    datasets.disable_progress_bars()
    return datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=str(cache))


def _read_shards(paths: list[Path]) -> list[dict[str, Any]]:
    """The samples of the shards, as ``webdataset`` groups and decodes them.

    Its own pipeline (``wds.WebDataset(urls)``) leaves the last shard's file open for the
    garbage collector (a ResourceWarning, an error here), so the files are opened here and
    handed to the same tar expander, key grouping and decoder it is built from.
    """
    import webdataset as wds

    with ExitStack() as stack:
        streams = [{"url": str(p), "stream": stack.enter_context(p.open("rb"))} for p in paths]
        files = wds.tariterators.tar_file_expander(streams)
        decode = wds.autodecode.Decoder([wds.autodecode.imagehandler("pil")])
        return [decode(sample) for sample in wds.tariterators.group_by_keys(files)]


# -- the three formats, each read by its reader -----------------------------------------------


def test_demo_exports_to_imagefolder_that_datasets_loads(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    code, err = _export(demo_run, out, "--format", "imagefolder")
    assert code == EXIT_OK, err
    assert f"wrote {DEMO_IMAGES} images of 13 jobs to {out} (" in err
    lines = _lines(out / "metadata.jsonl")
    assert len(lines) == DEMO_IMAGES
    assert all((out / line["file_name"]).is_file() for line in lines)
    # Hard links where the file system allows: the run's outputs, not copies of them.
    assert f"({DEMO_IMAGES} hard-linked to the run's outputs)" in err
    outputs = {p.stat().st_ino for p in (demo_run / "outputs").rglob("*.jpg")}
    assert {(out / line["file_name"]).stat().st_ino for line in lines} == outputs

    loaded = _load_imagefolder(out, tmp_path / "hf")
    train = loaded["train"]
    assert train.num_rows == DEMO_IMAGES
    by_key = {row["key"]: row for row in train}
    mug = by_key["mug-01-0"]
    assert mug["prompt"] == "Studio photo of ceramic coffee mug in matte black, white background"
    assert (mug["seed"], mug["endpoint"], mug["image_size"]) == (
        101,
        "fal-ai/flux-lora",
        "square_hd",
    )
    assert (mug["sku"], mug["title"], mug["color"]) == (
        "SKU-1001",
        "ceramic coffee mug",
        "matte black",
    )
    assert mug["flagged"] is False
    assert mug["image"].size == (mug["width"], mug["height"])
    # The vase asked for two images: one line each, both with the row's columns.
    assert {k for k in by_key if k.startswith("vase-01-")} == {"vase-01-0", "vase-01-1"}
    assert by_key["vase-01-1"]["image_index"] == 1
    assert by_key["vase-01-1"]["sku"] == "SKU-4001"
    # An edit carries its request fields: the strength it was sent with.
    assert by_key["sofa-edit-01-0"]["strength"] == pytest.approx(0.7)


def test_demo_exports_to_webdataset_shards_that_webdataset_reads(
    demo_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "wds"
    code, err = _export(demo_run, out, "--format", "webdataset", "--shard-size", "120kB")
    assert code == EXIT_OK, err
    shards = sorted(p.name for p in out.iterdir())
    assert len(shards) > 1 and shards[0] == "train-000000.tar"
    assert shards == [f"train-{i:06d}.tar" for i in range(len(shards))]
    for name in shards[:-1]:  # every shard but the last is full, none far past the size
        assert (out / name).stat().st_size <= 120_000 + 10_240  # + the tar's end blocks

    samples = _read_shards([out / name for name in shards])
    assert len(samples) == DEMO_IMAGES
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == DEMO_IMAGES and not any("." in k for k in keys)
    for sample in samples:
        meta = sample["json"]
        assert meta["key"] == sample["__key__"]
        assert sample["jpg"].size == (meta["width"], meta["height"])
        assert meta["prompt"] and meta["seed"] is not None and meta["sku"].startswith("SKU-")


def test_demo_exports_to_per_image_parquet_with_optional_bytes(
    demo_run: Path, tmp_path: Path
) -> None:
    plain, with_bytes = tmp_path / "plain.parquet", tmp_path / "bytes.parquet"
    assert _export(demo_run, plain, "--format", "parquet", "--per-image")[0] == EXIT_OK
    flags = ("--format", "parquet", "--per-image", "--with-bytes")
    assert _export(demo_run, with_bytes, *flags)[0] == EXIT_OK

    table = pq.read_table(plain)
    assert table.num_rows == DEMO_IMAGES and "image" not in table.column_names
    assert {"file_name", "prompt", "seed", "endpoint", "flagged", "sku"} <= set(table.column_names)
    full = pq.read_table(with_bytes)
    assert full.drop_columns(["image"]).equals(table)
    for row in full.select(["image", "sha256", "width", "height"]).to_pylist():
        assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]
        with Image.open(io.BytesIO(row["image"])) as image:
            assert image.size == (row["width"], row["height"])


# -- splits -----------------------------------------------------------------------------------


def test_split_column_writes_a_folder_and_shards_per_split(tmp_path: Path) -> None:
    manifest = tmp_path / "demo.csv"
    rows = DEMO.read_text().splitlines()[:8]  # the text-to-image rows: no input files
    splits = ["split", *(("test" if i % 3 == 0 else "train") for i in range(1, len(rows)))]
    manifest.write_text("\n".join(f"{r},{s}" for r, s in zip(rows, splits, strict=True)) + "\n")
    run_dir = _run(manifest, tmp_path / "run")
    assert rows[7].startswith("vase-01,") and splits[7] == "train"  # the vase has 2 images
    want = {"train": splits.count("train") + 1, "test": splits.count("test")}

    folder = tmp_path / "ds"
    assert _export(run_dir, folder, "--format", "imagefolder", "--split-column", "split")[0] == 0
    loaded = _load_imagefolder(folder, tmp_path / "hf")
    assert {name: loaded[name].num_rows for name in loaded} == want
    assert set(loaded["test"]["split"]) == {"test"}
    assert not (folder / "metadata.jsonl").exists()

    shards = tmp_path / "wds"
    assert _export(run_dir, shards, "--format", "webdataset", "--split-column", "split")[0] == 0
    assert sorted(p.name for p in shards.iterdir()) == ["test-000000.tar", "train-000000.tar"]

    tables = tmp_path / "pq"
    flags = ("--format", "parquet", "--per-image", "--split-column", "split")
    assert _export(run_dir, tables, *flags)[0] == EXIT_OK
    counts = {p.stem: pq.read_metadata(p).num_rows for p in tables.iterdir()}
    assert counts == want


# -- what is left out -------------------------------------------------------------------------


def _record(run_dir: Path, events: list[LedgerEvent]) -> None:
    with Ledger.open(run_dir) as ledger:
        for event in events:
            ledger.append(event)
        ledger.commit_sync()


def test_failed_jobs_and_flagged_images_are_left_out_unless_asked(tmp_path: Path) -> None:
    # The first job sent fails for good; the emulator flags nothing, so the safety checker's
    # verdicts are recorded as a run records them: a `completed` event with has_nsfw_concepts.
    run_dir = _run(DEMO, tmp_path / "run", "fail_internal_error=@1", max_attempts=1)
    jobs = {row["row_id"]: row for row in current_jobs(run_dir).to_pylist()}
    (failed,) = [r for r, row in jobs.items() if row["state"] == JobState.FAILED]
    now = datetime.now(UTC)
    _record(run_dir, [
        LedgerEvent(job_key=jobs["mug-02"]["job_key"], state=JobState.COMPLETED, at=now,
                    nsfw=(True,)),
        LedgerEvent(job_key=jobs["vase-01"]["job_key"], state=JobState.COMPLETED, at=now,
                    nsfw=(False, True)),
        # A job failed after its outputs came back (as `--flagged fail` records one).
        LedgerEvent(job_key=jobs["lamp-01"]["job_key"], state=JobState.FAILED, at=now,
                    error_type="flagged", error_message="the safety checker flagged it"),
    ])  # fmt: skip

    out = tmp_path / "default"
    code, err = _export(run_dir, out, "--format", "imagefolder")
    assert code == EXIT_OK, err
    assert "left out 2 failed jobs and 2 flagged images" in err
    keys = {line["key"] for line in _lines(out / "metadata.jsonl")}
    assert len(keys) == DEMO_IMAGES - 1 - 1 - 2  # a failed job's image, lamp-01, 2 flagged
    assert {"mug-02-0", "vase-01-1", "lamp-01-0"}.isdisjoint(keys)
    assert f"{failed}-0" not in keys and "vase-01-0" in keys

    everything = tmp_path / "all"
    flags = ("--format", "imagefolder", "--include-failed", "--include-flagged")
    assert _export(run_dir, everything, *flags)[0] == EXIT_OK
    lines = {line["key"]: line for line in _lines(everything / "metadata.jsonl")}
    assert len(lines) == DEMO_IMAGES - 1  # the failed job that never had an image
    assert lines["mug-02-0"]["flagged"] is True and lines["vase-01-0"]["flagged"] is False
    assert lines["lamp-01-0"]["state"] == "failed"


def test_outputs_not_downloaded_are_named_with_the_fix(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "id,endpoint,prompt,seed\na,fal-ai/flux-lora,one,1\nb,fal-ai/flux-lora,two,2\n"
    )
    run_dir = _run(manifest, tmp_path / "run", download=False)
    code, err = _export(run_dir, tmp_path / "ds", "--format", "webdataset")
    assert code == EXIT_LEDGER
    assert "cannot export 2 of 2 images without their files: a image 0: not downloaded" in err
    assert f"`runner run {manifest} --ledger {run_dir}` without --no-download" in err
    assert not (tmp_path / "ds").exists()
    # Without the bytes, the per-image table needs no files: it has the URLs.
    table_path = tmp_path / "t.parquet"
    assert _export(run_dir, table_path, "--format", "parquet", "--per-image")[0] == EXIT_OK
    assert all(pq.read_table(table_path)["url"].to_pylist())


def test_an_export_never_writes_into_a_folder_with_files(demo_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LedgerError, match="already exists and is not an empty folder"):
        export_dataset(demo_run, out, "imagefolder", DatasetOptions())
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    export_dataset(demo_run, empty, "imagefolder", DatasetOptions())
    assert len(list(empty.glob("*.jpg"))) == DEMO_IMAGES
    assert not list(tmp_path.glob(".*tmp*"))


# -- the pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("1GB", 10**9), ("500MB", 500 * 10**6), ("512MiB", 512 * 2**20), ("4096", 4096),
     ("1.5kB", 1500), ("2g", 2 * 10**9)],
)  # fmt: skip
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "lots", "-1GB", "0", "1PB"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(UsageError, match="--shard-size"):
        parse_size(text)


def _jobs(*rows: dict[str, Any]) -> pa.Table:
    base = {"job_key": "k", "row_id": "r", "source": "m.csv", "line": 2, "variant": 0,
            "state": "completed", "endpoint": "e", "request": "{}", "metadata": None,
            "seed": None, "nsfw": None, "outputs": None}  # fmt: skip
    return pa.Table.from_pylist([{**base, **row} for row in rows])


def _output(name: str) -> dict[str, Any]:
    return {"url": f"https://x/{name}", "width": 1, "height": 1, "content_type": "image/png",
            "local_path": None, "sha256": None}  # fmt: skip


def test_keys_are_webdataset_safe_and_unique(tmp_path: Path) -> None:
    jobs = _jobs(
        {"job_key": "aaaa1111", "row_id": "shots/v1.2 final", "line": 2,
         "outputs": [_output("1"), _output("2")]},
        {"job_key": "bbbb2222", "row_id": "shots_v1_2_final", "line": 3, "outputs": [_output("3")]},
        {"job_key": "cccc3333", "row_id": "x", "line": 4, "variant": 2, "outputs": [_output("4")]},
        {"job_key": "dddd4444", "row_id": "X", "line": 5, "variant": 2, "outputs": [_output("5")]},
    )  # fmt: skip
    selection = select_images(jobs, tmp_path, DatasetOptions())
    keys = [image.columns["key"] for image in selection.images]
    assert keys == ["shots_v1_2_final-0", "shots_v1_2_final-1", "shots_v1_2_final-0-bbbb2222",
                    "x-v2-0", "X-v2-0-dddd4444"]  # fmt: skip
    assert selection.images[0].file_name == "shots_v1_2_final-0.png"


def test_columns_flatten_and_a_field_with_two_types_becomes_json_text(tmp_path: Path) -> None:
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": {}}) == {"a.b": 1, "a.c.d": [1], "e": {}}
    jobs = _jobs(
        {"job_key": "1", "line": 2, "outputs": [_output("1")],
         "request": json.dumps({"prompt": "p", "image_size": "square", "url": "mine"}),
         "metadata": json.dumps({"file_name": "clash", "sku": "S1"})},
        {"job_key": "2", "line": 3, "outputs": [_output("2")],
         "request": json.dumps({"image_size": {"width": 8, "height": 8}, "size": 1})},
        {"job_key": "3", "line": 4, "outputs": [_output("3")],
         "request": json.dumps({"size": [1, 2]})},
    )  # fmt: skip
    table = columns_table(select_images(jobs, tmp_path, DatasetOptions()).images)
    assert table["image_size"].to_pylist() == ["square", None, None]
    assert table["image_size.width"].to_pylist() == [None, 8, None]
    assert table["size"].to_pylist() == [None, "1", "[1, 2]"]
    # Names the export already uses keep their meaning; the row's own get a prefix.
    assert table["request.url"].to_pylist() == ["mine", None, None]
    assert table["metadata.file_name"].to_pylist() == ["clash", "", ""]
    assert table["file_name"].to_pylist()[0] == "r-0.png"


@pytest.mark.parametrize(
    "flags",
    [["--format", "csv", "--per-image"], ["--format", "imagefolder", "--with-bytes"],
     ["--format", "parquet", "--shard-size", "1GB"], ["--format", "jsonl", "--include-failed"],
     ["--format", "parquet", "--split-column", "x"], ["--format", "imagefolder", "--out", "-"]],
)  # fmt: skip
def test_dataset_flags_out_of_place_are_usage_errors(
    demo_run: Path, flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["export", str(demo_run), *flags]
    if "--out" not in flags:
        argv += ["--out", str(demo_run / "never")]
    assert main(argv) == EXIT_USAGE
    assert "runner: error: " in capsys.readouterr().err
    assert not (demo_run / "never").exists()


@pytest.mark.parametrize(
    ("split", "problem"),
    [(None, "row b (line 3) has no value in that column"),
     ("my test", "row b (line 3) has 'my test'; a split is letters, digits and _")],
)  # fmt: skip
def test_a_row_without_a_usable_split_is_refused_by_row_and_line(
    tmp_path: Path, split: str | None, problem: str
) -> None:
    jobs = _jobs(
        {"job_key": "1", "row_id": "a", "outputs": [_output("1")],
         "metadata": json.dumps({"part": "train"})},
        {"job_key": "2", "row_id": "b", "line": 3, "outputs": [_output("2")],
         "metadata": json.dumps({} if split is None else {"part": split})},
    )  # fmt: skip
    with pytest.raises(UsageError) as caught:
        select_images(jobs, tmp_path, DatasetOptions(split_column="part"))
    assert str(caught.value) == f"--split-column part: {problem}"


def test_with_splits_a_column_empty_in_one_split_is_text_in_all(tmp_path: Path) -> None:
    """Hugging Face's loader types each split's metadata.jsonl on its own: a column with
    no value in one split would be `null` there and a number in the other, and refused."""
    jobs = _jobs(
        {"job_key": "1", "row_id": "a", "outputs": [_output("1")],
         "request": json.dumps({"strength": 0.5, "steps": 4}),
         "metadata": json.dumps({"part": "train", "note": "n"})},
        {"job_key": "2", "row_id": "b", "line": 3, "outputs": [_output("2")],
         "request": json.dumps({"steps": 8}), "metadata": json.dumps({"part": "test"})},
    )  # fmt: skip
    split = select_images(jobs, tmp_path, DatasetOptions(split_column="part"))
    table = columns_table(split.images)
    assert table["strength"].to_pylist() == ["0.5", ""]
    assert table["steps"].to_pylist() == [4, 8]  # a value in every split: keeps its type
    assert table["note"].to_pylist() == ["n", ""]  # an empty manifest cell is ""
    whole = columns_table(select_images(jobs, tmp_path, DatasetOptions()).images)
    assert whole["strength"].to_pylist() == [0.5, None]
