"""The result folder format: written atomically, read back, malformed folders refused by name."""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featstore.errors import FeatstoreError
from featstore.results import read_result_folder, write_result_folder


def predictions(rows: list[int], shape: tuple[int, int] = (5, 7)) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(row, rng.integers(0, 256, size=shape, dtype=np.uint8)) for row in rows]


def test_round_trip_writes_the_contest_layout(tmp_path: Path) -> None:
    items = predictions([3, 0, 12])
    metadata = {"nparams": 2_469_696, "nflops": 10, "backbone": {"name": "alexnet"}, "decoder": "linear",
                "lineage": ["features:v1", "decoder:v2"]}
    out = write_result_folder(tmp_path / "result", items, metadata)

    assert out == tmp_path / "result"
    assert json.loads((out / "paths.json").read_text()) == {
        "output": {"0": "outputs/00000.png", "3": "outputs/00003.png", "12": "outputs/00012.png"}
    }
    assert list(json.loads((out / "paths.json").read_text())["output"]) == ["0", "3", "12"], "in row order"
    assert pd.read_json(out / "paths.json").index.tolist() == [0, 3, 12]
    folder = read_result_folder(out)
    assert folder.root == out
    assert list(folder.outputs) == [0, 3, 12]
    assert folder.metadata == metadata
    for row, values in items:
        assert folder.outputs[row] == out / "outputs" / f"{row:05d}.png"
        with Image.open(folder.outputs[row]) as image:
            assert image.mode == "L"
            assert image.size == (7, 5)
            assert np.array_equal(np.asarray(image), values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_read_accepts_the_paths_json_file_itself(tmp_path: Path) -> None:
    out = write_result_folder(tmp_path / "result", predictions([0]), {})
    assert read_result_folder(out / "paths.json").outputs == {0: out / "outputs" / "00000.png"}


def test_read_accepts_pandas_to_json_with_any_file_naming(tmp_path: Path) -> None:
    root = tmp_path / "other"
    (root / "x" / "y").mkdir(parents=True)
    pd.DataFrame({"output": ["x/y/first.png", "x/y/second.png"]}, index=[4, 9]).to_json(root / "paths.json")
    folder = read_result_folder(root)
    assert folder.outputs == {4: root / "x/y/first.png", 9: root / "x/y/second.png"}
    assert folder.metadata is None


def test_existing_non_empty_folder_is_refused_and_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "result"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FeatstoreError, match=f"{re.escape(str(out))}.*not empty"):
        write_result_folder(out, predictions([0]), {})
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_a_buffer_reused_by_the_producer_is_written_as_it_was_yielded(tmp_path: Path) -> None:
    def stream() -> Iterator[tuple[int, np.ndarray]]:
        buffer = np.zeros((3, 3), dtype=np.uint8)
        for row in range(50):
            buffer[:] = row
            yield row, buffer

    folder = read_result_folder(write_result_folder(tmp_path / "result", stream(), {}, workers=2))
    for row, png in folder.outputs.items():
        with Image.open(png) as image:
            assert np.all(np.asarray(image) == row)


def test_existing_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "result").mkdir()
    out = write_result_folder(tmp_path / "result", predictions([0]), {})
    assert list(read_result_folder(out).outputs) == [0]


def test_overwrite_replaces_the_old_folder(tmp_path: Path) -> None:
    out = write_result_folder(tmp_path / "result", predictions([0, 1]), {"version": 1})
    write_result_folder(out, predictions([5]), {"version": 2}, overwrite=True)
    folder = read_result_folder(out)
    assert list(folder.outputs) == [5]
    assert folder.metadata == {"version": 2}
    assert sorted(p.name for p in (out / "outputs").iterdir()) == ["00005.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


def test_a_failing_prediction_stream_leaves_no_folder(tmp_path: Path) -> None:
    def stream() -> Iterator[tuple[int, np.ndarray]]:
        yield from predictions(list(range(40)))
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError, match="model crashed"):
        write_result_folder(tmp_path / "result", stream(), {}, workers=2)
    assert list(tmp_path.iterdir()) == []


def test_a_failing_overwrite_keeps_the_old_folder(tmp_path: Path) -> None:
    out = write_result_folder(tmp_path / "result", predictions([0]), {"version": 1})

    def stream() -> Iterator[tuple[int, np.ndarray]]:
        yield from predictions([1, 2])
        raise RuntimeError("model crashed")

    with pytest.raises(RuntimeError):
        write_result_folder(out, stream(), {"version": 2}, overwrite=True)
    assert read_result_folder(out).metadata == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result"]


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ((0, np.zeros((4, 4), dtype=np.float32)), "uint8"),
        ((0, np.zeros((4, 4, 3), dtype=np.uint8)), "uint8"),
        ((-1, np.zeros((4, 4), dtype=np.uint8)), "non-negative"),
        (("0", np.zeros((4, 4), dtype=np.uint8)), "non-negative"),
    ],
)
def test_bad_predictions_are_refused_and_leave_nothing(tmp_path: Path, item: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_result_folder(tmp_path / "result", [item], {})
    assert list(tmp_path.iterdir()) == []


def test_duplicate_rows_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="row 2 was given twice"):
        write_result_folder(tmp_path / "result", predictions([2, 2]), {})
    assert list(tmp_path.iterdir()) == []


def test_unserializable_metadata_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_result_folder(tmp_path / "result", predictions([0]), {"path": Path("x")})
    assert list(tmp_path.iterdir()) == []


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FeatstoreError, match=re.escape(f"{tmp_path / 'nope'} does not exist")):
        read_result_folder(tmp_path / "nope")


def test_a_file_that_is_not_paths_json_is_refused(tmp_path: Path) -> None:
    out = write_result_folder(tmp_path / "result", predictions([0]), {})
    with pytest.raises(FeatstoreError, match="is a file, not a result folder"):
        read_result_folder(out / "outputs" / "00000.png")


def test_missing_paths_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(FeatstoreError, match=re.escape(f"{tmp_path / 'paths.json'} is missing")):
        read_result_folder(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('["outputs/00000.png"]', 'no "output" mapping'),
        ('{"raw": {"0": "a/00000.jpg"}}', 'no "output" mapping'),
        ('{"output": ["outputs/00000.png"]}', 'no "output" mapping'),
        ('{"output": {"first": "outputs/00000.png"}}', "'first' is not a row index"),
        ('{"output": {"-1": "outputs/00000.png"}}', "'-1' is not a row index"),
        ('{"output": {"0": null}}', "row 0 has no PNG path"),
        ('{"output": {"0": "a.png", "0": "b.png"}}', "repeats the key '0'"),
        ('{"output": {"0": "a.png", "00": "b.png"}}', "lists row 0 twice"),
    ],
)
def test_malformed_paths_json_is_refused_by_name(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "paths.json").write_text(content)
    with pytest.raises(FeatstoreError) as caught:
        read_result_folder(tmp_path)
    assert str(tmp_path / "paths.json") in str(caught.value)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("content", ["{oops", "[1, 2]"])
def test_malformed_metadata_json_is_refused_by_name(tmp_path: Path, content: str) -> None:
    (tmp_path / "paths.json").write_text('{"output": {"0": "a.png"}}')
    (tmp_path / "metadata.json").write_text(content)
    with pytest.raises(FeatstoreError, match=re.escape(str(tmp_path / "metadata.json"))):
        read_result_folder(tmp_path)


def test_the_result_folder_follows_the_umask_like_any_new_file(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        out = write_result_folder(tmp_path / "result", predictions([0, 1]), {"nparams": 1})
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "outputs").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "paths.json").stat().st_mode) == 0o644
