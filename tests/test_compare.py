"""Comparing backbones and heads end to end: build, train, predict and score each on one clip split; csv, plot, reuse."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import write_davis
from PIL import Image

from featstore.cli import main
from featstore.datasets import load_dataset
from featstore.errors import BackboneError, FeatstoreError
from featstore.results import read_result_folder
from featstore.store import Store
from jobs.compare import COLUMNS, CompareResult, compare_backbones, pareto_front, plot_figure, plot_styles
from jobs.evaluate import evaluate

CLIPS = {"alpha": 4, "beta": 3, "gamma": 4, "delta": 3}
SIZE = (48, 80)
BACKBONES = ["tiny@random", "timm:resnet18@random"]
HEADS = ("fpn", "linear")
FAST: dict[str, Any] = {"epochs": 1, "batch_size": 4, "device": "cpu", "progress": False}


@dataclasses.dataclass
class Compared:
    store: Store
    data: Path
    result: CompareResult


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Compared:
    root = tmp_path_factory.mktemp("compare")
    data = write_davis(root / "clips", CLIPS, size=SIZE, seed=5)
    store = Store(root / "store")
    result = compare_backbones(store, data, BACKBONES, out_dir=root / "board", **FAST)
    return Compared(store, data, result)


def test_every_backbone_gets_a_scored_row(compared: Compared) -> None:
    rows = compared.result.rows
    assert {(r["backbone"], r["weights"]) for r in rows} == {("tiny", "random"), ("timm:resnet18", "random")}
    assert [r["mean_iou"] for r in rows] == sorted((r["mean_iou"] for r in rows), reverse=True)
    assert len(compared.result.val_clips) == 1  # a quarter of four clips
    for row in rows:
        assert row["within_budget"] and not row["error"] and row["decoder"] == "fpn"
        assert row["nparams"] == row["nparams_backbone"] + row["nparams_head"] > 0
        assert row["store_bytes"] > 0 and row["featurize_fps"] > 0 and row["train_seconds"] > 0
        result = compared.store.resolve(row["result_ref"], type="result")
        assert set(result.parents) >= {row["decoder_ref"], row["features_ref"]}
        assert result.metadata["source"] == "features", "held-out clips are predicted from the stored features"
        # The leaderboard's number is the contest score of the written result, and equals validation's.
        held_out = load_dataset(compared.data).subset(compared.result.val_clips)
        assert evaluate(compared.store.path(result), held_out, progress=False).mean_iou == row["mean_iou"]
        assert row["mean_iou"] == pytest.approx(row["val_mean_iou"], abs=1e-12)
    assert rows[-1]["nparams_backbone"] == 11_176_512 or rows[0]["nparams_backbone"] == 11_176_512  # resnet18 body


def test_csv_and_plot_are_written(compared: Compared) -> None:
    result = compared.result
    table = pd.read_csv(result.csv)
    assert list(table.columns) == list(COLUMNS)
    assert list(table["backbone"]) == [r["backbone"] for r in result.rows]
    assert table["mean_iou"].tolist() == pytest.approx([r["mean_iou"] for r in result.rows])
    with Image.open(result.plot) as image:
        assert image.format == "PNG" and image.size[0] >= 600 and image.size[1] >= 400
        image.load()
    assert not [p for p in result.csv.parent.iterdir() if p.name.startswith(".")], "no temporary file is left"
    text = result.leaderboard()
    assert "tiny@random" in text and "timm:resnet18@random" in text and "mean IoU" in text


def test_a_second_run_computes_nothing(compared: Compared) -> None:
    store = compared.store
    before = store.list()
    csv = compared.result.csv.read_text()
    again = compare_backbones(store, compared.data, BACKBONES, out_dir=compared.result.csv.parent, **FAST)
    assert store.list() == before
    assert all(row["cached"] for row in again.rows)
    assert [{k: v for k, v in r.items() if k != "cached"} for r in again.rows] == [
        {k: v for k, v in r.items() if k != "cached"} for r in compared.result.rows]
    assert again.csv.read_text() == csv


def test_force_recomputes_every_step_as_new_versions(tmp_path: Path) -> None:
    data = write_davis(tmp_path / "clips", CLIPS, size=SIZE, seed=5)
    store = Store(tmp_path / "store")
    (first,) = compare_backbones(store, data, ["tiny@random"], out_dir=tmp_path / "board", **FAST).rows
    (forced,) = compare_backbones(store, data, ["tiny@random"], out_dir=tmp_path / "board", force=True, **FAST).rows
    assert not forced["cached"]
    for step in ("features_ref", "decoder_ref", "result_ref"):
        assert first[step].endswith(":v1") and forced[step] == first[step].replace(":v1", ":v2"), step
    assert forced["mean_iou"] == first["mean_iou"], "the same inputs score the same"


def test_an_over_budget_backbone_is_a_row_not_an_abort(compared: Compared, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    budget = 1_000_000  # above tiny plus its head, far below resnet18's 11M
    result = compare_backbones(compared.store, compared.data, BACKBONES, budget=budget, out_dir=tmp_path, **FAST)
    by_name = {r["backbone"]: r for r in result.rows}
    over, fine = by_name["timm:resnet18"], by_name["tiny"]
    assert over["within_budget"] is False and over["mean_iou"] is None and over["decoder_ref"] is None
    assert "over budget" in over["error"] and f"{over['nparams']:,}" in over["error"] and "1,000,000" in over["error"]
    assert fine["within_budget"] and fine["mean_iou"] is not None
    assert result.rows[-1] is over, "unscored rows sort last"
    assert "over budget" in capsys.readouterr().err
    table = pd.read_csv(result.csv)
    assert math.isnan(table.loc[table["backbone"] == "timm:resnet18", "mean_iou"].item())


def test_pareto_front_keeps_the_best_score_for_each_size() -> None:
    rows: list[dict[str, Any]] = [
        {"nparams": 10, "mean_iou": 0.5},
        {"nparams": 20, "mean_iou": 0.4},  # bigger and worse: dominated
        {"nparams": 30, "mean_iou": 0.7},
        {"nparams": 30, "mean_iou": 0.6},  # same size, worse: dominated
        {"nparams": 40, "mean_iou": None},  # not scored
    ]
    assert [(r["nparams"], r["mean_iou"]) for r in pareto_front(rows)] == [(10, 0.5), (30, 0.7)]


def test_pil_decoding_on_the_cpu_reuses_every_step(compared: Compared, capsys: pytest.CaptureFixture[str]) -> None:
    before = compared.store.list()
    args = ["compare", "--data", str(compared.data), "--backbones", ",".join(BACKBONES), "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "--jpeg-decoder", "pil", "--out", str(compared.result.csv.parent),
            "--store", str(compared.store.root), "--json", "--quiet"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert all(row["cached"] for row in payload["rows"])
    assert compared.store.list() == before


def test_cli_compare_json_defaults_to_the_store_folder(compared: Compared,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--data", str(compared.data), "--backbones", ",".join(BACKBONES), "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "--store", str(compared.store.root), "--json", "--quiet"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"rows", "csv", "plot"} <= set(payload)
    for row in payload["rows"]:
        assert {"backbone", "decoder", "mean_iou", "nparams"} <= set(row)
    assert [r["result_ref"] for r in payload["rows"]] == [r["result_ref"] for r in compared.result.rows]
    assert [r["mean_iou"] for r in payload["rows"]] == [r["mean_iou"] for r in compared.result.rows]
    board = compared.store.root / "compare" / "clips"
    assert payload["csv"] == str(board / "compare.csv") and Path(payload["plot"]).is_file()
    probe = board / "probe.txt"
    probe.write_text("")  # any new file: its mode is what the user's umask gives
    for written in ("compare.csv", "compare.png"):
        assert (board / written).stat().st_mode == probe.stat().st_mode, written
    probe.unlink()

    assert main([*args[:-2], "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "leaderboard of clips" in shown and str(board / "compare.png") in shown


def test_bad_input_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    data = write_davis(tmp_path / "clips", {"alpha": 2, "beta": 2}, size=SIZE)
    with pytest.raises(BackboneError, match="nosuchnet"):
        compare_backbones(store, data, ["tiny@random", "nosuchnet"], **FAST)
    with pytest.raises(FeatstoreError, match="twice"):
        compare_backbones(store, data, ["tiny@random", "tiny@random"], **FAST)
    unannotated = write_davis(tmp_path / "test-set", {"alpha": 2, "beta": 2}, size=SIZE, masks=False)
    with pytest.raises(FeatstoreError, match="needs annotations"):
        compare_backbones(store, unannotated, ["tiny@random"], **FAST)
    with pytest.raises(FeatstoreError, match=r"--holdout-fraction 0\.9"):
        compare_backbones(store, data, ["tiny@random"], holdout_fraction=0.9, **FAST)
    with pytest.raises(FeatstoreError, match=r"--holdout-fraction 0 leaves no clip to score the leaderboard on"):
        compare_backbones(store, data, ["tiny@random"], holdout_fraction=0.0, **FAST)
    with pytest.raises(BackboneError, match="random"):  # tiny has no ImageNet weights: it says to use @random
        compare_backbones(store, data, ["tiny"], **FAST)
    with pytest.raises(FeatstoreError, match="--jpeg-decoder nvjpeg decodes on a GPU but --device cpu"):
        compare_backbones(store, data, ["tiny@random"], jpeg_decoder="nvjpeg", **FAST)
    assert store.list() == []

    assert main(["compare", "--data", str(tmp_path / "nope"), "--backbones", "tiny@random",
                 "--store", str(store.root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nope") in err
    assert store.list() == []


@pytest.fixture(scope="module")
def compared_heads(compared: Compared) -> Compared:
    """The same backbones with two heads each, in the store the one-head comparison already filled."""
    result = compare_backbones(compared.store, compared.data, BACKBONES, decoders=HEADS,
                               out_dir=compared.result.csv.parent.with_name("heads-board"), **FAST)
    return Compared(compared.store, compared.data, result)


def test_each_backbone_and_decoder_pair_is_its_own_row(compared: Compared, compared_heads: Compared) -> None:
    store, rows = compared_heads.store, compared_heads.result.rows
    assert sorted((r["backbone"], r["decoder"]) for r in rows) == sorted(
        itertools.product(("tiny", "timm:resnet18"), HEADS))
    assert [r["mean_iou"] for r in rows] == sorted((r["mean_iou"] for r in rows), reverse=True)
    assert len({r["decoder_ref"] for r in rows}) == len({r["result_ref"] for r in rows}) == 4
    for row in rows:
        assert row["within_budget"] and not row["error"] and row["mean_iou"] is not None
        trained = store.resolve(row["decoder_ref"], type="decoder")
        assert trained.metadata["decoder"]["name"] == row["decoder"]
        assert trained.metadata["nparams"] == row["nparams"] == row["nparams_backbone"] + row["nparams_head"]
        assert row["features_ref"] in trained.parents
        result = store.resolve(row["result_ref"], type="result")
        assert row["decoder_ref"] in result.parents and result.metadata["source"] == "features"
    for backbone in ("tiny", "timm:resnet18"):
        pair = [r for r in rows if r["backbone"] == backbone]
        assert len({r["features_ref"] for r in pair}) == 1, "one feature artifact serves every head on a backbone"
        assert len({r["nparams_head"] for r in pair}) == 2
    assert len(store.list("features")) == len(BACKBONES), "features are built once per backbone"
    # The fpn rows are the one-head comparison's, reused; only the linear heads were trained and predicted.
    alone = {r["backbone"]: r for r in compared.result.rows}
    for row in rows:
        if row["decoder"] == "fpn":
            assert row["cached"] and row["result_ref"] == alone[row["backbone"]]["result_ref"]
            assert row["mean_iou"] == alone[row["backbone"]]["mean_iou"]
        else:
            assert not row["cached"]


def test_csv_has_a_row_per_backbone_and_decoder(compared_heads: Compared) -> None:
    result = compared_heads.result
    table = pd.read_csv(result.csv)
    assert list(table.columns) == list(COLUMNS) and len(table) == 4
    assert list(zip(table["backbone"], table["decoder"], strict=True)) == [
        (r["backbone"], r["decoder"]) for r in result.rows]
    assert table["decoder_ref"].tolist() == [r["decoder_ref"] for r in result.rows]
    assert table["mean_iou"].tolist() == pytest.approx([r["mean_iou"] for r in result.rows])
    with Image.open(result.plot) as image:
        assert image.format == "PNG" and image.size[0] >= 600
        image.load()
    assert [line.split()[2] for line in result.leaderboard().splitlines()[1:]] == [r["decoder"] for r in result.rows]


def test_a_second_run_of_several_heads_computes_nothing(compared_heads: Compared) -> None:
    store = compared_heads.store
    before = store.list()
    csv = compared_heads.result.csv.read_text()
    again = compare_backbones(store, compared_heads.data, BACKBONES, decoders=",".join(HEADS),
                              out_dir=compared_heads.result.csv.parent, **FAST)
    assert store.list() == before
    assert len(again.rows) == 4 and all(row["cached"] for row in again.rows)
    assert again.csv.read_text() == csv


def test_an_over_budget_pair_is_a_row_and_its_backbone_is_not_built(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    data = write_davis(tmp_path / "clips", CLIPS, size=SIZE, seed=5)
    store = Store(tmp_path / "store")
    budget = 50_000  # tiny with a linear head fits; tiny with fpn, and resnet18 with any head, do not
    result = compare_backbones(store, data, BACKBONES, decoders=HEADS, budget=budget, out_dir=tmp_path / "board",
                               **FAST)
    (fits,) = (r for r in result.rows if r["within_budget"])
    assert (fits["backbone"], fits["decoder"]) == ("tiny", "linear") and fits["mean_iou"] is not None
    assert result.rows[0] is fits, "unscored rows sort last"
    for row in result.rows[1:]:
        assert row["mean_iou"] is None and row["decoder_ref"] is None
        assert f"{row['decoder']} head {row['nparams_head']:,}" in row["error"] and "50,000" in row["error"]
    assert [r.name for r in store.list("features")] == [fits["features_ref"].split(":")[0]]
    assert len(store.list("decoder")) == 1
    err = capsys.readouterr().err
    assert "timm:resnet18@random + fpn: over budget" in err and "tiny@random + fpn: over budget" in err
    assert len(pd.read_csv(result.csv)) == 4


def test_bad_decoder_names_are_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    board = tmp_path / "board"
    with pytest.raises(FeatstoreError, match=r"'nosuch' is unknown: use one of .*linear"):
        compare_backbones(store, None, ["tiny@random"], decoders=["fpn", "nosuch"], out_dir=board, **FAST)
    with pytest.raises(FeatstoreError, match="lists fpn twice"):
        compare_backbones(store, None, ["tiny@random"], decoders="fpn,linear,fpn", out_dir=board, **FAST)
    with pytest.raises(FeatstoreError, match="empty name"):
        compare_backbones(store, None, ["tiny@random"], decoders=["fpn", " "], out_dir=board, **FAST)
    assert not store.root.exists() and not board.exists(), "not even the demo dataset is written"

    argv = ["compare", "--backbones", "tiny@random", "--store", str(store.root), "--out", str(board)]
    assert main([*argv, "--decoder", "linear,nosuch"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'nosuch' is unknown" in err
    with pytest.raises(SystemExit) as caught:
        main([*argv, "--decoder", "fpn,fpn"])
    assert caught.value.code == 2 and "lists fpn twice" in capsys.readouterr().err
    assert not store.root.exists() and not board.exists()


def test_cli_compare_takes_a_list_of_decoders(compared_heads: Compared, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    args = ["compare", "--data", str(compared_heads.data), "--backbones", ",".join(BACKBONES), "--decoder",
            ",".join(HEADS), "--epochs", "1", "--batch-size", "4", "--device", "cpu",
            "--store", str(compared_heads.store.root), "--out", str(tmp_path), "--quiet"]
    assert main([*args, "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["backbone"], r["decoder"], r["mean_iou"], r["nparams"]) for r in payload["rows"]] == [
        (r["backbone"], r["decoder"], r["mean_iou"], r["nparams"]) for r in compared_heads.result.rows]
    assert all(r["cached"] for r in payload["rows"])
    assert main(args) == 0
    shown = capsys.readouterr().out
    assert all(f" {decoder} " in shown for decoder in HEADS)


@pytest.mark.slow
def test_demo_dataset_is_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = tmp_path / "store"
    assert main(["compare", "--backbones", "tiny@random", "--epochs", "1", "--device", "cpu", "--store", str(store),
                 "--json", "--quiet"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["dataset"] == "demo" and payload["csv"] == str(store / "compare" / "demo" / "compare.csv")
    assert payload["rows"][0]["mean_iou"] is not None


@pytest.mark.realdata
def test_real_clips_end_to_end(tmp_path: Path, davis_dev: Path) -> None:
    """Three real clips, two frames each, at 854x480: a random tiny backbone against offline ImageNet Lite0."""
    subset = tmp_path / "three-clips"
    clips = ("car-shadow", "cows", "motocross-jump")
    for kind, ext in (("JPEGImages", "jpg"), ("Annotations", "png")):
        for clip in clips:
            (subset / kind / "480p" / clip).mkdir(parents=True)
            for i in range(2):
                name = f"{i:05d}.{ext}"
                (subset / kind / "480p" / clip / name).symlink_to(davis_dev / kind / "480p" / clip / name)
    store = Store(tmp_path / "store")
    result = compare_backbones(store, subset, ["tiny@random", "efficientnet_lite0"], epochs=1, batch_size=2,
                               device="cpu", progress=False)
    assert {r["backbone"] for r in result.rows} == {"tiny", "efficientnet_lite0"}
    for row in result.rows:
        assert row["within_budget"] and 0.0 <= row["mean_iou"] <= 1.0
    lite0 = next(r for r in result.rows if r["backbone"] == "efficientnet_lite0")
    assert lite0["nparams_backbone"] == store.resolve(lite0["features_ref"]).metadata["nparams_backbone"]
    outputs = read_result_folder(store.path(store.resolve(lite0["result_ref"]))).outputs
    assert len(outputs) == 2 * len(result.val_clips)
    with Image.open(next(iter(outputs.values()))) as image:
        assert image.size == (854, 480) and image.mode == "L"


def test_a_backbone_keeps_its_colour_whatever_the_scores_and_the_other_backbones() -> None:
    colour, marker = plot_styles(["tiny@random", "alexnet"], ["fpn", "linear"])
    again, markers_again = plot_styles(["tiny@random", "alexnet", "efficientnet_lite0"], ["fpn"])
    assert list(colour) == ["tiny@random", "alexnet"] and len(set(colour.values())) == 2
    assert colour.items() <= again.items() and markers_again["fpn"] == marker["fpn"] != marker["linear"]


@pytest.mark.parametrize("clips", [
    [f"a-rather-long-held-out-clip-name-{i:02d}" for i in range(3)],  # few enough to be listed, too long to fit
    [f"a-rather-long-held-out-clip-name-{i:02d}" for i in range(12)],
])
def test_plot_title_and_size_labels_stay_inside_the_figure_and_apart(clips: list[str]) -> None:
    sizes = (300, 4_000, 600_000, 3_500_000, 60_000_000)  # from hundreds to tens of millions
    rows: list[dict[str, Any]] = [
        {"backbone": f"net{i}", "weights": "random", "decoder": "fpn", "mean_iou": 0.1 * i, "nparams": n}
        for i, n in enumerate(sizes)]
    rows[-1]["mean_iou"] = None  # over the budget
    figure = plot_figure(rows, "davis2016-dev", clips, 50_000_000,
                         styles=plot_styles([f"net{i}@random" for i in range(len(sizes))], ["fpn"]))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (axes,) = figure.axes
    inside = figure.bbox

    def within(box: Any) -> bool:
        return bool(inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1)

    title = axes.title
    assert within(title.get_window_extent(renderer)), title.get_text()
    headline, named = title.get_text().split("\n")
    assert headline == "davis2016-dev: held-out mean IoU against model size"
    assert named.startswith(f"{len(clips)} held-out clips: {clips[0]}")
    shown = named.split(": ", 1)[1].split(", ")
    if len(shown) < len(clips):
        assert shown[-1] == f"… and {len(clips) - len(shown) + 1} more" and shown[:-1] == clips[:len(shown) - 1]
    labels = [t for t in axes.get_xticklabels() if t.get_visible() and t.get_text()]
    assert len(labels) >= 4 and {"1k", "1M"} <= {t.get_text() for t in labels}
    boxes = [t.get_window_extent(renderer) for t in labels]
    assert all(within(box) for box in boxes), [t.get_text() for t in labels]
    for (a, box_a), (b, box_b) in itertools.combinations(zip(labels, boxes, strict=True), 2):
        assert not box_a.overlaps(box_b), (a.get_text(), b.get_text())


def test_plot_marks_the_best_pair_names_sizes_and_keeps_labels_off_the_front() -> None:
    rows: list[dict[str, Any]] = [
        {"backbone": "small", "weights": "imagenet", "decoder": "linear", "mean_iou": 0.31, "nparams": 2_960_000},
        {"backbone": "small", "weights": "imagenet", "decoder": "fpn", "mean_iou": 0.79, "nparams": 3_100_000},
        {"backbone": "mid", "weights": "imagenet", "decoder": "fpn", "mean_iou": 0.84, "nparams": 3_870_000},
        {"backbone": "big", "weights": "imagenet", "decoder": "fpn", "mean_iou": None, "nparams": 4_510_000},
        {"backbone": "big", "weights": "imagenet", "decoder": "linear", "mean_iou": None, "nparams": 4_360_000},
    ]
    figure = plot_figure(rows, "demo", ["a", "b"], 50_000_000,
                         styles=plot_styles(["small", "mid", "big"], ["linear", "fpn"]))
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    (axes,) = figure.axes
    texts = {t.get_text(): t for t in axes.texts}
    assert "mid + fpn  0.840, 3.87M" in texts and "small + linear  0.310, 2.96M" in texts
    for name in ("big + fpn (4.51M): over budget", "big + linear (4.36M): over budget"):
        assert texts[name].arrow_patch is not None, "an over-budget label is tied to its mark"
    assert axes.get_xlim()[1] < 50_000_000 and "budget 50M →" in texts, "a far budget is pointed at, not drawn"
    (star,) = [c for c in axes.collections if c.get_offsets().shape[0] == 1 and c.get_sizes()[0] > 300]
    assert tuple(star.get_offsets()[0]) == (3_870_000, 0.84)
    assert "best held-out IoU" in [t.get_text() for t in axes.get_legend().get_texts()]
    front = axes.transData.transform([(2_960_000, 0.31), (3_100_000, 0.31), (3_100_000, 0.79),
                                      (3_870_000, 0.79), (3_870_000, 0.84)])
    for name, text in texts.items():
        box = text.get_window_extent(renderer)
        for (x0, y0), (x1, y1) in itertools.pairwise(front):
            along = min(x0, x1) + 1 < box.x1 and box.x0 < max(x0, x1) - 1 and box.y0 < max(y0, y1) and min(y0, y1) < box.y1
            assert not along, f"label {name!r} covers the Pareto front"
