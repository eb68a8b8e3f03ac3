"""The store's commit protocol: invisible until committed, versioned by content key, verified by sha256."""

from __future__ import annotations

import json
import multiprocessing as mp
import re
from pathlib import Path

import pytest

from featstore.cli import main
from featstore.errors import StoreError
from featstore.store import Store, canonical_hash


def _commit(store: Store, name: str, key: str, payload: bytes = b"data", parents: tuple[str, ...] = ()) -> str:
    with store.stage("features", name, key) as staging:
        if staging.committed is not None:
            return staging.committed.ref
        (staging.path / "sub").mkdir(exist_ok=True)
        (staging.path / "sub" / "blob.bin").write_bytes(payload)
        return staging.commit(parents=list(parents), metadata={"n": len(payload)}).ref


def test_commit_versions_and_cache(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    assert _commit(store, "feat", "k1") == "feat:v1"
    assert _commit(store, "feat", "k1") == "feat:v1", "same key is a cache hit"
    assert _commit(store, "feat", "k2", b"other") == "feat:v2", "new key under the same name is the next version"
    assert store.resolve("feat").ref == "feat:v2"
    assert store.resolve("feat:latest").ref == "feat:v2"
    assert store.resolve("feat:v1").key == "k1"
    record = store.resolve("feat:v1")
    assert record.manifest == {"sub/blob.bin": canonical_sha(b"data")}
    assert json.loads((store.path(record) / "artifact.json").read_text())["ref"] == "feat:v1"
    assert not any((tmp_path / "s" / "staging").glob("features-*/"))


def canonical_sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def test_uncommitted_staging_is_invisible(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    with store.stage("features", "feat", "k1") as staging:
        (staging.path / "half.bin").write_bytes(b"x")
    assert store.list() == []
    with pytest.raises(StoreError, match="no artifact named 'feat'"):
        store.resolve("feat")
    with store.stage("features", "feat", "k1") as staging:
        assert (staging.path / "half.bin").read_bytes() == b"x", "a later run resumes the same staging area"


def test_verify_catches_deleted_altered_and_extra_files(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    record = store.resolve(_commit(store, "feat", "k1", b"payload"))
    assert store.verify(record) == []
    blob = store.path(record) / "sub" / "blob.bin"
    blob.write_bytes(b"payloaD")
    assert any("changed file sub/blob.bin" in p for p in store.verify(record))
    blob.unlink()
    assert store.verify(record) == ["missing file sub/blob.bin"]
    with pytest.raises(StoreError, match=r"damaged: missing file sub/blob\.bin"):
        store.require_intact(record)
    blob.write_bytes(b"payload")
    (store.path(record) / "stray").write_bytes(b"?")
    assert store.verify(record) == ["unrecorded file stray"]


def test_bad_refs_and_names(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _commit(store, "feat", "k1")
    with pytest.raises(StoreError, match="known versions: feat:v1"):
        store.resolve("feat:v7")
    with pytest.raises(StoreError, match="not an artifact reference"):
        store.resolve("feat:v1:x")
    with pytest.raises(StoreError, match="not valid"):
        _commit(store, "../escape", "k")


def test_a_mistyped_ref_names_what_was_probably_meant(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    _commit(store, "clips.lite0", "k1")
    with store.stage("decoder", "clips.lite0.fpn", "k2") as staging:
        staging.commit(parents=["clips.lite0:v1"], metadata={})
    with pytest.raises(StoreError, match=r"'clips\.lite0' is a features artifact, not a decoder; did you mean "
                                         r"clips\.lite0\.fpn\? `featstore ls` lists the decoders"):
        store.resolve("clips.lite0", type="decoder")
    with pytest.raises(StoreError, match=r"no features artifact named 'clips\.lite1' .*: did you mean clips\.lite0\?"):
        store.resolve("clips.lite1", type="features")
    with pytest.raises(StoreError, match=r"no artifact named 'other' in the store .*: `featstore ls` lists what is there"):
        store.resolve("other")


def test_unwritable_store_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store = Store(blocker / "store")
    with pytest.raises(StoreError, match="store"), store.stage("features", "feat", "k1"):
        pass
    assert blocker.read_text() == "not a folder"


def _race(root: str, key: str, queue: mp.Queue) -> None:
    queue.put(_commit(Store(root), "feat", key, key.encode()))


def test_concurrent_commits_of_one_key_give_one_version(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(str(tmp_path / "s"), key, queue)) for key in ["a", "a", "b", "b"]]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    refs = sorted(queue.get() for _ in procs)
    records = Store(tmp_path / "s").list("features")
    assert sorted(r.key for r in records) == ["a", "b"], "one version per key"
    assert sorted({r.ref for r in records}) == sorted(set(refs))


def test_canonical_hash_is_order_free() -> None:
    assert canonical_hash({"a": 1, "b": [1, 2]}) == canonical_hash({"b": [1, 2], "a": 1})
    assert canonical_hash({"a": 1}) != canonical_hash({"a": 2})


def test_an_unreadable_record_is_named_with_its_fix_and_spares_the_rest_of_the_listing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(tmp_path / "s")
    good = _commit(store, "good", "k1", b"a")
    bad = store.resolve(_commit(store, "bad", "k2", b"b"))
    record_file = store.path(bad) / "artifact.json"
    record_file.write_text("{broken")
    with pytest.raises(StoreError, match=f"{re.escape(str(record_file))} is unreadable .*`featstore rm bad:v1`"):
        store.resolve("bad")
    assert store.resolve(good).ref == good
    with pytest.raises(StoreError, match="unreadable"):
        store.list()
    damaged: list[str] = []
    assert [r.ref for r in store.list(damaged=damaged)] == [good]
    assert len(damaged) == 1 and str(record_file) in damaged[0]
    assert main(["ls", "--store", str(store.root), "--json"]) == 0
    out, err = capsys.readouterr()
    payload = json.loads(out.strip().splitlines()[-1])
    assert [a["name"] for a in payload["artifacts"]] == ["good"] and payload["damaged"] == damaged
    assert f"featstore ls: warning: artifact record {record_file} is unreadable" in err


def test_ls_lines_up_its_columns_and_marks_the_latest_of_several_versions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(tmp_path / "s")
    _commit(store, "short", "k1")
    _commit(store, "a-much-longer-artifact-name-than-the-column-used-to-hold-for-names", "k2")
    first, second = _commit(store, "twice", "k3", b"a"), _commit(store, "twice", "k4", b"b")
    assert main(["ls", "--store", str(store.root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["TYPE", "REF", "SIZE", "CREATED", "KEY"]
    created = {re.search(r"\d{4}-\d\d-\d\dT", line).start() for line in lines[1:]}  # type: ignore[union-attr]
    assert created == {lines[0].index("CREATED")}
    marked = {line.split()[1]: line.endswith("  latest") for line in lines[1:]}
    assert marked == {"short:v1": False, first: False, second: True,
                      "a-much-longer-artifact-name-than-the-column-used-to-hold-for-names:v1": False}
