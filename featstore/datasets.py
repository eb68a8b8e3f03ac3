"""Input datasets: a DAVIS folder or a contest ``paths.json``, validated up front and addressed by row.

The row index of ``paths.json`` is the identity of a frame everywhere downstream (results are keyed by
it), so every layout is reduced to the same table of ``FrameRecord`` rows. All validation happens here,
before any job writes anything, and every problem is reported as one line naming the file and the fix.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import TypeVar

import numpy as np
from PIL import Image, UnidentifiedImageError

from featstore.errors import DatasetError

__all__ = [
    "DEMO_NAME",
    "Dataset",
    "FrameRecord",
    "load_dataset",
    "read_frame",
    "read_mask",
]

DEMO_NAME = "demo"
PATHS_FILE = "paths.json"
DAVIS_RESOLUTION = "480p"
MASK_MODES = ("L", "P", "1")

_FRAME_NAME = re.compile(r"^(\d{5})\.([A-Za-z0-9]+)$")
# Files that file managers drop into folders of images, ignored like dotfiles.
_SYSTEM_FILES = ("thumbs.db", "desktop.ini")
_IO_THREADS = min(16, 2 * (os.cpu_count() or 1))
_DIGEST_FORMAT = "featstore-dataset-digest-v1"

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


@dataclass(frozen=True)
class FrameRecord:
    """One frame of one clip, addressed by its row in the dataset's frame table."""

    row: int
    clip: str
    frame: int
    raw: Path
    annotation: Path | None


@dataclass(frozen=True)
class Dataset:
    """A validated frame table; frames are sorted by row."""

    name: str
    root: Path
    frames: tuple[FrameRecord, ...]
    has_annotations: bool
    _digest: str | None = field(default=None, init=False, repr=False, compare=False)
    _clips: dict[str, tuple[FrameRecord, ...]] | None = field(default=None, init=False, repr=False, compare=False)

    def clips(self) -> Mapping[str, tuple[FrameRecord, ...]]:
        """Frames grouped by clip: clips in sorted order, frames sorted by frame number. Computed once."""
        by_clip = self._clips
        if by_clip is None:
            grouped: dict[str, list[FrameRecord]] = {}
            for record in self.frames:
                grouped.setdefault(record.clip, []).append(record)
            by_clip = {clip: tuple(sorted(grouped[clip], key=lambda r: r.frame)) for clip in sorted(grouped)}
            object.__setattr__(self, "_clips", by_clip)  # frozen dataclass: the cache is set past __setattr__
        return MappingProxyType(by_clip)  # read-only: every caller shares the one grouping

    def digest(self) -> str:
        """sha256 of the frame table and the bytes of every file: the dataset's content identity.

        It does not depend on where the files live or which layout listed them, so the same frames
        behind a DAVIS folder and behind a ``paths.json`` share cached features. Computed once.
        """
        digest = self._digest
        if digest is None:
            digest = _content_digest(self.frames)
            object.__setattr__(self, "_digest", digest)  # frozen dataclass: the cache is set past __setattr__
        return digest

    def subset(self, clips: Sequence[str]) -> Dataset:
        """The rows of the given clips, keeping their row numbers (results stay keyed by row)."""
        wanted = set(clips)
        known = {record.clip for record in self.frames}
        unknown = sorted(wanted - known)
        if unknown:
            raise DatasetError(
                f"{self.root}: no clip named {', '.join(unknown)} in dataset {self.name!r}; "
                f"choose from {', '.join(sorted(known))}"
            )
        if not wanted:
            raise DatasetError(
                f"{self.root}: an empty clip selection gives an empty dataset; name at least one clip"
            )
        frames = tuple(record for record in self.frames if record.clip in wanted)
        return Dataset(
            name=self.name,
            root=self.root,
            frames=frames,
            has_annotations=all(record.annotation is not None for record in frames),
        )


def load_dataset(path: str | Path | None, *, demo_root: Path | None = None) -> Dataset:
    """Load and validate a DAVIS folder, a contest folder or its ``paths.json``, or (``None``) the demo.

    A folder holding ``paths.json`` is read through it even if it also has ``JPEGImages/``, because its
    row index is the frame identity the contest uses. Raises ``DatasetError`` before anything is written.
    """
    if path is None:
        if demo_root is None:
            raise DatasetError(
                "no dataset given and no place for the demo dataset: pass --data PATH "
                "(a DAVIS folder or a paths.json) or a store to generate the demo into"
            )
        from featstore.demo import generate_demo

        root = generate_demo(Path(demo_root))
        return _finish(_scan_davis(Path(root).absolute(), DEMO_NAME))

    given = Path(path).expanduser().absolute()
    if not given.exists():
        raise DatasetError(f"{given}: no such file or folder; pass a DAVIS folder or a contest paths.json")
    if given.is_file():
        if given.suffix.lower() != ".json":
            raise DatasetError(
                f"{given}: not a dataset; pass a DAVIS folder (JPEGImages/{DAVIS_RESOLUTION}/<clip>/<NNNNN>.jpg) "
                f"or a contest {PATHS_FILE} (a pandas to_json table, under any name ending in .json)"
            )
        return _finish(_read_paths_json(given))
    if (given / PATHS_FILE).is_file():
        return _finish(_read_paths_json(given / PATHS_FILE))
    if (given / "JPEGImages").is_dir():
        return _finish(_scan_davis(given, given.name))
    nearby = _datasets_near(given)
    hint = f"did you mean {' or '.join(map(str, nearby))}? " if nearby else ""
    raise DatasetError(
        f"{given}: not a dataset (no {PATHS_FILE} and no JPEGImages/ folder); {hint}pass a DAVIS folder "
        f"(JPEGImages/{DAVIS_RESOLUTION}/<clip>/<NNNNN>.jpg) or a contest {PATHS_FILE}"
    )


def _is_dataset_folder(folder: Path) -> bool:
    return (folder / PATHS_FILE).is_file() or (folder / "JPEGImages").is_dir()


def _datasets_near(folder: Path) -> list[Path]:
    """Dataset folders a mistyped ``--data`` probably meant: the one it lies inside (a clip or
    ``JPEGImages/480p`` given for the DAVIS root), else those directly below it (the root's parent given)."""
    for ancestor in list(folder.parents)[:3]:
        if _is_dataset_folder(ancestor):
            return [ancestor]
    try:
        children = sorted(child for child in folder.iterdir() if child.is_dir() and _is_dataset_folder(child))
    except OSError:
        return []
    return children[:3]


def read_frame(path: Path) -> np.ndarray:
    """The frame as an (H, W, 3) uint8 RGB array."""
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(
            f"{path}: cannot read frame ({_reason(exc)}); replace it with a valid JPEG or PNG"
        ) from exc


def read_mask(path: Path) -> np.ndarray:
    """The mask as an (H, W) uint8 array in {0, 1}: round(v / 255) of its greyscale value.

    Palette masks (DAVIS 2017 style) hold object indices, not grey levels: any index above 0 is object.
    """
    try:
        with Image.open(path) as image:
            if image.mode not in MASK_MODES:
                raise DatasetError(_bad_mask_mode(Path(path), image.mode))
            if image.mode == "P":
                return (np.asarray(image) > 0).astype(np.uint8)
            grey = np.asarray(image.convert("L"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DatasetError(
            f"{path}: cannot read mask ({_reason(exc)}); replace it with an 8-bit greyscale PNG"
        ) from exc
    # round(v / 255) for integer v in [0, 255] is exactly v >= 128 (no value sits on the .5 boundary).
    return (grey >= 128).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------
# Layouts


@dataclass(frozen=True)
class _Listing:
    """Rows as listed by a layout, before the files themselves are checked."""

    name: str
    root: Path
    source: Path  # the file or folder to name when the table itself is at fault
    frames: tuple[FrameRecord, ...]


def _read_paths_json(paths_file: Path) -> _Listing:
    """Parse a pandas ``to_json`` (default orientation) frame table; paths are relative to its folder."""
    root = paths_file.parent
    fix = 'write it with pandas DataFrame.to_json() as {"raw": {"0": "<clip>/<NNNNN>.jpg", ...}, "annotation": {...}}'
    # The json module rather than pd.read_json: pandas coerces values and index labels, which would hide
    # malformed rows and could reorder or renumber the identity column.
    try:
        table = json.loads(paths_file.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DatasetError(f"{paths_file}: malformed {PATHS_FILE} ({_reason(exc)}); {fix}") from exc
    if not isinstance(table, dict) or not isinstance(table.get("raw"), dict):
        raise DatasetError(f'{paths_file}: malformed {PATHS_FILE} (no "raw" column); {fix}')
    raw_column = _column(paths_file, table, "raw", fix)
    annotation_column = _column(paths_file, table, "annotation", fix) if "annotation" in table else None
    if not raw_column:
        raise DatasetError(f'{paths_file}: empty dataset (no rows in "raw"); list at least one frame')
    if annotation_column is not None and set(annotation_column) != set(raw_column):
        stray = sorted(set(annotation_column) ^ set(raw_column))
        raise DatasetError(
            f'{paths_file}: "annotation" rows differ from "raw" rows (e.g. row {stray[0]}, '
            f"{len(stray)} in all); give both columns the same index"
        )

    frames = []
    for row in sorted(raw_column):
        raw_text = raw_column[row]
        if raw_text is None:
            raise DatasetError(f'{paths_file}: row {row} has no "raw" path; give every row a frame file')
        clip, frame = _clip_and_frame(paths_file, row, raw_text, "raw")
        annotation = None
        annotation_text = annotation_column.get(row) if annotation_column is not None else None
        if annotation_text is not None:
            annotation_clip, annotation_frame = _clip_and_frame(
                paths_file, row, annotation_text, "annotation"
            )
            if (annotation_clip, annotation_frame) != (clip, frame):
                raise DatasetError(
                    f"{paths_file}: row {row} pairs raw {raw_text!r} with annotation {annotation_text!r} "
                    f"(clip or frame differ); point both at the same <clip>/<NNNNN>"
                )
            annotation = _under(root, annotation_text)
        frames.append(
            FrameRecord(row=row, clip=clip, frame=frame, raw=_under(root, raw_text), annotation=annotation)
        )
    # A table under another name than paths.json is its own dataset beside the folder's paths.json.
    name = root.name if paths_file.name == PATHS_FILE else f"{root.name}-{paths_file.stem}"
    return _Listing(name=name, root=root, source=paths_file, frames=tuple(frames))


def _column(paths_file: Path, table: dict, name: str, fix: str) -> dict[int, str | None]:
    """One column as {row: path or None}; the index must be non-negative integer strings."""
    column = table[name]
    if not isinstance(column, dict):
        raise DatasetError(
            f'{paths_file}: malformed {PATHS_FILE} ("{name}" is not an index->path mapping); {fix}'
        )
    parsed: dict[int, str | None] = {}
    for key, value in column.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise DatasetError(
                f'{paths_file}: malformed {PATHS_FILE} ("{name}" index {key!r} is not a row number); {fix}'
            )
        if value is not None and not isinstance(value, str):
            raise DatasetError(
                f'{paths_file}: malformed {PATHS_FILE} ("{name}" row {key} is {value!r}, not a path); {fix}'
            )
        row = int(key)
        if row in parsed:
            raise DatasetError(f'{paths_file}: "{name}" lists row {row} twice; give every row one index')
        parsed[row] = value
    return parsed


def _clip_and_frame(paths_file: Path, row: int, text: str, column: str) -> tuple[str, int]:
    """Clip (parent folder) and frame number (5-digit stem) of a listed path."""
    parts = PurePosixPath(text.replace("\\", "/")).parts
    match = _FRAME_NAME.match(parts[-1]) if parts else None
    if match is None or len(parts) < 2 or parts[-2] in ("", ".", "..", "/"):
        raise DatasetError(
            f"{paths_file}: row {row} {column} path {text!r} does not end in <clip>/<NNNNN>.<ext>; "
            f"rename the file or fix the path"
        )
    return parts[-2], int(match.group(1))


def _under(root: Path, text: str) -> Path:
    """Absolute path of a listed path, relative to the folder holding paths.json."""
    return root / PurePosixPath(text.replace("\\", "/"))


def _scan_davis(root: Path, name: str) -> _Listing:
    """Rows 0..N-1 in (clip, frame) order from ``JPEGImages/480p`` and ``Annotations/480p``."""
    raw_dir = root / "JPEGImages" / DAVIS_RESOLUTION
    annotation_dir = root / "Annotations" / DAVIS_RESOLUTION
    if not raw_dir.is_dir():
        raise DatasetError(
            f"{raw_dir}: missing; a DAVIS folder keeps its frames in JPEGImages/{DAVIS_RESOLUTION}/<clip>/<NNNNN>.jpg"
        )
    raws = _scan_clip_folders(raw_dir)
    annotations = _scan_clip_folders(annotation_dir) if annotation_dir.is_dir() else {}
    orphans = sorted(set(annotations) - set(raws))
    if orphans:
        mask = annotations[orphans[0]]
        raise DatasetError(
            f"{mask}: mask without a frame ({len(orphans)} in all); add "
            f"{raw_dir / orphans[0][0] / f'{orphans[0][1]:05d}.jpg'} or remove the mask"
        )
    frames = tuple(
        FrameRecord(
            row=row, clip=clip, frame=frame, raw=raws[clip, frame], annotation=annotations.get((clip, frame))
        )
        for row, (clip, frame) in enumerate(sorted(raws))
    )
    return _Listing(name=name, root=root, source=raw_dir, frames=frames)


def _scan_clip_folders(folder: Path) -> dict[tuple[str, int], Path]:
    """{(clip, frame): file} for ``folder/<clip>/<NNNNN>.<ext>``; dotfiles are ignored."""
    found: dict[tuple[str, int], Path] = {}
    for clip_entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if clip_entry.name.startswith("."):
            continue
        if not clip_entry.is_dir():
            raise DatasetError(
                f"{clip_entry.path}: stray file among clip folders; move it into a <clip>/ folder or delete it"
            )
        for entry in sorted(os.scandir(clip_entry.path), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name.lower() in _SYSTEM_FILES:
                continue
            match = _FRAME_NAME.match(entry.name)
            if match is None:
                raise DatasetError(
                    f"{entry.path}: not named <NNNNN>.<ext> (5-digit frame number); rename or remove it"
                )
            if entry.is_symlink() and not os.path.exists(entry.path):
                raise DatasetError(
                    f"{entry.path}: frame does not exist (a link to {os.readlink(entry.path)}, which is missing); "
                    "restore its target or remove the link"
                )
            if not entry.is_file():
                raise DatasetError(f"{entry.path}: a folder where a frame file belongs; move it out of {clip_entry.path}")
            key = (clip_entry.name, int(match.group(1)))
            if key in found:
                raise DatasetError(
                    f"{entry.path}: duplicate frame {key[1]} of clip {key[0]!r} (also {found[key].name}); keep one"
                )
            found[key] = Path(entry.path)
    return found


# ----------------------------------------------------------------------------------------------------
# Validation and digest


def _artifact_name(folder_name: str) -> str:
    """The dataset's name in artifact names, which allow letters, digits, '.', '_' and '-':
    ``my clips (v2)`` becomes ``my-clips-v2``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", folder_name).strip("-._") or "dataset"


def _finish(listing: _Listing) -> Dataset:
    """Check the table and the files' headers, then freeze it into a Dataset."""
    if not listing.frames:
        raise DatasetError(f"{listing.source}: empty dataset (no frames); add <clip>/<NNNNN>.jpg frames")
    seen: dict[tuple[str, int], int] = {}
    for record in listing.frames:
        key = (record.clip, record.frame)
        if key in seen:
            raise DatasetError(
                f"{listing.source}: rows {seen[key]} and {record.row} are both frame {record.frame} of clip "
                f"{record.clip!r}; remove the duplicate row"
            )
        seen[key] = record.row

    raw_headers = _threaded(_header, [record.raw for record in listing.frames])
    mask_headers = _threaded(_header, [record.annotation for record in listing.frames])
    unreadable = sum(isinstance(header, str) for header in raw_headers + mask_headers)
    first_of_clip: dict[str, tuple[FrameRecord, tuple[int, int]]] = {}
    for record, raw_header, mask_header in zip(listing.frames, raw_headers, mask_headers, strict=True):
        _check_frame_files(listing.source, record, raw_header, mask_header, unreadable)
        assert isinstance(raw_header, tuple)
        first, size = first_of_clip.setdefault(record.clip, (record, raw_header[0]))
        if raw_header[0] != size:  # a clip is one array of frames: its features need one size
            raise DatasetError(
                f"{record.raw}: frame is {raw_header[0][0]}x{raw_header[0][1]} but clip {record.clip!r} starts at "
                f"{size[0]}x{size[1]} ({first.raw}); resize it to its clip's size or {_removal(listing.source, 'mask')}"
            )

    return Dataset(
        name=_artifact_name(listing.name),
        root=listing.root,
        frames=listing.frames,
        has_annotations=all(record.annotation is not None for record in listing.frames),
    )


def _removal(source: Path, partner: str) -> str:
    """How to drop a frame from the dataset ``source`` names: its row of paths.json, or its DAVIS files."""
    if source.is_file():  # a contest table
        return f"remove its row from {source}"
    return f"delete it and its {partner}" if partner else "delete it"


def _header(path: Path | None) -> tuple[tuple[int, int], str] | str | None:
    """(size, mode) from the image header without decoding pixels; a reason string if unreadable."""
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            if not _ends_with_its_end_marker(path, image.format):
                image.load()  # decodes: refuses a file cut short, accepts one with data after its end marker
            return image.size, image.mode
    except FileNotFoundError:
        return "does not exist"
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        return f"not a readable image: {_reason(exc)}"


# The last bytes of a whole file: JPEG's end-of-image marker, PNG's IEND chunk type and its CRC.
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
TAIL_BYTES = 64  # read from a file's end to find its marker, past any zero padding an encoder left


def has_end_marker(tail: bytes, image_format: str | None) -> bool:
    """Whether a file ending in ``tail`` (its last ``TAIL_BYTES``) ends in its format's end marker, zero
    padding aside; formats other than JPEG and PNG are assumed whole.

    Decoders read a file cut short (a partial copy or download) in different ways: PIL names it, nvJPEG
    may decode it to garbage, and a header alone passes it.
    """
    marker = _END_MARKERS.get(image_format or "")
    return marker is None or tail.rstrip(b"\x00").endswith(marker)


def _ends_with_its_end_marker(path: Path, image_format: str | None) -> bool:
    """``has_end_marker`` of a file on disk: one small read, so only files without the marker are decoded
    in full when a dataset is checked."""
    if _END_MARKERS.get(image_format or "") is None:
        return True
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        handle.seek(max(0, handle.tell() - TAIL_BYTES))
        return has_end_marker(handle.read(), image_format)


def _check_frame_files(
    source: Path,
    record: FrameRecord,
    raw_header: tuple[tuple[int, int], str] | str | None,
    mask_header: tuple[tuple[int, int], str] | str | None,
    unreadable: int,
) -> None:
    where = f"row {record.row}, clip {record.clip!r}, frame {record.frame}"
    if unreadable > 1:
        where += f"; {unreadable} files unreadable in all"
    if isinstance(raw_header, str) or raw_header is None:
        raise DatasetError(f"{record.raw}: frame {raw_header} ({where}); restore the file or {_removal(source, 'mask')}")
    if record.annotation is None or mask_header is None:
        return
    if isinstance(mask_header, str):
        raise DatasetError(
            f"{record.annotation}: mask {mask_header} ({where}); restore the file or {_removal(source, 'frame')}"
        )
    (raw_size, _), (mask_size, mask_mode) = raw_header, mask_header
    if mask_mode not in MASK_MODES:
        raise DatasetError(_bad_mask_mode(record.annotation, mask_mode))
    if mask_size != raw_size:
        raise DatasetError(
            f"{record.annotation}: mask is {mask_size[0]}x{mask_size[1]} but its frame {record.raw} is "
            f"{raw_size[0]}x{raw_size[1]}; resize or replace the mask to match its frame"
        )


def _content_digest(frames: Iterable[FrameRecord]) -> str:
    """sha256 over "row clip frame sha256(raw) sha256(annotation)" lines, files hashed in parallel."""
    records = list(frames)
    files: list[Path | None] = [record.raw for record in records]
    files += [record.annotation for record in records]
    hashes = _threaded(_file_sha256, files)
    raw_hashes, annotation_hashes = hashes[: len(records)], hashes[len(records) :]
    canonical = hashlib.sha256(f"{_DIGEST_FORMAT}\n".encode())
    for record, raw_hash, annotation_hash in zip(records, raw_hashes, annotation_hashes, strict=True):
        line = f"{record.row}\t{record.clip}\t{record.frame:05d}\t{raw_hash}\t{annotation_hash or '-'}\n"
        canonical.update(line.encode())
    return canonical.hexdigest()


def _threaded(function: Callable[[_Item], _Result], items: Sequence[_Item]) -> list[_Result]:
    """``[function(item) for item in items]`` on a thread pool, in chunks so per-task overhead stays small.

    File reads, image header parsing and hashing release the GIL, so threads overlap the I/O.
    """
    chunk = max(1, -(-len(items) // (_IO_THREADS * 4)))
    chunks = [items[start : start + chunk] for start in range(0, len(items), chunk)]
    with ThreadPoolExecutor(max_workers=_IO_THREADS) as pool:
        results = pool.map(lambda part: [function(item) for item in part], chunks)
        return [result for part in results for result in part]


def _file_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        raise DatasetError(
            f"{path}: cannot read ({_reason(exc)}); restore the file and load the dataset again"
        ) from exc


def _bad_mask_mode(path: Path, mode: str) -> str:
    return f"{path}: mask has image mode {mode}, not greyscale; save it as an 8-bit greyscale PNG (mode L, 0/255)"


def _reason(exc: BaseException) -> str:
    """An exception as a short single line, for embedding in a one-line error."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text.strip()
