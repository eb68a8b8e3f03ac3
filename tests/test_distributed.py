"""The featurize job on a real dask.distributed LocalCluster gives the same artifact as a local build."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from featstore.errors import FeatstoreError
from featstore.features import open_features
from featstore.store import Store
from jobs.distributed import connect, local_workers
from jobs.featurize import build_features

pytestmark = pytest.mark.dask


def test_local_cluster_build_matches_local_build(tmp_path: Path, small_davis: Path) -> None:
    local_store, dask_store = Store(tmp_path / "local"), Store(tmp_path / "dask")
    local = build_features(local_store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    distributed = build_features(dask_store, "tiny", small_davis, weights="random", device="cpu",
                                 scheduler="local:2", progress=False)
    assert distributed.record.key == local.record.key and distributed.ref == local.ref
    assert dask_store.verify(distributed.record) == []
    a, b = open_features(local_store, local.ref), open_features(dask_store, distributed.ref)
    for clip in a.clips:
        assert a.rows(clip) == b.rows(clip)
        for layer in a.layers:
            assert torch.equal(a.read(clip, layer), b.read(clip, layer))
        assert torch.equal(a.read_masks(clip), b.read_masks(clip))
    again = build_features(dask_store, "tiny", small_davis, weights="random", device="cpu",
                           scheduler="local:2", progress=False)
    assert again.cached and again.ref == distributed.ref


BAD_SCHEDULERS = [("bogus", "'bogus' is not a dask scheduler address"), ("tcp://host", "give tcp://HOST:PORT"),
                  ("foo://bar:1", "not foo://"), ("ucx://x", "not ucx://"), ("tcp://host:99999", "port 99999"),
                  ("tcp://:8786", "no host"), ("", "not a dask scheduler address"),
                  ("LOCAL:2", "local:N in lower case"), ("local:abc", "use local:N"), ("local:0", "at least 1")]


@pytest.mark.parametrize(("scheduler", "expected"), BAD_SCHEDULERS)
def test_a_scheduler_that_is_no_scheduler_is_one_clear_error(scheduler: str, expected: str) -> None:
    with pytest.raises(FeatstoreError, match=expected):
        connect(scheduler)


def test_a_mistyped_scheduler_is_refused_even_when_the_build_is_cached(tmp_path: Path, small_davis: Path) -> None:
    store = Store(tmp_path / "store")
    first = build_features(store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    assert not first.cached
    for scheduler, expected in BAD_SCHEDULERS:
        with pytest.raises(FeatstoreError, match=expected):
            build_features(store, "tiny", small_davis, weights="random", device="cpu", scheduler=scheduler,
                           progress=False)


def test_scheduler_addresses_as_dask_prints_them_pass_the_check() -> None:
    assert local_workers("local:3") == 3
    for address in ("tcp://127.0.0.1:8786", "10.0.0.7:8786", "tls://scheduler.example:8786", "tcp://[::1]:8786"):
        assert local_workers(address) is None, address


def test_a_partly_annotated_dataset_stores_the_same_arrays_on_a_cluster(tmp_path: Path, small_davis: Path) -> None:
    """One clip keeps its masks, another lost them: as a local build, no clip's masks are stored."""
    for mask in (small_davis / "Annotations" / "480p" / "beta").iterdir():
        mask.unlink()
    local_store, dask_store = Store(tmp_path / "local"), Store(tmp_path / "dask")
    local = build_features(local_store, "tiny", small_davis, weights="random", device="cpu", progress=False)
    distributed = build_features(dask_store, "tiny", small_davis, weights="random", device="cpu",
                                 scheduler="local:2", progress=False)
    assert distributed.record.key == local.record.key
    assert set(distributed.record.manifest) == set(local.record.manifest)
    assert not any("masks/" in name for name in distributed.record.manifest)


def test_workers_reload_a_weights_file_overwritten_between_builds(tmp_path: Path, small_davis: Path) -> None:
    """A long-lived cluster keeps backbones in its workers: a file rewritten in place is new weights."""
    from distributed import LocalCluster

    from featstore.backbones import create_backbone

    weights = tmp_path / "tiny.pt"
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None)
    try:
        store = Store(tmp_path / "store")
        for seed in (1, 2):
            torch.save(create_backbone("tiny", weights="random", seed=seed).state_dict(), weights)
            built = build_features(store, "tiny", small_davis, weights=str(weights), device="cpu",
                                   scheduler=cluster.scheduler_address, progress=False)
        local_store = Store(tmp_path / "local")
        local = build_features(local_store, "tiny", small_davis, weights=str(weights), device="cpu", progress=False)
        assert built.record.key == local.record.key and built.ref.endswith(":v2")
        a, b = open_features(store, built.ref), open_features(local_store, local.ref)
        for clip in a.clips:
            for layer in a.layers:
                assert torch.equal(a.read(clip, layer), b.read(clip, layer)), (clip, layer)
    finally:
        cluster.close()
