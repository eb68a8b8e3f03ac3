"""Dataset loading, validation, digests and pixel reading, on real image files written per test."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from featstore.datasets import Dataset, load_dataset, read_frame, read_mask
from featstore.errors import DatasetError

DAVIS_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016-dev"
SIZE = (40, 24)  # (width, height) of the frames written by these tests


def write_frame(path: Path, seed: int, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_mask(path: Path, seed: int, size: tuple[int, int] = SIZE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.random.default_rng(seed).random((size[1], size[0])) > 0.5
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def make_davis(root: Path, clips: dict[str, list[int]], masks: bool = True) -> Path:
    """A DAVIS folder with the given frame numbers per clip."""
    for index, (clip, frames) in enumerate(clips.items()):
        for frame in frames:
            write_frame(root / "JPEGImages" / "480p" / clip / f"{frame:05d}.jpg", seed=100 * index + frame)
            if masks:
                write_mask(
                    root / "Annotations" / "480p" / clip / f"{frame:05d}.png", seed=100 * index + frame
                )
    return root


def make_contest(
    root: Path, rows: dict[int, tuple[str, int]], prefix: str = "data", annotations: bool = True
) -> Path:
    """A contest folder: files under ``prefix`` and a pandas-written paths.json indexed by ``rows``."""
    table: dict[str, dict[int, str]] = {"raw": {}, "annotation": {}}
    for row, (clip, frame) in rows.items():
        raw = f"{prefix}/JPEGImages/{clip}/{frame:05d}.jpg"
        annotation = f"{prefix}/Annotations/{clip}/{frame:05d}.png"
        write_frame(root / raw, seed=row)
        table["raw"][row] = raw
        if annotations:
            write_mask(root / annotation, seed=row)
            table["annotation"][row] = annotation
    frame = pd.DataFrame({name: column for name, column in table.items() if column})
    (root / "paths.json").write_text(frame.to_json())
    return root


def edit_paths_json(root: Path, edit) -> None:
    table = json.loads((root / "paths.json").read_text())
    edit(table)
    (root / "paths.json").write_text(json.dumps(table))


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*")) if p.is_file()}


def refused(path: str | Path, *expected: str, **kwargs) -> str:
    """Load ``path``, expect a one-line DatasetError mentioning ``expected``, and check nothing was written."""
    watched = Path(path) if Path(path).is_dir() else Path(path).parent
    before = snapshot(watched) if watched.exists() else {}
    with pytest.raises(DatasetError) as caught:
        load_dataset(path, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    for text in expected:
        assert text in message, f"{text!r} not in {message!r}"
    if watched.exists():
        assert snapshot(watched) == before
    return message


# ----------------------------------------------------------------------------------------------------
# Layouts


def test_davis_folder_rows_follow_clip_then_frame_order(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "mini", {"zebra": [3, 0, 10], "alpha": [7, 2]})
    dataset = load_dataset(root)
    assert dataset.name == "mini"
    assert dataset.root == root
    assert dataset.has_annotations
    assert [(r.row, r.clip, r.frame) for r in dataset.frames] == [
        (0, "alpha", 2),
        (1, "alpha", 7),
        (2, "zebra", 0),
        (3, "zebra", 3),
        (4, "zebra", 10),
    ]
    first = dataset.frames[0]
    assert first.raw == root / "JPEGImages" / "480p" / "alpha" / "00002.jpg"
    assert first.annotation == root / "Annotations" / "480p" / "alpha" / "00002.png"
    assert first.raw.is_absolute()
    assert list(dataset.clips()) == ["alpha", "zebra"]


def test_davis_folder_with_some_masks_missing_has_no_full_annotations(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "mini", {"a": [0, 1, 2]})
    (root / "Annotations" / "480p" / "a" / "00001.png").unlink()
    dataset = load_dataset(root)
    assert not dataset.has_annotations
    assert [r.annotation is None for r in dataset.frames] == [False, True, False]


def test_davis_folder_without_annotations(tmp_path: Path) -> None:
    dataset = load_dataset(make_davis(tmp_path / "mini", {"a": [0, 1]}, masks=False))
    assert not dataset.has_annotations
    assert all(r.annotation is None for r in dataset.frames)


def test_paths_json_keeps_its_row_index_and_deep_prefixes(tmp_path: Path) -> None:
    rows = {12: ("cat", 1), 3: ("cat", 0), 40: ("bird", 5), 7: ("cat", 2)}
    root = make_contest(tmp_path / "contest", rows, prefix="a/b/c/d/JPEGs")
    dataset = load_dataset(root)
    assert dataset.name == "contest"
    assert dataset.root == root
    assert dataset.has_annotations
    assert [(r.row, r.clip, r.frame) for r in dataset.frames] == [
        (3, "cat", 0),
        (7, "cat", 2),
        (12, "cat", 1),
        (40, "bird", 5),
    ]
    assert dataset.frames[0].raw == root / "a/b/c/d/JPEGs/JPEGImages/cat/00000.jpg"
    assert dataset.frames[0].annotation == root / "a/b/c/d/JPEGs/Annotations/cat/00000.png"
    clips = dataset.clips()
    assert list(clips) == ["bird", "cat"]
    assert [(r.frame, r.row) for r in clips["cat"]] == [(0, 3), (1, 12), (2, 7)]


def test_paths_json_file_and_its_folder_load_the_same_dataset(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "contest", {0: ("a", 0), 1: ("a", 1)})
    assert load_dataset(root / "paths.json") == load_dataset(root)
    assert load_dataset(str(root)) == load_dataset(root)


def test_paths_json_without_annotation_column(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "test-phase", {0: ("a", 0), 1: ("b", 4)}, annotations=False)
    assert "annotation" not in json.loads((root / "paths.json").read_text())
    dataset = load_dataset(root / "paths.json")
    assert not dataset.has_annotations
    assert [(r.row, r.clip, r.frame, r.annotation) for r in dataset.frames] == [
        (0, "a", 0, None),
        (1, "b", 4, None),
    ]


def test_paths_json_null_annotation_leaves_that_row_unannotated(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "contest", {0: ("a", 0), 1: ("a", 1)})
    edit_paths_json(root, lambda t: t["annotation"].update({"1": None}))
    dataset = load_dataset(root)
    assert not dataset.has_annotations
    assert dataset.frames[0].annotation is not None
    assert dataset.frames[1].annotation is None


def test_paths_json_is_preferred_over_davis_folders_beside_it(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "both", {"a": [0, 1, 2]})
    table = pd.DataFrame({"raw": {5: "JPEGImages/480p/a/00002.jpg", 9: "JPEGImages/480p/a/00000.jpg"}})
    (root / "paths.json").write_text(table.to_json())
    dataset = load_dataset(root)
    assert [(r.row, r.frame) for r in dataset.frames] == [(5, 2), (9, 0)]
    assert not dataset.has_annotations


def test_subset_keeps_row_identity(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "c", {0: ("a", 0), 1: ("b", 0), 2: ("a", 1), 3: ("c", 0)})
    edit_paths_json(root, lambda t: t["annotation"].update({"3": None}))
    dataset = load_dataset(root)
    assert not dataset.has_annotations
    part = dataset.subset(["a", "b"])
    assert isinstance(part, Dataset)
    assert [(r.row, r.clip) for r in part.frames] == [(0, "a"), (1, "b"), (2, "a")]
    assert part.has_annotations
    assert part.digest() != dataset.digest()
    with pytest.raises(DatasetError, match="nope"):
        dataset.subset(["a", "nope"])


# ----------------------------------------------------------------------------------------------------
# Refusals: one line, names the file, writes nothing


def test_refuses_missing_path(tmp_path: Path) -> None:
    refused(tmp_path / "nowhere", str(tmp_path / "nowhere"), "no such")


def test_refuses_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "readme.txt").write_text("hello")
    refused(tmp_path / "junk", str(tmp_path / "junk"), "not a dataset")
    refused(tmp_path / "junk" / "readme.txt", "readme.txt", "not a dataset")


def test_a_folder_inside_or_above_a_dataset_names_the_dataset(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "datasets" / "davis", {"bear": [0, 1]})
    for inside in (root / "JPEGImages", root / "JPEGImages" / "480p", root / "JPEGImages" / "480p" / "bear"):
        refused(inside, f"did you mean {root}?")
    refused(tmp_path / "datasets", f"did you mean {root}?")
    (tmp_path / "elsewhere").mkdir()
    assert "did you mean" not in refused(tmp_path / "elsewhere", "not a dataset")


def test_a_contest_table_under_another_name_is_its_own_dataset(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "contest", {7: ("bear", 0), 3: ("bear", 1)})
    (root / "test-phase.json").write_text((root / "paths.json").read_text())
    renamed, original = load_dataset(root / "test-phase.json"), load_dataset(root / "paths.json")
    assert renamed.name == "contest-test-phase" and original.name == "contest"
    assert [(r.row, r.raw) for r in renamed.frames] == [(r.row, r.raw) for r in original.frames]
    (root / "broken.json").write_text("{}")
    refused(root / "broken.json", str(root / "broken.json"), 'no "raw" column')


def test_folder_names_become_valid_artifact_names(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "my clips (v2)", {"bear": [0]})
    assert load_dataset(root).name == "my-clips-v2"
    assert load_dataset(make_davis(tmp_path / "___", {"bear": [0]})).name == "dataset"


def test_refuses_demo_without_a_place_to_put_it() -> None:
    with pytest.raises(DatasetError, match="--data"):
        load_dataset(None)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '[{"raw": "a/00000.jpg"}]',
        '{"annotation": {"0": "a/00000.png"}}',
        '{"raw": ["a/00000.jpg"]}',
        '{"raw": {"first": "a/00000.jpg"}}',
        '{"raw": {"-1": "a/00000.jpg"}}',
        '{"raw": {"0": 17}}',
        '{"raw": {"0": "a/00000.jpg"}, "annotation": "a/00000.png"}',
    ],
)
def test_refuses_malformed_paths_json(tmp_path: Path, content: str) -> None:
    write_frame(tmp_path / "a" / "00000.jpg", seed=0)
    (tmp_path / "paths.json").write_text(content)
    refused(tmp_path, str(tmp_path / "paths.json"), "malformed", "to_json")


def test_refuses_empty_datasets(tmp_path: Path) -> None:
    (tmp_path / "contest").mkdir()
    (tmp_path / "contest" / "paths.json").write_text('{"raw": {}}')
    refused(tmp_path / "contest", str(tmp_path / "contest" / "paths.json"), "empty dataset")
    (tmp_path / "davis" / "JPEGImages" / "480p" / "clip").mkdir(parents=True)
    refused(tmp_path / "davis", str(tmp_path / "davis" / "JPEGImages" / "480p"), "empty dataset")


def test_refuses_missing_frame_naming_it(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "c", {0: ("a", 0), 1: ("a", 1), 2: ("a", 2)})
    missing = root / "data" / "JPEGImages" / "a" / "00001.jpg"
    missing.unlink()
    refused(root, str(missing), "does not exist", "row 1", "restore")


def test_refuses_missing_mask_listed_in_paths_json(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "c", {0: ("a", 0), 1: ("a", 1)})
    missing = root / "data" / "Annotations" / "a" / "00000.png"
    missing.unlink()
    refused(root, str(missing), "mask does not exist")


def test_refuses_unreadable_frame(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0, 1]})
    broken = root / "JPEGImages" / "480p" / "a" / "00001.jpg"
    broken.write_bytes(b"this is not a jpeg at all")
    message = refused(root, str(broken), "not a readable image", "delete it and its mask")
    assert "row from" not in message, "a DAVIS folder has no rows to remove"


@pytest.mark.parametrize("cut", ["JPEGImages/480p/a/00001.jpg", "Annotations/480p/a/00001.png"])
def test_refuses_a_file_cut_short_before_anything_decodes_it(tmp_path: Path, cut: str) -> None:
    """A partial copy passes a header check; its missing end marker gets it decoded, and refused, up front."""
    root = make_davis(tmp_path / "d", {"a": [0, 1]})
    broken = root / cut
    whole = broken.read_bytes()
    broken.write_bytes(whole[: len(whole) * 2 // 3])
    refused(root, str(broken), "truncated", "(row 1, clip 'a', frame 1)", "restore the file")


def test_accepts_files_with_bytes_after_their_end_marker(tmp_path: Path) -> None:
    """Some encoders pad or append data after the end marker: such files decode, so they are whole."""
    root = make_davis(tmp_path / "d", {"a": [0, 1]})
    for padded, extra in (("JPEGImages/480p/a/00000.jpg", b"\x00" * 100), ("Annotations/480p/a/00001.png", b"X" * 100)):
        with open(root / padded, "ab") as handle:
            handle.write(extra)
    assert len(load_dataset(root).frames) == 2


def test_refuses_a_frame_of_another_size_than_its_clip(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"bear": [0, 1, 2], "cows": [0]})
    odd = root / "JPEGImages" / "480p" / "bear" / "00002.jpg"
    write_frame(odd, seed=5, size=(SIZE[0] + 8, SIZE[1]))
    write_mask(root / "Annotations" / "480p" / "bear" / "00002.png", seed=5, size=(SIZE[0] + 8, SIZE[1]))
    refused(root, str(odd), f"{SIZE[0] + 8}x{SIZE[1]}", f"clip 'bear' starts at {SIZE[0]}x{SIZE[1]}", "00000.jpg")
    write_frame(root / "JPEGImages" / "480p" / "cows" / "00000.jpg", seed=6, size=(SIZE[0] + 8, SIZE[1]))
    (root / "Annotations" / "480p" / "cows" / "00000.png").unlink()
    odd.unlink()
    (root / "Annotations" / "480p" / "bear" / "00002.png").unlink()
    assert len(load_dataset(root).frames) == 3, "clips of different sizes are fine: each is its own array"


def test_refuses_mask_of_another_size(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0, 1]})
    mask = root / "Annotations" / "480p" / "a" / "00001.png"
    write_mask(mask, seed=0, size=(SIZE[0] + 1, SIZE[1]))
    refused(root, str(mask), f"{SIZE[0] + 1}x{SIZE[1]}", f"{SIZE[0]}x{SIZE[1]}", "resize")


def test_refuses_colour_mask(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0]})
    mask = root / "Annotations" / "480p" / "a" / "00000.png"
    write_frame(mask, seed=0)
    refused(root, str(mask), "mode RGB", "greyscale")


@pytest.mark.parametrize("bad", ["a/frame1.jpg", "00000.jpg", "a/0000.jpg", "a/000000.jpg", "a/00000"])
def test_refuses_path_not_ending_in_clip_and_frame(tmp_path: Path, bad: str) -> None:
    root = make_contest(tmp_path / "c", {0: ("a", 0), 1: ("a", 1)})
    edit_paths_json(root, lambda t: t["raw"].update({"1": bad}))
    refused(root, str(root / "paths.json"), repr(bad), "<clip>/<NNNNN>.<ext>")


@pytest.mark.parametrize("annotation", ["data/Annotations/b/00001.png", "data/Annotations/a/00000.png"])
def test_refuses_row_whose_raw_and_annotation_disagree(tmp_path: Path, annotation: str) -> None:
    root = make_contest(tmp_path / "c", {0: ("a", 0), 1: ("a", 1), 2: ("b", 1)})
    edit_paths_json(root, lambda t: t["annotation"].update({"1": annotation}))
    refused(root, str(root / "paths.json"), "row 1", annotation, "clip or frame differ")


def test_refuses_annotation_rows_that_are_not_the_raw_rows(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "c", {0: ("a", 0), 1: ("a", 1)})
    edit_paths_json(root, lambda t: t["annotation"].update({"5": t["annotation"].pop("1")}))
    refused(root, str(root / "paths.json"), '"annotation" rows differ', "row 1")


def test_refuses_duplicate_frames_in_paths_json(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "c", {0: ("a", 0), 1: ("a", 1)})
    write_frame(root / "elsewhere" / "a" / "00001.jpg", seed=9)
    edit_paths_json(root, lambda t: (t["raw"].update({"2": "elsewhere/a/00001.jpg"}), t.pop("annotation")))
    refused(root, str(root / "paths.json"), "rows 1 and 2", "duplicate")


def test_refuses_duplicate_frames_in_davis_folder(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0, 1]})
    write_frame(root / "JPEGImages" / "480p" / "a" / "00001.png", seed=3)
    refused(
        root, str(root / "JPEGImages" / "480p" / "a" / "00001.png"), "duplicate frame 1", "'a'", "00001.jpg"
    )


def test_refuses_mask_without_frame(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0, 1]})
    orphan = root / "Annotations" / "480p" / "a" / "00007.png"
    write_mask(orphan, seed=1)
    refused(root, str(orphan), "mask without a frame", "00007.jpg")


def test_refuses_badly_named_davis_frame(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0]})
    bad = root / "JPEGImages" / "480p" / "a" / "frame-1.jpg"
    write_frame(bad, seed=0)
    refused(root, str(bad), "<NNNNN>")


def test_davis_folder_ignores_dotfiles_and_file_manager_files(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0]})
    (root / "JPEGImages" / "480p" / "a" / ".DS_Store").write_bytes(b"\0")
    (root / "JPEGImages" / "480p" / "a" / "Thumbs.db").write_bytes(b"\0")
    assert len(load_dataset(root).frames) == 1


def test_refuses_a_frame_link_whose_target_is_missing(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0]})
    link = root / "JPEGImages" / "480p" / "a" / "00001.jpg"
    link.symlink_to(tmp_path / "elsewhere" / "00001.jpg")
    refused(root, str(link), "frame does not exist", str(tmp_path / "elsewhere" / "00001.jpg"))


def test_refuses_a_folder_among_frames(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0]})
    folder = root / "JPEGImages" / "480p" / "a" / "00001.jpg"
    folder.mkdir()
    refused(root, str(folder), "a folder where a frame file belongs")


# ----------------------------------------------------------------------------------------------------
# Digest


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_digest_is_stable_and_independent_of_location_and_layout(tmp_path: Path) -> None:
    davis = make_davis(tmp_path / "one", {"b": [0, 1], "a": [4]})
    first = load_dataset(davis).digest()
    assert len(first) == 64 and int(first, 16) >= 0
    assert load_dataset(davis).digest() == first
    os.rename(davis, tmp_path / "two")
    assert load_dataset(tmp_path / "two").digest() == first
    # The same frames listed by a paths.json, in the same row order, are the same content.
    rows = {
        i: f"JPEGImages/480p/{r.clip}/{r.frame:05d}.jpg"
        for i, r in enumerate(load_dataset(tmp_path / "two").frames)
    }
    masks = {i: p.replace("JPEGImages", "Annotations").replace(".jpg", ".png") for i, p in rows.items()}
    (tmp_path / "two" / "paths.json").write_text(pd.DataFrame({"raw": rows, "annotation": masks}).to_json())
    assert load_dataset(tmp_path / "two" / "paths.json").digest() == first


def test_digest_changes_with_any_byte_of_any_file_or_the_row_table(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0, 1], "b": [0]})
    original = load_dataset(root).digest()

    flip_byte(root / "JPEGImages" / "480p" / "b" / "00000.jpg")
    after_frame = load_dataset(root).digest()
    assert after_frame != original

    flip_byte(root / "Annotations" / "480p" / "a" / "00001.png")
    after_mask = load_dataset(root).digest()
    assert after_mask not in (original, after_frame)

    (root / "Annotations" / "480p" / "a" / "00000.png").unlink()
    assert load_dataset(root).digest() not in (original, after_frame, after_mask)


def test_digest_depends_on_row_numbers(tmp_path: Path) -> None:
    root = make_contest(tmp_path / "c", {0: ("a", 0), 1: ("a", 1)})
    original = load_dataset(root).digest()
    edit_paths_json(root, lambda t: [t[c].update({"7": t[c].pop("1")}) for c in ("raw", "annotation")])
    assert load_dataset(root).digest() != original


def test_digest_is_computed_once_per_dataset(tmp_path: Path) -> None:
    root = make_davis(tmp_path / "d", {"a": [0, 1]})
    dataset = load_dataset(root)
    digest = dataset.digest()
    flip_byte(root / "JPEGImages" / "480p" / "a" / "00000.jpg")
    assert dataset.digest() == digest
    assert load_dataset(root).digest() != digest


# ----------------------------------------------------------------------------------------------------
# Pixels


def test_read_frame_returns_rgb_uint8(tmp_path: Path) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "00000.png")
    np.testing.assert_array_equal(read_frame(tmp_path / "00000.png"), pixels)
    Image.fromarray(pixels[..., 0]).save(tmp_path / "00001.png")
    grey = read_frame(tmp_path / "00001.png")
    assert grey.shape == (5, 7, 3) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey[..., 2], pixels[..., 0])


def test_read_frame_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "00009.jpg"))):
        read_frame(tmp_path / "00009.jpg")
    (tmp_path / "00010.jpg").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "00010.jpg"))):
        read_frame(tmp_path / "00010.jpg")
    full = tmp_path / "00011.jpg"
    write_frame(full, seed=1)
    full.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    with pytest.raises(DatasetError, match=re.escape(str(full))):
        read_frame(full)


def test_read_mask_rounds_at_the_midpoint(tmp_path: Path) -> None:
    values = np.array([[0, 1, 126, 127], [128, 129, 254, 255]], dtype=np.uint8)
    Image.fromarray(values).save(tmp_path / "m.png")
    mask = read_mask(tmp_path / "m.png")
    assert mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, [[0, 0, 0, 0], [1, 1, 1, 1]])


def test_read_mask_accepts_bilevel_and_palette_masks(tmp_path: Path) -> None:
    truth = np.array([[0, 1, 1], [1, 0, 0]], dtype=np.uint8)
    Image.fromarray(truth.astype(bool)).save(tmp_path / "bilevel.png")
    assert Image.open(tmp_path / "bilevel.png").mode == "1"
    np.testing.assert_array_equal(read_mask(tmp_path / "bilevel.png"), truth)
    palette = Image.frombytes("P", (3, 2), truth.tobytes())
    palette.putpalette([0, 0, 0, 255, 255, 255])
    palette.save(tmp_path / "palette.png")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png"), truth)
    davis2017 = Image.frombytes("P", (3, 2), truth.tobytes())
    davis2017.putpalette([0, 0, 0, 128, 0, 0])  # dark red object, grey level 38: still the object
    davis2017.save(tmp_path / "davis2017.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "davis2017.png"), truth)


def test_read_mask_refuses_colour_and_missing_masks(tmp_path: Path) -> None:
    write_frame(tmp_path / "rgb.png", seed=0)
    with pytest.raises(DatasetError, match=r"rgb\.png.*mode RGB"):
        read_mask(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match=re.escape(str(tmp_path / "gone.png"))):
        read_mask(tmp_path / "gone.png")


# ----------------------------------------------------------------------------------------------------
# Real DAVIS 2016 dev data

realdata = pytest.mark.skipif(not DAVIS_DEV.is_dir(), reason=f"DAVIS 2016 dev data not found at {DAVIS_DEV}")


@pytest.fixture
def davis_layout(tmp_path: Path) -> Path:
    """The dev data seen as a plain DAVIS folder (no paths.json), through links rather than copies."""
    root = tmp_path / "davis2016-dev"
    root.mkdir()
    for folder in ("JPEGImages", "Annotations"):
        (root / folder).symlink_to(DAVIS_DEV / folder, target_is_directory=True)
    return root


@pytest.mark.realdata
@realdata
def test_real_dev_data_loads_the_same_through_both_layouts(davis_layout: Path) -> None:
    contest = load_dataset(DAVIS_DEV / "paths.json")
    davis = load_dataset(davis_layout)
    for dataset in (contest, davis):
        assert dataset.name == "davis2016-dev"
        assert dataset.has_annotations
        assert len(dataset.frames) == 823
        assert len(dataset.clips()) == 12
        assert [r.row for r in dataset.frames] == list(range(823))
    assert [(r.row, r.clip, r.frame) for r in contest.frames] == [
        (r.row, r.clip, r.frame) for r in davis.frames
    ]
    assert contest.digest() == davis.digest()
    assert load_dataset(DAVIS_DEV) == contest


@pytest.mark.realdata
@realdata
def test_real_dev_masks_match_their_frames(davis_layout: Path) -> None:
    dataset = load_dataset(davis_layout)
    for frames in dataset.clips().values():
        for record in (frames[0], frames[-1]):
            assert record.annotation is not None
            image, mask = read_frame(record.raw), read_mask(record.annotation)
            assert image.shape == (480, 854, 3)
            assert mask.shape == image.shape[:2]
            assert 0 < mask.sum() < mask.size
