"""The Lightning wrappers train a head end to end from device-resident features and log the contest IoU."""

from __future__ import annotations

import platform

import pytest
import pytorch_lightning as pl
import torch
from synthetic_features import synthetic_features

from decoders import HeadConfig, evaluate, host_allocator
from decoders.lightning import FeatureDataModule, HeadModule
from featstore.errors import FeatstoreError


def _trainer(epochs: int = 1, precision: str = "32-true") -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        precision=precision,  # type: ignore[arg-type]
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )


def test_trainer_runs_end_to_end_and_logs_val_iou() -> None:
    train = synthetic_features({"a": 8, "b": 8, "c": 8}, seed=10)
    val = synthetic_features({"v": 6, "w": 5}, seed=11)
    data = FeatureDataModule(train=train, val=val, batch_size=4, seed=0)
    module = HeadModule.for_features(HeadConfig("fpn", lr=3e-3, options={"width": 16}), train, seed=0)
    trainer = _trainer()
    allocator_during_fit: list[bool] = []

    class Watch(pl.Callback):
        def on_train_batch_start(self, *args: object) -> None:
            allocator_during_fit.append(host_allocator.is_active())

    trainer.callbacks.append(Watch())
    trainer.fit(module, datamodule=data)
    assert trainer.state.finished
    assert trainer.global_step == 6
    expect_applied = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert allocator_during_fit == [expect_applied] * 6, "CPU fitting keeps freed host memory mapped"
    assert not host_allocator.is_active(), "and gives it back when fitting ends"
    assert "val_iou" in trainer.callback_metrics and "train_loss" in trainer.callback_metrics
    val_iou = float(trainer.callback_metrics["val_iou"])
    assert 0.0 <= val_iou <= 1.0
    assert (
        module.val_scores is not None
        and module.val_scores.frames_scored + module.val_scores.frames_both_empty == 11
    )
    # The logged number is the contest rule as train_heads applies it.
    assert val_iou == pytest.approx(evaluate(module.head, val).mean_iou, abs=1e-6)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_batchnorm_is_recalibrated_in_the_trainers_precision(precision: str) -> None:
    """The statistics come from the activations that training and validation steps compute."""
    train = synthetic_features({"a": 8, "b": 8}, seed=15)
    val = synthetic_features({"v": 6}, seed=16)
    module = HeadModule.for_features(HeadConfig("fpn", options={"width": 8, "norm": "batch"}), train)
    norm = next(m for m in module.head.modules() if isinstance(m, torch.nn.BatchNorm2d))
    seen: dict[str, set[bool]] = {"step": set(), "recalibration": set()}

    def watch(*args: object) -> None:
        # Training steps need gradients and validation runs in eval mode: the rest is the recalibration.
        kind = "recalibration" if module.head.training and not torch.is_grad_enabled() else "step"
        seen[kind].add(torch.is_autocast_enabled("cpu"))

    norm.register_forward_pre_hook(watch)
    _trainer(precision=precision).fit(
        module, datamodule=FeatureDataModule(train=train, val=val, batch_size=4)
    )
    mixed = precision == "bf16-mixed"
    assert seen == {"step": {mixed}, "recalibration": {mixed}}


def test_evaluate_scores_in_the_trainers_precision_as_val_iou_does() -> None:
    train = synthetic_features({"a": 8, "b": 8}, seed=17)
    val = synthetic_features({"v": 6, "w": 5}, seed=18)
    module = HeadModule.for_features(HeadConfig("fpn", lr=3e-3, options={"width": 16}), train, seed=0)
    assert module.evaluate(val, batch_size=4).frames_scored > 0, "without a trainer, featstore train's precision"
    autocast_on: list[bool] = []
    module.head.register_forward_pre_hook(lambda *args: autocast_on.append(torch.is_autocast_enabled("cpu")))
    trainer = _trainer(precision="bf16-mixed")
    trainer.fit(module, datamodule=FeatureDataModule(train=train, val=val, batch_size=4))
    autocast_on.clear()
    scores = module.evaluate(val, batch_size=4)
    assert autocast_on and set(autocast_on) == {True}
    assert scores.mean_iou == pytest.approx(float(trainer.callback_metrics["val_iou"]), abs=1e-6)


def test_loaders_yield_indices_that_become_device_features() -> None:
    train = synthetic_features({"a": 5, "b": 4}, seed=12)
    data = FeatureDataModule(train=train, batch_size=4, temporal_window=1)
    data.setup("fit")
    batches = list(data.train_dataloader())
    assert [b["split"] for b in batches] == ["train"] * 3
    assert sorted(torch.cat([b["index"] for b in batches]).tolist()) == list(range(9))
    assert data.val_dataloader() == []
    ready = data.on_after_batch_transfer(batches[0], 0)
    assert ready["features"]["fine"].shape == (4, 3, 8, 16, 24)
    assert ready["features"]["fine"].dtype == torch.float16
    assert ready["masks"].shape == (4, 64, 96)
    assert torch.equal(ready["clip_ids"], train.clip_ids[batches[0]["index"]])


def test_temporal_head_trains_through_lightning_and_needs_its_window() -> None:
    train = synthetic_features({"a": 6, "b": 6}, seed=13)
    val = synthetic_features({"v": 4}, seed=14)
    config = HeadConfig("temporal", options={"width": 8})
    module = HeadModule.for_features(config, train)
    trainer = _trainer()
    trainer.fit(module, datamodule=FeatureDataModule(train=train, val=val, batch_size=6, temporal_window=1))
    assert "val_iou" in trainer.callback_metrics
    with pytest.raises(FeatstoreError, match="temporal_window=1"):
        _trainer().fit(
            HeadModule.for_features(config, train), datamodule=FeatureDataModule(train=train, batch_size=6)
        )


def test_data_module_needs_exactly_one_source() -> None:
    with pytest.raises(FeatstoreError, match="exactly one source"):
        FeatureDataModule()
