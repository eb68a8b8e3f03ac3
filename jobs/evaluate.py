"""Score any contest result folder against an annotated dataset with the contest's mean IoU.

The folder may come from any tool: only its ``paths.json`` (row index -> PNG) and the PNGs themselves
are read. It must cover exactly the dataset's rows, with one 8-bit greyscale PNG of the frame's size
per row; anything else is refused before a score is reported, because a partial score would mislead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from featstore.datasets import Dataset, FrameRecord, load_dataset, read_mask
from featstore.errors import FeatstoreError
from featstore.metrics import ContestScore, Scores, frame_terms
from featstore.results import PATHS_FILE, ResultFolder, read_result_folder

PREDICTION_MODE = "L"
_SHOWN_ROWS = 5
_PROGRESS_MIN_FRAMES = 200


def evaluate(
    result_dir: Path | str,
    data: Dataset | Path | str,
    *,
    workers: int | None = None,
    progress: bool | None = None,
) -> Scores:
    """Contest scores of the result folder ``result_dir`` against the annotations of ``data``.

    ``data`` is anything ``load_dataset`` accepts, or an already loaded ``Dataset``. PNGs are decoded in a
    thread pool (Pillow and numpy release the GIL). ``progress`` forces the stderr progress bar on or off;
    by default it shows for large sets when stderr is a terminal.
    """
    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    if not dataset.has_annotations:
        missing = sum(record.annotation is None for record in dataset.frames)
        raise FeatstoreError(
            f"{dataset.root}: evaluation needs annotations, but {missing} of {len(dataset.frames)} frames have "
            f"none; pass a dataset with an \"annotation\" column (or Annotations/480p/ masks)"
        )
    result = read_result_folder(result_dir)
    _check_rows(result, dataset)
    _check_files_exist(result)

    score = ContestScore()
    # tqdm's disable=None hides the bar when stderr is not a terminal.
    if progress is None:
        disable: bool | None = None if len(dataset.frames) >= _PROGRESS_MIN_FRAMES else True
    else:
        disable = not progress
    with (
        ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evaluate") as pool,
        tqdm(total=len(dataset.frames), desc="evaluate", unit="frame", file=sys.stderr, disable=disable) as bar,
    ):
        terms: Iterator[tuple[int, int]] = pool.map(
            lambda record: _score_frame(record, result.outputs[record.row]), dataset.frames
        )
        for record, (intersection, union) in zip(dataset.frames, terms, strict=True):
            score.add_terms(record.clip, intersection, union)
            bar.update()
    return score.result()


def _check_rows(result: ResultFolder, dataset: Dataset) -> None:
    paths_file = result.root / PATHS_FILE
    expected = {record.row for record in dataset.frames}
    missing = sorted(expected - result.outputs.keys())
    if missing:
        raise FeatstoreError(
            f"{paths_file} misses {len(missing)} of the {len(expected)} rows of dataset {dataset.name!r} "
            f"({_first(missing)}); predict every frame of the dataset the result is scored against"
        )
    extra = sorted(result.outputs.keys() - expected)
    if extra:
        raise FeatstoreError(
            f"{paths_file} has {len(extra)} {'row' if len(extra) == 1 else 'rows'} that dataset "
            f"{dataset.name!r} does not have ({_first(extra)}); evaluate against the dataset the result was "
            f"predicted for"
        )


def _check_files_exist(result: ResultFolder) -> None:
    absent = [(row, path) for row, path in result.outputs.items() if not path.is_file()]
    if absent:
        row, path = absent[0]
        raise FeatstoreError(
            f"{path}: prediction PNG for row {row} is missing ({len(absent)} missing in all); "
            f"write it or fix its path in {result.root / PATHS_FILE}"
        )


def _first(rows: list[int]) -> str:
    """'row 7' or 'rows 1, 2, 3, 4, 5, ...': the first few of a list of row indices."""
    shown = ", ".join(str(row) for row in rows[:_SHOWN_ROWS])
    return ("row " if len(rows) == 1 else "rows ") + shown + (", ..." if len(rows) > _SHOWN_ROWS else "")


def _score_frame(record: FrameRecord, png: Path) -> tuple[int, int]:
    """(intersection, union) of one frame, after checking its PNG is 8-bit greyscale of the frame's size."""
    assert record.annotation is not None  # guaranteed by has_annotations
    target = read_mask(record.annotation)  # the dataset checked that masks have their frame's size
    try:
        with Image.open(png) as image:
            if image.mode != PREDICTION_MODE:
                raise FeatstoreError(
                    f"{png}: prediction PNG has image mode {image.mode}, not L; save it as 8-bit greyscale "
                    f"(mode L) holding round(255 x probability)"
                )
            frame_size = (target.shape[1], target.shape[0])
            if image.size != frame_size:
                raise FeatstoreError(
                    f"{png}: prediction is {image.size[0]}x{image.size[1]} but frame {record.raw} is "
                    f"{frame_size[0]}x{frame_size[1]}; predict at the frame's size"
                )
            pred = np.asarray(image, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FeatstoreError(
            f"{png}: cannot read prediction PNG ({reason}); rewrite it as an 8-bit greyscale PNG"
        ) from exc
    return frame_terms(pred, target)
