"""The generated demo dataset: deterministic, well formed, and a real (if small) segmentation problem."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featstore.datasets import Dataset, load_dataset, read_frame, read_mask
from featstore.demo import DEMO_CLIPS, DEMO_FRAMES, DEMO_SIZE, generate_demo
from featstore.errors import DatasetError


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    return load_dataset(None, demo_root=tmp_path_factory.mktemp("store") / "nested" / "demo")


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_two_generations_are_byte_identical(demo: Dataset, tmp_path: Path) -> None:
    (tmp_path / "demo").mkdir()  # an empty folder is filled like a missing one
    again = generate_demo(tmp_path / "demo")
    assert len(file_bytes(demo.root)) == 2 * len(DEMO_CLIPS) * DEMO_FRAMES
    assert file_bytes(again) == file_bytes(demo.root)


def test_demo_loads_as_davis_layout_with_exact_masks(demo: Dataset) -> None:
    assert demo.name == "demo"
    assert demo.has_annotations
    clips = demo.clips()
    assert tuple(clips) == DEMO_CLIPS
    assert len(DEMO_CLIPS) == 6
    assert all([r.frame for r in frames] == list(range(DEMO_FRAMES)) for frames in clips.values())
    assert [r.row for r in demo.frames] == list(range(len(DEMO_CLIPS) * DEMO_FRAMES))
    for record in demo.frames[:: DEMO_FRAMES // 2]:
        assert record.raw.suffix == ".jpg"
        assert record.annotation is not None
        assert read_frame(record.raw).shape == (*DEMO_SIZE, 3)
        with Image.open(record.annotation) as mask:
            assert mask.mode == "L"
            assert mask.size == (DEMO_SIZE[1], DEMO_SIZE[0])
            assert set(np.unique(np.asarray(mask)).tolist()) == {0, 255}


def masks_and_frames(frames) -> tuple[np.ndarray, np.ndarray]:
    masks = np.stack([read_mask(r.annotation) for r in frames]).astype(bool)
    images = np.stack([read_frame(r.raw) for r in frames]).astype(np.float32)
    return masks, images


def test_each_clip_has_one_moving_object_of_changing_size(demo: Dataset) -> None:
    for clip, frames in demo.clips().items():
        masks, _ = masks_and_frames(frames)
        coverage = masks.mean(axis=(1, 2))
        assert np.all((coverage > 0.03) & (coverage < 0.3)), clip
        assert coverage.max() / coverage.min() > 1.1, f"{clip}: the object should change scale"
        centres = np.array([np.argwhere(mask).mean(axis=0) for mask in masks])
        steps = np.linalg.norm(np.diff(centres, axis=0), axis=1)
        assert steps.min() > 2 and steps.max() < 80, f"{clip}: the object should move smoothly"


def test_objects_differ_from_backgrounds_but_not_by_colour_alone(demo: Dataset) -> None:
    """Learnable (object colours differ from the background's) but not solved by a colour threshold."""
    background_means = []
    for clip, frames in demo.clips().items():
        masks, images = masks_and_frames(frames[::3])
        inside, outside = images[masks], images[~masks]
        assert np.linalg.norm(inside.mean(axis=0) - outside.mean(axis=0)) > 15, clip
        # Nearest class-mean colour is the best a per-pixel colour threshold of this kind can do.
        pixels = images.reshape(-1, 3)
        nearer_object = np.linalg.norm(pixels - inside.mean(axis=0), axis=1) < np.linalg.norm(
            pixels - outside.mean(axis=0), axis=1
        )
        truth = masks.reshape(-1)
        iou = (nearer_object & truth).sum() / (nearer_object | truth).sum()
        assert iou < 0.95, f"{clip}: colour alone separates the object (IoU {iou:.3f})"
        background_means.append(outside.mean(axis=0))
    distances = [
        np.linalg.norm(a - b) for i, a in enumerate(background_means) for b in background_means[i + 1 :]
    ]
    assert min(distances) > 5, "every clip should have its own background"


def test_existing_demo_is_reused_untouched(demo: Dataset) -> None:
    root = demo.root
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert generate_demo(root) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps
    assert load_dataset(None, demo_root=root) == demo
    assert [p.name for p in root.parent.iterdir()] == ["demo"], "no scratch folder may be left behind"


def test_refuses_a_folder_that_is_not_a_complete_demo(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    (root / "JPEGImages" / "480p" / DEMO_CLIPS[0]).mkdir(parents=True)
    (root / "JPEGImages" / "480p" / DEMO_CLIPS[0] / "00000.jpg").write_bytes(b"partial")
    before = file_bytes(root)
    with pytest.raises(DatasetError, match=re.escape(f"{root}: exists but is not a complete demo")):
        load_dataset(None, demo_root=root)
    assert file_bytes(root) == before
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
