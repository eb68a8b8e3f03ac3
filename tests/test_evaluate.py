"""Scoring result folders against real annotated datasets on disk, and refusing folders that do not fit."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featstore.datasets import load_dataset, read_mask
from featstore.errors import FeatstoreError
from featstore.results import write_result_folder
from jobs.evaluate import evaluate

# Four frames of 4x2 pixels: clip "a" has three, clip "b" one. 0/255 annotations, greyscale predictions.
MASKS = {
    ("a", 0): [[255, 255, 255, 255], [0, 0, 0, 0]],
    ("a", 1): [[255, 255, 0, 0], [255, 255, 0, 0]],
    ("a", 2): [[0, 0, 0, 0], [0, 0, 0, 0]],
    ("b", 0): [[255, 255, 255, 255], [255, 255, 255, 255]],
}
PREDICTIONS = {
    ("a", 0): [[128, 128, 128, 128], [127, 127, 127, 127]],  # IoU 4/4
    ("a", 1): [[200, 127, 0, 0], [200, 127, 0, 0]],  # IoU 2/4
    ("a", 2): [[127, 127, 127, 127], [0, 0, 0, 0]],  # both empty: left out
    ("b", 0): [[255, 255, 0, 0], [0, 0, 0, 0]],  # IoU 2/8
}
EXPECTED_MEAN_IOU = (1 + 0.5 + 0.25) / 3
EXPECTED_PER_CLIP = {"a": (1 + 0.5) / 2, "b": 0.25}
EXPECTED_J_MEAN = (0.75 + 0.25) / 2


def write_tiny_davis(root: Path, *, masks: bool = True) -> Path:
    """The four frames above in DAVIS layout (rows: a/0, a/1, a/2, b/0)."""
    rng = np.random.default_rng(0)
    for (clip, frame), values in MASKS.items():
        raw = root / "JPEGImages" / "480p" / clip / f"{frame:05d}.jpg"
        raw.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(2, 4, 3), dtype=np.uint8)).save(raw)
        if masks:
            annotation = root / "Annotations" / "480p" / clip / f"{frame:05d}.png"
            annotation.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.array(values, dtype=np.uint8)).save(annotation)
    return root


def write_foreign_result(root: Path, rows: dict[int, tuple[str, int]]) -> Path:
    """A result folder as another tool might write it: odd file names, keys out of order, no metadata."""
    output = {}
    for row, key in reversed(list(rows.items())):
        relative = f"x/y/whatever-{key[0]}{key[1]}.png"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.array(PREDICTIONS[key], dtype=np.uint8), mode="L").save(root / relative)
        output[str(row)] = relative
    (root / "paths.json").write_text(json.dumps({"output": output}))
    return root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    return write_tiny_davis(tmp_path / "tiny")


@pytest.fixture
def foreign(tmp_path: Path) -> Path:
    return write_foreign_result(tmp_path / "foreign", {0: ("a", 0), 1: ("a", 1), 2: ("a", 2), 3: ("b", 0)})


def refusal(result_dir: Path, data: Path) -> str:
    with pytest.raises(FeatstoreError) as caught:
        evaluate(result_dir, data)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_foreign_result_folder_scores_by_the_contest_rules(tiny: Path, foreign: Path) -> None:
    scores = evaluate(foreign, tiny)
    assert scores.mean_iou == pytest.approx(EXPECTED_MEAN_IOU)
    assert scores.j_mean == pytest.approx(EXPECTED_J_MEAN)
    assert scores.per_clip == pytest.approx(EXPECTED_PER_CLIP)
    assert (scores.frames_scored, scores.frames_both_empty) == (3, 1)


def test_rows_follow_the_contest_paths_json_not_the_folder_order(tmp_path: Path, tiny: Path) -> None:
    # a contest paths.json listing clip b first: row 0 is b/00000, rows 1-3 are a/00000..a/00002
    order = [("b", 0), ("a", 0), ("a", 1), ("a", 2)]
    pd.DataFrame(
        {
            "raw": [f"JPEGImages/480p/{clip}/{frame:05d}.jpg" for clip, frame in order],
            "annotation": [f"Annotations/480p/{clip}/{frame:05d}.png" for clip, frame in order],
        }
    ).to_json(tiny / "paths.json")
    result = write_foreign_result(tmp_path / "result", dict(enumerate(order)))
    scores = evaluate(result, tiny / "paths.json")
    assert scores.mean_iou == pytest.approx(EXPECTED_MEAN_IOU)
    assert scores.per_clip == pytest.approx(EXPECTED_PER_CLIP)


def test_result_written_by_write_result_folder_scores(tmp_path: Path, tiny: Path) -> None:
    dataset = load_dataset(tiny)
    items = [(r.row, np.array(PREDICTIONS[r.clip, r.frame], dtype=np.uint8)) for r in dataset.frames]
    out = write_result_folder(tmp_path / "result", items, {"nparams": 1})
    scores = evaluate(out, dataset)
    assert scores.mean_iou == pytest.approx(EXPECTED_MEAN_IOU)
    assert scores.j_mean == pytest.approx(EXPECTED_J_MEAN)


def test_ground_truth_scores_one_and_empty_scores_zero(tmp_path: Path, small_davis: Path) -> None:
    dataset = load_dataset(small_davis)
    truth = [(r.row, read_mask(r.annotation) * np.uint8(255)) for r in dataset.frames if r.annotation]
    assert evaluate(write_result_folder(tmp_path / "truth", truth, {}), small_davis).mean_iou == 1.0
    empty = [(row, np.zeros_like(values)) for row, values in truth]
    scores = evaluate(write_result_folder(tmp_path / "empty", empty, {}), small_davis)
    assert (scores.mean_iou, scores.j_mean) == (0.0, 0.0)


def test_missing_rows_are_refused_with_count_and_first_rows(tmp_path: Path, small_davis: Path) -> None:
    out = write_result_folder(tmp_path / "result", [(0, np.zeros((64, 96), dtype=np.uint8))], {})
    message = refusal(out, small_davis)
    assert str(out / "paths.json") in message
    assert "misses 11 of the 12 rows" in message
    assert "(rows 1, 2, 3, 4, 5, ...)" in message


def test_rows_the_dataset_lacks_are_refused(tmp_path: Path, tiny: Path) -> None:
    out = write_foreign_result(tmp_path / "result", {0: ("a", 0), 1: ("a", 1), 2: ("a", 2), 3: ("b", 0),
                                                     7: ("a", 0), 9: ("a", 0)})
    assert "has 2 rows that dataset 'tiny' does not have (rows 7, 9)" in refusal(out, tiny)
    one_extra = write_foreign_result(tmp_path / "one", {0: ("a", 0), 1: ("a", 1), 2: ("a", 2), 3: ("b", 0),
                                                        4: ("a", 0)})
    assert "has 1 row that dataset 'tiny' does not have (row 4)" in refusal(one_extra, tiny)


def test_missing_png_is_refused_by_name(tiny: Path, foreign: Path) -> None:
    missing = foreign / "x/y/whatever-a1.png"
    missing.unlink()
    message = refusal(foreign, tiny)
    assert message.startswith(f"{missing}: prediction PNG for row 1 is missing")


@pytest.mark.parametrize("mode", ["RGB", "P", "I;16", "1", "LA"])
def test_png_not_8bit_greyscale_is_refused_with_its_mode(tiny: Path, foreign: Path, mode: str) -> None:
    bad = foreign / "x/y/whatever-a1.png"
    Image.new(mode, (4, 2)).save(bad)
    message = refusal(foreign, tiny)
    assert message.startswith(f"{bad}: prediction PNG has image mode {mode}, not L")


def test_png_of_the_wrong_size_is_refused_with_both_sizes(tiny: Path, foreign: Path) -> None:
    bad = foreign / "x/y/whatever-b0.png"
    Image.new("L", (5, 3)).save(bad)
    message = refusal(foreign, tiny)
    assert re.match(rf"{re.escape(str(bad))}: prediction is 5x3 but frame .*00000\.jpg is 4x2", message)


def test_unreadable_png_is_refused_by_name(tiny: Path, foreign: Path) -> None:
    bad = foreign / "x/y/whatever-a0.png"
    bad.write_bytes(b"not a png")
    assert refusal(foreign, tiny).startswith(f"{bad}: cannot read prediction PNG")


def test_dataset_without_annotations_is_refused(tmp_path: Path, foreign: Path) -> None:
    unannotated = write_tiny_davis(tmp_path / "test-phase", masks=False)
    message = refusal(foreign, unannotated)
    assert "evaluation needs annotations" in message
    assert "4 of 4 frames" in message


def test_malformed_result_folder_is_refused(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "paths.json").write_text("{")
    assert str(tmp_path / "broken" / "paths.json") in refusal(tmp_path / "broken", tiny)


def test_progress_bar_goes_to_stderr(tiny: Path, foreign: Path, capsys: pytest.CaptureFixture[str]) -> None:
    evaluate(foreign, tiny, progress=True)
    captured = capsys.readouterr()
    assert "evaluate" in captured.err
    assert captured.out == ""


@pytest.mark.realdata
def test_real_dev_annotations_score_one_against_themselves(tmp_path: Path, davis_dev: Path) -> None:
    dataset = load_dataset(davis_dev)
    result = tmp_path / "truth"
    result.mkdir()
    # the annotation PNGs themselves, by absolute path: nothing is copied
    output = {str(r.row): str(r.annotation) for r in dataset.frames}
    (result / "paths.json").write_text(json.dumps({"output": output}))
    scores = evaluate(result, dataset)
    assert scores.mean_iou == 1.0
    assert scores.j_mean == 1.0
    assert len(scores.per_clip) == 12
    assert scores.frames_scored + scores.frames_both_empty == len(dataset.frames) == 823


@pytest.mark.realdata
def test_real_dev_all_zero_result_scores_zero(tmp_path: Path, davis_dev: Path) -> None:
    dataset = load_dataset(davis_dev)
    zeros = np.zeros((480, 854), dtype=np.uint8)
    out = write_result_folder(tmp_path / "zeros", ((r.row, zeros) for r in dataset.frames), {})
    scores = evaluate(out, dataset)
    assert (scores.mean_iou, scores.j_mean) == (0.0, 0.0)
    assert scores.frames_scored > 0
