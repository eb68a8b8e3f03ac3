"""The contest result folder: ``paths.json`` mapping dataset row index to an 8-bit greyscale PNG.

Layout written here (any other tool's folder is read as long as its ``paths.json`` has the same shape)::

    paths.json      {"output": {"<row index>": "outputs/<NNNNN>.png", ...}}   (pandas to_json layout)
    metadata.json   nparams, nflops, backbone, decoder, lineage: whatever the producer records
    outputs/<NNNNN>.png   mode L, the frame's size, value = round(255 * probability)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from featstore.errors import FeatstoreError
from featstore.store import hidden_sibling

PATHS_FILE = "paths.json"
METADATA_FILE = "metadata.json"
OUTPUTS_DIR = "outputs"
_PATHS_EXAMPLE = '{"output": {"0": "outputs/00000.png", ...}}'


@dataclass(frozen=True)
class ResultFolder:
    """A parsed result folder: where each row's PNG is, and the producer's metadata if it wrote any."""

    root: Path
    outputs: dict[int, Path]  # row index -> absolute PNG path, sorted by row
    metadata: dict[str, Any] | None


def output_name(row: int) -> str:
    """Relative path of a row's PNG inside a result folder: the row index zero-padded to 5 digits."""
    return f"{OUTPUTS_DIR}/{row:05d}.png"


def write_result_folder(
    out_dir: Path | str,
    predictions: Iterable[tuple[int, npt.NDArray[np.uint8]]],
    metadata: dict[str, Any],
    *,
    overwrite: bool = False,
    workers: int | None = None,
) -> Path:
    """Write (row index, uint8 HxW array) predictions as a result folder; returns its path.

    The folder appears only once every PNG, ``paths.json`` and ``metadata.json`` are written: everything
    goes into a hidden temporary sibling first, which is renamed into place. An existing non-empty
    ``out_dir`` is refused unless ``overwrite``, which swaps the new folder in and then deletes the old one.
    PNGs are encoded in a thread pool (Pillow releases the GIL while compressing) with a bounded number of
    frames in flight, so memory stays flat however many frames stream in.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    _check_destination(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(out_dir, ".partial")
    staging.mkdir()
    try:
        rows = _write_pngs(staging, predictions, workers)
        # In row order, as pandas' to_json writes an index: sorted keys would put "10" before "2".
        paths = {"output": {str(row): output_name(row) for row in sorted(rows)}}
        _write_json(staging / PATHS_FILE, paths, sort_keys=False)
        _write_json(staging / METADATA_FILE, metadata)
        _move_into_place(staging, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FeatstoreError(f"{out_dir} exists and is not a folder; choose another --out for the result")
    if _is_non_empty_dir(out_dir) and not overwrite:
        raise FeatstoreError(
            f"{out_dir} already exists and is not empty; choose another --out, or delete it first"
        )


def _is_non_empty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _write_pngs(
    staging: Path, predictions: Iterable[tuple[int, npt.NDArray[np.uint8]]], workers: int | None
) -> set[int]:
    (staging / OUTPUTS_DIR).mkdir()
    workers = workers or min(8, (os.cpu_count() or 1) + 2)
    max_in_flight = 2 * workers
    rows: set[int] = set()
    pending: deque[Future[None]] = deque()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="png-encode")
    try:
        for item_row, values in predictions:
            row = _check_prediction(item_row, values, rows)
            rows.add(row)
            # a copy, because producers often reuse one buffer per batch while the encode is still queued
            pending.append(pool.submit(_save_png, staging / output_name(row), values.copy()))
            while len(pending) >= max_in_flight:
                pending.popleft().result()
        while pending:
            pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


def _check_prediction(row: Any, values: Any, seen: set[int]) -> int:
    if isinstance(row, bool) or not isinstance(row, int | np.integer) or row < 0:
        raise ValueError(f"row index must be a non-negative int, got {row!r}")
    row = int(row)
    if row in seen:
        raise ValueError(f"row {row} was given twice; each frame of the dataset has one prediction")
    if not isinstance(values, np.ndarray) or values.dtype != np.uint8 or values.ndim != 2:
        got = f"{values.dtype} {values.shape}" if isinstance(values, np.ndarray) else type(values).__name__
        raise ValueError(
            f"row {row}: need a uint8 (H, W) array of round(255 * probability) "
            f"(see featstore.metrics.probability_to_u8), got {got}"
        )
    return row


def _save_png(path: Path, values: npt.NDArray[np.uint8]) -> None:
    Image.fromarray(values).save(path, format="PNG")


def _write_json(path: Path, payload: Any, *, sort_keys: bool = True) -> None:
    with path.open("w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=sort_keys, allow_nan=False)
        f.write("\n")


def _move_into_place(staging: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename the finished folder into place; when replacing, set the old one aside until the swap is done."""
    if not _is_non_empty_dir(out_dir):
        try:
            os.replace(staging, out_dir)  # onto nothing, or onto an empty folder
        except OSError as exc:
            raise FeatstoreError(
                f"cannot move the result into {out_dir}: {exc.strerror}; choose another --out"
            ) from exc
        return
    if not overwrite:
        raise FeatstoreError(f"{out_dir} appeared while the result was being written; choose another --out")
    aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
    os.replace(out_dir, aside / out_dir.name)
    try:
        os.replace(staging, out_dir)
    except BaseException:
        os.replace(aside / out_dir.name, out_dir)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def read_result_folder(path: Path | str) -> ResultFolder:
    """Parse a result folder (or its ``paths.json``); FeatstoreError naming the file when it is malformed.

    Only ``paths.json`` is required and its files may be named any way (relative to the folder holding
    it, or absolute); ``metadata.json`` is optional. Whether the PNGs exist and fit the dataset is checked by evaluation.
    """
    path = Path(path).expanduser().absolute()
    if path.is_file() and path.suffix != ".json":
        raise FeatstoreError(f"{path} is a file, not a result folder; pass the folder holding {PATHS_FILE}")
    paths_file = path if path.is_file() else path / PATHS_FILE
    root = paths_file.parent
    if not root.is_dir():
        raise FeatstoreError(f"result folder {root} does not exist; pass the folder holding {PATHS_FILE}")
    if not paths_file.is_file():
        raise FeatstoreError(
            f"{paths_file} is missing; a contest result folder holds {PATHS_FILE} = {_PATHS_EXAMPLE}"
        )
    table = _load_json(paths_file)
    output = table.get("output") if isinstance(table, dict) else None
    if not isinstance(output, dict):
        raise FeatstoreError(f"{paths_file} has no \"output\" mapping; expected {_PATHS_EXAMPLE}")
    outputs: dict[int, Path] = {}
    for key, rel in output.items():
        row = _parse_row(paths_file, key)
        if row in outputs:
            raise FeatstoreError(f"{paths_file} lists row {row} twice; keep one entry per dataset row")
        if not isinstance(rel, str) or not rel:
            raise FeatstoreError(f"{paths_file}: row {row} has no PNG path ({rel!r}); give every row a file")
        outputs[row] = root / rel
    metadata = _read_metadata(root / METADATA_FILE)
    return ResultFolder(root=root, outputs=dict(sorted(outputs.items())), metadata=metadata)


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FeatstoreError(f"{path} is not valid JSON ({exc}); rewrite it as {_PATHS_EXAMPLE}") from exc
    except _DuplicateKey as exc:
        raise FeatstoreError(f"{path} repeats the key {exc.args[0]!r}; keep one entry per key") from exc


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def _parse_row(paths_file: Path, key: str) -> int:
    if not (key.isascii() and key.isdigit()):
        raise FeatstoreError(
            f"{paths_file}: key {key!r} is not a row index; keys of \"output\" are the dataset's row indices"
        )
    return int(key)


def _read_metadata(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FeatstoreError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    if not isinstance(metadata, dict):
        raise FeatstoreError(f"{path} holds {type(metadata).__name__}, not a JSON object; fix or delete it")
    return metadata
