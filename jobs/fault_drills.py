"""Fault drills: real builds on real stores, hit with real faults, checked for what the store promises.

Each drill sets up a dataset and a store in a given folder, injects one fault (SIGKILL of the build
process, also inside the deletion of a staging folder, two builds racing, damaged chunks, a full disk,
an unwritable store, a lost dask worker), checks the outcome against the store's contract, and returns
a ``DrillResult``: what was tried, whether the build survived, and the evidence. The tests run each
drill once; the reliability report in ``benchmarks/`` runs them many times and prints the totals.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin
from PIL import Image

from featstore.errors import StoreError
from featstore.features import GROUP_DIR, open_features
from featstore.store import REMOVED_FILE, TRASH_PREFIX, ArtifactRecord, Store
from jobs.featurize import DONE_DIR, build_features

BACKBONE = "tiny"
TEMP_MARKERS = (".tmp-", ".partial")
FEATURIZE_KEY_PREFIX = "featurize-"


@dataclass(frozen=True)
class DrillResult:
    """One drill's outcome; ``evidence`` holds the concrete facts the verdict rests on."""

    name: str
    tried: str
    survived: bool
    details: str
    seconds: float
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DrillScale:
    """The dataset a drill builds: enough frames that a fault lands while work is under way."""

    clips: int
    frames: int
    size: tuple[int, int]
    batch_size: int = 4

    @property
    def label(self) -> str:
        return f"{self.clips}x{self.frames}-{self.size[0]}x{self.size[1]}"


# Test-sized drills: a CLI build of FAST takes about a second of compute after start-up.
FAST = DrillScale(clips=4, frames=8, size=(96, 128), batch_size=2)
FULL = DrillScale(clips=8, frames=30, size=(240, 320))
# Clips of several chunk spans (14 frames at 240x320), so a dask worker can die between two chunks.
DASK_FULL = DrillScale(clips=4, frames=48, size=(240, 320))


def write_davis_dataset(
    root: Path, clips: Mapping[str, int], size: tuple[int, int], *, seed: int = 0, masks: bool = True
) -> Path:
    """A DAVIS-layout dataset of real JPEG frames and 0/255 PNG masks (a bright square moving on noise).

    Written into a temporary sibling and renamed, so a folder that exists is always complete.
    """
    if root.is_dir():
        return root
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    rng = np.random.default_rng(seed)
    height, width = size
    for clip, n in clips.items():
        frames_dir = tmp / "JPEGImages" / "480p" / clip
        masks_dir = tmp / "Annotations" / "480p" / clip
        frames_dir.mkdir(parents=True)
        if masks:
            masks_dir.mkdir(parents=True)
        for i in range(n):
            frame = rng.integers(0, 120, size=(height, width, 3), dtype=np.uint8)
            mask = np.zeros((height, width), dtype=np.uint8)
            top, left = (i * 3) % (height // 2), (i * 5) % (width // 2)
            mask[top : top + height // 3, left : left + width // 3] = 255
            frame[mask > 0] = (220, 200, 40)
            Image.fromarray(frame).save(frames_dir / f"{i:05d}.jpg", quality=90)
            if masks:
                Image.fromarray(mask, mode="L").save(masks_dir / f"{i:05d}.png")
    os.rename(tmp, root)
    return root


class DrillBench:
    """A drill folder: one dataset, its clean reference build, and fresh stores for each drill run.

    The dataset and the reference are made once and reused by every drill run in the same folder.
    """

    def __init__(self, workdir: Path, scale: DrillScale = FAST) -> None:
        self.workdir = Path(workdir)
        self.scale = scale
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data = write_davis_dataset(
            self.workdir / f"davis-{scale.label}",
            {f"clip{i}": scale.frames for i in range(scale.clips)},
            scale.size,
        )
        self._reference: tuple[Store, ArtifactRecord] | None = None

    @property
    def clips(self) -> int:
        return self.scale.clips

    def reference(self) -> tuple[Store, ArtifactRecord]:
        """The features of an uninterrupted in-process build: what every surviving build must equal."""
        if self._reference is None:
            store = Store(self.workdir / f"reference-{self.scale.label}")
            result = build_features(store, BACKBONE, self.data, weights="random", device="cpu",
                                    batch_size=self.scale.batch_size, progress=False)
            self._reference = (store, result.record)
        return self._reference

    def spans_per_clip(self) -> int:
        """Chunk-aligned writes per clip in the reference (the fewest chunks of any of clip0's arrays)."""
        _store, record = self.reference()
        counts: dict[str, int] = {}
        for rel in feature_chunk_files(record.manifest):
            parts = rel.split("/")
            if parts[3] == "clip0":
                counts[parts[2]] = counts.get(parts[2], 0) + 1
        return min(counts.values())

    def staged_file_count(self) -> int:
        """Files a build writes into its staging folder: the reference's manifest plus its record."""
        return len(self.reference()[1].manifest) + 1

    def fresh_dir(self, label: str) -> Path:
        """A new, empty folder for one drill run."""
        for n in range(1, 100_000):
            path = self.workdir / f"{label}-{n}"
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return path
        raise RuntimeError(f"no free drill folder under {self.workdir}")

    def build_args(self, store: Path, *, json_output: bool = True) -> list[str]:
        args = ["build", "--backbone", BACKBONE, "--weights", "random", "--data", str(self.data),
                "--store", str(store), "--device", "cpu", "--quiet", "--batch-size", str(self.scale.batch_size)]
        return [*args, "--json"] if json_output else args


# --- evidence helpers ------------------------------------------------------------------------------


def featstore_command(args: Sequence[str]) -> list[str]:
    """The ``featstore`` command line as a subprocess of this interpreter."""
    return [sys.executable, "-m", "featstore", *args]


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FEATSTORE_WANDB", None)
    env.setdefault("WANDB_MODE", "offline")
    return env


def run_cli(args: Sequence[str], *, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run ``featstore ARGS`` in a fresh process and wait for it."""
    return subprocess.run(featstore_command(args), capture_output=True, text=True, timeout=timeout,
                          env=_child_env(), check=False)


def cli_in_process(args: Sequence[str]) -> tuple[int, str, str]:
    """Run the ``featstore`` command's entry point here: (exit status, stdout, stderr)."""
    from featstore.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def last_json(stdout: str) -> dict[str, Any]:
    lines = stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def _glob(root: Path, pattern: str) -> list[Path]:
    """``root.glob(pattern)`` on folders a running build may remove meanwhile: [] when one vanished mid-scan
    (callers poll again)."""
    try:
        return list(root.glob(pattern))
    except OSError:
        return []


def done_markers(store_root: Path) -> list[str]:
    """Clips marked finished in any features staging area of the store."""
    return sorted(p.stem for p in _glob(store_root, f"staging/features-*/scratch/{DONE_DIR}/*.json"))


def feature_chunk_files(manifest: Mapping[str, str]) -> list[str]:
    """The feature chunk files of a manifest, whatever zarr's chunk key layout: every file of an array but
    its ``zarr.json`` (``features.zarr/features/<layer>/<clip>/...``)."""
    prefix = f"{GROUP_DIR}/features/"
    return sorted(rel for rel in manifest
                  if rel.startswith(prefix) and len(rel.split("/")) > 4 and not rel.endswith("zarr.json"))


def _count_chunk_files(array_dirs: Iterable[Path]) -> int:
    """Chunk files written so far under these array folders; folders vanishing under the count are skipped."""
    count = 0
    for array_dir in array_dirs:
        for _dirpath, _dirnames, filenames in os.walk(array_dir):
            count += sum(name != "zarr.json" and not name.endswith(".partial") for name in filenames)
    return count


def _count_staged_files(store_root: Path) -> int:
    count = 0
    for data in _glob(store_root, "staging/features-*/data"):
        for _dirpath, _dirnames, filenames in os.walk(data):
            count += len(filenames)
    return count


def visible_problems(store_root: Path) -> list[str]:
    """Anything under ``artifacts/`` that is not a complete, verified version: the store's visibility promise."""
    problems: list[str] = []
    artifacts = store_root / "artifacts"
    if not artifacts.exists():
        return problems
    store = Store(store_root)
    for type_dir in sorted(artifacts.iterdir()):
        for name_dir in sorted(type_dir.iterdir()) if type_dir.is_dir() else []:
            for entry in sorted(name_dir.iterdir()):
                if not (entry.is_dir() and entry.name.startswith("v") and entry.name[1:].isdigit()):
                    problems.append(f"stray entry {entry.relative_to(store_root)}")
                elif not (entry / "artifact.json").is_file() and not (entry / REMOVED_FILE).is_file():
                    problems.append(f"version without record {entry.relative_to(store_root)}")  # nor tombstone
    try:
        records = store.list()
    except StoreError as exc:
        return [*problems, str(exc)]
    for record in records:
        problems.extend(f"{record.ref}: {p}" for p in store.verify(record))
        problems.extend(f"{record.ref}: temporary file {rel}" for rel in record.manifest
                        if any(marker in rel for marker in TEMP_MARKERS))
    return problems


def feature_differences(expected: tuple[Store, ArtifactRecord], actual: tuple[Store, ArtifactRecord]) -> list[str]:
    """How two feature artifacts differ: key, clips, rows, every array of every layer, masks; [] when equal."""
    (store_a, record_a), (store_b, record_b) = expected, actual
    if record_a.key != record_b.key:
        return [f"key {record_b.key[:12]} differs from the clean build's {record_a.key[:12]}"]
    a, b = open_features(store_a, record_a.ref), open_features(store_b, record_b.ref)
    if a.clips != b.clips or a.layers != b.layers:
        return [f"clips/layers {b.clips}/{b.layers} differ from {a.clips}/{a.layers}"]
    differences = []
    for clip in a.clips:
        if a.rows(clip) != b.rows(clip):
            differences.append(f"rows of {clip}")
        differences.extend(f"{clip}/{layer}" for layer in a.layers
                           if not torch.equal(a.read(clip, layer), b.read(clip, layer)))
        if a.has_masks and not torch.equal(a.read_masks(clip), b.read_masks(clip)):
            differences.append(f"masks of {clip}")
    return differences


def _verify_exit(store_root: Path, ref: str) -> int:
    code, _out, _err = cli_in_process(["verify", ref, "--store", str(store_root)])
    return code


def _rerun(bench: DrillBench, store_root: Path, in_process: bool, evidence: dict[str, Any]) -> tuple[int, str, str]:
    """The same build again, as a user reruns it after a kill: exit code, stdout, stderr (kept in ``evidence``)."""
    if in_process:
        code, out, err = cli_in_process(bench.build_args(store_root))
    else:
        rerun = run_cli(bench.build_args(store_root))
        code, out, err = rerun.returncode, rerun.stdout, rerun.stderr
    evidence["rerun_exit"] = code
    evidence["rerun_stderr"] = err.strip()
    return code, out, err


def _check_rerun(bench: DrillBench, store_root: Path, ref: str, evidence: dict[str, Any], failures: list[str]) -> None:
    """After a rerun: its version verifies, is the only one, nothing half-done is visible, and it equals a
    clean build, array for array. Adds what it saw to ``evidence`` and what broke to ``failures``."""
    store = Store(store_root)
    record = store.resolve(ref, type="features")
    evidence["verify_exit"] = _verify_exit(store_root, record.ref)
    evidence["versions_after_rerun"] = [r.ref for r in store.list("features")]
    evidence["visible_problems_after_rerun"] = visible_problems(store_root)
    evidence["differences"] = feature_differences(bench.reference(), (store, record))
    if evidence["verify_exit"] != 0:
        failures.append("`featstore verify` failed after the rerun")
    if len(evidence["versions_after_rerun"]) != 1:
        failures.append(f"expected one version, found {evidence['versions_after_rerun']}")
    if evidence["visible_problems_after_rerun"]:
        failures.append("after the rerun: " + "; ".join(evidence["visible_problems_after_rerun"][:3]))
    if evidence["differences"]:
        failures.append("features differ from a clean build: " + ", ".join(evidence["differences"][:5]))


def _finish(name: str, tried: str, started: float, failures: list[str], details: str,
            evidence: dict[str, Any]) -> DrillResult:
    text = details if not failures else f"{details}; FAILED: {'; '.join(failures)}"
    return DrillResult(name, tried, not failures, text, time.perf_counter() - started, evidence)


# --- drill 1: SIGKILL at any point -----------------------------------------------------------------


@dataclass(frozen=True)
class KillPoint:
    """When to SIGKILL the build: after some clips are finished, after a delay, or right after the commit."""

    after_clips: int | None = None
    after_seconds: float | None = None
    after_files: int | None = None  # kill once this many files are staged (or the commit happened)
    of_files: int | None = None  # the files a whole build stages, for the description
    after_commit: bool = False

    def describe(self) -> str:
        if self.after_commit:
            return "right after the commit"
        if self.after_clips is not None:
            return f"after clip {self.after_clips} finished"
        if self.after_files is not None:
            return f"after {self.after_files}" + (f" of {self.of_files}" if self.of_files else "") + " files staged"
        return f"{self.after_seconds:.2f}s after start"

    def reached(self, store_root: Path, elapsed: float) -> bool:
        committed = bool(_glob(store_root / "artifacts" / "features", "*/v*"))
        if self.after_commit:
            return committed
        if self.after_clips is not None:
            return len(done_markers(store_root)) >= self.after_clips
        if self.after_files is not None:
            return committed or _count_staged_files(store_root) >= self.after_files
        return elapsed >= (self.after_seconds or 0.0)


def _run_until(command: list[str], condition: Callable[[float], bool], logs: Path,
               timeout: float = 300.0) -> tuple[int, bool, float]:
    """Start ``command``; SIGKILL it once ``condition(elapsed)`` holds. Returns (exit status, killed, when)."""
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=_child_env())
        started = time.monotonic()
        killed = False
        while proc.poll() is None:
            elapsed = time.monotonic() - started
            if condition(elapsed):
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
                break
            if elapsed > timeout:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"{' '.join(command)} ran past {timeout:.0f}s")
            time.sleep(0.002)
        code = proc.wait()
        return code, killed, time.monotonic() - started


def drill_sigkill(
    bench: DrillBench, point: KillPoint, *, rerun_in_process: bool = False, remove_committed: bool = False
) -> DrillResult:
    """SIGKILL `featstore build` at ``point``; nothing half-done may be visible, and a rerun must resume
    from the finished clips and produce exactly the clean build's features.

    The rerun is a new ``featstore build`` process, or the same command's entry point called in this
    process when ``rerun_in_process`` (the same code without a second interpreter start-up). With
    ``remove_committed``, a version the killed build committed is removed with `featstore rm` first, so
    the rerun must build it again whole from whatever the kill left in staging.
    """
    started = time.perf_counter()
    run_dir = bench.fresh_dir("sigkill")
    store_root = run_dir / "store"
    command = featstore_command(bench.build_args(store_root))
    code, killed, at = _run_until(command, lambda elapsed: point.reached(store_root, elapsed), run_dir)
    if killed and code == 0:  # it exited between the last check and the signal
        killed = False
    finished = done_markers(store_root)
    visible = Store(store_root).list("features")
    evidence: dict[str, Any] = {
        "killed": killed, "exit_after_kill": code, "killed_at_s": round(at, 3),
        "finished_clips_at_kill": len(finished), "visible_after_kill": [r.ref for r in visible],
        "visible_problems_after_kill": visible_problems(store_root),
    }
    failures: list[str] = []
    if killed and code != -signal.SIGKILL:
        failures.append(f"the build exited {code} instead of dying from SIGKILL")
    if not killed:
        moment = "not killed: the build finished first"
        if code != 0:
            failures.append(f"uninterrupted build exited {code}")
    elif visible:
        moment = "killed after the commit"
    elif len(finished) == bench.clips:
        moment = "killed during the commit (every clip finished, nothing visible yet)"
    elif finished:
        moment = f"killed mid-build ({len(finished)}/{bench.clips} clips finished)"
    else:
        moment = "killed before any clip finished"
    evidence["moment"] = moment
    if evidence["visible_problems_after_kill"]:
        failures.append("after the kill: " + "; ".join(evidence["visible_problems_after_kill"][:3]))
    removed = remove_committed and bool(visible)
    if removed:
        rm_exit, _, rm_err = cli_in_process(["rm", *(r.ref for r in visible), "--store", str(store_root)])
        evidence["rm_exit"] = rm_exit
        if rm_exit != 0:
            failures.append(f"`featstore rm` after the kill exited {rm_exit}: {rm_err.strip()[-300:]}")
            return _finish("sigkill", f"SIGKILL {point.describe()}, then rm", started, failures, moment, evidence)
        moment += ", then removed with rm"

    rerun_exit, rerun_out, rerun_err = _rerun(bench, store_root, rerun_in_process, evidence)
    if rerun_exit != 0:
        failures.append(f"the rerun exited {rerun_exit}: {rerun_err.strip()[-300:]}")
        return _finish("sigkill", f"SIGKILL {point.describe()}", started, failures, moment, evidence)
    built = last_json(rerun_out)
    evidence["rerun_cached"] = built.get("cached")
    resumed = f"{len(finished)} clip(s) already finished"
    evidence["rerun_reported_resume"] = resumed in rerun_err
    if removed:
        if built.get("cached") is not False or "resuming" in rerun_err:
            failures.append("the rerun after rm did not build every clip afresh")
    elif visible or not killed:
        if built.get("cached") is not True:
            failures.append("the rerun after a committed build recomputed instead of reusing it")
    elif finished and resumed not in rerun_err:
        failures.append(f"the rerun did not report resuming ({resumed!r} not in its stderr)")
    elif not finished and "resuming" in rerun_err:
        failures.append("the rerun reported resuming although no clip had finished")

    _check_rerun(bench, store_root, built["ref"], evidence, failures)
    if removed:
        rerun_did = "built every clip again"
    elif built.get("cached"):
        rerun_did = "reused the commit"
    elif finished:
        rerun_did = f"resumed from {len(finished)} finished clip(s)"
    else:
        rerun_did = "built every clip"
    details = f"{moment}; rerun {rerun_did}, verify ok, equal to a clean build"
    title = f"SIGKILL {point.describe()}" + (", then rm" if removed else "")
    return _finish("sigkill", title, started, failures, details, evidence)


# --- drill 2: concurrent builds --------------------------------------------------------------------


def drill_concurrent_builds(bench: DrillBench, n: int = 2) -> DrillResult:
    """``n`` builds of the same inputs started together: all succeed, one computes, one version exists."""
    started = time.perf_counter()
    run_dir = bench.fresh_dir("concurrent")
    store_root = run_dir / "store"
    procs = [subprocess.Popen(featstore_command(bench.build_args(store_root)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_child_env()) for _ in range(n)]
    outputs = [proc.communicate(timeout=300) for proc in procs]
    codes = [proc.returncode for proc in procs]
    failures: list[str] = []
    evidence: dict[str, Any] = {"exits": codes}
    if any(codes):
        failures.append(f"exit statuses {codes}: " + " | ".join(err.strip()[-200:] for _out, err in outputs))
        return _finish("concurrent", f"{n} builds started together", started, failures, "", evidence)
    built = [last_json(out) for out, _err in outputs]
    store = Store(store_root)
    versions = store.list("features")
    evidence.update(
        refs=sorted({b["ref"] for b in built}),
        cached=sorted(bool(b["cached"]) for b in built),
        waited=sum("waiting for another job" in err for _out, err in outputs),
        versions=[r.ref for r in versions],
    )
    if len(versions) != 1 or len(evidence["refs"]) != 1:
        failures.append(f"expected one version and one ref, found {evidence['versions']} / {evidence['refs']}")
    if evidence["cached"] != [False] + [True] * (n - 1):
        failures.append(f"expected exactly one build to compute, cached flags {evidence['cached']}")
    if versions:
        evidence["verify_exit"] = _verify_exit(store_root, versions[0].ref)
        evidence["differences"] = feature_differences(bench.reference(), (store, versions[0]))
        if evidence["verify_exit"] != 0:
            failures.append("`featstore verify` failed")
        if evidence["differences"]:
            failures.append("features differ from a clean build")
    evidence["visible_problems"] = visible_problems(store_root)
    failures.extend(evidence["visible_problems"])
    details = (f"all exited 0; one version {evidence.get('versions')}, verify ok; "
               f"{evidence['waited']} waited on the lock, {n - 1} reused the commit")
    return _finish("concurrent", f"{n} builds of the same inputs started together", started, failures, details,
                   evidence)


# --- drill 3: damaged chunk ------------------------------------------------------------------------


def _damage(path: Path, mode: str) -> None:
    if mode == "delete":
        path.unlink()
        return
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for i in range(middle, min(len(data), middle + 8)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def drill_damaged_chunk(bench: DrillBench, mode: str = "delete", *, pick: int = 0) -> DrillResult:
    """Delete or alter one chunk of a committed artifact: verify names it, readers refuse the damaged
    array instead of reading zeros or garbage, and every other array stays readable and exact."""
    if mode not in ("delete", "flip"):
        raise ValueError(f"mode must be 'delete' or 'flip', not {mode!r}")
    started = time.perf_counter()
    ref_store, ref_record = bench.reference()
    run_dir = bench.fresh_dir(f"damaged-{mode}")
    shutil.copytree(ref_store.root, run_dir / "store", symlinks=True)
    store = Store(run_dir / "store")
    record = store.resolve(ref_record.ref, type="features")
    chunks = feature_chunk_files(record.manifest)
    target = chunks[pick % len(chunks)]
    layer, clip = target.split("/")[2:4]
    _damage(store.path(record) / target, mode)
    tried = f"{'deleted' if mode == 'delete' else 'flipped 8 bytes of'} chunk {target.split('features.zarr/')[-1]}"
    failures: list[str] = []
    code, out, _err = cli_in_process(["verify", record.ref, "--store", str(store.root), "--json"])
    evidence: dict[str, Any] = {"chunk": target, "clip": clip, "layer": layer, "verify_exit": code,
                                "verify_problems": last_json(out).get("problems", [])}
    if code != 1 or not any(target in p for p in evidence["verify_problems"]):
        failures.append(f"`featstore verify` exited {code} without naming {target}")
    try:
        values = open_features(store, record.ref).read(clip, layer)
        evidence["read_error"] = None
        failures.append(f"reading {clip}/{layer} returned {tuple(values.shape)} instead of an error")
    except StoreError as exc:
        evidence["read_error"] = str(exc)
        if target not in str(exc):
            failures.append(f"the read error does not name {target}: {exc}")
    # What the manifest check prevents: zarr alone reads a missing chunk as zeros, an altered one as garbage.
    try:
        unchecked = open_features(store, record.ref, verify=False).read(clip, layer)
        expected = open_features(ref_store, ref_record.ref).read(clip, layer)
        evidence["unchecked_read"] = ("equal" if torch.equal(unchecked, expected)
                                      else f"{int((unchecked != expected).flatten(1).any(1).sum())} frame(s) wrong")
    except Exception as exc:  # any decoder failure is evidence, not a drill failure
        evidence["unchecked_read"] = f"raised {type(exc).__name__}"
    intact = _intact_arrays_readable((ref_store, ref_record), (store, record), damaged=(clip, layer))
    evidence["intact_arrays_checked"], evidence["intact_differences"] = intact
    if evidence["intact_differences"]:
        failures.append("intact arrays unreadable or different: " + ", ".join(evidence["intact_differences"][:3]))
    details = (f"verify exit 1 naming it; read raised StoreError; {evidence['intact_arrays_checked']} intact "
               f"arrays equal; unchecked zarr read: {evidence['unchecked_read']}")
    return _finish(f"damaged-{mode}", tried, started, failures, details, evidence)


def _intact_arrays_readable(expected: tuple[Store, ArtifactRecord], actual: tuple[Store, ArtifactRecord],
                            damaged: tuple[str, str]) -> tuple[int, list[str]]:
    a, b = open_features(expected[0], expected[1].ref), open_features(actual[0], actual[1].ref)
    checked, differences = 0, []
    for clip in a.clips:
        for layer in a.layers:
            if (clip, layer) == damaged:
                continue
            checked += 1
            try:
                if not torch.equal(a.read(clip, layer), b.read(clip, layer)):
                    differences.append(f"{clip}/{layer} differs")
            except StoreError as exc:
                differences.append(f"{clip}/{layer}: {exc}")
        checked += 1
        try:
            if not torch.equal(a.read_masks(clip), b.read_masks(clip)):
                differences.append(f"masks of {clip} differ")
        except StoreError as exc:
            differences.append(f"masks of {clip}: {exc}")
    return checked, differences


# --- drill 4: full disk and unwritable stores ------------------------------------------------------

_FILE_SIZE_LIMIT = (
    "import os, resource, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])"
)


def _one_clear_line(stderr: str, must_name: Sequence[str]) -> list[str]:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    problems = []
    if len(lines) != 1:
        problems.append(f"stderr has {len(lines)} lines, not one: {stderr.strip()[-300:]!r}")
    elif not lines[0].startswith("featstore build: error:"):
        problems.append(f"stderr is not a featstore error line: {lines[0]!r}")
    problems.extend(f"the error does not name {word!r}" for word in must_name if word not in stderr)
    return problems


def drill_full_disk(bench: DrillBench, limit_bytes: int = 64 * 1024, *, recover: bool = True) -> DrillResult:
    """The build's files may not grow past ``limit_bytes`` (RLIMIT_FSIZE, SIGXFSZ ignored, so writes fail
    with EFBIG as on a full disk): one clear error line, nothing visible; with space back it resumes."""
    started = time.perf_counter()
    run_dir = bench.fresh_dir("full-disk")
    store_root = run_dir / "store"
    limited = [sys.executable, "-c", _FILE_SIZE_LIMIT, str(limit_bytes), "-m", "featstore",
               *bench.build_args(store_root, json_output=False)]
    proc = subprocess.run(limited, capture_output=True, text=True, timeout=300, env=_child_env(), check=False)
    store = Store(store_root)
    evidence: dict[str, Any] = {
        "limit_bytes": limit_bytes, "exit": proc.returncode, "stderr": proc.stderr.strip(),
        "visible_features": [r.ref for r in store.list("features")],
        "visible_problems": visible_problems(store_root),
        "finished_clips_at_failure": len(done_markers(store_root)),
        "dataset_recorded": bool(store.list("dataset")),
        "chunks_staged": _count_chunk_files(_glob(store_root, f"staging/features-*/data/{GROUP_DIR}/features/*/*")),
    }
    tried = f"file-size limit {limit_bytes // 1024} KiB (EFBIG, as a full disk)"
    failures: list[str] = []
    if proc.returncode != 1:
        failures.append(f"exit status {proc.returncode}, expected 1")
    failures.extend(_one_clear_line(proc.stderr, [str(store.root), "--store"]))
    if "Traceback" in proc.stderr:
        failures.append("a traceback reached the user")
    if evidence["visible_features"]:
        failures.append(f"visible after the failure: {evidence['visible_features']}")
    failures.extend(evidence["visible_problems"])
    where = (f"after {evidence['chunks_staged']} chunk files, {evidence['finished_clips_at_failure']} clips"
             if evidence["dataset_recorded"] else "while recording the dataset")
    details = f"failed {where}: exit 1, one error line, nothing visible"
    if recover and not failures:
        result = build_features(store, BACKBONE, bench.data, weights="random", device="cpu",
                                batch_size=bench.scale.batch_size, progress=False)
        evidence["recovered_ref"] = result.ref
        evidence["recovered_verify"] = store.verify(result.record)
        evidence["differences"] = feature_differences(bench.reference(), (store, result.record))
        if evidence["recovered_verify"] or evidence["differences"]:
            failures.append("the build after space came back is damaged or differs from a clean build")
        details += "; without the limit it completed, equal to a clean build"
    return _finish("full-disk", tried, started, failures, details, evidence)


def drill_unwritable_store(bench: DrillBench) -> DrillResult:
    """A store path running through a regular file (ENOTDIR), and a read-only folder when not root
    (root ignores permission bits): a clear one-line error each, and nothing written."""
    started = time.perf_counter()
    run_dir = bench.fresh_dir("unwritable")
    failures: list[str] = []
    evidence: dict[str, Any] = {}
    blocker = run_dir / "a-file"
    blocker.write_text("not a folder\n")
    store_root = blocker / "store"
    code, _out, err = cli_in_process(bench.build_args(store_root, json_output=False))
    evidence["enotdir"] = {"exit": code, "stderr": err.strip()}
    if code != 1:
        failures.append(f"ENOTDIR: exit {code}, expected 1")
    failures.extend(f"ENOTDIR: {p}" for p in _one_clear_line(err, [str(blocker), "--store"]))
    if blocker.read_text() != "not a folder\n" or sorted(os.listdir(run_dir)) != ["a-file"]:
        failures.append("ENOTDIR: something was written")
    variants = ["store under a regular file (ENOTDIR)"]
    if os.geteuid() != 0:
        locked = run_dir / "read-only"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            code, _out, err = cli_in_process(bench.build_args(locked / "store", json_output=False))
            written = os.listdir(locked)
        finally:
            locked.chmod(0o700)
        evidence["read_only"] = {"exit": code, "stderr": err.strip()}
        if code != 1:
            failures.append(f"read-only: exit {code}, expected 1")
        failures.extend(f"read-only: {p}" for p in _one_clear_line(err, [str(locked), "--store"]))
        if written:
            failures.append(f"read-only: wrote {written}")
        variants.append("chmod 0o500 folder")
    else:
        evidence["read_only"] = "not run: root ignores permission bits"
    details = "exit 1 with one error line naming the path and --store; nothing written"
    if os.geteuid() == 0:
        details += " (chmod variant not run as root)"
    return _finish("unwritable", " and ".join(variants), started, failures, details, evidence)


# --- drill 5: a dask worker lost mid-build ---------------------------------------------------------


def _clip_of(key: str) -> str:
    return key.split("-", 2)[2]


class KillWorkerOnFirstClip(WorkerPlugin):
    """SIGKILLs its own worker process in the middle of the cluster's first featurize task.

    A marker file created with O_EXCL makes this happen once across the cluster (restarted workers
    included). The worker dies once its clip's arrays exist (the first batch is computed) and at least
    ``after_chunks`` chunk files of the clip are on disk, so the clip is half done.
    """

    name = "featstore-kill-worker-once"

    def __init__(self, marker: str, store_root: str, after_chunks: int = 0, give_up_s: float = 60.0) -> None:
        self.marker = marker
        self.store_root = store_root
        self.after_chunks = after_chunks
        self.give_up_s = give_up_s

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "executing" or not str(key).startswith(FEATURIZE_KEY_PREFIX):
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        threading.Thread(target=self._kill_mid_clip, args=(str(key),), daemon=True).start()

    def _kill_mid_clip(self, key: str) -> None:
        clip = _clip_of(key)
        root = Path(self.store_root)
        arrays = f"staging/features-*/data/{GROUP_DIR}/features/*/{clip}"
        done = f"staging/features-*/scratch/{DONE_DIR}/{clip}.json"
        started = time.monotonic()
        chunks, landed = 0, False
        while time.monotonic() - started < self.give_up_s and not _glob(root, done):
            if _glob(root, f"{arrays}/zarr.json"):
                chunks = _count_chunk_files(_glob(root, arrays))
                if chunks >= self.after_chunks:
                    landed = True
                    break
            time.sleep(0.001)
        evidence = {
            "key": key, "clip": clip, "pid": os.getpid(), "after_s": round(time.monotonic() - started, 3),
            "chunk_files": chunks, "landed": landed, "clip_done": bool(_glob(root, done)),
        }
        tmp = f"{self.marker}.json.tmp"
        Path(tmp).write_text(json.dumps(evidence))
        os.replace(tmp, f"{self.marker}.json")
        if landed:
            os.kill(os.getpid(), signal.SIGKILL)


class CountTaskAttempts(SchedulerPlugin):
    """Counts, on the scheduler, how often each featurize task was sent to a worker and workers lost."""

    name = "featstore-count-attempts"

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}
        self.erred: list[str] = []
        self.workers_removed = 0

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if not str(key).startswith(FEATURIZE_KEY_PREFIX):
            return
        if finish == "processing":
            self.attempts[str(key)] = self.attempts.get(str(key), 0) + 1
        elif finish == "erred":
            self.erred.append(str(key))

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.workers_removed += 1


def _read_attempts(dask_scheduler: Any) -> dict[str, Any]:
    plugin = dask_scheduler.plugins[CountTaskAttempts.name]
    return {"attempts": dict(plugin.attempts), "erred": list(plugin.erred), "workers_removed": plugin.workers_removed}


@contextlib.contextmanager
def _local_cluster(n_workers: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=n_workers, processes=True, threads_per_worker=1, dashboard_address=None,
                           env={"OMP_NUM_THREADS": "1", "FEATSTORE_WORKER_THREADS": "1"})
    client = Client(cluster)
    try:
        yield cluster, client
    finally:
        client.close()
        cluster.close()


def drill_dask_worker_lost(bench: DrillBench, *, after_chunks: int | None = None) -> DrillResult:
    """A worker of a real 2-process LocalCluster SIGKILLs itself mid-clip, once its clip's arrays and
    ``after_chunks`` chunk files exist (by default one when a clip takes several writes, else none): the
    scheduler reschedules the task, the build succeeds, and its features equal a local build's."""
    started = time.perf_counter()
    run_dir = bench.fresh_dir("dask-worker-lost")
    store_root = run_dir / "store"
    marker = run_dir / "worker-killed"
    reference = bench.reference()
    if after_chunks is None:
        after_chunks = 1 if bench.spans_per_clip() >= 2 else 0
    failures: list[str] = []
    evidence: dict[str, Any] = {"after_chunks": after_chunks}
    with _local_cluster(2) as (cluster, client):
        client.register_plugin(CountTaskAttempts())
        client.register_plugin(KillWorkerOnFirstClip(str(marker), str(store_root), after_chunks))
        try:
            result = build_features(Store(store_root), BACKBONE, bench.data, weights="random", device="cpu",
                                    batch_size=bench.scale.batch_size, scheduler=cluster.scheduler_address,
                                    progress=False)
        except Exception as exc:  # a failed build is the drill's finding, reported below
            failures.append(f"the build failed: {type(exc).__name__}: {exc}")
            result = None
        counts = client.run_on_scheduler(_read_attempts)
    evidence.update(counts)
    kill_file = Path(f"{marker}.json")
    evidence["kill"] = json.loads(kill_file.read_text()) if kill_file.is_file() else None
    attempts: dict[str, int] = counts["attempts"]
    evidence["total_attempts"] = sum(attempts.values())
    if evidence["kill"] is None or not evidence["kill"]["landed"]:
        failures.append(f"no worker was killed mid-clip: {evidence['kill']}")
    else:
        killed_key = evidence["kill"]["key"]
        evidence["killed_task_attempts"] = attempts.get(killed_key, 0)
        if evidence["kill"]["clip_done"] or evidence["kill"]["chunk_files"] < after_chunks:
            failures.append(f"the kill did not land mid-clip: {evidence['kill']}")
        if evidence["killed_task_attempts"] < 2:
            failures.append(f"the killed task ran {evidence['killed_task_attempts']} time(s); expected a retry")
    if result is not None:
        store = Store(store_root)
        evidence["verify"] = store.verify(result.record)
        evidence["differences"] = feature_differences(reference, (store, result.record))
        evidence["frames"] = result.frames
        if evidence["verify"] or evidence["differences"]:
            failures.append(f"verify {evidence['verify'][:2]}, differences {evidence['differences'][:3]}")
    kill = evidence["kill"] or {}
    details = (f"worker pid {kill.get('pid')} killed {kill.get('after_s')}s into {kill.get('clip')} "
               f"({kill.get('chunk_files')} chunk files written); {evidence['total_attempts']} task attempts for "
               f"{bench.clips} clips; build equal to a local build, verify ok")
    return _finish("dask-worker-lost", "SIGKILL of a dask worker mid-clip", started, failures, details, evidence)


# --- drill 6: SIGKILL inside a staging folder's deletion -------------------------------------------

BALLAST_DIR = "ballast"
DISCARD_POINTS = ("commit", "force")


def add_ballast(folder: Path, subfolders: int = 200, links: int = 50) -> int:
    """Fill ``folder`` with ``subfolders`` x ``links`` hard links to one empty file; returns its entries.

    A test-sized staging folder is deleted in about a millisecond, too fast to catch from outside; a
    full-size one holds thousands of chunk files. Hard links give ``rmtree`` as many entries to unlink at
    almost no cost to make, so a kill can land part-way through the deletion.
    """
    folder.mkdir(parents=True)
    seed = folder / "seed"
    seed.touch()
    for i in range(subfolders):
        sub = folder / f"{i:04d}"
        sub.mkdir()
        for j in range(links):
            os.link(seed, sub / f"{j:04d}")
    return subfolders + 1


def ballast_left(store_root: Path) -> dict[str, int]:
    """Entries left in the ballast of each staging folder, live or renamed aside, by the folder's name."""
    left = {}
    for ballast in _glob(store_root, f"staging/*/scratch/{BALLAST_DIR}"):
        with contextlib.suppress(OSError):  # deleted under the scan
            left[ballast.parents[1].name] = len(os.listdir(ballast))
    return left


def _trash_folders(store_root: Path) -> list[str]:
    return sorted(p.name for p in _glob(store_root, f"staging/{TRASH_PREFIX}*") if p.is_dir())


def _files_beside_ballast(folder: Path) -> list[str]:
    """The staged files (markers, chunks) still in a staging folder, its ballast left out."""
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        if Path(dirpath) == folder / "scratch":
            dirnames[:] = [name for name in dirnames if name != BALLAST_DIR]
        files += [os.path.relpath(os.path.join(dirpath, name), folder) for name in filenames]
    return sorted(files)


def drill_sigkill_in_discard(bench: DrillBench, where: str = "commit", *, subfolders: int = 200, links: int = 50,
                             rerun_in_process: bool = False) -> DrillResult:
    """SIGKILL `featstore build` half-way through ``discard_staging``'s deletion of a staging folder.

    A build is first stopped mid-way (SIGKILL after half its clips) and ballast added to its staging folder;
    the next build then deletes that folder, and is killed once half the ballast is gone, wherever the
    folder is (so a deletion that does not rename aside is caught too): after it resumed and committed
    (``commit``), or as ``--force`` discards the stopped build's clips (``force``). The
    folder must be renamed aside, never left part-deleted under its live name, where a later run would
    resume from it; nothing half-done may be visible; a plain rerun, which resumes from any staging folder
    it finds, must equal a clean build; and `featstore gc` must delete what was left aside.
    """
    if where not in DISCARD_POINTS:
        raise ValueError(f"where must be one of {DISCARD_POINTS}, not {where!r}")
    started = time.perf_counter()
    run_dir = bench.fresh_dir(f"discard-{where}")
    store_root = run_dir / "store"
    tried = "SIGKILL in discard_staging " + ("after the commit" if where == "commit"
                                               else "of stopped clips (--force)")
    failures: list[str] = []
    evidence: dict[str, Any] = {"where": where}

    stop = KillPoint(after_clips=max(1, bench.clips // 2))
    (run_dir / "stopped").mkdir()
    code, killed, _at = _run_until(featstore_command(bench.build_args(store_root)),
                                   lambda elapsed: stop.reached(store_root, elapsed), run_dir / "stopped")
    staged = _glob(store_root, "staging/features-*/scratch")
    evidence["stopped_build_clips"] = len(done_markers(store_root))
    if not killed or code != -signal.SIGKILL or len(staged) != 1:
        failures.append(f"the first build was not stopped mid-way (exit {code}, staging folders {len(staged)})")
        return _finish("sigkill-discard", tried, started, failures, "", evidence)
    full = add_ballast(staged[0] / BALLAST_DIR, subfolders, links)
    evidence["ballast_entries"] = full

    args = [*bench.build_args(store_root), *(["--force"] if where == "force" else [])]
    (run_dir / "killed").mkdir()
    def half_deleted(_elapsed: float) -> bool:
        return any(0 < n <= full // 2 for n in ballast_left(store_root).values())

    code, killed, at = _run_until(featstore_command(args), half_deleted, run_dir / "killed")
    left = ballast_left(store_root)
    trash = _trash_folders(store_root)
    visible = Store(store_root).list("features")
    evidence.update({
        "killed": killed, "exit_after_kill": code, "killed_at_s": round(at, 3), "ballast_left": left,
        "trash_after_kill": trash, "part_deleted_live": sorted(name for name in left if name not in trash),
        "staged_files_at_kill": {name: _files_beside_ballast(store_root / "staging" / name) for name in left},
        "visible_after_kill": [r.ref for r in visible], "visible_problems_after_kill": visible_problems(store_root),
    })
    if not killed or code != -signal.SIGKILL:
        failures.append(f"the build was not killed inside the deletion (exit {code})")
        return _finish("sigkill-discard", tried, started, failures, "", evidence)
    failures.extend(f"staging folder {name} left part-deleted under its live name ({left[name]} of {full} "
                    "ballast entries)" for name in evidence["part_deleted_live"])
    caught = [name for name in trash if 0 < left.get(name, 0) < full]
    if not caught:
        failures.append(f"no folder renamed aside was caught part-way through its deletion: {left}")
    expected_visible = 1 if where == "commit" else 0
    if len(visible) != expected_visible:
        failures.append(f"{len(visible)} version(s) visible after the kill, expected {expected_visible}")
    if evidence["visible_problems_after_kill"]:
        failures.append("after the kill: " + "; ".join(evidence["visible_problems_after_kill"][:3]))

    rerun_exit, rerun_out, rerun_err = _rerun(bench, store_root, rerun_in_process, evidence)
    if rerun_exit != 0:
        failures.append(f"the rerun exited {rerun_exit}: {rerun_err.strip()[-300:]}")
        return _finish("sigkill-discard", tried, started, failures, "", evidence)
    built = last_json(rerun_out)
    evidence["rerun_cached"] = built.get("cached")
    reused = built.get("cached") is True and [built.get("ref")] == evidence["visible_after_kill"]
    if where == "commit" and not reused:
        failures.append(f"the rerun did not reuse the committed version: {built.get('ref')}, "
                        f"cached {built.get('cached')}")
    if where == "force" and (built.get("cached") is not False or "resuming" in rerun_err):
        failures.append("the rerun did not build every clip afresh after --force discarded the stopped build's")
    _check_rerun(bench, store_root, built["ref"], evidence, failures)

    gc_exit, gc_out, gc_err = cli_in_process(["gc", "--store", str(store_root), "--json"])
    removed = [Path(item["path"]).name for item in last_json(gc_out).get("staging", [])] if gc_exit == 0 else []
    evidence.update({"gc_exit": gc_exit, "gc_removed": removed, "trash_after_gc": _trash_folders(store_root),
                     "ballast_after_gc": ballast_left(store_root),
                     "visible_problems_after_gc": visible_problems(store_root)})
    if gc_exit != 0:
        failures.append(f"`featstore gc` exited {gc_exit}: {gc_err.strip()[-300:]}")
    if not set(trash) <= set(removed) or evidence["trash_after_gc"] or evidence["ballast_after_gc"]:
        failures.append(f"`featstore gc` left {evidence['trash_after_gc'] or evidence['ballast_after_gc']} "
                        f"(it removed {removed})")
    if evidence["visible_problems_after_gc"]:
        failures.append("after gc: " + "; ".join(evidence["visible_problems_after_gc"][:3]))

    where_killed = ", ".join(f"{name} ({left[name]} of {full} ballast entries and "
                             f"{len(evidence['staged_files_at_kill'][name])} staged files left)" for name in caught)
    details = (f"killed {at:.2f}s in, inside the deletion of {where_killed or 'nothing renamed aside'}; "
               f"visible after the kill: {evidence['visible_after_kill'] or 'nothing'}; rerun "
               f"{'reused the commit' if built.get('cached') else 'built every clip'}, verify ok, equal to a clean "
               f"build; gc removed {len(removed)} folder(s)")
    return _finish("sigkill-discard", tried, started, failures, details, evidence)
