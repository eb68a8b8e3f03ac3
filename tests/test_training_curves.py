"""training.png: readable for a whole grid, runaway and diverged heads included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from PIL import Image

from decoders import HeadConfig, create_decoder
from decoders.training import TrainedHead
from jobs.training_curves import diverged, loss_ceiling, write_training_curves


def test_diverged_means_non_finite_or_ending_above_the_start() -> None:
    assert not diverged([1.2, 0.8, 0.5])
    assert diverged([1.2, None, None])
    assert diverged([1.2, math.inf])
    assert diverged([0.9, 1.4])
    assert not diverged([1.0])


def test_one_runaway_head_does_not_set_the_scale() -> None:
    typical = [[1.3, 0.9, 0.5], [1.4, 1.1, 1.0], [1.2, 0.7, 0.4]]
    runaway = [[1e27, 1e26, 1e25]]
    assert loss_ceiling(typical + runaway) == pytest.approx(1.5 * 1.35 * 1.05), "1.5x the median first epoch"
    assert loss_ceiling(typical) == pytest.approx(1.4 * 1.05), "no higher than the highest loss drawn"
    assert loss_ceiling([[None, None]]) == 1.0


def test_a_grid_of_twelve_with_diverged_heads_is_plotted(tmp_path: Path) -> None:
    heads = []
    for i in range(12):
        curve: list[float | None] = [1.5 - 0.1 * i, 1.2 - 0.1 * i, 1.0 - 0.05 * i]
        if i == 10:
            curve = [3e9, None, None]
        heads.append({"head": f"fpn lr={i}", "val_mean_iou": i / 20 if i != 11 else None, "epoch_losses": curve})
    path = tmp_path / "training.png"
    write_training_curves(heads, path, best="fpn lr=9", title="grid")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 900


def test_a_diverged_head_records_null_not_nan() -> None:
    decoder = create_decoder("linear", {"layer": 4}, {"layer": 8})
    head = TrainedHead(HeadConfig("linear", lr=1.0), decoder, train_seconds=1.0, train_frames=8,
                       final_loss=math.nan, val=None, epoch_losses=(2.0, math.inf, math.nan))
    metrics = head.metrics()
    assert metrics["epoch_losses"] == [2.0, None, None] and metrics["final_loss"] is None
    json.dumps(metrics, allow_nan=False)  # strict JSON: raises on NaN or infinity
