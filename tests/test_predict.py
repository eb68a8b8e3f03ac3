"""Predicting datasets with a committed decoder into contest result folders, from stored features or the backbone."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_davis
from PIL import Image

from featstore.backbones import create_backbone
from featstore.cli import main
from featstore.datasets import Dataset, load_dataset
from featstore.errors import BackboneError, DatasetError, FeatstoreError, StoreError
from featstore.frame_stream import with_jpeg_decoder
from featstore.results import read_result_folder
from featstore.store import Store
from jobs.evaluate import evaluate
from jobs.featurize import build_features
from jobs.predict import PredictResult, _decode_as_trained, _rebuild_backbone, predict_dataset
from jobs.train import train_decoders

CLIPS = {"alpha": 5, "beta": 4, "gamma": 5, "delta": 4}
SIZE = (48, 80)  # (height, width): not a multiple of the backbone's strides, so upsampling is exercised


@dataclasses.dataclass
class Trained:
    store: Store
    data: Path
    features: str
    decoders: dict[str, str]  # head name -> decoder ref


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One small annotated dataset, tiny random features, and an fpn and a temporal decoder trained on them."""
    root = tmp_path_factory.mktemp("predict")
    data = write_davis(root / "clips", CLIPS, size=SIZE, seed=7)
    store = Store(root / "store")
    built = build_features(store, "tiny", data, weights="random", batch_size=4, device="cpu", progress=False)
    decoders = {
        head: train_decoders(store, built.ref, decoders=[head], epochs=2, batch_size=4, device="cpu",
                             progress=False).ref
        for head in ("fpn", "temporal")
    }
    return Trained(store, data, built.ref, decoders)


def write_contest_test_set(root: Path, source: Dataset, *, first_row: int = 100) -> Path:
    """The frames of ``source`` as a test-phase contest folder: paths.json with only "raw", rows from ``first_row``."""
    raw = {}
    for offset, record in enumerate(reversed(source.frames)):
        relative = f"test/JPEGImages/480p/{record.clip}/{record.frame:05d}.jpg"
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(record.raw.read_bytes())
        raw[str(first_row + offset)] = relative
    (root / "paths.json").write_text(json.dumps({"raw": raw}))
    return root


def png_bytes(result: PredictResult) -> dict[int, bytes]:
    return {row: path.read_bytes() for row, path in read_result_folder(result.out).outputs.items()}


def test_result_folder_has_the_contest_format_and_lineage(trained: Trained) -> None:
    store, decoder_ref = trained.store, trained.decoders["fpn"]
    dataset = load_dataset(trained.data)
    result = predict_dataset(store, decoder_ref, trained.data, device="cpu", progress=False)
    assert result.out == store.path(result.record) and result.source == "features"
    assert result.features == trained.features and not result.cached

    paths = json.loads((result.out / "paths.json").read_text())
    assert paths == {"output": {str(r.row): f"outputs/{r.row:05d}.png" for r in dataset.frames}}
    for record in dataset.frames:
        with Image.open(result.out / f"outputs/{record.row:05d}.png") as image:
            assert image.mode == "L" and image.size == (SIZE[1], SIZE[0])

    metadata = json.loads((result.out / "metadata.json").read_text())
    decoder = store.resolve(decoder_ref)
    assert metadata["nparams"] == decoder.metadata["nparams"] > metadata["nparams_head"] > 0
    assert metadata["nflops"] == metadata["nflops_backbone"] + metadata["nflops_head"] > 0
    assert metadata["backbone"]["name"] == "tiny" and metadata["decoder"]["name"] == "fpn"
    lineage = metadata["lineage"]
    assert lineage["decoder"] == decoder_ref and lineage["features"] == trained.features
    assert lineage["dataset"]["digest"] == dataset.digest()
    assert set(result.record.parents) == {decoder_ref, trained.features, lineage["dataset"]["ref"]}
    assert result.record.type == "result" and store.verify(result.record) == []


def test_a_test_phase_dataset_without_annotations_is_predicted_by_row(trained: Trained, tmp_path: Path) -> None:
    source = load_dataset(trained.data)
    folder = write_contest_test_set(tmp_path / "contest", source)
    test_set = load_dataset(folder)
    assert not test_set.has_annotations

    result = predict_dataset(trained.store, trained.decoders["fpn"], folder, device="cpu", progress=False)
    assert result.source == "backbone" and result.features is None
    outputs = read_result_folder(result.out).outputs
    assert sorted(outputs) == [r.row for r in test_set.frames] == list(range(100, 100 + len(source.frames)))
    for record in test_set.frames:
        with Image.open(outputs[record.row]) as image:
            assert image.mode == "L" and image.size == (SIZE[1], SIZE[0])
    assert json.loads((result.out / "metadata.json").read_text())["lineage"]["dataset"]["has_annotations"] is False


@pytest.mark.parametrize("head", ["fpn", "temporal"])
def test_stored_features_and_the_backbone_give_identical_masks(trained: Trained, tmp_path: Path, head: str) -> None:
    source = load_dataset(trained.data)
    from_features = predict_dataset(trained.store, trained.decoders[head], source, device="cpu", progress=False)
    # The same frames without annotations are another dataset: no features are stored for it.
    folder = write_contest_test_set(tmp_path / "contest", source, first_row=0)
    from_backbone = predict_dataset(trained.store, trained.decoders[head], folder, batch_size=3, device="cpu",
                                    progress=False)
    assert (from_features.source, from_backbone.source) == ("features", "backbone")

    by_frame = {(r.clip, r.frame): r.row for r in load_dataset(folder).frames}
    stored, computed = png_bytes(from_features), png_bytes(from_backbone)
    assert len(stored) == len(computed) == len(source.frames)
    for record in source.frames:
        assert stored[record.row] == computed[by_frame[record.clip, record.frame]], f"{record.clip}/{record.frame}"
    masks = np.stack([np.asarray(Image.open(p)) for p in read_result_folder(from_features.out).outputs.values()])
    assert masks.min() < 128 <= masks.max(), "predictions are neither all foreground nor all background"


def test_each_clip_is_predicted_at_its_own_frame_size(trained: Trained, tmp_path: Path) -> None:
    """A dataset whose clips differ in size from each other and from the training frames."""
    data = write_davis(tmp_path / "mixed", {"small": 3}, size=(32, 56), seed=1)
    write_davis(data, {"large": 3}, size=(72, 120), seed=2)
    built = build_features(trained.store, "tiny", data, weights="random", device="cpu", progress=False)
    sizes = {"small": (56, 32), "large": (120, 72)}
    for source in ("features", "backbone"):
        dataset = load_dataset(data)
        if source == "backbone":  # the same frames without annotations: no stored features for them
            dataset = load_dataset(write_contest_test_set(tmp_path / "mixed-test", dataset))
        result = predict_dataset(trained.store, trained.decoders["fpn"], dataset, device="cpu", progress=False)
        assert result.source == source and result.features == (built.ref if source == "features" else None)
        outputs = read_result_folder(result.out).outputs
        for record in dataset.frames:
            with Image.open(outputs[record.row]) as image:
                assert image.size == sizes[record.clip]


def test_held_out_clips_score_exactly_as_validation_did(trained: Trained) -> None:
    """The result folder, scored by the contest rule, reproduces the decoder's own validation numbers."""
    store = trained.store
    decoder = store.resolve(trained.decoders["fpn"])
    val_clips = decoder.metadata["val_clips"]
    held_out = dataclasses.replace(load_dataset(trained.data).subset(val_clips), name="clips-holdout")
    result = predict_dataset(store, decoder.ref, held_out, features=trained.features, device="cpu", progress=False)
    assert result.source == "features" and result.features == trained.features
    scores = evaluate(result.out, held_out, progress=False)
    assert scores.mean_iou == pytest.approx(decoder.metadata["val_mean_iou"], abs=1e-12)
    assert scores.j_mean == pytest.approx(decoder.metadata["val_j_mean"], abs=1e-12)
    assert scores.per_clip == pytest.approx(decoder.metadata["val_per_clip"], abs=1e-12)


def test_features_of_another_dataset_are_refused(trained: Trained, tmp_path: Path) -> None:
    other = write_davis(tmp_path / "other", {"alpha": 5}, size=SIZE, seed=99)
    with pytest.raises(FeatstoreError, match="not the clip stored in features"):
        predict_dataset(trained.store, trained.decoders["fpn"], other, features=trained.features, device="cpu",
                        progress=False)


def test_predicting_again_computes_nothing_and_out_gets_a_copy(trained: Trained, tmp_path: Path) -> None:
    store, decoder_ref = trained.store, trained.decoders["fpn"]
    first = predict_dataset(store, decoder_ref, trained.data, device="cpu", progress=False)
    before = store.list()
    again = predict_dataset(store, decoder_ref, trained.data, out=tmp_path / "submission", device="cpu",
                            progress=False)
    assert again.cached and again.ref == first.ref and store.list() == before
    assert again.out == tmp_path / "submission"
    assert sorted(p.name for p in again.out.iterdir()) == ["metadata.json", "outputs", "paths.json"]
    assert png_bytes(again) == png_bytes(first)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary folder is left behind"

    with pytest.raises(FeatstoreError, match="not empty"):
        predict_dataset(store, decoder_ref, trained.data, out=tmp_path / "submission", device="cpu", progress=False)


def test_changed_backbone_weights_are_refused(tmp_path: Path) -> None:
    weights = tmp_path / "tiny.pt"
    torch.save(create_backbone("tiny", weights="random", seed=1).state_dict(), weights)
    data = write_davis(tmp_path / "clips", {"alpha": 3, "beta": 3}, size=SIZE)
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", data, weights=str(weights), device="cpu", progress=False)
    decoder = train_decoders(store, built.ref, holdout_fraction=0.5, epochs=1, device="cpu", progress=False)
    torch.save(create_backbone("tiny", weights="random", seed=2).state_dict(), weights)
    unannotated = write_contest_test_set(tmp_path / "contest", load_dataset(data))
    with pytest.raises(BackboneError, match=f"decoder {decoder.ref} was trained on features of weights"):
        predict_dataset(store, decoder.ref, unannotated, device="cpu", progress=False)
    assert store.list("result") == []
    weights.unlink()
    with pytest.raises(BackboneError, match=f"weights file {weights}, which is gone; restore the file there"):
        predict_dataset(store, decoder.ref, unannotated, device="cpu", progress=False)
    assert store.list("result") == []


def test_cli_predict_json_and_errors(trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = str(trained.store.root)
    decoder_ref = trained.decoders["fpn"]
    out = tmp_path / "submission"
    args = ["predict", "--decoder", decoder_ref, "--data", str(trained.data), "--store", store, "--out", str(out),
            "--device", "cpu", "--json", "--quiet"]
    assert main(args) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["ref"].startswith("clips.clips.tiny.random.fpn:v") and payload["out"] == str(out)
    assert (out / "paths.json").is_file()
    assert main(["predict", "--decoder", decoder_ref, "--data", str(trained.data), "--store", store, "--device", "cpu",
                 "--json", "--quiet"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["cached"] and again["fps"] is None and again["ref"] == payload["ref"]
    stored = trained.store.path(trained.store.resolve(payload["ref"]))
    assert payload["folder"] == again["folder"] == again["out"] == str(stored), "the copy and the stored folder"
    args[args.index("--json")] = "--force"
    args[args.index(str(out))] = str(tmp_path / "copy")
    assert main(args) == 0
    assert f"stored as         {trained.store.root}" in capsys.readouterr().out

    assert main(["predict", "--decoder", decoder_ref, "--data", str(trained.data), "--store", store,
                 "--device", "cpu", "--quiet"]) == 0
    shown = capsys.readouterr().out
    assert "cached" in shown and str(trained.store.root / "artifacts" / "result") in shown

    before = trained.store.list()
    assert main(["predict", "--decoder", "nosuch.decoder", "--data", str(trained.data), "--store", store]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nosuch.decoder" in err and "featstore ls" in err
    assert main(["predict", "--decoder", decoder_ref, "--data", str(tmp_path / "nope"), "--store", store]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "nope") in err
    assert trained.store.list() == before, "a refused predict writes nothing"


def test_library_errors_name_the_problem(trained: Trained, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no decoder artifact named 'absent'"):
        predict_dataset(trained.store, "absent:v1", trained.data, device="cpu", progress=False)
    with pytest.raises(DatasetError, match="no such file or folder"):
        predict_dataset(trained.store, trained.decoders["fpn"], tmp_path / "nope", device="cpu", progress=False)
    with pytest.raises(FeatstoreError, match="--batch-size 0"):
        predict_dataset(trained.store, trained.decoders["fpn"], trained.data, batch_size=0, progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(FeatstoreError, match=r"--out .*taken.* not empty"):
        predict_dataset(trained.store, trained.decoders["fpn"], trained.data, out=tmp_path / "taken", progress=False)


@pytest.mark.wandb
def test_wandb_run_uses_the_decoder_and_features_and_logs_the_result(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb
    from test_wandb_sync import OfflineRun

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    decoder = trained.store.resolve(trained.decoders["temporal"])
    held_out = load_dataset(trained.data).subset(decoder.metadata["val_clips"])
    wandb.teardown()
    try:
        result = predict_dataset(trained.store, decoder.ref, held_out, features=trained.features, device="cpu",
                                 progress=False, wandb=True)
    finally:
        wandb.teardown()  # finish() may return before the core has flushed the run's log to disk
    (folder,) = (tmp_path / "runs" / "wandb").glob("offline-run-*")
    run = OfflineRun.read(folder)
    assert run.run.job_type == "predict" and run.exit_code == 0
    assert set(run.logged) == {result.record.name}
    used = {json.loads(art.metadata)["featstore_ref"] for art in run.used.values()}
    assert used == set(result.record.parents) and {decoder.ref, trained.features} < used
    logged = json.loads(run.logged[result.record.name].metadata)
    assert logged["nparams"] == decoder.metadata["nparams"] and logged["featstore_ref"] == result.ref


def test_a_damaged_result_says_how_to_recompute_it_and_force_does(trained: Trained, tmp_path: Path) -> None:
    folder = write_contest_test_set(tmp_path / "forced", load_dataset(trained.data))
    store, decoder_ref = trained.store, trained.decoders["fpn"]
    first = predict_dataset(store, decoder_ref, folder, device="cpu", progress=False)
    kept = png_bytes(first)
    removed = sorted((first.out / "outputs").iterdir())[0]
    removed.unlink()
    with pytest.raises(StoreError, match=r"run the `featstore predict` \(or `featstore compare`\) command that made it again with --force"):
        predict_dataset(store, decoder_ref, folder, device="cpu", progress=False)
    forced = predict_dataset(store, decoder_ref, folder, device="cpu", progress=False, force=True)
    assert not forced.cached and forced.ref != first.ref and forced.record.key == first.record.key
    assert store.verify(forced.record) == []
    assert png_bytes(forced) == kept, "the same inputs give the same PNGs, the lost one included"
    again = predict_dataset(store, decoder_ref, folder, device="cpu", progress=False)
    assert again.cached and again.ref == forced.ref


def test_a_decoder_trained_on_nvjpeg_features_decodes_as_it_was_trained(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run for such a decoder, the backbone gets nvJPEG's pixels on a GPU, and PIL's on the CPU, with a warning."""
    record = trained.store.resolve(trained.decoders["fpn"], type="decoder")
    assert not _decode_as_trained(record, torch.device("cuda")), "PIL-decoded features: PIL decodes, even on a GPU"
    meta = record.metadata
    on_gpu = dataclasses.replace(
        record, metadata={**meta, "preprocessing": with_jpeg_decoder(meta["preprocessing"], on_gpu=True)}
    )
    assert _decode_as_trained(on_gpu, torch.device("cuda"))
    assert capsys.readouterr().err == ""
    assert not _decode_as_trained(on_gpu, torch.device("cpu"))
    assert f"decoder {record.ref} was trained on features of JPEGs decoded by nvJPEG" in capsys.readouterr().err
    # The backbone itself is the one the decoder was trained on, whichever decoder made its pixels.
    assert _rebuild_backbone(on_gpu, torch.device("cpu")).weights_digest == meta["weights_digest"]
