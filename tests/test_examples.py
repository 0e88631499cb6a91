"""Every example manifest validates and plans, so they never rot."""

import json
from pathlib import Path

import pytest

from runner.cli import main

MANIFESTS = sorted(
    p
    for p in (Path(__file__).parent.parent / "manifests").iterdir()
    if p.suffix in {".csv", ".jsonl", ".parquet"}
)


def test_every_endpoint_family_has_an_example() -> None:
    names = {p.name for p in MANIFESTS}
    assert {"demo.csv", "mixed.csv"} <= names
    assert {".csv", ".jsonl", ".parquet"} <= {p.suffix for p in MANIFESTS}


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_example_validates(manifest: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(manifest)]) == 0
    err = capsys.readouterr().err
    assert "0 bad rows" in err


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.name)
def test_example_plans_with_a_price_for_every_job(
    manifest: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["plan", str(manifest), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["bad_rows"] == 0
    assert plan["total"]["jobs"] > 0
    assert plan["total"]["unpriced_jobs"] == 0
    assert float(plan["total"]["usd"]) > 0


def test_mixed_manifest_covers_all_eight_endpoints(capsys: pytest.CaptureFixture[str]) -> None:
    manifests = Path(__file__).parent.parent / "manifests"
    seen: set[str] = set()
    for manifest in MANIFESTS:
        main(["plan", str(manifests / manifest.name), "--json"])
        seen |= set(json.loads(capsys.readouterr().out)["endpoints"])
    assert len(seen) == 8
