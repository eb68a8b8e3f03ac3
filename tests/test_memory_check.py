"""The memory check before a training load: exact byte counts from metadata, and the refusal in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from conftest import write_davis

from decoders import DeviceFeatures
from decoders.memory import (
    CGROUP_ROOT,
    PROC_CGROUP,
    available_bytes,
    cgroup_available,
    check_fits,
    check_memory,
    mem_available,
    memory_fixes,
)
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


GIB = 2**30


def write_cgroup(level: Path, files: dict[str, str]) -> None:
    level.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (level / name).write_text(text)


def test_cgroup_v2_room_is_the_tightest_level_counting_inactive_file_cache_as_free(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/batch/job7\n")
    root = tmp_path / "fs"
    write_cgroup(root / "batch" / "job7", {"memory.max": f"{4 * GIB}\n", "memory.current": f"{3 * GIB}\n",
                                           "memory.stat": f"anon {2 * GIB}\ninactive_file {GIB}\n"})
    write_cgroup(root / "batch", {"memory.max": "max\n", "memory.current": f"{5 * GIB}\n",
                                  "memory.stat": "inactive_file 0\n"})
    assert cgroup_available(proc, root) == 2 * GIB  # 4 GiB less a working set of 3 - 1 GiB
    write_cgroup(root / "batch", {"memory.max": f"{6 * GIB}\n"})
    assert cgroup_available(proc, root) == GIB  # the parent's 6 GiB less its 5 GiB in use
    write_cgroup(root / "batch", {"memory.current": f"{7 * GIB}\n"})
    assert cgroup_available(proc, root) == 0


def test_cgroup_limits_are_read_at_the_mount_root_inside_a_container(tmp_path: Path) -> None:
    """A container sees its host-side cgroup path in /proc but its own cgroup mounted at the root."""
    proc = tmp_path / "cgroup"
    proc.write_text("12:pids:/docker/abc\n4:cpu,memory:/docker/abc\n0::/docker/abc\n")
    root = tmp_path / "fs"
    write_cgroup(root / "memory", {"memory.limit_in_bytes": f"{GIB}\n", "memory.usage_in_bytes": f"{GIB // 2}\n",
                                   "memory.stat": f"inactive_file 7\ntotal_inactive_file {GIB // 4}\n"})
    assert cgroup_available(proc, root) == GIB // 4 * 3  # v1 is preferred; its hierarchical inactive cache counts


@pytest.mark.parametrize("limit", ["9223372036854771712", "max"])
def test_an_unlimited_or_absent_cgroup_sets_no_bound(tmp_path: Path, limit: str) -> None:
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    assert cgroup_available(proc, tmp_path / "fs") is None
    write_cgroup(tmp_path / "fs", {"memory.max": limit, "memory.current": "5", "memory.stat": ""})
    assert cgroup_available(proc, tmp_path / "fs") is None
    assert cgroup_available(tmp_path / "absent", tmp_path / "fs") is None


def _v1_memory_cgroup() -> Path | None:
    """This process's writable cgroup v1 memory directory, where a test may make a child cgroup."""
    if not PROC_CGROUP.is_file():
        return None
    for line in PROC_CGROUP.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        level = CGROUP_ROOT / "memory" / path.lstrip("/")
        if "memory" in controllers.split(",") and os.access(level, os.W_OK):
            return level
    return None


@pytest.mark.skipif(_v1_memory_cgroup() is None, reason="needs a writable cgroup v1 memory hierarchy (root)")
def test_a_process_in_a_memory_limited_cgroup_sees_the_limit() -> None:
    """A real cgroup with a 512 MiB limit: the CPU's available memory is under it, not the host's."""
    parent = _v1_memory_cgroup()
    assert parent is not None
    child = parent / f"featstore-test-{uuid.uuid4().hex[:8]}"
    child.mkdir()
    try:
        (child / "memory.limit_in_bytes").write_text(str(512 * 2**20))
        script = ("import os, sys, torch; from decoders.memory import available_bytes; "
                  "open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid())); "
                  "print(available_bytes(torch.device('cpu')))")
        out = subprocess.run([sys.executable, "-c", script, str(child)], capture_output=True, text=True,
                             check=True, cwd=Path(__file__).parent.parent).stdout
        assert 0 < int(out) <= 512 * 2**20 < mem_available(Path("/proc/meminfo")) // 4  # type: ignore[operator]
    finally:
        child.rmdir()


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
