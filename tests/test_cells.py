"""Cell syntax: each small language of a manifest cell, table by table."""

from __future__ import annotations

import functools
import math
from typing import Annotated, Any, Literal

import pytest
from pydantic import Field

from runner.endpoints import catalog
from runner.manifest.cells import (
    CellError,
    Kind,
    coerce_text,
    field_kind,
    guess_text,
    is_blank,
    parse_cell,
    parse_count,
    parse_image_size,
    parse_image_urls,
    parse_loras,
    parse_seeds,
    parse_untyped_cell,
)

# --- loras --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("owner/repo", [{"path": "owner/repo", "scale": 1.0}]),
        ("owner/repo:0.8", [{"path": "owner/repo", "scale": 0.8}]),
        (
            "https://host:8080/x.safetensors:0.8",
            [{"path": "https://host:8080/x.safetensors", "scale": 0.8}],
        ),
        ("https://h/x.safetensors", [{"path": "https://h/x.safetensors", "scale": 1.0}]),
        ("https://host:8080", [{"path": "https://host:8080", "scale": 1.0}]),
        (
            "a:0.5; b ;https://h:1/c.safetensors:1.25;",
            [
                {"path": "a", "scale": 0.5},
                {"path": "b", "scale": 1.0},
                {"path": "https://h:1/c.safetensors", "scale": 1.25},
            ],
        ),
        ("a:-.5", [{"path": "a", "scale": -0.5}]),
        ("a:1e-1", [{"path": "a", "scale": 0.1}]),
        ("a:2", [{"path": "a", "scale": 2.0}]),
        ("a:b", [{"path": "a:b", "scale": 1.0}]),
        ("C:\\loras\\x.safetensors", [{"path": "C:\\loras\\x.safetensors", "scale": 1.0}]),
        ('[{"path": "p", "scale": 0.8}]', [{"path": "p", "scale": 0.8}]),
        ('[{"path": "p"}]', [{"path": "p"}]),
        ('{"path": "p", "scale": 2}', [{"path": "p", "scale": 2}]),
        ('["a:0.5", "b"]', [{"path": "a", "scale": 0.5}, {"path": "b", "scale": 1.0}]),
        # Native values (JSONL, Parquet list<struct>); a null struct field is "not given".
        ([{"path": "p", "scale": 0.3}], [{"path": "p", "scale": 0.3}]),
        ([{"path": "p", "scale": None}], [{"path": "p"}]),
    ],
)
def test_loras_cell_syntax(cell: Any, expected: list[dict[str, Any]]) -> None:
    assert parse_loras("loras", cell) == expected


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("[{bad json", "loras='[{bad json' is not valid JSON"),
        ('[{"scale": 1}]', "loras: LoRA {'scale': 1} needs a text 'path'"),
        ("[1]", "loras: LoRA 1 needs a text 'path'"),
        (5, "loras=5 is not a list of LoRAs"),
    ],
)
def test_bad_loras_cell_names_the_column(cell: Any, message: str) -> None:
    with pytest.raises(CellError, match=None) as caught:
        parse_loras("loras", cell)
    assert str(caught.value).startswith(message)
    assert caught.value.column == "loras"


# --- image_urls ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("a.png", ["a.png"]),
        ("a.png|https://h/b.jpg", ["a.png", "https://h/b.jpg"]),
        (" a.png | b.png |", ["a.png", "b.png"]),
        ('["a.png", "b|c.png"]', ["a.png", "b|c.png"]),
        (["a.png", "b.png"], ["a.png", "b.png"]),
    ],
)
def test_image_urls_cell_syntax(cell: Any, expected: list[str]) -> None:
    assert parse_image_urls("image_urls", cell) == expected


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        (" | ", "image_urls lists no image URLs"),
        ("[1, 2]", "image_urls=[1, 2] is not a list of image URLs"),
        ("[oops", "image_urls='[oops' is not valid JSON"),
    ],
)
def test_bad_image_urls_cell(cell: Any, message: str) -> None:
    with pytest.raises(CellError) as caught:
        parse_image_urls("image_urls", cell)
    assert str(caught.value).startswith(message)


# --- image_size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("square_hd", "square_hd"),
        (" landscape_4_3 ", "landscape_4_3"),
        ("1024x768", {"width": 1024, "height": 768}),
        ("1280 X 720", {"width": 1280, "height": 720}),
        ('{"width": 800, "height": 600}', {"width": 800, "height": 600}),
        ({"width": 512, "height": 512}, {"width": 512, "height": 512}),
        (catalog.ImageSize(width=640, height=480), {"width": 640, "height": 480}),
    ],
)
def test_image_size_cell_syntax(cell: Any, expected: Any) -> None:
    assert parse_image_size("image_size", cell) == expected


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("huge", "image_size='huge' is not a preset"),
        ("1024x", "image_size='1024x' is not a preset"),
        ('{"width": 0, "height": 5}', "image_size={'width': 0, 'height': 5} has width 0"),
        ('{"width": 5}', "image_size={'width': 5} must have exactly the keys"),
        ("{nope", "image_size='{nope' is not valid JSON"),
        (12, "image_size=12 is not an image size"),
        (  # once valid, and its estimate broke the ledger's money column
            "99999999999999999999x8",
            "image_size='99999999999999999999x8' has width 99999999999999999999, above the "
            "largest side 2147483647",
        ),
    ],
)
def test_bad_image_size_cell(cell: Any, message: str) -> None:
    with pytest.raises(CellError) as caught:
        parse_image_size("image_size", cell)
    assert str(caught.value).startswith(message)


# --- seeds and counts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("1,2,3", [1, 2, 3]),
        (" 7 ", [7]),
        ("1, 2 ,3,", [1, 2, 3]),
        ("[4, 5]", [4, 5]),
        ("[4.0]", [4]),
        ([9, 8], [9, 8]),
        (42, [42]),
    ],
)
def test_seeds_cell_syntax(cell: Any, expected: list[int]) -> None:
    assert parse_seeds("seeds", cell) == expected


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("1,x,3", "seeds value 'x' is not an integer"),
        ("1.5", "seeds value '1.5' is not an integer"),
        ("[true]", "seeds value True is not an integer"),
        ("[]", "seeds lists no seeds"),
        (",", "seeds lists no seeds"),
        ("1,2,1", "seeds repeats the seed 1"),
        (
            "1,9223372036854775808",
            "seeds value 9223372036854775808 is outside the 64-bit seed range",
        ),
        (",".join(str(i) for i in range(1001)), "seeds lists 1001 seeds; at most 1000"),
    ],
)
def test_bad_seeds_cell(cell: Any, message: str) -> None:
    with pytest.raises(CellError) as caught:
        parse_seeds("seeds", cell)
    assert str(caught.value) == message


@pytest.mark.parametrize(("cell", "expected"), [("1", 1), (" 1000 ", 1000), (3, 3), (4.0, 4)])
def test_count_cell(cell: Any, expected: int) -> None:
    assert parse_count("variants", cell) == expected


@pytest.mark.parametrize(
    ("cell", "message"),
    [
        ("0", "variants=0 is not between 1 and 1000"),
        ("1001", "variants=1001 is not between 1 and 1000"),
        ("many", "variants='many' is not an integer"),
        (True, "variants=True is not an integer"),
    ],
)
def test_bad_count_cell(cell: Any, message: str) -> None:
    with pytest.raises(CellError) as caught:
        parse_count("variants", cell)
    assert str(caught.value) == message


# --- scalars by field type -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("annotation", "kind"),
    [
        (int, "int"),
        (int | None, "int"),
        (Annotated[int, Field(ge=1)], "int"),
        (float, "float"),
        (int | float, "float"),
        (bool, "bool"),
        (bool | None, "bool"),
        (str, "str"),
        (Literal["jpeg", "png"], "str"),
        (Literal[1, 2], "int"),
        (list[str], "json"),
        (dict[str, int], "json"),
        (catalog.LoraWeight, "json"),
        (str | catalog.ImageSize, "any"),
        (Any, "any"),
    ],
)
def test_field_kind_follows_the_annotation(annotation: Any, kind: Kind) -> None:
    assert field_kind(annotation) == kind


def test_field_kind_reads_the_catalog_models() -> None:
    fields = catalog.CATALOG["fal-ai/flux-lora"].model.model_fields
    kinds = {name: field_kind(info.annotation) for name, info in fields.items()}
    assert kinds["num_images"] == "int"
    assert kinds["seed"] == "int"
    assert kinds["guidance_scale"] == "float"
    assert kinds["sync_mode"] == "bool"
    assert kinds["output_format"] == "str"


@pytest.mark.parametrize(
    ("text", "kind", "expected"),
    [
        ("2", "int", 2),
        (" 2 ", "int", 2),
        ("2.0", "int", 2),
        ("-3", "int", -3),
        ("3.5", "float", 3.5),
        ("4", "float", 4.0),
        ("1e-2", "float", 0.01),
        ("true", "bool", True),
        ("TRUE", "bool", True),
        ("Yes", "bool", True),
        ("1", "bool", True),
        ("false", "bool", False),
        ("No", "bool", False),
        ("0", "bool", False),
        (" a cat ", "str", "a cat"),
        ("007", "str", "007"),
        ('["a"]', "json", ["a"]),
        ("12", "any", 12),
    ],
)
def test_text_cells_are_coerced_by_field_kind(text: str, kind: Kind, expected: Any) -> None:
    value = coerce_text("col", text, kind)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("column", "text", "kind", "message"),
    [
        ("num_images", "two", "int", "num_images='two' is not an integer"),
        ("num_images", "2.5", "int", "num_images='2.5' is not an integer"),
        ("num_images", "inf", "int", "num_images='inf' is not an integer"),
        ("guidance_scale", "high", "float", "guidance_scale='high' is not a number"),
        ("guidance_scale", "nan", "float", "guidance_scale='nan' is not a number"),
        (
            "sync_mode",
            "maybe",
            "bool",
            "sync_mode='maybe' is not a boolean (true/false/yes/no/1/0)",
        ),
        ("extra", "{", "json", "extra='{' is not valid JSON: Expecting property name"),
    ],
)
def test_bad_text_cells_name_the_column(column: str, text: str, kind: Kind, message: str) -> None:
    with pytest.raises(CellError) as caught:
        coerce_text(column, text, kind)
    assert str(caught.value).startswith(message)
    assert caught.value.column == column


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("12", 12),
        ("-1.5", -1.5),
        ("true", True),
        ("False", False),
        ('{"a": 1}', {"a": 1}),
        ("[1, 2]", [1, 2]),
        ("[not json", "[not json"),
        ("a cat", "a cat"),
        ("nan", "nan"),
        ("1024x768", "1024x768"),
    ],
)
def test_untyped_text_is_guessed(text: str, expected: Any) -> None:
    assert guess_text(text) == expected


def test_parse_cell_dispatches_special_columns_then_types() -> None:
    assert parse_cell("loras", "a:0.5", "json") == [{"path": "a", "scale": 0.5}]
    assert parse_cell("image_size", "10x20", "any") == {"width": 10, "height": 20}
    assert parse_cell("num_images", "3", "int") == 3
    assert parse_cell("prompt", "  hi  ", "str") == "hi"


@pytest.mark.parametrize("value", [3, 2.5, True, None, [1], {"a": 1}])
def test_native_values_pass_through_for_the_model_to_check(value: Any) -> None:
    assert parse_cell("num_images", value, "int") is value


@pytest.mark.parametrize("value", [5, 2.5, True, ["a"], {"a": 1}, b"x"])
def test_a_native_value_where_text_goes_is_refused_naming_the_column(value: Any) -> None:
    # The request model's text checks assume text: an int reached them as 5.strip().
    with pytest.raises(CellError) as caught:
        parse_cell("prompt", value, "str")
    assert str(caught.value) == f"prompt={value!r} is not text"
    assert caught.value.column == "prompt"


DEEP = "[" * 100_000


@pytest.mark.parametrize(
    ("parse", "column", "text"),
    [
        (parse_loras, "loras", DEEP),
        (parse_image_urls, "image_urls", DEEP),
        (parse_seeds, "seeds", DEEP),
        (parse_image_size, "image_size", '{"a":' * 100_000),
        (functools.partial(coerce_text, kind="json"), "extra", DEEP),
        (functools.partial(coerce_text, kind="any"), "extra", DEEP),
        (parse_untyped_cell, "extra", DEEP),
    ],
    ids=["loras", "image_urls", "seeds", "image_size", "json", "any", "untyped"],
)
def test_json_nested_past_the_limit_is_a_cell_error(parse: Any, column: str, text: str) -> None:
    with pytest.raises(CellError) as caught:
        parse(column, text)
    assert str(caught.value).startswith(f"{column}=")
    assert str(caught.value).endswith("is nested deeper than 64 levels")
    assert caught.value.column == column


def test_an_integer_past_pythons_digit_limit_stays_text() -> None:
    assert guess_text("9" * 5000) == "9" * 5000
    with pytest.raises(CellError, match="holds a number of more than 4300 digits"):
        coerce_text("extra", "[" + "9" * 5000 + "]", "json")


def test_untyped_cells_keep_special_syntax_but_not_image_size_checks() -> None:
    assert parse_untyped_cell("loras", "a:2") == [{"path": "a", "scale": 2.0}]
    assert parse_untyped_cell("image_size", "giant") == "giant"
    assert parse_untyped_cell("steps", "12") == 12
    assert parse_untyped_cell("steps", 12.5) == 12.5


@pytest.mark.parametrize(
    ("value", "blank"), [(None, True), ("", True), ("  \t", True), ("x", False), (0, False)]
)
def test_blank_means_not_given(value: Any, blank: bool) -> None:
    assert is_blank(value) is blank


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, [1.0, math.nan], {"a": {"b": [math.inf]}}, '{"a": NaN}',
     "[Infinity]", "loras-nan"],
)  # fmt: skip
def test_untyped_cells_refuse_nan_and_infinities_anywhere(value: Any) -> None:
    # No model checks an untyped request, and JSON cannot carry these to fal: the send
    # raised "Out of range float values are not JSON compliant" mid-run.
    column = "extra"
    if value == "loras-nan":
        column, value = "loras", [{"path": "a", "scale": math.nan}]
    with pytest.raises(CellError, match="holds NaN or an infinity"):
        parse_untyped_cell(column, value)


def test_untyped_cells_keep_finite_floats_and_text_that_only_looks_infinite() -> None:
    assert parse_untyped_cell("extra", [1.5, {"a": -0.0}]) == [1.5, {"a": -0.0}]
    assert parse_untyped_cell("extra", "1e999") == "1e999"  # not a finite number: text
    assert parse_untyped_cell("extra", "nan") == "nan"
