"""W&B mirroring against real offline runs: what each run's transaction log records is the local lineage."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from featstore.errors import FeatstoreError
from featstore.features import GROUP_DIR, ClipArrays, open_group
from featstore.results import write_result_folder
from featstore.store import ArtifactRecord, Store, canonical_hash
from featstore.wandb_sync import WandbJob, _check_credentials, wandb_requested

pytestmark = pytest.mark.wandb

NPARAMS = 2_469_696 + 257


# --- reading an offline run ---------------------------------------------------------------------------

# wandb 0.31 writes its transaction log from the Go core and no longer ships a Python reader, so the
# leveldb-log framing is read here (checking every CRC) and each record is parsed with wandb's protobuf.
_HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _transaction_log(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    assert data[: len(_HEADER)] == _HEADER, f"{path} is not a W&B transaction log"
    pos, parts = len(_HEADER), []
    while pos + 7 <= len(data):
        if _BLOCK - pos % _BLOCK < 7:  # block trailer
            pos += _BLOCK - pos % _BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        assert crc == zlib.crc32(bytes([kind]) + chunk), f"{path}: bad record checksum at byte {pos}"
        pos += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            parts = [chunk]
        elif kind == _MIDDLE:
            parts.append(chunk)
        elif kind == _LAST:
            yield b"".join([*parts, chunk])


@dataclass
class OfflineRun:
    """What one offline run recorded: its run record, artifacts it used and logged, and history rows."""

    folder: Path
    run: Any = None
    used: dict[str, Any] = field(default_factory=dict)  # artifact name -> ArtifactRecord proto
    use_order: list[str] = field(default_factory=list)  # every use, in order, duplicates included
    logged: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int | None = None

    @classmethod
    def read(cls, folder: Path) -> OfflineRun:
        from wandb.proto import wandb_internal_pb2 as pb

        (log_file,) = folder.glob("run-*.wandb")
        parsed = cls(folder)
        for raw in _transaction_log(log_file):
            record = pb.Record()  # type: ignore[attr-defined]
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                parsed.run = record.run
            elif kind == "artifact":
                art = record.artifact
                if art.user_created and art.use_after_commit:
                    parsed.used[art.name] = art
                    parsed.use_order.append(art.name)
                else:
                    parsed.logged[art.name] = art
            elif kind == "history":
                parsed.history.append(dict(_history_item(item) for item in record.history.item))
            elif kind == "exit":
                parsed.exit_code = record.exit.exit_code
        return parsed

    @property
    def config(self) -> dict[str, Any]:
        return {u.key: json.loads(u.value_json) for u in self.run.config.update if u.key != "_wandb"}


def _history_item(item: Any) -> tuple[str, Any]:
    key = item.key or "/".join(item.nested_key)
    if item.value_json:
        return key, json.loads(item.value_json)
    kind = item.WhichOneof("value")
    return key, getattr(item, kind) if kind else None


def _run_folders(root: Path) -> list[Path]:
    return sorted((root / "wandb").glob("offline-run-*"))


def _b64md5(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


# --- a small real lineage in a real store -------------------------------------------------------------


@dataclass(frozen=True)
class Lineage:
    store: Store
    dataset: ArtifactRecord
    features: ArtifactRecord
    decoder: ArtifactRecord
    result: ArtifactRecord


def _build_lineage(root: Path) -> Lineage:
    store = Store(root)
    clips = {"alpha": 3, "beta": 2}
    rng = np.random.default_rng(0)

    with store.stage("dataset", "toy-clips", canonical_hash(clips)) as staging:
        (staging.path / "frames.json").write_text(json.dumps({"clip": clips}))
        dataset = staging.commit(parents=[], metadata={"frames": 5, "clips": clips})

    with store.stage("features", "tiny.random-toy-clips", canonical_hash(["features", clips])) as staging:
        group = open_group(staging.path / GROUP_DIR, mode="w")
        for clip, n in clips.items():
            arrays = ClipArrays(
                group, clip, n, {"layer1": (4, 3, 5)}, "float16", (12, 20), {"rows": list(range(n))}
            )
            arrays.write(
                0,
                {"layer1": rng.standard_normal((n, 4, 3, 5)).astype(np.float16)},
                rng.integers(0, 2, (n, 12, 20), dtype=np.uint8),
            )
        features = staging.commit(
            parents=[dataset.ref],
            metadata={"layers": ["layer1"], "dtype": "float16", "nparams_backbone": 2_469_696},
        )

    with store.stage(
        "decoder", "tiny.random-toy-clips-linear", canonical_hash(["decoder", features.key])
    ) as staging:
        torch.save({"weight": torch.zeros(1, 4, 1, 1), "bias": torch.zeros(1)}, staging.path / "decoder.pt")
        (staging.path / "decoder.json").write_text(json.dumps({"decoder": "linear", "in_channels": 4}))
        decoder = staging.commit(parents=[features.ref], metadata={"nparams_head": 257, "nparams": NPARAMS})

    predictions = [(row, rng.integers(0, 256, (12, 20), dtype=np.uint8)) for row in range(5)]
    with store.stage("result", "toy-clips-prediction", canonical_hash(["result", decoder.key])) as staging:
        write_result_folder(
            staging.path, predictions, {"nparams": NPARAMS, "nflops": 1000, "decoder": "linear"}
        )
        result = staging.commit(parents=[decoder.ref, dataset.ref], metadata={"frames": 5})
    return Lineage(store, dataset, features, decoder, result)


@dataclass(frozen=True)
class Mirrored:
    lineage: Lineage
    cwd: Path
    featurize: OfflineRun
    train: OfflineRun
    predict: OfflineRun


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mirrored]:
    """Three offline jobs (featurize, train, predict) mirrored into W&B; shared because runs take a second."""
    import wandb

    base = tmp_path_factory.mktemp("mirrored")
    lineage = _build_lineage(base / "store")
    with pytest.MonkeyPatch.context() as mp:
        _offline_environment(mp, base)
        cwd = base / "cwd"
        cwd.mkdir()
        mp.chdir(cwd)
        wandb.teardown()
        try:
            # No WANDB_DIR: the run goes under the store root.
            mp.delenv("WANDB_DIR", raising=False)
            with WandbJob("featurize", {"backbone": "tiny"}, enabled=True, store=lineage.store) as job:
                job.log(lineage.features)
            wandb.teardown()  # finish() may return before the core has flushed the run's log to disk
            featurize = OfflineRun.read(_only(_run_folders(lineage.store.root)))

            mp.setenv("WANDB_DIR", str(base / "runs"))
            with WandbJob(
                "train", {"lr": [0.1, 0.01], "decoder": "linear"}, enabled=True, store=lineage.store
            ) as job:
                job.use(lineage.features)
                job.log(lineage.decoder)
            wandb.teardown()
            train = OfflineRun.read(_only(_run_folders(base / "runs")))

            with WandbJob("predict", {"out": "result"}, enabled=True, store=lineage.store) as job:
                job.use(lineage.decoder)
                job.use(lineage.decoder)  # a second use of the same input is recorded once
                job.log(lineage.result)
                job.log_metrics({"mean_iou": 0.75})
            wandb.teardown()
            (predict_folder,) = set(_run_folders(base / "runs")) - {train.folder}
            predict = OfflineRun.read(predict_folder)
        finally:
            wandb.teardown()
    yield Mirrored(lineage, cwd, featurize, train, predict)


def _offline_environment(mp: pytest.MonkeyPatch, base: Path) -> None:
    """Offline, quiet, and every W&B folder (logs, cache, settings, staging) inside ``base``."""
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    mp.setenv("HOME", str(base / "home"))
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        mp.setenv(name, str(base / "home" / name.lower()))
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.delenv("WANDB_PROJECT", raising=False)


def _only(items: list[Path]) -> Path:
    assert len(items) == 1, f"expected exactly one run folder, found {items}"
    return items[0]


# --- the mirrored runs --------------------------------------------------------------------------------


def test_runs_carry_job_type_config_and_project(mirrored: Mirrored) -> None:
    assert [r.run.job_type for r in (mirrored.featurize, mirrored.train, mirrored.predict)] == [
        "featurize",
        "train",
        "predict",
    ]
    assert mirrored.train.config == {"lr": [0.1, 0.01], "decoder": "linear"}
    assert mirrored.featurize.config == {"backbone": "tiny"}
    assert {r.run.project for r in (mirrored.featurize, mirrored.train, mirrored.predict)} == {"featstore"}
    assert [r.exit_code for r in (mirrored.featurize, mirrored.train, mirrored.predict)] == [0, 0, 0]


def test_runs_are_written_under_wandb_dir_or_the_store_never_the_working_directory(
    mirrored: Mirrored,
) -> None:
    assert mirrored.featurize.folder.parent == mirrored.lineage.store.root / "wandb"
    assert mirrored.train.folder.parent == mirrored.predict.folder.parent != mirrored.featurize.folder.parent
    assert list(mirrored.cwd.iterdir()) == [], "nothing may be written into the working directory"


def test_wandb_lineage_has_the_local_edges(mirrored: Mirrored) -> None:
    """Each run uses exactly the local parents of what it logs, so the W&B graph is the local graph."""
    store = mirrored.lineage.store
    for run in (mirrored.featurize, mirrored.train, mirrored.predict):
        (logged,) = run.logged.values()
        record = store.resolve(json.loads(logged.metadata)["featstore_ref"])
        inputs = {json.loads(art.metadata)["featstore_ref"] for art in run.used.values()}
        assert inputs == set(record.parents), (
            f"{run.run.job_type}: used {inputs}, local parents {record.parents}"
        )
        assert logged.name == record.name and logged.type == record.type
        assert sorted(logged.aliases) == sorted([f"featstore-v{record.version}", "featstore-latest", "latest"])
        assert run.run.display_name == f"{run.run.job_type} {record.ref}"
        assert not logged.user_created, "an output is created by its run"
    decoder, dataset = mirrored.lineage.decoder.name, mirrored.lineage.dataset.name
    assert mirrored.predict.use_order == [decoder, dataset], "explicit uses first, each input once"


def test_an_input_has_the_digest_of_its_logged_output(mirrored: Mirrored) -> None:
    """W&B dedups by digest: features used by train are the same W&B version that featurize logged."""
    name = mirrored.lineage.features.name
    assert mirrored.train.used[name].digest == mirrored.featurize.logged[name].digest
    name = mirrored.lineage.decoder.name
    assert mirrored.predict.used[name].digest == mirrored.train.logged[name].digest


def test_features_go_by_reference_with_checksums(mirrored: Mirrored) -> None:
    record = mirrored.lineage.features
    artifact = mirrored.featurize.logged[record.name]
    root = mirrored.lineage.store.path(record)
    entries = {entry.path: entry for entry in artifact.manifest.contents}
    assert set(entries) == {rel for rel in record.manifest if rel.startswith(GROUP_DIR + "/")}
    assert any("/layer1/" in path for path in entries) and any(
        path.startswith(GROUP_DIR + "/masks/") for path in entries
    )
    for path, entry in entries.items():
        assert entry.ref == (root / path).as_uri(), (
            "the bytes stay in the store, W&B keeps a file:// reference"
        )
        assert not entry.local_path, "referenced files are never copied"
        assert entry.digest == _b64md5(root / path), f"{path}: checksum must be the file's md5"
    metadata = json.loads(artifact.metadata)
    assert metadata["featstore_key"] == record.key and metadata["featstore_ref"] == record.ref
    assert metadata["featstore_parents"] == [mirrored.lineage.dataset.ref]
    assert metadata["nparams_backbone"] == 2_469_696


def test_dataset_input_references_its_frame_table(mirrored: Mirrored) -> None:
    dataset = mirrored.lineage.dataset
    artifact = mirrored.featurize.used[dataset.name]
    entries = {entry.path: entry for entry in artifact.manifest.contents}
    assert set(entries) == {"frames.json", "featstore_content.json"}
    table = mirrored.lineage.store.path(dataset) / "frames.json"
    assert (entries["frames.json"].ref, entries["frames.json"].digest) == (table.as_uri(), _b64md5(table))
    assert artifact.type == "dataset"


def test_dataset_versions_whose_files_changed_in_place_stay_apart_and_local_latest_stays_put(tmp_path: Path) -> None:
    """The frame table is the same, the content key is not: W&B must not fold the versions into one.
    Logging the older one again (a cache hit of an older ref) must not move featstore-latest to it."""
    import wandb

    store = Store(tmp_path / "store")
    versions = []
    for key in ("pixels-before", "pixels-after"):
        with store.stage("dataset", "edited", key) as staging:
            (staging.path / "frames.json").write_text(json.dumps({"clip": {"a": 2}}))
            versions.append(staging.commit(parents=[], metadata={"digest": key}))
    with pytest.MonkeyPatch.context() as mp:
        _offline_environment(mp, tmp_path)
        mp.delenv("WANDB_DIR", raising=False)  # runs under the store
        wandb.teardown()
        try:
            runs = []
            for record in (versions[1], versions[0]):
                with WandbJob("featurize", {}, enabled=True, store=store) as job:
                    job.log(record)
                wandb.teardown()
                (folder,) = set(_run_folders(store.root)) - {run.folder for run in runs}
                runs.append(OfflineRun.read(folder))
        finally:
            wandb.teardown()
    newer, older = (run.logged["edited"] for run in runs)
    assert newer.digest != older.digest
    assert "featstore-latest" in newer.aliases and "featstore-latest" not in older.aliases
    assert "featstore-v2" in newer.aliases and "featstore-v1" in older.aliases


def test_result_is_logged_as_contest_files_with_nparams(mirrored: Mirrored) -> None:
    record = mirrored.lineage.result
    artifact = mirrored.predict.logged[record.name]
    root = mirrored.lineage.store.path(record)
    entries = {entry.path: entry for entry in artifact.manifest.contents}
    assert set(entries) == {"paths.json", "metadata.json", *(f"outputs/{row:05d}.png" for row in range(5))}
    for path, entry in entries.items():
        assert entry.local_path == str(root / path) and not entry.ref
        assert entry.digest == _b64md5(root / path)
    metadata = json.loads(artifact.metadata)
    assert metadata["nparams"] == NPARAMS, "nparams comes from the contest metadata.json"
    assert metadata["nflops"] == 1000 and metadata["frames"] == 5
    assert artifact.type == "result"


def test_decoder_is_logged_as_files(mirrored: Mirrored) -> None:
    record = mirrored.lineage.decoder
    artifact = mirrored.train.logged[record.name]
    assert {entry.path for entry in artifact.manifest.contents} == {"decoder.pt", "decoder.json"}
    assert json.loads(artifact.metadata)["nparams"] == NPARAMS


def test_metrics_are_logged_to_history(mirrored: Mirrored) -> None:
    assert any(row.get("mean_iou") == 0.75 for row in mirrored.predict.history)


# --- switching it on and off --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("YES", True), ("0", False), ("", False), (None, False)],
)
def test_featstore_wandb_env_requests_it(
    monkeypatch: pytest.MonkeyPatch, value: str | None, expected: bool
) -> None:
    if value is None:
        monkeypatch.delenv("FEATSTORE_WANDB", raising=False)
    else:
        monkeypatch.setenv("FEATSTORE_WANDB", value)
    assert wandb_requested(False) is expected
    assert wandb_requested(True) is True


def test_without_the_flag_wandb_is_never_imported_or_written(tmp_path: Path) -> None:
    lineage = _build_lineage(tmp_path / "store")
    env = {k: v for k, v in os.environ.items() if k != "FEATSTORE_WANDB"}
    env["WANDB_DIR"] = str(tmp_path / "wandb-dir")
    script = (
        "import sys\n"
        "from featstore.store import Store\n"
        "from featstore.wandb_sync import WandbJob, wandb_requested\n"
        f"store = Store({str(lineage.store.root)!r})\n"
        "record = store.resolve('toy-clips-prediction')\n"
        "with WandbJob('predict', {}, enabled=wandb_requested(False), store=store) as job:\n"
        "    job.use(store.resolve('toy-clips'))\n"
        "    job.log(record)\n"
        "    job.log_metrics({'mean_iou': 1.0})\n"
        "print('wandb' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False", "wandb must not even be imported without --wandb"
    assert not (tmp_path / "wandb-dir").exists() and not (lineage.store.root / "wandb").exists()
    assert not (tmp_path / "wandb").exists()


def test_featstore_wandb_env_starts_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    lineage = _build_lineage(tmp_path / "store")
    _offline_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("FEATSTORE_WANDB", "1")
    monkeypatch.setenv("WANDB_PROJECT", "contest-entry")
    wandb.teardown()
    try:
        with WandbJob(
            "evaluate", {"data": "toy"}, enabled=wandb_requested(False), store=lineage.store
        ) as job:
            job.log_metrics({"mean_iou": 0.5})
    finally:
        wandb.teardown()
    run = OfflineRun.read(_only(_run_folders(tmp_path / "runs")))
    assert (run.run.job_type, run.run.project) == ("evaluate", "contest-entry")
    assert run.config == {"data": "toy"}


def test_a_failing_job_finishes_its_run_with_an_error_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    _offline_environment(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    wandb.teardown()
    try:
        with (
            pytest.raises(RuntimeError, match="boom"),
            WandbJob("train", {}, enabled=True, store=Store(tmp_path / "store")),
        ):
            raise RuntimeError("boom")
    finally:
        wandb.teardown()
    assert OfflineRun.read(_only(_run_folders(tmp_path / "runs"))).exit_code == 1


# --- when W&B is asked for but cannot be used ---------------------------------------------------------


def _online_without_credentials(mp: pytest.MonkeyPatch, base: Path) -> None:
    _offline_environment(mp, base)
    mp.setenv("WANDB_MODE", "online")
    mp.setenv("NETRC", str(base / "no-netrc"))
    mp.delenv("WANDB_IDENTITY_TOKEN_FILE", raising=False)


def test_online_without_api_key_fails_fast_and_names_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import wandb

    _online_without_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "runs"))
    store = Store(tmp_path / "store")
    wandb.teardown()
    start = time.monotonic()
    try:
        with pytest.raises(FeatstoreError) as caught, WandbJob("train", {}, enabled=True, store=store):
            pytest.fail("the job body must not run without usable W&B")
    finally:
        wandb.teardown()
    assert time.monotonic() - start < 5, "the check reads local configuration only"
    message = str(caught.value)
    assert "wandb login" in message and "WANDB_MODE=offline" in message and "API key" in message
    assert not (tmp_path / "runs").exists() and not (store.root / "wandb").exists()


def test_online_with_an_api_key_passes_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    _online_without_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    wandb.teardown()
    try:
        _check_credentials()
    finally:
        wandb.teardown()


def test_online_with_a_netrc_entry_passes_the_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    _online_without_credentials(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_BASE_URL", "https://api.wandb.ai")
    netrc = tmp_path / "no-netrc"
    netrc.write_text(f"machine api.wandb.ai\n  login user\n  password {'b' * 40}\n")
    netrc.chmod(0o600)
    wandb.teardown()
    try:
        _check_credentials()
        monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
        wandb.teardown()
        with pytest.raises(FeatstoreError, match="wandb login"):
            _check_credentials()
    finally:
        wandb.teardown()


def test_missing_wandb_package_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with (
        pytest.raises(FeatstoreError, match="pip install wandb"),
        WandbJob("train", {}, enabled=True, store=Store(tmp_path / "store")),
    ):
        pytest.fail("the job body must not run without wandb")
