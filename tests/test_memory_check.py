"""The memory check before a training load: exact byte counts from metadata, and the refusal in one line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import write_davis

from decoders import DeviceFeatures
from decoders.memory import available_bytes, check_fits, check_memory, mem_available, memory_fixes
from featstore.cli import main
from featstore.errors import FeatstoreError
from featstore.features import FeatureArtifact, open_features
from featstore.store import Store
from featstore.units import format_bytes
from jobs.featurize import build_features

CLIPS = {"alpha": 5, "beta": 3, "gamma": 4}


def _artifact(tmp_path: Path, *, dtype: str = "float16", masks: bool = True) -> FeatureArtifact:
    data = write_davis(tmp_path / "davis", CLIPS, size=(48, 64), masks=masks)
    store = Store(tmp_path / "store")
    built = build_features(store, "tiny", data, weights="random", dtype=dtype, device="cpu", progress=False)
    return open_features(store, built.ref)


def test_check_fits_refuses_only_beyond_the_usable_share() -> None:
    fixes = ["train with `--device cpu`", "rebuild them with fewer `--layers`"]
    check_fits(8_000_000_000, 10_000_000_000, what="loading x:v1", device="cuda:0", fixes=fixes)
    check_fits(10_000_000_000, 10_000_000_000, what="loading x:v1", device="cpu", fixes=fixes, headroom=0.0)
    with pytest.raises(FeatstoreError) as refused:
        check_fits(8_000_000_001, 10_000_000_000, what="loading x:v1", device="cuda:0", fixes=fixes)
    message = str(refused.value)
    assert message == (
        "loading x:v1 needs 8.0 GB on cuda:0, which has 10.0 GB available, of which features may take "
        "8.0 GB (80%; the rest is for training): train with `--device cpu`; or rebuild them with fewer `--layers`"
    )
    with pytest.raises(FeatstoreError, match=r"needs 31\.2 GB on cpu, which has 950 B available"):
        check_fits(31_200_000_000, 950, what="loading x:v1", device="cpu", fixes=fixes)


def test_format_bytes_uses_decimal_units() -> None:
    assert [format_bytes(n) for n in (0, 950, 1_500_000, 31_200_000_000, 2e12)] == [
        "0 B",
        "950 B",
        "1.5 MB",
        "31.2 GB",
        "2.0 TB",
    ]


def test_mem_available_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(
        "MemTotal:       16384000 kB\nMemFree:         1024000 kB\nMemAvailable:    8192000 kB\n"
    )
    assert mem_available(meminfo) == 8_192_000 * 1024
    meminfo.write_text("MemTotal:       16384000 kB\n")
    assert mem_available(meminfo) is None
    assert mem_available(tmp_path / "absent") is None
    assert available_bytes(torch.device("meta")) is None


@pytest.mark.skipif(not Path("/proc/meminfo").is_file(), reason="the CPU's available memory is read on Linux")
def test_cpu_available_memory_is_measured() -> None:
    available = available_bytes(torch.device("cpu"))
    assert available is not None and available > 0


@pytest.mark.parametrize(("dtype", "masks"), [("float16", True), ("float32", True), ("bfloat16", False)])
def test_predicted_bytes_equal_the_loaded_bytes(tmp_path: Path, dtype: str, masks: bool) -> None:
    artifact = _artifact(tmp_path, dtype=dtype, masks=masks)
    assert artifact.has_masks == masks and len(artifact.layers) == 2
    for clips, layers in [
        (None, None),
        (["gamma", "alpha"], None),
        (["beta"], ["stage2"]),
        (None, ["stage1"]),
    ]:
        predicted = DeviceFeatures.load_nbytes(artifact, clips, layers=layers)
        loaded = DeviceFeatures.from_artifact(artifact, clips, "cpu", layers=layers, require_masks=False)
        assert loaded.has_masks == masks
        assert predicted == loaded.nbytes, (clips, layers)


def test_predicted_bytes_read_no_chunk(tmp_path: Path) -> None:
    artifact = _artifact(tmp_path)
    expected = DeviceFeatures.from_artifact(artifact, None, "cpu").nbytes
    chunks = list(artifact.path.rglob("c.*"))
    assert chunks
    for chunk in chunks:
        chunk.unlink()
    fresh = open_features(artifact.store, artifact.record.ref)
    assert DeviceFeatures.load_nbytes(fresh, None) == expected
    with pytest.raises(FeatstoreError, match="damaged"):
        DeviceFeatures.from_artifact(fresh, None, "cpu")
    with pytest.raises(FeatstoreError, match=r"clips \['omega'\] are not in"):
        DeviceFeatures.load_nbytes(fresh, ["omega"])
    with pytest.raises(FeatstoreError, match=r"layers \['stage9'\] are not in"):
        DeviceFeatures.load_nbytes(fresh, None, layers=["stage9"])


def test_training_load_is_checked_with_train_and_validation_clips(tmp_path: Path) -> None:
    artifact = _artifact(tmp_path, dtype="float32")
    train_clips, val_clips = ["alpha", "gamma"], ["beta"]
    needed = (
        DeviceFeatures.from_artifact(artifact, train_clips, "cpu").nbytes
        + DeviceFeatures.from_artifact(artifact, val_clips, "cpu").nbytes
    )
    check_memory(artifact, train_clips, artifact, val_clips, torch.device("cpu"), needed * 2)
    check_memory(artifact, train_clips, artifact, val_clips, torch.device("cpu"), None)
    with pytest.raises(FeatstoreError) as refused:
        check_memory(artifact, train_clips, artifact, val_clips, torch.device("cpu"), needed)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"loading the features of {artifact.record.ref} needs {format_bytes(needed)} on cpu"
    )
    assert "--dtype float16" in message and "--layers" in message and "--data" in message


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fixes_name_only_options_the_cli_takes(
    tmp_path: Path, device: str, capsys: pytest.CaptureFixture[str]
) -> None:
    fixes = memory_fixes(_artifact(tmp_path, dtype="float32"), torch.device(device))
    named = set(re.findall(r"--[a-z][a-z-]*", " ".join(fixes)))
    assert {"--dtype", "--layers", "--data"} <= named
    assert ("--device" in named) == (device == "cuda" or torch.cuda.is_available())
    helps = ""
    for command in ("build", "train"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps += capsys.readouterr().out
    assert all(re.search(rf"{option}\b", helps) for option in named), named
