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
