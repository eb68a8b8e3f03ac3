"""`featstore rm`: removed versions vanish at once, free their disk, never orphan a dependent or reuse a number."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from conftest import stopped_build

from featstore.cli import main
from featstore.errors import StoreError
from featstore.features import open_features
from featstore.removal import collect_garbage, plan_removal, remove, sweep
from featstore.store import RECORD_FILE, REMOVED_FILE, TRASH_PREFIX, Store, write_json_atomic
from jobs.featurize import build_features
from jobs.predict import predict_dataset
from jobs.train import train_decoders


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.fixture
def lineage(tmp_path: Path, small_davis: Path) -> tuple[Store, Path, list[str]]:
    """A store holding dataset -> features -> decoder -> result; returns the last three refs."""
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    trained = train_decoders(store, built.ref, decoders=["linear"], epochs=1, batch_size=4, device="cpu",
                             progress=False)
    predicted = predict_dataset(store, trained.ref, small_davis, device="cpu", progress=False)
    return store, small_davis, [built.ref, trained.ref, predicted.ref]


def test_removing_a_parent_is_refused_while_dependents_exist(lineage: tuple[Store, Path, list[str]]) -> None:
    store, _, (features, decoder, result) = lineage
    before = store.list()
    with pytest.raises(StoreError, match=rf"2 artifact\(s\) were made from {features}: .*--cascade") as refused:
        plan_removal(store, [features], cascade=False)
    assert decoder in str(refused.value) and result in str(refused.value)
    with pytest.raises(StoreError, match="name the version to remove, as NAME:vN"):
        plan_removal(store, [features.split(":")[0]], cascade=True)
    assert store.list() == before


def test_cascade_removes_dependents_first_and_frees_their_bytes(lineage: tuple[Store, Path, list[str]]) -> None:
    store, data, (features, decoder, result) = lineage
    sizes = {ref: folder_bytes(store.path(store.resolve(ref))) for ref in (features, decoder, result)}
    folders = {ref: store.path(store.resolve(ref)) for ref in sizes}
    planned = plan_removal(store, [features], cascade=True)
    assert planned.refs == [result, decoder, features], "children before parents"
    records = sum((folder / RECORD_FILE).stat().st_size for folder in folders.values())
    assert planned.bytes == sum(sizes.values()) - records, "all but the records, which become tombstones"
    removal, freed = remove(store, [features], cascade=True)
    assert removal.refs == planned.refs and freed == planned.bytes
    assert {r.type for r in store.list()} == {"dataset"}, "the dataset was not asked for and stays"
    for ref, folder in folders.items():
        assert sorted(p.name for p in folder.iterdir()) == [REMOVED_FILE], ref
        with pytest.raises(StoreError, match="removed with `featstore rm`"):
            store.resolve(ref)
    rebuilt = build_features(store, "tiny", data, weights="random", device="cpu", progress=False)
    assert not rebuilt.cached and rebuilt.ref.endswith(":v2"), "a removed version's number is never reused"


def test_removing_a_forced_version_gives_latest_and_the_cache_back_to_the_older_one(
    tmp_path: Path, small_davis: Path
) -> None:
    store = Store(tmp_path / "store")
    first = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    forced = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False, force=True)
    remove(store, [forced.ref], cascade=False)
    with pytest.raises(StoreError, match=r"v2 was removed with `featstore rm` on .*; known versions: .*:v1"):
        store.resolve(forced.ref)
    assert store.resolve(first.record.name).ref == first.ref
    again = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert again.cached and again.ref == first.ref


def test_a_removal_stopped_after_its_commit_point_is_invisible_and_swept_later(
    tmp_path: Path, small_davis: Path
) -> None:
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    folder = store.path(built.record)
    size = folder_bytes(folder)
    os.replace(folder / RECORD_FILE, folder / REMOVED_FILE)  # killed right after the rename
    assert [r.type for r in store.list()] == ["dataset"]
    with pytest.raises(StoreError, match="removed with `featstore rm`"):
        store.resolve(built.ref)
    freed = sweep(store)
    assert sorted(p.name for p in folder.iterdir()) == [REMOVED_FILE]
    assert 0 < freed < size


def test_cli_rm_dry_run_then_json(lineage: tuple[Store, Path, list[str]], capsys: pytest.CaptureFixture[str]) -> None:
    store, _, (features, decoder, result) = lineage
    common = ["--store", str(store.root)]
    capsys.readouterr()
    assert main(["rm", decoder, "--cascade", "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert f"would remove  {result}  (result)" in out and f"would remove  {decoder}  (decoder)" in out
    assert "would free" in out
    assert store.resolve(decoder) and store.resolve(result)
    assert main(["rm", result, decoder, "--json", *common]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert payload["removed"] == [result, decoder] and payload["bytes"] > 0 and payload["dry_run"] is False
    assert {r.ref for r in store.list()} == {features, store.resolve(features).parents[0]}
    assert main(["rm", decoder, *common]) == 1
    assert "removed with `featstore rm`" in capsys.readouterr().err


def test_removal_frees_the_disk_even_when_nothing_can_be_written(
    tmp_path: Path, small_davis: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    size = folder_bytes(store.path(built.record)) - (store.path(built.record) / RECORD_FILE).stat().st_size

    def disk_full(path: Path, payload: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("featstore.removal.write_json_atomic", disk_full)
    _, freed = remove(store, [built.ref], cascade=False)
    assert freed == size
    assert sorted(p.name for p in store.path(built.record).iterdir()) == [REMOVED_FILE]
    with pytest.raises(StoreError, match="removed with `featstore rm`"):
        store.resolve(built.ref)


def test_a_job_whose_input_was_removed_meanwhile_does_not_commit(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    with store.stage("decoder", "late", "k" * 64) as staging:
        write_json_atomic(staging.path / "decoder.json", {})
        remove(store, [built.ref], cascade=False)  # no dependent is committed yet, so rm may go ahead
        with pytest.raises(StoreError, match=rf"its input {built.ref} is gone .*run the job again"):
            staging.commit(parents=[built.ref], metadata={})
    assert store.list("decoder") == []


def test_the_same_version_named_twice_is_removed_once(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    name = built.record.name
    removal = plan_removal(store, [f"{name}:v1", f"{name}:v01", f" {name}:v1"], cascade=False)
    assert removal.refs == [built.ref]


def test_an_unreadable_record_elsewhere_is_a_warning_not_a_block(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    other = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False, force=True)
    (store.path(other.record) / RECORD_FILE).write_text("{not json")
    removal, _ = remove(store, [built.ref], cascade=False)
    assert removal.refs == [built.ref]
    assert len(removal.warnings) == 1 and "is unreadable" in removal.warnings[0]


def test_gc_deletes_abandoned_staging_but_not_work_in_progress(
    tmp_path: Path, small_davis: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(tmp_path / "store")
    abandoned = stopped_build(store, small_davis)
    size = folder_bytes(abandoned)
    with store.stage("decoder", "running", "r" * 64) as running:  # a job still writing: its lock is held
        (running.path / "partial.bin").write_bytes(b"x" * 1000)
        common = ["--store", str(store.root), "--json"]
        capsys.readouterr()
        assert main(["gc", "--dry-run", *common]) == 0
        listed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert listed["staging"] == [{"path": str(abandoned), "bytes": size}] and abandoned.is_dir()
        assert main(["gc", *common]) == 0
        removed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert removed["bytes"] == size and not abandoned.exists()
        assert (running.path / "partial.bin").is_file(), "work in progress is left alone"
    rebuilt = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert store.verify(rebuilt.record) == [], "the stopped build starts over after gc"


def test_rm_waits_for_a_commit_in_progress(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    finished = threading.Event()

    def remove_it() -> None:
        remove(store, [built.ref], cascade=False)
        finished.set()

    with store.lineage_lock(exclusive=False):  # what a commit holds while it checks parents and renames in
        worker = threading.Thread(target=remove_it)
        worker.start()
        assert not finished.wait(0.5), "rm went ahead while a commit held the lineage lock"
        assert store.resolve(built.ref) == built.record
    worker.join(timeout=30)
    assert finished.is_set() and [r.type for r in store.list()] == ["dataset"]


def test_gc_deletes_folders_a_stopped_deletion_left_aside(tmp_path: Path) -> None:
    store = Store(tmp_path / "store")
    left, busy = (store.root / "staging" / f"{TRASH_PREFIX}features-{key}.1a2b" for key in ("left", "busy"))
    for aside in (left, busy):
        (aside / "data").mkdir(parents=True)
        (aside / "data" / "chunk").write_bytes(b"x" * 500)
    with open(store.root / "staging" / "features-busy.lock", "a+") as lock:  # its job is deleting it now
        fcntl.flock(lock, fcntl.LOCK_EX)
        (found,) = collect_garbage(store)
    assert found.path == left and found.bytes == 500 and not left.exists()
    assert busy.exists(), "a folder its job is still deleting is that job's to delete"


def test_progress_markers_without_their_data_are_not_resumed(tmp_path: Path, small_davis: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(tmp_path / "store")
    staging = stopped_build(store, small_davis)
    shutil.rmtree(staging / "data")  # as a kill right after a commit's rename leaves it
    rebuilt = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert "already finished" not in capsys.readouterr().err
    assert store.verify(rebuilt.record) == []
    features = open_features(store, rebuilt.ref)
    assert features.read("alpha", "stage2").abs().sum() > 0, "clip alpha was computed, not skipped"


def test_a_lone_unreadable_version_is_named_as_unreadable(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    (store.path(built.record) / RECORD_FILE).write_text("{not json")
    for ref in (built.ref, built.record.name):
        with pytest.raises(StoreError, match=rf"is unreadable .*`featstore rm {built.ref}`"):
            store.resolve(ref)
    removal, freed = remove(store, [built.ref], cascade=False)
    assert removal.refs == [built.ref] and freed > 0
    with pytest.raises(StoreError, match="removed with `featstore rm`"):
        store.resolve(built.ref)
    again = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert again.ref.endswith(":v2"), "the dropped version's number is not reused"
