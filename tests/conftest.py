"""Shared fixtures: an isolated store per test, small real DAVIS-layout datasets, and the real dev clips."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

DAVIS_DEV = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016-dev"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads or writes the user's store or W&B folders."""
    monkeypatch.setenv("FEATSTORE_HOME", str(tmp_path / "featstore-home"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.delenv("FEATSTORE_WANDB", raising=False)


@pytest.fixture
def davis_dev() -> Path:
    """The 12 real DAVIS 2016 dev clips; tests that use them skip where ../shared is absent."""
    if not (DAVIS_DEV / "JPEGImages" / "480p").is_dir():
        pytest.skip(f"real DAVIS dev clips not found at {DAVIS_DEV} (they live in ../shared beside the checkout)")
    return DAVIS_DEV


def write_davis(root: Path, clips: dict[str, int], size: tuple[int, int] = (64, 96), *, masks: bool = True,
                seed: int = 0) -> Path:
    """Write a DAVIS-layout dataset of real JPEG frames and 0/255 PNG masks: a bright square on noise."""
    rng = np.random.default_rng(seed)
    height, width = size
    for clip, n in clips.items():
        (root / "JPEGImages" / "480p" / clip).mkdir(parents=True, exist_ok=True)
        if masks:
            (root / "Annotations" / "480p" / clip).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            frame = rng.integers(0, 120, size=(height, width, 3), dtype=np.uint8)
            mask = np.zeros((height, width), dtype=np.uint8)
            top, left = (i * 3) % (height // 2), (i * 5) % (width // 2)
            mask[top : top + height // 3, left : left + width // 3] = 255
            frame[mask > 0] = (220, 200, 40)
            Image.fromarray(frame).save(root / "JPEGImages" / "480p" / clip / f"{i:05d}.jpg", quality=90)
            if masks:
                Image.fromarray(mask, mode="L").save(root / "Annotations" / "480p" / clip / f"{i:05d}.png")
    return root


@pytest.fixture
def small_davis(tmp_path: Path) -> Path:
    """Three short clips of 64x96 frames with masks, in DAVIS layout."""
    return write_davis(tmp_path / "small-davis", {"alpha": 5, "beta": 3, "gamma": 4})
