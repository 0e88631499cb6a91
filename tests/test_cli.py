"""The CLI called in-process: what it prints, what it exits with."""

import json
from pathlib import Path

import pytest

from runner.cli import main


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_validate_names_file_line_column_and_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = "".join(f"r{i},a cat,3.5\n" for i in range(12))
    manifest = write(
        tmp_path,
        "demo.csv",
        "id,prompt,guidance_scale\n" + rows + "bad,a dog,40\n",
    )
    assert main(["validate", str(manifest), "--endpoint", "fal-ai/flux-lora"]) == 1
    out = capsys.readouterr().out
    assert "demo.csv:14: guidance_scale=40 is above the maximum 35 for fal-ai/flux-lora" in out


def test_validate_reports_every_bad_row_and_counts_good_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write(
        tmp_path,
        "m.jsonl",
        '{"prompt": "a", "num_images": 9}\n\n{"prompt": "b"}\n{"prompt": ""}\n',
    )
    assert main(["validate", str(manifest), "--endpoint", "fal-ai/flux-lora"]) == 1
    captured = capsys.readouterr()
    assert "m.jsonl:1:" in captured.out and "num_images" in captured.out
    assert "m.jsonl:4:" in captured.out
    assert "1 job ok, 2 bad rows" in captured.err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "not found"),
        ("", "empty"),
    ],
)
def test_whole_file_problem_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, expected: str
) -> None:
    path = tmp_path / "m.csv"
    if content is not None:
        path.write_text(content)
    assert main(["validate", str(path), "--endpoint", "fal-ai/flux-lora"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("runner: error: ") and expected in err.lower()
    assert "Traceback" not in err


def test_unknown_endpoint_lists_known_ones_unless_allowed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write(tmp_path, "m.csv", "endpoint,prompt,foo\nacme/new-model,a cat,1\n")
    assert main(["validate", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "acme/new-model" in out and "fal-ai/flux-lora" in out
    assert main(["plan", str(manifest), "--allow-endpoint", "acme/new-model", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["endpoints"]["acme/new-model"]["unpriced_jobs"] == 1


def test_plan_hand_checked_costs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write(
        tmp_path,
        "m.csv",
        "id,endpoint,prompt,image_size,num_images\n"
        "a,fal-ai/flux-lora,x,1024x768,\n"
        "b,fal-ai/flux-lora,x,1920x1080,\n"
        "c,fal-ai/flux-2/lora,x,square_hd,4\n",
    )
    assert main(["plan", str(manifest), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["endpoints"]["fal-ai/flux-lora"]["usd"] == "0.105"  # 0.035 + 0.070
    assert plan["endpoints"]["fal-ai/flux-2/lora"]["usd"] == "0.084"
    assert plan["total"]["usd"] == "0.189"


def test_plan_reads_input_sizes_from_local_headers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    Image.new("RGB", (1920, 1080)).save(tmp_path / "big.png")
    manifest = write(
        tmp_path,
        "m.csv",
        "id,endpoint,prompt,image_url\n"
        "a,fal-ai/flux-lora/image-to-image,x,big.png\n"
        "b,fal-ai/flux-lora/image-to-image,x,https://example.com/unknown.png\n",
    )
    assert main(["plan", str(manifest), "--json"]) == 0
    totals = json.loads(capsys.readouterr().out)["endpoints"]["fal-ai/flux-lora/image-to-image"]
    assert totals["approximate_jobs"] == 1  # only the URL one
    assert totals["megapixels"] == 2 + 1  # 1920x1080 rounds up to 2 MP; unknown assumed 1 MP


def test_set_defaults_and_prompt_template(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write(tmp_path, "m.csv", "id,title,num_images\na,mug,\nb,lamp,2\n")
    args = [
        "plan", str(manifest), "--endpoint", "fal-ai/flux-lora", "--set", "num_images=3",
        "--prompt-template", "Photo of {title}", "--json",
    ]  # fmt: skip
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["total"]["images"] == 5


def test_price_override_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = write(tmp_path, "m.csv", "prompt\nx\n")
    prices = write(
        tmp_path,
        "prices.json",
        json.dumps(
            {
                "endpoints": {
                    "fal-ai/flux-lora": {
                        "usd": "0.05",
                        "unit": "output_mp",
                        "source": "my invoice",
                        "date": "2026-11-21",
                        "confidence": "confirmed",
                    }
                }
            }
        ),
    )
    args = ["plan", str(manifest), "--endpoint", "fal-ai/flux-lora", "--prices", str(prices)]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["usd"] == "0.05"


def test_near_miss_columns_and_set_keys_are_warned_about_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = write(tmp_path, "m.csv", "prompt,guidence_scale\na,3\nb,4\n")
    args = ["validate", str(manifest), "--endpoint", "fal-ai/flux-lora", "--set", "seedd=3"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert err.count("did you mean 'guidance_scale'") == 1
    assert "did you mean 'seed'" in err


def test_status_export_and_compact_on_a_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from datetime import UTC, datetime

    from runner.ledger.schema import JobState, LedgerEvent
    from runner.ledger.store import Ledger

    run_dir = tmp_path / "run"
    with Ledger.open(run_dir, checkpoint_events=2) as ledger:
        for i in range(3):
            for state in (JobState.SUBMITTING, JobState.QUEUED, JobState.COMPLETED):
                at = datetime.now(UTC)
                ledger.append(LedgerEvent(f"k{i}", state, at, row_id=f"r{i}", attempt=1))
                ledger.commit_sync()
    assert main(["status", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["by_state"] == {"completed": 3}
    assert main(["compact", str(run_dir)]) == 0
    assert len(list((run_dir / "ledger").glob("*.parquet"))) == 1
    assert main(["export", str(run_dir), "--format", "jsonl"]) == 0
    lines = (run_dir / "export.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["row_id"] for x in lines) == ["r0", "r1", "r2"]


# -- errors: one line and the documented exit code, with or without --emulator -----------------


# Nothing leaves the host: fal's queue and Platform API (prices) at a closed local port.
LOCAL = ["--queue-url", "http://127.0.0.1:9", "--api-url", "http://127.0.0.1:9"]


def one_error_line(err: str) -> str:
    """The one ``runner: error:`` line of stderr; no traceback, no exception group."""
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("runner: error: ")]
    return line


@pytest.mark.parametrize("emulator", [[], ["--emulator"]], ids=["fal", "emulator"])
def test_an_unknown_endpoint_in_a_run_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    emulator: list[str],
) -> None:  # fmt: skip
    monkeypatch.setenv("FAL_KEY", "emulator:local-key")
    manifest = write(tmp_path, "m.csv", "id,prompt\na,a cat\n")
    args = ["run", str(manifest), "--endpoint", "acme/nope", "--ledger", str(tmp_path / "run")]
    assert main([*args, *emulator, *LOCAL]) == 2
    assert "unknown endpoint 'acme/nope'" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("emulator", [[], ["--emulator"]], ids=["fal", "emulator"])
def test_a_locked_run_directory_is_one_line_and_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    emulator: list[str],
) -> None:  # fmt: skip
    from runner.ledger.store import Ledger

    monkeypatch.setenv("FAL_KEY", "emulator:local-key")
    manifest = write(tmp_path, "m.csv", "id,prompt\na,a cat\n")
    run_dir = tmp_path / "run"
    args = ["run", str(manifest), "--endpoint", "fal-ai/flux-lora", "--ledger", str(run_dir)]
    with Ledger.open(run_dir):  # another runner holds the directory
        assert main([*args, *emulator, *LOCAL]) == 4
    assert "is in use by another runner" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("emulator", [[], ["--emulator"]], ids=["fal", "emulator"])
@pytest.mark.parametrize("where", ["under-a-file", "run-json-is-a-folder"])
def test_an_unusable_ledger_is_one_line_naming_it_and_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    emulator: list[str], where: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("FAL_KEY", "emulator:local-key")
    manifest = write(tmp_path, "m.csv", "id,prompt\na,a cat\n")
    # As root nothing is read-only to chmod: a path under a regular file (ENOTDIR), or a
    # folder where the run directory's own file goes (EISDIR), cannot be written by anyone.
    write(tmp_path, "a-file", "not a folder")
    if where == "under-a-file":
        run_dir = tmp_path / "a-file" / "run"
    else:
        run_dir = tmp_path / "run"
        (run_dir / "run.json").mkdir(parents=True)
    args = ["run", str(manifest), "--endpoint", "fal-ai/flux-lora", "--ledger", str(run_dir)]
    assert main([*args, *emulator, *LOCAL]) == 4
    line = one_error_line(capsys.readouterr().err)
    assert str(run_dir) in line and "[Errno" in line


def test_a_ledger_with_a_missing_parent_is_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAL_KEY", "emulator:local-key")
    manifest = write(tmp_path, "m.csv", "id,prompt\na,a cat\n")
    run_dir = tmp_path / "no" / "such" / "run"
    args = ["run", str(manifest), "--endpoint", "fal-ai/flux-lora", "--ledger", str(run_dir)]
    assert main([*args, "--emulator", "--no-download"]) == 0
    assert (run_dir / "run.json").is_file()
    assert "Traceback" not in capsys.readouterr().err


def a_run_directory(tmp_path: Path) -> Path:
    from datetime import UTC, datetime

    from runner.ledger.schema import JobState, LedgerEvent
    from runner.ledger.store import Ledger

    run_dir = tmp_path / "run"
    with Ledger.open(run_dir) as ledger:
        ledger.append(LedgerEvent("k0", JobState.COMPLETED, datetime.now(UTC), row_id="r0"))
        ledger.commit_sync()
    return run_dir


@pytest.mark.parametrize("where", ["run-dir", "under-a-file", "missing-folder"])
def test_an_export_that_cannot_be_written_is_one_line_naming_it_and_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    run_dir = a_run_directory(tmp_path)
    write(tmp_path, "a-file", "not a folder")
    if where == "run-dir":  # the default place: a folder where the file would go
        out, flags = run_dir / "export.csv", []
        (run_dir / "export.csv").mkdir()
    else:
        parent = tmp_path / ("a-file" if where == "under-a-file" else "no-such-folder")
        out = parent / "x.csv"
        flags = ["--out", str(out)]
    assert main(["export", str(run_dir), *flags]) == 4
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"runner: error: cannot write the export {out}: [Errno ")
    assert not out.is_file()
    if where == "run-dir":  # the temp file written, then refused its name: removed
        assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_run_directory_that_cannot_be_read_is_one_line_naming_it_and_exit_4(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = a_run_directory(tmp_path)
    journal = run_dir / "journal"
    for part in journal.iterdir():
        part.unlink()
    journal.rmdir()
    journal.write_text("a file where a folder goes")
    for command in (["status", str(run_dir)], ["export", str(run_dir)], ["report", str(run_dir)]):
        assert main(command) == 4, command
        line = one_error_line(capsys.readouterr().err)
        assert str(journal) in line and "Not a directory" in line, command


@pytest.mark.parametrize(
    "command", [["status"], ["status", "--json"], ["report"], ["report", "--json"]]
)
def test_a_closed_stdout_ends_quietly(tmp_path: Path, command: list[str]) -> None:
    import os
    import subprocess
    import sys

    run_dir = a_run_directory(tmp_path)
    read, written = os.pipe()
    os.close(read)  # `runner status RUN | head`, once head has gone
    try:
        done = subprocess.run(
            [sys.executable, "-m", "runner", command[0], str(run_dir), *command[1:]],
            stdout=written, stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent,
            timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(written)
    assert done.stderr.decode() == ""
    assert done.returncode == 141  # 128 + SIGPIPE, as for any program writing to a closed pipe


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    "command",
    [["status"], ["report", "--json"], ["export", "--out", "-"],
     ["export", "--format", "jsonl", "--out", "-"]],
)  # fmt: skip
def test_a_full_stdout_is_one_line_and_exit_4(tmp_path: Path, command: list[str]) -> None:
    import subprocess
    import sys

    run_dir = a_run_directory(tmp_path)
    with open("/dev/full", "wb") as full:  # every write: ENOSPC, as on a full disk
        done = subprocess.run(
            [sys.executable, "-m", "runner", command[0], str(run_dir), *command[1:]],
            stdout=full, stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent,
            timeout=120, check=False,
        )  # fmt: skip
    err = done.stderr.decode()
    assert "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == (
        "runner: error: cannot write the output: [Errno 28] No space left on device"
    )
    assert done.returncode == 4


def test_export_to_stdout_with_out_dash(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    from datetime import UTC, datetime

    from runner.ledger import JobState, Ledger, LedgerEvent

    run_dir = tmp_path / "run"
    with Ledger.open(run_dir) as ledger:
        ledger.append(LedgerEvent("k", JobState.COMPLETED, datetime.now(UTC), row_id="r1"))
        ledger.commit_sync()
    assert main(["export", str(run_dir), "--format", "jsonl", "--out", "-"]) == 0
    captured = capsysbinary.readouterr()
    assert b'"row_id": "r1"' in captured.out and b"wrote 1 job to stdout" in captured.err
    assert not list(run_dir.glob("export.*"))


def test_validate_checks_local_input_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    Image.new("RGB", (64, 64)).save(tmp_path / "ok.png")
    (tmp_path / "not-an-image.png").write_text("hello")
    path = tmp_path / "m.csv"
    path.write_text(
        "id,endpoint,prompt,image_url\n"
        "a,fal-ai/flux-lora/image-to-image,p,ok.png\n"
        "b,fal-ai/flux-lora/image-to-image,p,missing.png\n"
        "c,fal-ai/flux-lora/image-to-image,p,not-an-image.png\n"
    )
    assert main(["validate", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "m.csv:3: image_url=missing.png: file not found" in out
    assert "m.csv:4: image_url=not-an-image.png" in out
    assert "1 job ok, 2 bad rows" in err


@pytest.mark.parametrize("command", ["status", "export", "report", "compact", "cancel"])
def test_a_mistyped_run_directory_is_a_usage_error_and_is_not_created(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    monkeypatch.setenv("FAL_KEY", "key-id:key-secret")
    missing = tmp_path / "nightly.runnr"
    assert main([command, str(missing)]) == 2
    assert f"{missing} is not a run directory" in capsys.readouterr().err
    assert not missing.exists()


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_an_id_column_the_header_lacks_is_one_usage_error_naming_the_columns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    path = tmp_path / "catalog.csv"
    path.write_text("sku,prompt\na1,red mug\nb2,blue mug\n")
    argv = [command, str(path), "--endpoint", "fal-ai/flux-lora", "--id-column", "skus"]
    if command == "run":
        argv += ["--emulator", "--ledger", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--id-column skus: " in err and "(its columns: sku, prompt)" in err
    assert not (tmp_path / "run").exists()
