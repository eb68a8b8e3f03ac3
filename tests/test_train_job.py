"""`featstore train`: a grid of heads from stored features, the best committed with its accounting."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import write_davis
from PIL import Image

from decoders import DeviceFeatures, evaluate
from featstore.cli import main
from featstore.errors import BudgetError, FeatstoreError
from featstore.features import FeatureArtifact, check_compatible, open_features
from featstore.frame_stream import with_jpeg_decoder
from featstore.store import Store
from jobs.featurize import build_features
from jobs.predict import predict_dataset
from jobs.train import load_decoder, train_decoders


@pytest.fixture
def tiny_features(tmp_path: Path) -> tuple[Store, str]:
    data = write_davis(tmp_path / "train-davis", {f"clip{i}": 4 for i in range(4)}, size=(48, 64))
    store = Store(tmp_path / "store")
    return store, build_features(store, "tiny", data, weights="random", device="cpu", progress=False).ref


def test_grid_trains_and_commits_the_best_head(tiny_features: tuple[Store, str]) -> None:
    store, ref = tiny_features
    result = train_decoders(store, ref, decoders=["linear", "fpn"], lrs=[1e-3, 1e-2], epochs=2, batch_size=4,
                            device="cpu", progress=False)
    meta = result.record.metadata
    assert result.record.parents == (ref,)
    assert len(meta["heads"]) == 4, "one head per (decoder, lr)"
    assert meta["val_mean_iou"] == max(h["val_mean_iou"] for h in meta["heads"])
    assert set(meta["train_clips"]).isdisjoint(meta["val_clips"]), "split by clip, never frames"
    assert sorted(meta["train_clips"] + meta["val_clips"]) == sorted(open_features(store, ref).clips)
    decoder, record = load_decoder(store, result.ref)
    assert meta["nparams_head"] == sum(p.numel() for p in decoder.parameters())
    assert meta["nparams"] == meta["nparams_backbone"] + meta["nparams_head"]
    assert meta["nparams_backbone"] == open_features(store, ref).nparams_backbone
    assert meta["nflops"] == meta["nflops_backbone"] + meta["nflops_head"] > 0
    val = DeviceFeatures.from_artifact(open_features(store, ref), meta["val_clips"], "cpu")
    assert evaluate(decoder, val, batch_size=4).mean_iou == pytest.approx(meta["val_mean_iou"])
    again = train_decoders(store, ref, decoders=["linear", "fpn"], lrs=[1e-3, 1e-2], epochs=2, batch_size=4,
                           device="cpu", progress=False)
    assert again.cached and again.ref == result.ref
    assert store.verify(record) == []


def test_over_budget_is_an_error_before_training(tiny_features: tuple[Store, str]) -> None:
    store, ref = tiny_features
    with pytest.raises(BudgetError, match=r"exceeds --budget 10,000"):
        train_decoders(store, ref, budget=10_000, device="cpu", progress=False)
    assert store.list("decoder") == []


def test_validation_features_must_match(tmp_path: Path, tiny_features: tuple[Store, str]) -> None:
    store, ref = tiny_features
    other = write_davis(tmp_path / "val-davis", {"v0": 3, "v1": 3}, size=(48, 64), seed=1)
    same = build_features(store, "tiny", other, weights="random", device="cpu", progress=False).ref
    result = train_decoders(store, ref, val_features=same, decoders=["linear"], epochs=1, device="cpu",
                            progress=False)
    assert result.record.metadata["val_clips"] == ["v0", "v1"]
    assert result.record.parents == (ref, same)
    different = build_features(store, "tiny", other, weights="random", seed=3, device="cpu", progress=False).ref
    with pytest.raises(FeatstoreError, match="weights_digest"):
        train_decoders(store, ref, val_features=different, device="cpu", progress=False)
    with pytest.raises(FeatstoreError, match=r"share 4 clip\(s\) .* \(clip0, clip1, clip2, clip3\): validation would"):
        train_decoders(store, ref, val_features=ref, device="cpu", progress=False)
    with pytest.raises(FeatstoreError, match="--epochs 0 must be at least 1"):
        train_decoders(store, ref, val_features=same, epochs=0, device="cpu", progress=False)
    assert [r.ref for r in store.list("decoder")] == [result.ref]


def test_heads_that_never_predict_foreground_are_kept_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Trained on frames without any foreground, every head learns to predict none and scores 0 on clips with some."""
    data = write_davis(tmp_path / "empty-masks", {"e0": 3, "e1": 3}, size=(48, 64))
    for png in sorted(data.glob("Annotations/480p/*/*.png")):
        Image.new("L", (64, 48), 0).save(png)
    store = Store(tmp_path / "store")
    ref = build_features(store, "tiny", data, weights="random", device="cpu", progress=False).ref
    val_data = write_davis(tmp_path / "val-davis", {"v0": 3}, size=(48, 64), seed=1)
    val = build_features(store, "tiny", val_data, weights="random", device="cpu", progress=False).ref
    capsys.readouterr()
    result = train_decoders(store, ref, val_features=val, decoders=["linear"], lrs=[1e-2, 3e-2], epochs=3,
                            batch_size=2, device="cpu", progress=False)
    meta = result.record.metadata
    assert [h["val_mean_iou"] for h in meta["heads"]] == [0.0, 0.0]
    lowest = min(meta["heads"], key=lambda h: h["epoch_losses"][-1])
    err = capsys.readouterr().err
    assert "warning: every head scored 0 mean IoU on the validation clips" in err
    assert f"kept {lowest['head']}, the lowest training loss" in err


def test_validation_features_decoded_elsewhere_say_so(tmp_path: Path, tiny_features: tuple[Store, str]) -> None:
    """Features whose JPEGs nvJPEG decoded are not the CPU's: the refusal says to build both alike."""
    store, ref = tiny_features
    other = write_davis(tmp_path / "val-davis", {"v0": 3, "v1": 3}, size=(48, 64), seed=1)
    val = build_features(store, "tiny", other, weights="random", device="cpu", progress=False)
    meta = val.record.metadata
    on_gpu = dataclasses.replace(
        val.record, metadata={**meta, "preprocessing": with_jpeg_decoder(meta["preprocessing"], on_gpu=True)}
    )
    with pytest.raises(FeatstoreError, match=r"in preprocessing: .*both on a GPU \(nvJPEG decodes their JPEGs\)"):
        check_compatible(open_features(store, ref), FeatureArtifact(store, on_gpu))
    check_compatible(open_features(store, ref), open_features(store, val.ref))


def test_cli_train_json(tiny_features: tuple[Store, str], capsys: pytest.CaptureFixture[str]) -> None:
    store, ref = tiny_features
    code = main(["train", "--features", ref, "--store", str(store.root), "--decoder", "linear", "--lr", "0.001,0.01",
                 "--epochs", "1", "--device", "cpu", "--json", "--quiet"])
    assert code == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"ref", "nparams_backbone", "nparams_head", "nparams", "train_frames_per_s", "val_mean_iou"} <= set(out)
    assert out["nparams"] == out["nparams_backbone"] + out["nparams_head"]
    assert all(len(head["epoch_losses"]) == 1 for head in out["heads"])
    record = store.resolve(out["ref"])
    assert out["plot"] == str(store.path(record) / "training.png") and "training.png" in record.manifest
    with Image.open(out["plot"]) as plot:
        assert plot.format == "PNG" and plot.width >= 800
    with pytest.raises(SystemExit) as bad_lr:
        main(["train", "--features", ref, "--store", str(store.root), "--lr", "fast"])
    assert bad_lr.value.code == 2 and "'fast' is not a comma-separated list" in capsys.readouterr().err
    assert main(["train", "--features", "nope:v1", "--store", str(store.root)]) == 1
    assert "no features artifact named 'nope'" in capsys.readouterr().err


def test_holdout_fraction_zero_trains_one_setting_on_every_clip(
    tmp_path: Path, tiny_features: tuple[Store, str], capsys: pytest.CaptureFixture[str]
) -> None:
    store, ref = tiny_features
    with pytest.raises(FeatstoreError, match=r"no clip to choose among 2 heads: choose the setting on a split first"):
        train_decoders(store, ref, holdout_fraction=0.0, lrs=[1e-3, 1e-2], device="cpu", progress=False)
    assert store.list("decoder") == [], "refused before training"
    code = main(["train", "--features", ref, "--store", str(store.root), "--holdout-fraction", "0", "--decoder",
                 "linear", "--epochs", "2", "--batch-size", "4", "--device", "cpu", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "val mean IoU      - (trained on all 4 clips: --holdout-fraction 0)" in captured.out
    assert "validating on none (--holdout-fraction 0)" in captured.err
    (record,) = store.list("decoder")
    meta = record.metadata
    assert meta["train_clips"] == sorted(open_features(store, ref).clips) and meta["val_clips"] == []
    assert meta["val_mean_iou"] is None and meta["val_j_mean"] is None and meta["val_per_clip"] is None
    assert meta["split"] == {"holdout_fraction": 0.0, "seed": 0}
    assert store.verify(record) == []
    split = train_decoders(store, ref, decoders=["linear"], epochs=2, batch_size=4, device="cpu", progress=False)
    assert split.ref != record.ref, "another split is another decoder"
    unlabelled = write_davis(tmp_path / "test-phase", {"new0": 3}, size=(48, 64), masks=False, seed=5)
    result = predict_dataset(store, record.ref, unlabelled, device="cpu", progress=False)
    assert result.record.metadata["lineage"]["decoder"] == record.ref


def test_training_again_is_a_cache_hit_unless_forced(tiny_features: tuple[Store, str]) -> None:
    store, ref = tiny_features
    options = {"decoders": ["linear"], "epochs": 1, "batch_size": 4, "device": "cpu", "progress": False}
    first = train_decoders(store, ref, **options)
    again = train_decoders(store, ref, **options)
    assert again.cached and again.ref == first.ref
    forced = train_decoders(store, ref, force=True, **options)
    assert not forced.cached and forced.ref.endswith(":v2") and forced.record.key == first.record.key
    assert store.resolve(forced.record.name).ref == forced.ref
    assert forced.record.metadata["val_mean_iou"] == first.record.metadata["val_mean_iou"], "same seed, same head"
    assert train_decoders(store, ref, **options).ref == forced.ref
    assert train_decoders(store, ref, budget=1_000_000, **options).ref == forced.ref, "the budget only gates"


def test_a_version_rebuilt_with_force_is_what_training_and_prediction_then_name(tmp_path: Path) -> None:
    data = write_davis(tmp_path / "davis", {f"clip{i}": 3 for i in range(3)}, size=(48, 64))
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", data, weights="random", device="cpu", progress=False)
    options = {"decoders": ["linear"], "epochs": 1, "batch_size": 4, "device": "cpu", "progress": False}
    first = train_decoders(store, built.record.name, **options)
    rebuilt = build_features(store, "tiny", data, weights="random", device="cpu", progress=False, force=True)
    retrained = train_decoders(store, built.record.name, **options)
    assert not retrained.cached and list(retrained.record.parents) == [rebuilt.ref] != list(first.record.parents)
    assert train_decoders(store, built.record.name, **options).ref == retrained.ref, "and that is cached in turn"

    predicted = predict_dataset(store, retrained.record.name, data, device="cpu", progress=False)
    forced = train_decoders(store, built.record.name, force=True, **options)
    again = predict_dataset(store, forced.record.name, data, device="cpu", progress=False)
    assert not again.cached and again.record.metadata["lineage"]["decoder"] == forced.ref
    assert predicted.record.metadata["lineage"]["decoder"] == retrained.ref


def test_trained_decoder_predicts_full_resolution(tiny_features: tuple[Store, str]) -> None:
    store, ref = tiny_features
    result = train_decoders(store, ref, decoders=["linear"], epochs=1, device="cpu", progress=False)
    decoder, _ = load_decoder(store, result.ref)
    features = open_features(store, ref)
    batch = {layer: features.read("clip0", layer)[:2].float() for layer in features.layers}
    with torch.no_grad():
        logits = decoder(batch, features.frame_size)
    assert logits.shape == (2, 1, 48, 64)
