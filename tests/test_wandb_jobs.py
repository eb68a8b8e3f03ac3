"""build, train and predict with --wandb: the offline W&B runs carry the same lineage as the local store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_wandb_sync import OfflineRun, _offline_environment, _run_folders

from featstore.store import Store
from jobs.featurize import build_features
from jobs.predict import predict_dataset
from jobs.train import train_decoders

pytestmark = pytest.mark.wandb


def test_jobs_mirror_their_lineage(tmp_path: Path, small_davis: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    _offline_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    store = Store(tmp_path / "store")
    runs: dict[str, OfflineRun] = {}

    def newest_run(job: str) -> None:
        wandb.teardown()  # flush the offline log before reading it
        seen = {r.folder for r in runs.values()}
        (folder,) = set(_run_folders(tmp_path / "runs")) - seen
        runs[job] = OfflineRun.read(folder)

    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False, wandb=True)
    newest_run("featurize")
    trained = train_decoders(store, built.ref, decoders=["linear"], epochs=2, device="cpu", progress=False,
                             wandb=True)
    newest_run("train")
    predicted = predict_dataset(store, trained.ref, small_davis, device="cpu", progress=False, wandb=True)
    newest_run("predict")

    for job, run in runs.items():
        assert run.run.job_type == job and run.exit_code == 0
    dataset_ref = built.record.parents[0]
    assert set(runs["featurize"].logged) == {built.record.name}
    assert set(runs["featurize"].used) == {store.resolve(dataset_ref).name}
    assert set(runs["train"].used) == {built.record.name}
    assert set(runs["train"].logged) == {trained.record.name}
    assert trained.record.name in runs["predict"].used
    result = runs["predict"].logged[predicted.record.name]
    assert result.type == "result"
    assert '"nparams"' in result.metadata
    logged_files = {entry.path for entry in result.manifest.contents}
    assert {"paths.json", "metadata.json"} <= logged_files
    assert sum(p.startswith("outputs/") for p in logged_files) == 12
    assert all(parent.split(":")[0] in runs["predict"].used for parent in predicted.record.parents)
    curve = [row for row in runs["train"].history if "epoch" in row]
    (head,) = trained.record.metadata["heads"]
    assert [row["epoch"] for row in curve] == [1, 2]
    assert [row[f"train_loss/{head['head']}"] for row in curve] == pytest.approx(head["epoch_losses"])
    summary = next(row for row in runs["train"].history if "nparams" in row)
    assert summary["cached"] is False and summary["val_mean_iou"] == trained.record.metadata["val_mean_iou"]
    assert "extraction" not in summary

    # Cache hits are runs too, with the same figures and no speed: nothing was computed to time.
    build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False, wandb=True)
    newest_run("featurize again")
    train_decoders(store, built.ref, decoders=["linear"], epochs=2, device="cpu", progress=False, wandb=True)
    newest_run("train again")
    predict_dataset(store, trained.ref, small_davis, device="cpu", progress=False, wandb=True)
    newest_run("predict again")
    for job in ("featurize again", "train again", "predict again"):
        (row,) = [row for row in runs[job].history if "cached" in row]
        assert row["cached"] is True and "fps" not in row, job
    again = next(row for row in runs["train again"].history if "nparams" in row)
    assert {k: again[k] for k in ("nparams", "val_mean_iou")} == {k: summary[k] for k in ("nparams", "val_mean_iou")}


def test_compare_groups_its_runs_and_logs_the_leaderboard(
    tmp_path: Path, small_davis: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    from jobs.compare import compare_backbones

    _offline_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    wandb.teardown()
    store = Store(tmp_path / "store")
    result = compare_backbones(store, small_davis, ["tiny@random"], decoders="linear,conv", epochs=1, device="cpu",
                               progress=False, wandb=True)
    wandb.teardown()
    runs = [OfflineRun.read(folder) for folder in _run_folders(tmp_path / "runs")]
    assert sorted(run.run.job_type for run in runs) == ["compare", "featurize", "predict", "predict", "train", "train"]
    assert len({run.run.run_group for run in runs}) == 1 and runs[0].run.run_group.startswith("compare ")
    (compare,) = [run for run in runs if run.run.job_type == "compare"]
    assert {json.loads(art.metadata)["featstore_ref"] for art in compare.used.values()} == {
        row["result_ref"] for row in result.rows
    }
    logged = {key: value for row in compare.history for key, value in row.items()}
    assert logged["leaderboard/_type"] == "table-file" and logged["leaderboard/nrows"] == 2
    assert logged["iou_vs_parameters/_type"] == "image-file" and logged["iou_vs_parameters/width"] > 0
