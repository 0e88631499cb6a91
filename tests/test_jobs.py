"""Rows to jobs: columns, defaults, templates, expansion, keys and row errors."""

from __future__ import annotations

import itertools
import json
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.endpoints.catalog import FluxLoraRequest
from runner.errors import RowError, UnknownEndpointError
from runner.manifest.columns import column_warnings, fill_template
from runner.manifest.identity import is_content_id
from runner.manifest.idtable import FirstLines
from runner.manifest.jobs import (
    ExpandOptions,
    Job,
    is_row_number_id,
    iter_jobs,
    job_key,
    row_identity,
    row_number_id,
    variant_seed,
)
from runner.manifest.reader import RawRow, read_rows

FLUX = "fal-ai/flux-lora"
FLUX2 = "fal-ai/flux-2/lora"
I2I = "fal-ai/flux-lora/image-to-image"


def row(line: int = 2, index: int = 0, *, typed: bool = False, **cells: Any) -> RawRow:
    return RawRow("demo.csv", line, index, cells, typed)


def expand(rows: list[RawRow], **options: Any) -> list[Job | RowError]:
    return list(iter_jobs(rows, ExpandOptions(manifest_dir=Path("."), **options)))


def jobs_of(rows: list[RawRow], **options: Any) -> list[Job]:
    out = expand(rows, **options)
    errors = [str(item) for item in out if isinstance(item, RowError)]
    assert not errors, errors
    return [item for item in out if isinstance(item, Job)]


def error_of(r: RawRow, **options: Any) -> RowError:
    [item] = expand([r], **options)
    assert isinstance(item, RowError), item
    return item


# --- columns ----------------------------------------------------------------------------------


def test_parameters_are_typed_and_other_columns_are_metadata() -> None:
    [job] = jobs_of(
        [
            row(
                endpoint=FLUX,
                id="mug-01",
                prompt="a mug",
                num_images="2",
                guidance_scale="4",
                sync_mode="no",
                sku="SKU-1",
                empty_meta="",
            )
        ]
    )
    assert job.payload == {
        "prompt": "a mug",
        "num_images": 2,
        "guidance_scale": 4.0,
        "sync_mode": False,
    }
    assert isinstance(job.request, FluxLoraRequest)
    assert job.metadata == {"sku": "SKU-1", "empty_meta": ""}
    assert (job.row_id, job.line, job.source, job.variant, job.endpoint) == (
        "mug-01",
        2,
        "demo.csv",
        0,
        FLUX,
    )


def test_empty_cells_mean_not_given() -> None:
    [job] = jobs_of([row(endpoint=FLUX, prompt="x", num_images="", seed=" ", loras=None)])
    assert job.payload == {"prompt": "x"}


def test_default_endpoint_applies_when_the_row_has_none() -> None:
    [job] = jobs_of([row(prompt="x", endpoint="")], default_endpoint=FLUX)
    assert job.endpoint == FLUX


def test_row_endpoint_wins_over_the_default() -> None:
    [job] = jobs_of([row(prompt="x", endpoint=FLUX2)], default_endpoint=FLUX)
    assert job.endpoint == FLUX2


def test_no_endpoint_anywhere_is_a_row_error() -> None:
    error = error_of(row(prompt="x"))
    assert [p.column for p in error.problems] == ["endpoint"]
    assert str(error) == "demo.csv:2: no endpoint: add an endpoint column or pass --endpoint"


def test_a_row_without_an_id_is_identified_by_its_content() -> None:
    jobs = jobs_of([row(2, 0, prompt="a"), row(5, 1, prompt="b")], default_endpoint=FLUX)
    assert all(is_content_id(j.row_id) and len(j.row_id) == 17 for j in jobs)
    [moved] = jobs_of([row(9, 7, prompt="a")], default_endpoint=FLUX)
    assert moved.row_id == jobs[0].row_id != jobs[1].row_id


def test_typed_ids_become_text() -> None:
    [job] = jobs_of([row(id=17, prompt="a", typed=True)], default_endpoint=FLUX)
    assert job.row_id == "17"


def test_typed_rows_pass_native_values_and_metadata_as_text() -> None:
    [job] = jobs_of(
        [
            row(
                typed=True,
                endpoint=FLUX,
                prompt="x",
                num_images=2,
                loras=[{"path": "p", "scale": None}],
                image_size={"width": 640, "height": 480},
                tags=["a", "b"],
                score=0.5,
                flag=True,
                gone=None,
            )
        ]
    )
    assert job.payload == {
        "prompt": "x",
        "num_images": 2,
        "loras": [{"path": "p", "scale": 1.0}],
        "image_size": {"width": 640, "height": 480},
    }
    assert job.metadata == {"tags": '["a","b"]', "score": "0.5", "flag": "true", "gone": ""}


def test_another_endpoints_parameter_is_ignored_when_empty_and_refused_when_set() -> None:
    [job] = jobs_of([row(endpoint=FLUX, prompt="x", strength="", image_url="")])
    assert job.payload == {"prompt": "x"} and job.metadata == {}
    error = error_of(row(endpoint=FLUX, prompt="x", strength="0.5"))
    assert str(error) == (
        "demo.csv:2: strength is not a parameter of fal-ai/flux-lora; leave it empty on this row"
    )


# --- row errors --------------------------------------------------------------------------------


def test_validation_error_reads_file_line_and_reason() -> None:
    error = error_of(row(14, endpoint=FLUX, prompt="x", guidance_scale="40"))
    assert (
        str(error) == "demo.csv:14: guidance_scale=40 is above the maximum 35 for fal-ai/flux-lora"
    )
    [problem] = error.problems
    assert (problem.file, problem.line, problem.column, problem.row_id) == (
        "demo.csv",
        14,
        "guidance_scale",
        "#1",
    )


def test_every_problem_in_a_row_is_reported() -> None:
    error = error_of(
        row(
            endpoint=FLUX,
            id="r1",
            prompt="",
            num_images="two",
            guidance_scale="40",
            image_size="huge",
            output_format="gif",
        )
    )
    columns = {p.column for p in error.problems}
    assert columns == {"num_images", "guidance_scale", "image_size", "output_format", "prompt"}
    assert "num_images='two' is not an integer" in str(error)
    assert all(p.row_id == "r1" and p.line == 2 for p in error.problems)


def test_a_cell_that_does_not_parse_is_not_also_reported_missing() -> None:
    error = error_of(row(endpoint="fal-ai/flux-2/lora/edit", prompt="x", image_urls="[bad"))
    assert [p.column for p in error.problems] == ["image_urls"]


def test_a_manifest_row_problem_becomes_a_row_error() -> None:
    bad = RawRow("m.jsonl", 7, 3, {}, True, problem="the line is not valid JSON")
    [item] = expand([bad], default_endpoint=FLUX)
    assert isinstance(item, RowError)
    assert str(item) == "m.jsonl:7: the line is not valid JSON"
    assert item.problems[0].row_id == "#4"


def test_duplicate_id_names_the_first_line() -> None:
    out = expand(
        [
            row(2, 0, id="a", prompt="x"),
            row(3, 1, id="b", prompt="y"),
            row(9, 2, id="a", prompt="z"),
        ],
        default_endpoint=FLUX,
    )
    assert [type(item) for item in out] == [Job, Job, RowError]
    error = out[2]
    assert isinstance(error, RowError)
    assert str(error) == "demo.csv:9: id 'a' is already used on line 2"
    assert error.problems[0].column == "id"


def test_duplicate_ids_are_found_after_the_id_table_grows() -> None:
    rows = [row(i + 2, i, id=f"r{i}", prompt="x") for i in range(3000)]
    rows += [row(3002, 3000, id="r0", prompt="x"), row(3003, 3001, id="r2999", prompt="x")]
    out = expand(rows, default_endpoint=FLUX)
    assert [str(item) for item in out if isinstance(item, RowError)] == [
        "demo.csv:3002: id 'r0' is already used on line 2",
        "demo.csv:3003: id 'r2999' is already used on line 3001",
    ]


def test_a_row_that_cannot_be_read_still_claims_its_id() -> None:
    bad = RawRow("demo.csv", 2, 0, {"id": "a"}, False, problem="the row has 5 cells, not 4")
    out = expand([bad, row(3, 1, id="a", prompt="x")], default_endpoint=FLUX)
    assert [str(item) for item in out] == [
        "demo.csv:2: the row has 5 cells, not 4",
        "demo.csv:3: id 'a' is already used on line 2",
    ]


def test_a_counting_pass_does_not_check_ids() -> None:
    rows = [row(2, 0, id="a", prompt="x"), row(3, 1, id="a", prompt="y")]
    out = expand(rows, default_endpoint=FLUX, check_unique_ids=False)
    assert [type(item) for item in out] == [Job, Job]


# --- the id table ------------------------------------------------------------------------------


def test_id_table_answers_the_first_line_of_each_key() -> None:
    table = FirstLines()
    assert [table.claim(7, 2), table.claim(9, 3), table.claim(7, 5), table.claim(9, 6)] == [
        2,
        3,
        2,
        3,
    ]
    assert len(table) == 2


@pytest.mark.parametrize("key", [0, 1, -1, 2**63 - 1, -(2**63)])
def test_id_table_takes_any_64_bit_key(key: int) -> None:
    table = FirstLines(capacity=4)
    assert table.claim(key, 10) == 10
    assert table.claim(key ^ 1, 20) == 20
    assert table.claim(key, 30) == 10
    assert table.claim(key ^ 1, 40) == 20


def test_id_table_keys_sharing_the_last_slot_wrap_around_and_stay_apart() -> None:
    table = FirstLines(capacity=8)
    keys = [7 + 8 * i for i in range(5)]  # home slot 7 for all; 5 fit under 3/4 of 8
    assert [table.claim(key, line) for line, key in enumerate(keys, 1)] == [1, 2, 3, 4, 5]
    assert table.capacity == 8
    assert [table.claim(key, 99) for key in keys] == [1, 2, 3, 4, 5]


def test_id_table_keys_sharing_low_bits_survive_growth() -> None:
    table = FirstLines(capacity=2)
    keys = [3 + (i << 40) for i in range(300)]  # one home slot at every capacity here
    assert [table.claim(key, line) for line, key in enumerate(keys, 1)] == list(range(1, 301))
    assert table.capacity == 512
    assert [table.claim(key, 0) for key in keys] == list(range(1, 301))


def test_id_table_agrees_with_a_dict() -> None:
    rng = random.Random(7)
    pool = [rng.randrange(-(2**63), 2**63) for _ in range(4000)]
    pool += [0, 1, -1, *(5 + (i << 20) for i in range(50))]
    table, reference = FirstLines(capacity=1), dict[int, int]()
    for line in range(1, 12_001):
        key = rng.choice(pool)
        assert table.claim(key, line) == reference.setdefault(key, line), (key, line)
    assert len(table) == len(reference)
    assert all(table.claim(key, 0) == first for key, first in reference.items())


def test_id_table_keeps_lines_past_32_bits() -> None:
    table = FirstLines()
    assert table.claim(1, 3) == 3
    assert table.claim(2, 2**32 + 5) == 2**32 + 5
    assert [table.claim(2, 9), table.claim(1, 9)] == [2**32 + 5, 3]


def test_id_table_capacity_is_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        FirstLines(capacity=3)


def test_ids_sharing_a_key_but_not_a_check_are_different_ids() -> None:
    table = FirstLines(capacity=4)
    assert [table.claim(7, 2, 1), table.claim(7, 3, 2), table.claim(7, 4, 1)] == [2, 3, 2]
    assert [table.claim(0, 5, 1), table.claim(0, 6, 2), table.claim(0, 7, 2)] == [5, 6, 6]
    for line in range(8, 40):  # growth keeps both halves of each identity
        table.claim(line * 4, line, line)
    assert [table.claim(7, 99, 2), table.claim(7, 99, 1), table.claim(7, 99, 3)] == [3, 2, 99]
    assert len(table) == 2 + 1 + 2 + 32


def test_id_table_holds_at_most_43_bytes_a_key() -> None:
    # 50,000 keys is just past 3/4 of 65,536 slots: the table has just doubled,
    # its emptiest and so costliest point per key.
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        table = FirstLines()
        for line in range(2, 50_002):
            table.claim(hash(f"row-{line}"), line)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert table.capacity == 131_072
    assert held / len(table) <= 43  # 16 bytes a slot, 131,072 slots, 50,000 keys


def test_unknown_endpoint_in_a_row_is_a_row_error_naming_the_flag() -> None:
    error = error_of(row(endpoint="fal-ai/flux-lorra", prompt="x"))
    assert error.problems[0].column == "endpoint"
    assert "unknown endpoint 'fal-ai/flux-lorra'" in str(error)
    assert "--allow-endpoint fal-ai/flux-lorra" in str(error)


def test_unknown_default_endpoint_stops_before_any_row() -> None:
    with pytest.raises(UnknownEndpointError):
        iter_jobs([row(prompt="x")], ExpandOptions(Path("."), default_endpoint="acme/model"))


def test_allowed_unknown_endpoint_sends_every_column_untyped() -> None:
    [job] = jobs_of(
        [row(id="r", endpoint="acme/model", prompt="x", steps="12", loras="a:0.5", note="hi")],
        allowed_endpoints=frozenset({"acme/model"}),
    )
    assert job.request is None
    assert job.payload == {
        "prompt": "x",
        "steps": 12,
        "loras": [{"path": "a", "scale": 0.5}],
        "note": "hi",
    }
    assert job.metadata == {}


# --- --set defaults -------------------------------------------------------------------------


def test_set_defaults_fill_empty_cells_and_the_rows_value_wins() -> None:
    rows = [
        row(2, 0, prompt="a", num_images=""),
        row(3, 1, prompt="b", num_images="3"),
        row(4, 2, prompt="c"),
    ]
    jobs = jobs_of(rows, default_endpoint=FLUX, defaults={"num_images": "2", "style": "ink"})
    assert [j.payload["num_images"] for j in jobs] == [2, 3, 2]
    assert [j.metadata["style"] for j in jobs] == ["ink", "ink", "ink"]


def test_bad_set_default_is_reported_like_a_cell() -> None:
    error = error_of(row(prompt="a"), default_endpoint=FLUX, defaults={"num_images": "lots"})
    assert str(error) == "demo.csv:2: num_images='lots' is not an integer"


def test_set_cannot_change_the_row_identity() -> None:
    [job] = jobs_of([row(prompt="a")], default_endpoint=FLUX, defaults={"id": "same"})
    assert is_content_id(job.row_id)


# --- templates ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("template", "values", "expected"),
    [
        ("{title} in {color}", {"title": "mug", "color": "red"}, "mug in red"),
        ("{{literal}} {a}", {"a": " x "}, "{literal} x"),
        ("no placeholders", {}, "no placeholders"),
        ("{n} images", {"n": 3}, "3 images"),
        ("{prompt}, watercolour", {"prompt": "a fox"}, "a fox, watercolour"),
    ],
)
def test_template_fills_placeholders(template: str, values: dict[str, Any], expected: str) -> None:
    assert fill_template(template, values) == expected


@pytest.mark.parametrize(
    ("template", "values", "message"),
    [
        ("{a} {b}", {"a": "x"}, "prompt_template needs {b} but the column is missing or empty"),
        ("{a}{b}{a}", {"a": "", "b": None}, "prompt_template needs {a}, {b} but"),
        ("{a.b}", {"a": "x"}, "prompt_template placeholder {a.b} is not a plain {column} name"),
        ("{a!r}", {"a": "x"}, "prompt_template placeholder {a} is not a plain"),
        ("{}", {}, "prompt_template placeholder {} is not a plain"),
        ("{a", {"a": "x"}, "prompt_template is not a valid template"),
    ],
)
def test_template_errors_name_the_placeholder(
    template: str, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=None) as caught:
        fill_template(template, values)
    assert str(caught.value).startswith(message)


def test_template_option_fills_prompt_from_the_rows_cells() -> None:
    [job] = jobs_of(
        [row(title="mug", color="red")],
        default_endpoint=FLUX,
        prompt_template="Photo of {title} in {color}",
    )
    assert job.payload["prompt"] == "Photo of mug in red"
    assert job.metadata == {"title": "mug", "color": "red"}


def test_template_column_wins_over_the_option() -> None:
    [job] = jobs_of(
        [row(title="mug", prompt_template="Sketch of {title}")],
        default_endpoint=FLUX,
        prompt_template="Photo of {title}",
    )
    assert job.payload["prompt"] == "Sketch of mug"


def test_template_naming_an_empty_column_is_a_row_error() -> None:
    error = error_of(
        row(title="mug", color=""), default_endpoint=FLUX, prompt_template="{title} {color}"
    )
    [problem] = error.problems
    assert problem.column == "prompt_template"
    assert problem.message == "prompt_template needs {color} but the column is missing or empty"


# --- expansion ---------------------------------------------------------------------------------


def test_seeds_make_one_job_per_seed_in_order() -> None:
    jobs = jobs_of([row(id="r", prompt="x", seeds="5,6,7")], default_endpoint=FLUX)
    assert [(j.variant, j.payload["seed"]) for j in jobs] == [(0, 5), (1, 6), (2, 7)]
    assert len({j.job_key for j in jobs}) == 3
    assert all(j.row_id == "r" for j in jobs)


def test_variants_derive_seeds_from_the_row_identity() -> None:
    jobs = jobs_of([row(id="r", prompt="x", variants="4")], default_endpoint=FLUX)
    assert [j.variant for j in jobs] == [0, 1, 2, 3]
    seeds = [j.payload["seed"] for j in jobs]
    assert seeds == [variant_seed("r", i) for i in range(4)]
    assert len(set(seeds)) == 4
    assert all(0 <= s < 2**31 for s in seeds)
    again = jobs_of([row(id="r", prompt="x", variants="4")], default_endpoint=FLUX)
    assert [j.payload["seed"] for j in again] == seeds
    other = jobs_of([row(id="s", prompt="x", variants="4")], default_endpoint=FLUX)
    assert [j.payload["seed"] for j in other] != seeds


def test_variant_seed_is_pinned() -> None:
    # Changing the derivation would change every derived seed and key: pin it.
    assert variant_seed("r", 0) == variant_seed("r", 0)
    assert [variant_seed("poster-02", i) for i in range(2)] == [220051415, 346260825]


def test_no_seeds_or_variants_is_one_job_variant_0() -> None:
    [job] = jobs_of([row(prompt="x", seed="9")], default_endpoint=FLUX)
    assert (job.variant, job.payload["seed"]) == (0, 9)


@pytest.mark.parametrize(
    ("cells", "column", "message"),
    [
        ({"seeds": "1,2", "variants": "2"}, "seeds", "give either seeds or variants, not both"),
        ({"seeds": "1,2", "seed": "3"}, "seed", "give either seed or seeds, not both"),
        ({"variants": "2", "seed": "3"}, "seed", "give either seed or variants, not both"),
        ({"variants": "0"}, "variants", "variants=0 is not between 1 and 1000"),
        ({"variants": "1001"}, "variants", "variants=1001 is not between 1 and 1000"),
        ({"seeds": "a,b"}, "seeds", "seeds value 'a' is not an integer"),
    ],
)
def test_conflicting_or_bad_expansion_is_a_row_error(
    cells: dict[str, str], column: str, message: str
) -> None:
    error = error_of(
        RawRow("demo.csv", 2, 0, {"prompt": "x", **cells}, False), default_endpoint=FLUX
    )
    assert [(p.column, p.message) for p in error.problems] == [(column, message)]


def test_set_variants_applies_only_to_rows_that_chose_no_expansion() -> None:
    jobs = jobs_of(
        [row(2, 0, prompt="x"), row(3, 1, prompt="y", seeds="1"), row(4, 2, prompt="z", seed="5")],
        default_endpoint=FLUX,
        defaults={"variants": "2"},
    )
    ids = [j.row_id for j in jobs]
    assert ids[0] == ids[1] != ids[2] != ids[3]
    assert [j.variant for j in jobs] == [0, 1, 0, 0]
    assert [j.payload["seed"] for j in jobs][2:] == [1, 5]


def test_a_bad_variant_payload_rejects_the_whole_row() -> None:
    error = error_of(row(prompt="x", guidance_scale="99", variants="3"), default_endpoint=FLUX)
    assert len(error.problems) == 1


# --- keys --------------------------------------------------------------------------------------


def test_job_key_is_32_hex_chars_of_canonical_json() -> None:
    key = job_key("r", FLUX, {"b": 1, "a": "é"}, 0)
    assert len(key) == 32 and int(key, 16) >= 0
    assert key == job_key("r", FLUX, {"a": "é", "b": 1}, 0)
    assert key != job_key("r", FLUX, {"a": "é", "b": 1}, 1)
    assert key != job_key("s", FLUX, {"a": "é", "b": 1}, 0)
    assert key != job_key("r", FLUX2, {"a": "é", "b": 1}, 0)


def write_csv(path: Path, prompt: str) -> Path:
    path.write_text(
        f'id,endpoint,prompt,variants,sku\na,{FLUX},"{prompt}",3,S1\nb,{FLUX},second,,S2\n',
        encoding="utf-8",
    )
    return path


def keys(path: Path) -> list[str]:
    return [j.job_key for j in jobs_of(list(read_rows(path)))]


def test_reading_a_file_twice_gives_identical_keys(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", "a fox")
    assert keys(path) == keys(path)
    assert len(set(keys(path))) == 4


def test_keys_do_not_depend_on_the_files_name_or_place(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    first = keys(write_csv(tmp_path / "m.csv", "a fox"))
    assert keys(write_csv(tmp_path / "sub" / "renamed.csv", "a fox")) == first


def test_editing_the_prompt_changes_only_that_rows_keys(tmp_path: Path) -> None:
    before = keys(write_csv(tmp_path / "m.csv", "a fox"))
    after = keys(write_csv(tmp_path / "m.csv", "a wolf"))
    assert set(before[:3]).isdisjoint(after[:3])
    assert before[3] == after[3]


def test_metadata_does_not_change_the_key() -> None:
    [a] = jobs_of([row(id="r", prompt="x", sku="1")], default_endpoint=FLUX)
    [b] = jobs_of([row(id="r", prompt="x", sku="2")], default_endpoint=FLUX)
    assert a.job_key == b.job_key


def test_csv_jsonl_and_parquet_rows_give_the_same_keys(tmp_path: Path) -> None:
    csv_path = tmp_path / "m.csv"
    csv_path.write_text('id,prompt,num_images,loras\nr,x,2,"owner/repo:0.5"\n', encoding="utf-8")
    jsonl_path = tmp_path / "m.jsonl"
    jsonl_path.write_text(
        '{"id": "r", "prompt": "x", "num_images": 2, '
        '"loras": [{"path": "owner/repo", "scale": 0.5}]}\n',
        encoding="utf-8",
    )
    parquet_path = tmp_path / "m.parquet"
    loras = pa.array(
        [[{"path": "owner/repo", "scale": 0.5}]],
        type=pa.list_(pa.struct([("path", pa.string()), ("scale", pa.float64())])),
    )
    pq.write_table(
        pa.table({"id": ["r"], "prompt": ["x"], "num_images": [2], "loras": loras}), parquet_path
    )
    found = {
        p.suffix: [j.job_key for j in jobs_of(list(read_rows(p)), default_endpoint=FLUX)]
        for p in (csv_path, jsonl_path, parquet_path)
    }
    assert found[".csv"] == found[".jsonl"] == found[".parquet"]


# --- streaming and warnings -------------------------------------------------------------------


def test_iter_jobs_is_lazy_over_an_endless_stream() -> None:
    def endless() -> Iterator[RawRow]:
        for i in itertools.count():
            yield row(i + 2, i, prompt=f"p{i}")

    options = ExpandOptions(Path("."), default_endpoint=FLUX)
    first = list(itertools.islice(iter_jobs(endless(), options), 5))
    assert [j.line for j in first if isinstance(j, Job)] == [2, 3, 4, 5, 6]


@pytest.mark.parametrize(
    ("column", "suggestion"),
    [
        ("guidence_scale", "guidance_scale"),
        ("num_image", "num_images"),
        ("Prompt", "prompt"),
        ("variant", "variants"),
        ("seeds_", "seeds"),
    ],
)
def test_near_miss_column_warns_with_the_parameter(column: str, suggestion: str) -> None:
    [warning] = column_warnings(["id", column, "prompt"], [FLUX])
    assert f"column {column!r}" in warning
    assert f"did you mean {suggestion!r}" in warning
    assert FLUX in warning


def test_plain_metadata_and_parameters_do_not_warn() -> None:
    columns = ["id", "endpoint", "prompt", "title", "color", "sku", "seed", "seeds", "strength"]
    assert column_warnings(columns, [FLUX, I2I, "acme/unknown"]) == []


def test_near_miss_uses_the_union_of_endpoints() -> None:
    [warning] = column_warnings(["strenght"], [FLUX, I2I])
    assert "did you mean 'strength'" in warning
    assert "fal-ai/flux-lora, fal-ai/flux-lora/image-to-image" in warning


def test_row_errors_carry_the_editor_line_after_bom_crlf_and_multiline_cells(
    tmp_path: Path,
) -> None:
    path = tmp_path / "demo.csv"
    path.write_bytes(
        b"\xef\xbb\xbfid,endpoint,prompt,guidance_scale\r\n"
        b'a,fal-ai/flux-lora,"line one\r\nline two\r\nline three",3\r\n'
        b"\r\n"
        b"b,fal-ai/flux-lora,ok,40\r\n"
        b'c,fal-ai/flux-lora,"x\r\ny",two\r\n'
        b"d,fal-ai/flux-lora,caf\xff,3\r\n"
    )
    out = list(iter_jobs(read_rows(path), ExpandOptions(manifest_dir=tmp_path)))
    assert isinstance(out[0], Job) and out[0].line == 2
    assert [str(item).removeprefix(str(path)) for item in out[1:]] == [
        ":6: guidance_scale=40 is above the maximum 35 for fal-ai/flux-lora",
        ":7: guidance_scale='two' is not a number",
        ":9: the row is not valid UTF-8 text (column 'prompt')",
    ]
    assert [item.problems[0].row_id for item in out[1:] if isinstance(item, RowError)] == [
        "b",
        "c",
        "d",
    ]


# --- hostile values: wrong types, deep nesting (issue 16) ----------------------------------


def expand_file(path: Path) -> list[Job | RowError]:
    return list(iter_jobs(read_rows(path), ExpandOptions(manifest_dir=path.parent)))


def reported(items: list[Job | RowError]) -> list[tuple[int, str | None, str]]:
    return [
        (p.line, p.column, p.message)
        for item in items
        if isinstance(item, RowError)
        for p in item.problems
    ]


def test_a_jsonl_value_of_the_wrong_type_is_a_row_error_naming_line_and_field(
    tmp_path: Path,
) -> None:
    lines: list[dict[str, Any]] = [
        {"id": "ok1", "prompt": "fine"},
        {"id": "a", "prompt": 5},
        {"id": "b", "prompt": ["x"]},
        {"id": "c", "prompt": {"text": "x"}},
        {"id": "d", "endpoint": I2I, "prompt": "x", "image_url": 7},
        {"id": "e", "endpoint": ["x"], "prompt": "x"},
        {"id": "f", "prompt_template": 3, "n": 1},
        {"id": ["g"], "prompt": "x"},
        {"id": True, "prompt": "x"},
        {"id": "h", "prompt": "x", "output_format": 1},
        {"id": "ok2", "prompt": "also fine", "num_images": 2},
    ]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"endpoint": FLUX, **d}) + "\n" for d in lines))
    items = expand_file(path)
    assert [j.row_id for j in items if isinstance(j, Job)] == ["ok1", "ok2"]
    assert reported(items) == [
        (2, "prompt", "prompt=5 is not text"),
        (3, "prompt", "prompt=['x'] is not text"),
        (4, "prompt", "prompt={'text': 'x'} is not text"),
        (5, "image_url", "image_url=7 is not text"),
        (6, "endpoint", "endpoint=['x'] is not text"),
        (7, "prompt_template", "prompt_template=3 is not text"),
        (8, "id", "id=['g'] is not text or a number"),
        (9, "id", "id=True is not text or a number"),
        (10, "output_format", "output_format=1 is not text"),
    ]
    assert str(items[1]) == f"{path}:2: prompt=5 is not text"


def test_an_int64_prompt_column_in_parquet_is_a_row_error_per_row(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "prompt": pa.array([5, None, 7], type=pa.int64())}), path
    )
    items = list(iter_jobs(read_rows(path), ExpandOptions(tmp_path, default_endpoint=FLUX)))
    assert reported(items) == [
        (1, "prompt", "prompt=5 is not text"),
        (2, "prompt", "prompt is required for fal-ai/flux-lora"),
        (3, "prompt", "prompt=7 is not text"),
    ]


def test_a_parquet_row_with_good_values_still_runs_beside_bad_ones(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    table = pa.table(
        {
            "id": pa.array([1, 2], type=pa.int64()),
            "prompt": ["fine", "also fine"],
            "num_images": pa.array([2.0, 2.5], type=pa.float64()),
        }
    )
    pq.write_table(table, path)
    items = list(iter_jobs(read_rows(path), ExpandOptions(tmp_path, default_endpoint=FLUX)))
    assert isinstance(items[0], Job) and items[0].row_id == "1"
    assert [(line, column) for line, column, _ in reported(items)] == [(2, "num_images")]


def test_json_nested_100000_deep_is_a_row_error_in_a_jsonl_line_and_a_csv_cell(
    tmp_path: Path,
) -> None:
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text(
        f'{{"id": "a", "endpoint": "{FLUX}", "prompt": "x"}}\n' + "[" * 100_000 + "\n"
        f'{{"id": "b", "endpoint": "{FLUX}", "prompt": "x", "loras": {"[" * 100_000}}}\n'
    )
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(
        f"id,endpoint,prompt,loras,note\na,{FLUX},x,,\nb,{FLUX},x,{'[' * 100_000},\n"
        f"c,{FLUX},x,,{'[' * 100_000}\n"
    )
    deep = "is nested deeper than 64 levels"
    assert [(line, column, deep in m) for line, column, m in reported(expand_file(jsonl))] == [
        (2, None, True),
        (3, None, True),
    ]
    csv_items = expand_file(csv_path)
    assert isinstance(csv_items[0], Job)
    assert [(line, column, deep in m) for line, column, m in reported(csv_items)] == [
        (3, "loras", True)
    ]
    # A metadata cell is never parsed as JSON: it is text, whatever it looks like.
    assert isinstance(csv_items[2], Job) and csv_items[2].metadata["note"] == "[" * 100_000


# --- row identity: blank ids, path spellings (issue 16) ------------------------------------


def test_a_blank_id_never_collides_with_an_explicit_numeric_id(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f"id,endpoint,prompt\n,{FLUX},first\n1,{FLUX},second\n#a,{FLUX},third\n")
    items = expand_file(path)
    found = [(j.row_id, j.line) for j in items if isinstance(j, Job)]
    assert is_content_id(found[0][0])
    assert found[1:] == [("1", 3), ("#a", 4)]


@pytest.mark.parametrize("given", ["#2", " #12 ", "#0"])
def test_an_explicit_id_of_the_row_number_form_is_a_row_error(given: str) -> None:
    error = error_of(row(2, 4, id=given, prompt="x"), default_endpoint=FLUX)
    assert [(p.column, p.row_id) for p in error.problems] == [("id", "#5")]
    assert str(error) == (
        f"demo.csv:2: id {given.strip()!r} has the form kept for rows without an id "
        "(# and a row number)"
    )


def test_row_number_ids_are_the_only_ids_of_their_form() -> None:
    assert [row_number_id(i) for i in (0, 9)] == ["#1", "#10"]
    assert is_row_number_id("#10")
    assert not any(is_row_number_id(s) for s in ("10", "#", "#a", "a#1", "#1a", "#١"))


def bad_row_identities(path: str) -> list[str]:
    return [
        row_identity(item.problems[0])
        for item in iter_jobs(read_rows(Path(path)), ExpandOptions(Path(".")))
        if isinstance(item, RowError)
    ]


def test_a_bad_rows_identity_is_the_same_however_the_manifest_path_is_spelt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "dir").mkdir()
    path = tmp_path / "dir" / "bad.csv"
    path.write_text(f"id,endpoint,prompt\n,{FLUX},\nr,{FLUX},\n")
    (tmp_path / "link").symlink_to(tmp_path / "dir")
    monkeypatch.chdir(tmp_path)
    spellings = [str(path), "dir/bad.csv", "./dir/../dir/bad.csv", "link/bad.csv"]
    first = bad_row_identities(spellings[0])
    assert len(first) == 2 and len(set(first)) == 2
    for spelling in spellings[1:]:
        assert bad_row_identities(spelling) == first, spelling
    monkeypatch.chdir(tmp_path / "dir")
    assert bad_row_identities("bad.csv") == first


def test_a_bad_row_with_an_id_has_no_path_in_its_identity(tmp_path: Path) -> None:
    for name in ("a.csv", "b.csv"):
        (tmp_path / name).write_text(f"id,endpoint,prompt\n,{FLUX},\nr,{FLUX},\n")
    blank_a, id_a = bad_row_identities(str(tmp_path / "a.csv"))
    blank_b, id_b = bad_row_identities(str(tmp_path / "b.csv"))
    assert id_a == id_b  # like job_key: a renamed manifest is the same rows
    assert blank_a != blank_b  # without an id, the file is all that tells the rows apart


def test_one_relative_spelling_in_two_folders_is_two_manifests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "bad.csv").write_text(f"id,endpoint,prompt\n,{FLUX},\n")
    monkeypatch.chdir(tmp_path / "a")
    in_a = bad_row_identities("bad.csv")
    monkeypatch.chdir(tmp_path / "b")
    assert bad_row_identities("bad.csv") != in_a
