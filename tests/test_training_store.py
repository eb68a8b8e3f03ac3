"""Training from a real feature artifact: featurize with the ``tiny`` backbone, load it onto the device, train."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import write_davis

from decoders import DEFAULT_DECODER, DeviceFeatures, HeadConfig, holdout_split, train_heads
from decoders.lightning import FeatureDataModule, HeadModule
from featstore.errors import FeatstoreError
from featstore.features import open_features
from featstore.store import Store
from jobs.featurize import build_features

CLIPS = {"alpha": 6, "beta": 5, "gamma": 6, "delta": 5}


@pytest.fixture
def built(tmp_path: Path) -> tuple[Store, str]:
    data = write_davis(tmp_path / "davis", CLIPS, seed=3)
    store = Store(tmp_path / "store")
    result = build_features(store, "tiny", data, weights="random", batch_size=4, device="cpu", progress=False)
    return store, result.ref


def test_device_features_hold_exactly_what_the_artifact_stores(built: tuple[Store, str]) -> None:
    store, ref = built
    artifact = open_features(store, ref)
    data = DeviceFeatures.from_artifact(artifact, ["gamma", "alpha"], "cpu")
    assert data.clips == ("gamma", "alpha") and len(data) == 12
    assert data.strides == artifact.strides() and data.channels == artifact.channels()
    assert data.frame_size == artifact.frame_size == (64, 96)
    assert data.rows == artifact.rows("gamma") + artifact.rows("alpha")
    for layer in artifact.layers:
        expected = torch.cat([artifact.read("gamma", layer), artifact.read("alpha", layer)])
        assert data.features[layer].dtype == artifact.dtype == torch.float16
        assert torch.equal(data.features[layer], expected)
    assert data.masks is not None
    assert torch.equal(data.masks, torch.cat([artifact.read_masks("gamma"), artifact.read_masks("alpha")]))
    with pytest.raises(FeatstoreError, match="not in"):
        DeviceFeatures.from_artifact(artifact, ["omega"], "cpu")


def test_heads_train_from_a_stored_artifact_on_held_out_clips(built: tuple[Store, str]) -> None:
    store, ref = built
    artifact = open_features(store, ref)
    train_clips, val_clips = holdout_split(artifact.clips, 0.25, seed=0)
    train = DeviceFeatures.from_artifact(artifact, train_clips, "cpu")
    val = DeviceFeatures.from_artifact(artifact, val_clips, "cpu")
    configs = [HeadConfig("linear", lr=1e-2), HeadConfig(DEFAULT_DECODER, lr=3e-3, options={"width": 16})]
    heads = train_heads(train, val, configs, epochs=4, batch_size=4, seed=0, progress=False)
    for head in heads:
        assert head.val is not None and set(head.val.per_clip) == set(val_clips)
        assert 0.0 <= head.val.mean_iou <= 1.0
        assert head.train_frames == 4 * len(train)
    # The square is bright on dark noise: even random tiny features make it easy for the multi-layer head.
    assert heads[1].val is not None and heads[1].val.mean_iou > 0.5


def test_lightning_trains_from_a_stored_artifact(built: tuple[Store, str]) -> None:
    store, ref = built
    data = FeatureDataModule(ref, store=store.root, holdout_fraction=0.25, batch_size=4, seed=0)
    data.prepare_data()
    data.setup("fit")
    assert data.train_features is not None and data.val_features is not None
    assert not set(data.train_features.clips) & set(data.val_features.clips)
    module = HeadModule.for_features(HeadConfig("fpn", lr=3e-3, options={"width": 16}), data.train_features)
    trainer = pl.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert 0.0 <= float(trainer.callback_metrics["val_iou"]) <= 1.0


def test_lightning_refuses_validation_features_of_the_training_clips(built: tuple[Store, str]) -> None:
    store, ref = built
    data = FeatureDataModule(ref, store=store.root, val_ref=ref, batch_size=4)
    data.prepare_data()
    with pytest.raises(FeatstoreError, match="validation would score frames the heads trained on"):
        data.setup("fit")


def test_features_without_masks_refuse_training(tmp_path: Path) -> None:
    data = write_davis(tmp_path / "unlabelled", {"a": 3, "b": 3}, masks=False)
    store = Store(tmp_path / "store")
    ref = build_features(store, "tiny", data, weights="random", device="cpu", progress=False).ref
    artifact = open_features(store, ref)
    with pytest.raises(FeatstoreError,
                       match=r"masks are missing: .* from dataset 'unlabelled', which has frames without masks"):
        DeviceFeatures.from_artifact(artifact, None, "cpu")
    unlabelled = DeviceFeatures.from_artifact(artifact, None, "cpu", require_masks=False)
    assert not unlabelled.has_masks and len(unlabelled) == 6
    with pytest.raises(FeatstoreError, match="no masks"):
        FeatureDataModule(ref, store=store.root).prepare_data()
