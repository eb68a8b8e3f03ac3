"""Fault drills, each run once: real builds survive SIGKILL, races, damage, full disks and lost workers.

The drills live in ``jobs.fault_drills``; ``benchmarks/reliability_report.py`` runs them many times.
Here each verdict is checked together with the evidence it rests on.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from featstore.store import Store
from jobs.fault_drills import (
    FAST,
    DrillBench,
    KillPoint,
    drill_concurrent_builds,
    drill_damaged_chunk,
    drill_dask_worker_lost,
    drill_full_disk,
    drill_sigkill,
    drill_sigkill_in_discard,
    drill_unwritable_store,
    feature_differences,
    visible_problems,
)
from jobs.featurize import build_features, featurize_clips, prepare_build


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> DrillBench:
    """One small dataset and its clean reference build, shared by the drills of this module."""
    return DrillBench(tmp_path_factory.mktemp("drills"), FAST)


def test_sigkill_mid_build_leaves_nothing_visible_and_the_rerun_resumes(bench: DrillBench) -> None:
    result = drill_sigkill(bench, KillPoint(after_clips=1), rerun_in_process=True)
    assert result.survived, result.details
    evidence = result.evidence
    assert evidence["killed"] and evidence["exit_after_kill"] == -9
    finished = evidence["finished_clips_at_kill"]
    assert 1 <= finished < bench.clips, "the kill landed mid-build"
    assert evidence["visible_after_kill"] == [] and evidence["visible_problems_after_kill"] == []
    assert evidence["rerun_exit"] == 0 and evidence["rerun_cached"] is False
    assert f"{finished} clip(s) already finished" in evidence["rerun_stderr"]
    assert evidence["verify_exit"] == 0
    assert len(evidence["versions_after_rerun"]) == 1
    assert evidence["differences"] == [], "the resumed build equals a clean build, array for array"


@pytest.mark.slow
def test_sigkill_right_after_the_commit_keeps_a_verified_version(bench: DrillBench) -> None:
    result = drill_sigkill(bench, KillPoint(after_commit=True))
    assert result.survived, result.details
    evidence = result.evidence
    if evidence["killed"]:
        assert len(evidence["visible_after_kill"]) == 1 and evidence["visible_problems_after_kill"] == []
    assert evidence["rerun_cached"] is True and evidence["verify_exit"] == 0
    assert evidence["differences"] == []


@pytest.mark.slow
def test_a_version_removed_after_a_kill_at_its_commit_is_built_again_whole(bench: DrillBench) -> None:
    result = drill_sigkill(bench, KillPoint(after_commit=True), remove_committed=True)
    assert result.survived, result.details
    evidence = result.evidence
    if evidence["killed"]:
        assert evidence["rm_exit"] == 0 and evidence["rerun_cached"] is False
        assert "resuming" not in evidence["rerun_stderr"], "markers whose data was committed are not resumed"
        assert evidence["versions_after_rerun"] == [evidence["visible_after_kill"][0].replace(":v1", ":v2")]
    assert evidence["verify_exit"] == 0 and evidence["differences"] == []


@pytest.mark.slow
@pytest.mark.parametrize("seconds", [0.5, 4.5, 5.5, 6.5])
def test_sigkill_after_a_delay(bench: DrillBench, seconds: float) -> None:
    result = drill_sigkill(bench, KillPoint(after_seconds=seconds))
    assert result.survived, result.details
    assert result.evidence["verify_exit"] == 0 and result.evidence["differences"] == []


@pytest.mark.parametrize("where", ["commit", "force"])
def test_sigkill_inside_a_staging_deletion_leaves_it_renamed_aside_for_gc(bench: DrillBench, where: str) -> None:
    result = drill_sigkill_in_discard(bench, where, rerun_in_process=True)
    assert result.survived, result.details
    evidence = result.evidence
    assert evidence["killed"] and evidence["exit_after_kill"] == -9
    assert evidence["part_deleted_live"] == [], "no staging folder is left part-deleted under its live name"
    (aside,) = evidence["trash_after_kill"]
    assert 0 < evidence["ballast_left"][aside] < evidence["ballast_entries"], "killed part-way through the deletion"
    assert evidence["visible_problems_after_kill"] == []
    assert len(evidence["visible_after_kill"]) == (1 if where == "commit" else 0)
    assert evidence["rerun_exit"] == 0 and evidence["rerun_cached"] is (where == "commit")
    assert evidence["verify_exit"] == 0 and evidence["differences"] == []
    assert evidence["versions_after_rerun"] == [f"{bench.reference()[1].name}:v1"]
    assert evidence["gc_exit"] == 0 and aside in evidence["gc_removed"]
    assert evidence["trash_after_gc"] == [] and evidence["ballast_after_gc"] == {}


def test_two_builds_started_together_commit_one_version(bench: DrillBench) -> None:
    result = drill_concurrent_builds(bench)
    assert result.survived, result.details
    evidence = result.evidence
    assert evidence["exits"] == [0, 0]
    assert evidence["cached"] == [False, True], "exactly one build computed, the other reused its commit"
    assert len(evidence["versions"]) == 1 and evidence["refs"] == evidence["versions"]
    assert evidence["verify_exit"] == 0 and evidence["differences"] == []


@pytest.mark.parametrize("mode", ["delete", "flip"])
def test_damaged_chunk_is_named_by_verify_and_refused_by_readers(bench: DrillBench, mode: str) -> None:
    result = drill_damaged_chunk(bench, mode)
    assert result.survived, result.details
    evidence = result.evidence
    chunk = evidence["chunk"]
    assert evidence["verify_exit"] == 1
    assert any(chunk in problem for problem in evidence["verify_problems"])
    assert evidence["read_error"] is not None and chunk in evidence["read_error"]
    assert evidence["intact_arrays_checked"] >= 3 * bench.clips - 1 and evidence["intact_differences"] == []
    if mode == "delete":
        assert "wrong" in evidence["unchecked_read"], "zarr alone would have served zeros"


def test_full_disk_is_one_clear_error_and_the_build_recovers(bench: DrillBench) -> None:
    result = drill_full_disk(bench, 64 * 1024)
    assert result.survived, result.details
    evidence = result.evidence
    assert evidence["exit"] == 1
    lines = evidence["stderr"].splitlines()
    assert len(lines) == 1 and "file size" in lines[0] and "--store" in lines[0]
    assert evidence["visible_features"] == [] and evidence["visible_problems"] == []
    assert evidence["recovered_verify"] == [] and evidence["differences"] == []


def test_unwritable_store_is_one_clear_error_and_writes_nothing(bench: DrillBench) -> None:
    result = drill_unwritable_store(bench)
    assert result.survived, result.details
    enotdir = result.evidence["enotdir"]
    assert enotdir["exit"] == 1 and "a-file is a file, not a folder" in enotdir["stderr"]
    if os.geteuid() != 0:
        assert result.evidence["read_only"]["exit"] == 1


def test_visible_problems_sees_half_published_versions(bench: DrillBench, tmp_path: Path) -> None:
    """The drills' visibility check is not vacuous: it flags what a broken commit would leave."""
    ref_store, record = bench.reference()
    shutil.copytree(ref_store.root, tmp_path / "store")
    assert visible_problems(tmp_path / "store") == []
    versions = tmp_path / "store" / "artifacts" / "features" / record.name
    (versions / "v2").mkdir()
    (versions / ".v3.tmp").write_text("")
    (versions / "v1" / "features.zarr" / "stray.partial").write_text("")
    found = visible_problems(tmp_path / "store")
    assert any("version without record" in p and "v2" in p for p in found)
    assert any("stray entry" in p and ".v3.tmp" in p for p in found)
    assert any("unrecorded file features.zarr/stray.partial" in p for p in found)


def test_files_left_by_writes_killed_midway_are_not_committed(bench: DrillBench, tmp_path: Path) -> None:
    """A SIGKILL inside zarr's write of group metadata leaves ``zarr.<uuid>.partial``, and one inside
    write_json_atomic leaves ``.<name>.tmp-<pid>``; the resumed build must not publish either."""
    store = Store(tmp_path / "store")
    plan, extractor = prepare_build(store, "tiny", bench.data, weights="random")
    with store.stage("features", plan.name, plan.key) as staging:
        group = staging.path / "features.zarr"
        featurize_clips(extractor, plan.dataset, ["clip0"], group, staging.scratch, dtype="float16",
                        batch_size=2, progress=False)
        (group / "features" / "zarr.0123456789abcdef0123456789abcdef.partial").write_bytes(b'{"zarr_for')
        (staging.path / ".artifact.json.tmp-4242").write_text('{"type": "feat')
    with store.stage("dataset", plan.dataset.name, plan.dataset.digest()) as staging:
        (staging.path / ".frames.json.tmp-4242").write_text("[{")
    result = build_features(store, "tiny", bench.data, weights="random", batch_size=2, device="cpu",
                            progress=False)
    dataset_record = store.resolve(result.record.parents[0], type="dataset")
    assert not [rel for rel in result.record.manifest if ".partial" in rel or ".tmp-" in rel]
    assert sorted(dataset_record.manifest) == ["frames.json"]
    assert visible_problems(store.root) == []
    assert feature_differences(bench.reference(), (store, result.record)) == []


@pytest.mark.dask
def test_lost_dask_worker_is_retried_and_the_build_matches_a_local_one(bench: DrillBench) -> None:
    result = drill_dask_worker_lost(bench)
    assert result.survived, result.details
    evidence = result.evidence
    kill = evidence["kill"]
    assert kill is not None and kill["landed"] and not kill["clip_done"], "killed mid-clip, begun but not finished"
    assert evidence["killed_task_attempts"] >= 2, "the killed clip's task ran again"
    assert evidence["total_attempts"] > bench.clips and evidence["workers_removed"] >= 1
    assert evidence["erred"] == []
    assert evidence["frames"] == bench.clips * bench.scale.frames
    assert evidence["verify"] == [] and evidence["differences"] == []
