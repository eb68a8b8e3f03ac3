"""Shared fixtures: an isolated store per test, small real DAVIS-layout datasets, and the real dev clips."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from featstore.store import Store
from jobs.fault_drills import write_davis_dataset
from jobs.featurize import featurize_clips, prepare_build

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
    return write_davis_dataset(root, clips, size, seed=seed, masks=masks)


@pytest.fixture
def small_davis(tmp_path: Path) -> Path:
    """Three short clips of 64x96 frames with masks, in DAVIS layout."""
    return write_davis(tmp_path / "small-davis", {"alpha": 5, "beta": 3, "gamma": 4})


def stopped_build(store: Store, data: Path, clips: tuple[str, ...] = ("alpha",)) -> Path:
    """Stage a `tiny` build of ``data`` that finished only ``clips`` and never committed; its staging folder."""
    plan, extractor = prepare_build(store, "tiny", data, weights="random")
    with store.stage("features", plan.name, plan.key) as staging:
        featurize_clips(extractor, plan.dataset, list(clips), staging.path / "features.zarr", staging.scratch,
                        dtype="float16", batch_size=2, progress=False)
        return staging.root
