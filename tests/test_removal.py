"""`featstore rm`: removed versions vanish at once, free their disk, never orphan a dependent or reuse a number."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from featstore.cli import main
from featstore.errors import StoreError
from featstore.removal import plan_removal, remove, sweep
from featstore.store import RECORD_FILE, REMOVED_FILE, Store
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
    removal = plan_removal(store, [features], cascade=True)
    assert removal.refs == [result, decoder, features], "children before parents"
    assert removal.bytes == sum(sizes.values())
    remove(store, removal)
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
    remove(store, plan_removal(store, [forced.ref], cascade=False))
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
