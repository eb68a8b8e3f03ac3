"""A Lightning user's workflow on a stored artifact: fit, checkpoint, reload, predict, commit, `featstore predict`."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import write_davis
from pytorch_lightning.callbacks import ModelCheckpoint
from synthetic_features import synthetic_features

from decoders import HeadConfig, host_allocator
from decoders.lightning import FeatureDataModule, HeadModule
from decoders.training import DEFAULT_HOLDOUT_FRACTION, recalibrate_batchnorm
from featstore.cli import build_parser
from featstore.errors import FeatstoreError
from featstore.store import Store
from jobs.featurize import build_features
from jobs.predict import predict_dataset
from jobs.train import commit_head, load_decoder, train_decoders

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lightning_train.py"
CLIPS = {"alpha": 6, "beta": 5, "gamma": 6, "delta": 5}
LINEAR = HeadConfig("linear", lr=1e-2, weight_decay=1e-4)
FPN = HeadConfig("fpn", lr=3e-3, options={"width": 16})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, str, Path]:
    root = tmp_path_factory.mktemp("lightning")
    data = write_davis(root / "davis", CLIPS, seed=3)
    store = Store(root / "store")
    ref = build_features(store, "tiny", data, weights="random", batch_size=4, device="cpu", progress=False).ref
    return store, ref, root


def _trainer(epochs: int, **options: object) -> pl.Trainer:
    settings: dict[str, object] = {
        "max_epochs": epochs, "accelerator": "cpu", "logger": False, "enable_checkpointing": False,
        "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**{**settings, **options})  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [LINEAR, HeadConfig("fpn", lr=3e-3)], ids=["linear", "fpn"])
def test_a_head_fitted_in_lightning_takes_the_steps_featstore_train_takes(
    built: tuple[Store, str, Path], config: HeadConfig
) -> None:
    store, ref, _ = built
    data = FeatureDataModule(ref, store=store.root, batch_size=4, seed=0)
    module = HeadModule(config, data.channels, data.strides, seed=0)  # sizes from the record, before setup
    _trainer(2).fit(module, datamodule=data)
    trained = train_decoders(store, ref, decoders=[config.decoder], lrs=[config.lr], epochs=2, batch_size=4,
                             weight_decays=[config.weight_decay], seed=0, device="cpu", progress=False)
    reference, record = load_decoder(store, trained.ref)
    meta = record.metadata
    assert data.val_features is not None and list(data.val_features.clips) == meta["val_clips"]
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(module.head.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert module.val_scores is not None and set(module.val_scores.per_clip) == set(meta["val_clips"])
    assert module.val_scores.mean_iou == pytest.approx(meta["val_mean_iou"], abs=1e-6)
    assert module.epoch_losses == pytest.approx(meta["heads"][0]["epoch_losses"], rel=1e-5)
    assert module.final_loss == pytest.approx(meta["heads"][0]["final_loss"], rel=1e-5), "the last step's loss"


def test_checkpoint_reload_prediction_and_commit_as_a_decoder(built: tuple[Store, str, Path]) -> None:
    store, ref, root = built
    data = FeatureDataModule(ref, store=store.root, batch_size=4, seed=1)
    module = HeadModule.for_features(FPN.to_dict(), data, seed=0)
    trainer = _trainer(2)
    trainer.fit(module, datamodule=data)
    checkpoint = root / "fpn.ckpt"
    trainer.save_checkpoint(checkpoint)
    reloaded = HeadModule.load_from_checkpoint(checkpoint)
    assert reloaded.config == FPN
    assert len(module.epoch_losses) == 2 and reloaded.epoch_losses == module.epoch_losses
    assert reloaded.train_seconds == module.train_seconds > 0 and reloaded.train_frames == module.train_frames
    for name, value in module.head.state_dict().items():
        assert torch.equal(reloaded.head.state_dict()[name], value), name

    assert data.val_features is not None
    batches = _trainer(1).predict(reloaded, datamodule=data)
    assert batches is not None
    index = torch.cat([b["index"] for b in batches])  # type: ignore[index]
    assert index.tolist() == list(range(len(data.val_features)))
    probabilities = torch.cat([b["probabilities"] for b in batches])  # type: ignore[index]
    assert probabilities.shape == (len(data.val_features), *data.val_features.frame_size)
    assert [c for b in batches for c in b["clips"]] == [  # type: ignore[index]
        data.val_features.clips[i] for i in data.val_features.clip_ids.tolist()]

    committed = commit_head(data, module)
    meta = committed.record.metadata
    assert not committed.cached and committed.record.parents == (ref,)
    assert meta["head"] == FPN.to_dict() and meta["val_clips"] == list(data.val_features.clips)
    assert meta["nparams"] == meta["nparams_backbone"] + module.head.nparams
    assert meta["val_mean_iou"] == pytest.approx(module.evaluate(data.val_features).mean_iou)
    assert meta["heads"][0]["epoch_losses"] == pytest.approx(module.epoch_losses)
    assert store.verify(committed.record) == []
    assert commit_head(data, module).cached, "the same weights again are the same artifact"
    decoder, _ = load_decoder(store, committed.ref)
    for name, value in module.head.state_dict().items():
        assert torch.equal(decoder.state_dict()[name], value.cpu()), name

    result = predict_dataset(store, committed.ref, root / "davis", device="cpu", progress=False)
    assert result.record.parents[0] == committed.ref
    assert len(list((result.out / "outputs").glob("*.png"))) == sum(CLIPS.values())


def _assert_exact_statistics(head: torch.nn.Module, saved: dict[str, torch.Tensor], data: FeatureDataModule) -> None:
    """``saved`` holds the BatchNorm statistics a recalibration of ``head`` over the training frames gives."""
    assert data.train_features is not None
    expected = copy.deepcopy(head)
    recalibrate_batchnorm(expected, data.train_features, batch_size=data.batch_size)
    running = [name for name in expected.state_dict() if "running" in name]
    assert running
    for name in running:
        torch.testing.assert_close(saved[name], expected.state_dict()[name], msg=name)


def test_without_validation_batchnorm_is_still_recalibrated(built: tuple[Store, str, Path], tmp_path: Path) -> None:
    store, ref, _ = built
    data = FeatureDataModule(ref, store=store.root, holdout_fraction=0.0, batch_size=4)
    module = HeadModule.for_features(FPN, data)
    for _ in range(2):  # a second Trainer counts its steps from 0 again
        last = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
        _trainer(1, enable_checkpointing=True, callbacks=[last]).fit(module, datamodule=data)
        assert data.val_features is None and data.train_features is not None
        assert sorted(data.train_features.clips) == sorted(CLIPS), "holdout 0 trains on every clip"
        _assert_exact_statistics(module.head, module.head.state_dict(), data)
        saved = torch.load(last.last_model_path, map_location="cpu", weights_only=False)["state_dict"]
        _assert_exact_statistics(module.head, {k.removeprefix("head."): v for k, v in saved.items()}, data)
    committed = commit_head(data, module)
    meta = committed.record.metadata
    assert meta["val_clips"] == [] and meta["val_mean_iou"] is None, "a head fitted on every clip is unvalidated"
    assert sorted(meta["train_clips"]) == sorted(CLIPS)
    decoder, _ = load_decoder(store, committed.ref)
    torch.testing.assert_close(decoder.state_dict(), {k: v.cpu() for k, v in module.head.state_dict().items()})


def test_a_head_is_committed_only_with_the_features_it_was_fitted_on(built: tuple[Store, str, Path]) -> None:
    store, ref, root = built
    data = FeatureDataModule(ref, store=store.root, batch_size=4)
    module = HeadModule.for_features(LINEAR, data)
    _trainer(1).fit(module, datamodule=data)
    assert module.trained_on == ref
    other = write_davis(root / "lookalike", {"rho": 3, "tau": 3}, seed=7)
    lookalike = build_features(store, "tiny", other, weights="random", device="cpu", progress=False).ref
    with pytest.raises(FeatstoreError, match=f"fitted on features {ref} but the data module holds {lookalike}"):
        commit_head(FeatureDataModule(lookalike, store=store.root, batch_size=4), module)


def test_setup_follows_a_changed_split(built: tuple[Store, str, Path]) -> None:
    store, ref, _ = built
    data = FeatureDataModule(ref, store=store.root, batch_size=4, seed=0)
    data.setup("fit")
    assert data.val_features is not None
    first = data.val_features.clips
    data.setup("fit")
    assert data.val_features.clips == first, "set up once per split"
    data.holdout_fraction = 0.5
    data.setup("fit")
    assert len(data.val_features.clips) == 2 and set(data.val_features.clips).isdisjoint(data.train_features.clips)


def test_data_module_refuses_what_featstore_train_refuses(built: tuple[Store, str, Path]) -> None:
    store, ref, root = built
    other = write_davis(root / "other", {"omega": 3, "sigma": 3}, seed=4)
    reseeded = build_features(store, "tiny", other, weights="random", seed=5, device="cpu", progress=False).ref
    with pytest.raises(FeatstoreError, match=f"features {reseeded} differ from the training features {ref} in .*weights_digest"):
        FeatureDataModule(ref, store=store.root, val_ref=reseeded).setup("fit")
    with pytest.raises(FeatstoreError, match=r"holdout_fraction 1\.0 must be in \[0, 1\)"):
        FeatureDataModule(ref, store=store.root, holdout_fraction=1.0)
    if not torch.cuda.is_available():
        with pytest.raises(FeatstoreError, match="device 'cuda' asks for CUDA but torch sees no GPU"):
            FeatureDataModule(ref, store=store.root, device="cuda")
    in_memory = synthetic_features({"a": 4, "b": 4}, seed=1)
    with pytest.raises(FeatstoreError, match="predict_ref needs ref"):
        FeatureDataModule(train=in_memory, predict_ref=ref)
    with pytest.raises(FeatstoreError, match=r"commit_head needs a FeatureDataModule made from a stored feature artifact"):
        commit_head(FeatureDataModule(train=in_memory), HeadModule.for_features(LINEAR, in_memory))
    everything = FeatureDataModule(ref, store=store.root, holdout_fraction=0.0)
    with pytest.raises(FeatstoreError, match=r"no predict features loaded: pass predict_ref, or keep clips for validation"):
        _trainer(1).predict(HeadModule.for_features(LINEAR, everything), datamodule=everything)


def test_loaders_without_their_data_module_say_to_pass_it(built: tuple[Store, str, Path]) -> None:
    store, ref, _ = built
    data = FeatureDataModule(ref, store=store.root, batch_size=4)
    data.setup("fit")
    module = HeadModule("linear", data.channels, data.strides)
    with pytest.raises(FeatstoreError, match=r"trainer\.fit\(module, datamodule=data\)"):
        _trainer(1).fit(module, train_dataloaders=data.train_dataloader())
    assert not host_allocator.is_active(), "a fit that failed gives freed host memory back too"


def test_predict_features_need_no_masks_and_must_match(built: tuple[Store, str, Path]) -> None:
    store, ref, root = built
    unlabelled = write_davis(root / "test-set", {"kappa": 4}, masks=False, seed=6)
    test_ref = build_features(store, "tiny", unlabelled, weights="random", device="cpu", progress=False).ref
    data = FeatureDataModule(ref, store=store.root, predict_ref=test_ref, batch_size=3)
    module = HeadModule.for_features(LINEAR, data)
    batches = _trainer(1).predict(module, datamodule=data)
    assert batches is not None
    assert sum(len(b["clips"]) for b in batches) == 4 and {c for b in batches for c in b["clips"]} == {"kappa"}  # type: ignore[index]


def test_every_entry_point_holds_out_the_same_fraction_by_default() -> None:
    parser = build_parser()
    assert parser.parse_args(["train", "--features", "x"]).holdout_fraction == DEFAULT_HOLDOUT_FRACTION
    assert parser.parse_args(["compare", "--backbones", "x"]).holdout_fraction == DEFAULT_HOLDOUT_FRACTION
    assert FeatureDataModule("x").holdout_fraction == DEFAULT_HOLDOUT_FRACTION


def test_the_lightning_example_commits_a_decoder_with_its_curve(built: tuple[Store, str, Path], tmp_path: Path) -> None:
    store, ref, _ = built
    run = subprocess.run(
        [sys.executable, str(EXAMPLE), ref, "--store", str(store.root), "--decoder", "linear", "--lr", "1e-2", "3e-2",
         "--epochs", "2", "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    scores = [float(s) for s in re.findall(r"best val_iou ([0-9.]+)", run.stdout)]
    assert len(scores) == 2
    committed = re.search(r"decoder (\S+): val mean IoU ([0-9.]+)", run.stdout)
    assert committed is not None, run.stdout
    record = store.resolve(committed.group(1), type="decoder")
    meta = record.metadata
    assert meta["val_mean_iou"] == pytest.approx(max(scores), abs=1e-4), "the best checkpoint is what was committed"
    assert len(meta["heads"][0]["epoch_losses"]) >= 1, "the checkpoint carried the fit's loss curve"
    assert record.parents == (ref,) and store.verify(record) == []
    assert len(list((tmp_path / "logs").glob("linear-lr*/version_0/metrics.csv"))) == 2
