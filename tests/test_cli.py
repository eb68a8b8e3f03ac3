"""The command line: arguments are checked before any work, and --json speaks JSON on failure too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from featstore import __version__
from featstore.cli import build_parser, main


def refused_argument(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, f"{text!r} not in {err!r}"


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--lr", "1e-3,,2", "has an empty item"),
        ("--lr", "1e-3,", "has an empty item"),
        ("--decoder", "", "has an empty item"),
        ("--decoder", "fpn,fpn", "lists fpn twice"),
        ("--lr", "0.01,abc", "not a comma-separated list of numbers"),
        ("--lr", "1e-3,0.001", "lists 0.001 twice"),
        ("--seed", "99999999999999999999", "use a seed from 0 to 9223372036854775807"),
        ("--seed", "-1", "use a seed from 0"),
        ("--budget", "5.5", "not a whole number of parameters"),
        ("--budget", "lots", "not a number of parameters"),
    ],
)
def test_bad_train_arguments_are_refused_with_the_reason(
    option: str, value: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    refused_argument(["train", "--features", "x", f"{option}={value}"], capsys, option, expected)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["build"], "featstore build: error: the following arguments are required: --backbone"),
        (["train", "--features", "x", "--lr", "1e-3", "3e-3"], "featstore: error: unrecognized arguments: 3e-3"),
        (["bogus"], "featstore: error: argument COMMAND: invalid choice: 'bogus'"),
    ],
)
def test_usage_errors_are_one_line_that_points_at_help(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    refused_argument(argv, capsys, expected, "--help`)")
    with pytest.raises(SystemExit):
        main(argv)
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(("text", "budget"), [("5e7", 50_000_000), ("50_000_000", 50_000_000), ("3,000", 3000)])
def test_budget_takes_the_ways_people_write_large_numbers(text: str, budget: int) -> None:
    args = build_parser().parse_args(["train", "--features", "x", "--budget", text])
    assert args.budget == budget


def test_json_failure_prints_the_error_as_the_last_stdout_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", "nosuch:v3", "--store", str(tmp_path / "store"), "--json"]) == 1
    out, err = capsys.readouterr()
    payload = json.loads(out.strip().splitlines()[-1])
    assert "nosuch" in payload["error"]
    assert err.startswith("featstore show: error:") and err.count("\n") == 1


def test_build_with_nvjpeg_on_the_cpu_names_the_option_and_the_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    argv = ["build", "--backbone", "tiny", "--weights", "random", "--device", "cpu", "--jpeg-decoder", "nvjpeg"]
    assert main([*argv, "--store", str(store)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--jpeg-decoder nvjpeg" in err and "use --device cuda" in err
    assert not (store / "features").exists()


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.strip() == f"featstore {__version__}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--store", "{store}", "--json", "ls"],
        ["ls", "--store", "{store}", "--json"],
        ["--json", "ls", "--store", "{store}"],
        ["--store", "{elsewhere}", "ls", "--store", "{store}", "--json"],
    ],
)
def test_common_options_work_before_and_after_the_command(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "home"))
    store = tmp_path / "store"
    assert main(["build", "--backbone", "tiny", "--weights", "random", "--store", str(store), "--quiet"]) == 0
    capsys.readouterr()
    filled = [a.format(store=store, elsewhere=tmp_path / "elsewhere") for a in argv]
    assert main(filled) == 0
    listing = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {record["type"] for record in listing["artifacts"]} == {"dataset", "features"}


@pytest.mark.parametrize("command", [["build", "--backbone", "tiny"], ["train", "--features", "x"],
                                     ["predict", "--decoder", "x", "--data", "d"], ["compare", "--backbones", "tiny"]])
def test_commands_that_compute_take_force(command: list[str]) -> None:
    assert build_parser().parse_args([*command, "--force"]).force is True
    assert build_parser().parse_args(command).force is False


def test_json_usage_errors_print_the_error_line_too(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["--json", "rm"])
    assert caught.value.code == 2
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "the following arguments are required: REF" in payload["error"]
    with pytest.raises(SystemExit):
        main(["train", "--features", "x", "--lr", "fast"])
    assert capsys.readouterr().out == "", "without --json, stdout stays empty"


def test_predict_and_evaluate_take_the_demo_dataset_without_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from featstore.datasets import load_dataset
    from jobs.evaluate import evaluate

    store = ["--store", str(tmp_path / "store"), "--quiet"]
    assert main(["build", "--backbone", "tiny", "--weights", "random", *store]) == 0
    assert main(["train", "--features", "demo.tiny.random", "--decoder", "linear", "--epochs", "1", *store]) == 0
    capsys.readouterr()
    submission = tmp_path / "submission"
    assert main(["predict", "--decoder", "demo.tiny.random.linear", "--out", str(submission), "--json", *store]) == 0
    predicted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert predicted["dataset"] == "demo:v1" and predicted["out"] == str(submission)
    assert main(["evaluate", str(submission), "--json", *store]) == 0
    scored = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    demo = load_dataset(tmp_path / "store" / "demo")
    assert scored["mean_iou"] == evaluate(submission, demo).mean_iou
    assert set(scored["per_clip"]) == set(demo.clips())
    assert main(["show", predicted["ref"], *store]) == 0
    shown = capsys.readouterr().out.splitlines()
    lineage = shown[shown.index("  lineage   made from:") + 1 : shown.index("  metadata")]
    assert lineage == [  # what each parent was made from, indented under it
        "    demo.tiny.random.linear:v1  (decoder)",
        "      demo.tiny.random:v1  (features)",
        "        demo:v1  (dataset)",
        "    demo:v1  (dataset)",
        "    demo.tiny.random:v1  (features, as above)",
    ]
