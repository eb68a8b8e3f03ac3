"""Reliability report: every fault drill, many times, with a table of what was tried and what survived.

Runs the drills of ``jobs.fault_drills`` on real builds: SIGKILL of ``featstore build`` at fixed points
(after the first, middle and last clip, once every clip is done, right after the commit), after a
random number of staged files (``--kills``) and at random times (``--timed-kills``); SIGKILL half-way
through the deletion of a staging folder, after a commit and when ``--force`` discards a stopped build's
clips (``--discard-kills``); concurrent builds of the same inputs; deleted and altered chunks; file-size
limits that fail the build at different points (EFBIG, as a full disk); unwritable store paths; and dask
workers killed mid-clip. Prints one row per drill run and the totals to stdout, progress to stderr, and
exits 1 when any drill did not survive.

    python benchmarks/reliability_report.py                  # 8 clips x 30 frames at 240x320, 12 random kills
    python benchmarks/reliability_report.py --quick          # the test-sized dataset, fewer repetitions
    python benchmarks/reliability_report.py --json report.json --workdir /tmp/drills --keep
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from jobs.fault_drills import (
    DASK_FULL,
    DISCARD_POINTS,
    FAST,
    FULL,
    DrillBench,
    DrillResult,
    KillPoint,
    drill_concurrent_builds,
    drill_damaged_chunk,
    drill_dask_worker_lost,
    drill_full_disk,
    drill_sigkill,
    drill_sigkill_in_discard,
    drill_unwritable_store,
    feature_chunk_files,
    run_cli,
)


def calibrate(bench: DrillBench) -> float:
    """Seconds an uninterrupted ``featstore build`` process takes, start-up included: the span kills are drawn from."""
    store = bench.fresh_dir("calibrate") / "store"
    started = time.perf_counter()
    proc = run_cli(bench.build_args(store))
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted build failed: {proc.stderr.strip()}")
    return time.perf_counter() - started


def file_size_limits(bench: DrillBench) -> list[int]:
    """Limits that make the build fail at different points, read off the reference build's file sizes."""
    store, record = bench.reference()
    dataset_record = store.resolve(record.parents[0], type="dataset")
    table_size = (store.path(dataset_record) / "frames.json").stat().st_size
    chunk_sizes = sorted((store.path(record) / rel).stat().st_size for rel in feature_chunk_files(record.manifest))
    largest_metadata = max((store.path(record) / rel).stat().st_size for rel in record.manifest
                           if rel.endswith("zarr.json"))
    floor = max(largest_metadata, 4096) + 1024
    limits = [
        max(floor, table_size // 2),  # fails while recording the dataset
        max(floor, table_size + 1024, chunk_sizes[0] // 2),  # fails at the first feature chunk
        chunk_sizes[-1] - 1,  # only the largest chunk fails, wherever in the build it comes
    ]
    return sorted({limit for limit in limits if limit < chunk_sizes[-1]})


def plan(args: argparse.Namespace, bench: DrillBench, dask_bench: DrillBench | None, build_seconds: float,
         rng: random.Random) -> list[Callable[[], DrillResult]]:
    """The drill runs of this report, in order."""
    clips = bench.clips
    points = [KillPoint(after_clips=1), KillPoint(after_clips=max(1, clips // 2)), KillPoint(after_clips=clips - 1),
              KillPoint(after_clips=clips), KillPoint(after_commit=True)]
    # Random points by progress (files staged so far), which any machine speed reaches, and by time,
    # which also lands in start-up and dataset hashing.
    total = bench.staged_file_count()
    points += [KillPoint(after_files=rng.randint(1, total), of_files=total) for _ in range(args.kills)]
    points += [KillPoint(after_seconds=round(rng.uniform(0.2, build_seconds), 2)) for _ in range(args.timed_kills)]
    runs: list[Callable[[], DrillResult]] = [partial(drill_sigkill, bench, point) for point in points]
    runs += [partial(drill_sigkill_in_discard, bench, where) for where in DISCARD_POINTS
             for _ in range(args.discard_kills)]
    runs += [partial(drill_concurrent_builds, bench, n) for n in [2] * args.races + [3]]
    for mode in ("delete", "flip"):
        runs += [partial(drill_damaged_chunk, bench, mode, pick=rng.randrange(1 << 30)) for _ in range(args.damage)]
    runs += [partial(drill_full_disk, bench, limit) for limit in file_size_limits(bench)]
    runs.append(partial(drill_unwritable_store, bench))
    if dask_bench is not None:
        runs += [partial(drill_dask_worker_lost, dask_bench) for _ in range(args.dask)]
    return runs


def run_guarded(run: Callable[[], DrillResult]) -> DrillResult:
    """A drill that crashes did not survive; the report goes on."""
    started = time.perf_counter()
    try:
        return run()
    except Exception as exc:  # the crash itself is the finding
        name = getattr(getattr(run, "func", run), "__name__", "drill").removeprefix("drill_")
        return DrillResult(name, "(crashed)", False, f"{type(exc).__name__}: {exc}", time.perf_counter() - started)


def print_table(results: list[DrillResult], header: str) -> None:
    print(header)
    print()
    print(f"{'#':>3}  {'drill':<17} {'tried':<58} {'survived':<8} {'s':>6}  details")
    for i, r in enumerate(results, 1):
        print(f"{i:>3}  {r.name:<17} {r.tried[:58]:<58} {'yes' if r.survived else 'NO':<8} {r.seconds:>6.1f}  {r.details}")
    print()
    print(f"{'drill':<17} {'tried':>5} {'survived':>8}")
    for name in dict.fromkeys(r.name for r in results):
        group = [r for r in results if r.name == name]
        print(f"{name:<17} {len(group):>5} {sum(r.survived for r in group):>8}")
    kills = [r for r in results if r.name == "sigkill"]
    moments: dict[str, int] = {}
    for r in kills:
        moment = str(r.evidence.get("moment", "?")).split(" (")[0]
        moments[moment] = moments.get(moment, 0) + 1
    survived = sum(r.survived for r in results)
    print(f"{'total':<17} {len(results):>5} {survived:>8}")
    print()
    print("SIGKILL outcomes: " + ", ".join(f"{n} {moment}" for moment, n in moments.items()))
    resumed = sum(bool(r.evidence.get("finished_clips_at_kill")) and not r.evidence.get("visible_after_kill")
                  and r.evidence.get("rerun_reported_resume", False) for r in kills)
    visible = [r for r in kills if r.evidence.get("killed") and r.evidence.get("visible_after_kill")]
    print(f"reruns that reported resuming from finished clips: {resumed}; kills that left a version visible: "
          f"{len(visible)} (all after the commit, verified: {all(r.survived for r in visible)}); "
          f"kills that left anything else visible under artifacts/: "
          f"{sum(bool(r.evidence.get('visible_problems_after_kill')) for r in kills)}")
    discards = [r for r in results if r.name == "sigkill-discard"]
    if discards:
        aside = [r for r in discards if r.evidence.get("trash_after_kill")]
        print(f"kills inside a staging folder's deletion: {len(discards)}; left part-deleted under its live name: "
              f"{sum(bool(r.evidence.get('part_deleted_live')) for r in discards)}; left renamed aside: "
              f"{len(aside)}, removed by gc: {sum(r.evidence.get('trash_after_gc') == [] for r in aside)}")
    dask = [r for r in results if r.name == "dask-worker-lost"]
    if dask:
        attempts = ", ".join(f"{r.evidence.get('total_attempts')} for {len(r.evidence.get('attempts', {}))} tasks"
                             for r in dask)
        print(f"dask task attempts seen by the scheduler: {attempts}")
    print(f"{survived} of {len(results)} drills survived")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the test-sized dataset and fewer repetitions")
    parser.add_argument("--kills", type=int, default=None,
                        help="SIGKILLs after a random number of staged files (default 12, quick 4)")
    parser.add_argument("--timed-kills", type=int, default=3, help="SIGKILLs at a random time after start")
    parser.add_argument("--discard-kills", type=int, default=None,
                        help="SIGKILLs inside a staging folder's deletion, per point (after the commit, --force; "
                             "default 2, quick 1)")
    parser.add_argument("--races", type=int, default=2, help="runs of two builds started together")
    parser.add_argument("--damage", type=int, default=3, help="damaged-chunk runs per mode (delete, flip)")
    parser.add_argument("--dask", type=int, default=None, help="dask worker-loss runs (default 2, quick 1; 0 skips)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill moments and chunks")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for datasets and stores (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, default=None, help="also write every result with its evidence here")
    args = parser.parse_args(argv)
    args.kills = args.kills if args.kills is not None else (4 if args.quick else 12)
    args.discard_kills = args.discard_kills if args.discard_kills is not None else (1 if args.quick else 2)
    args.dask = args.dask if args.dask is not None else (1 if args.quick else 2)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="featstore-drills-"))
    rng = random.Random(args.seed)
    started = time.perf_counter()
    results: list[DrillResult] = []
    try:
        bench = DrillBench(workdir, FAST if args.quick else FULL)
        bench.reference()
        build_seconds = calibrate(bench)
        print(f"uninterrupted `featstore build` of {bench.scale.label}: {build_seconds:.1f}s", file=sys.stderr)
        dask_bench = (bench if args.quick else DrillBench(workdir, DASK_FULL)) if args.dask else None
        runs = plan(args, bench, dask_bench, build_seconds, rng)
        for i, run in enumerate(runs, 1):
            result = run_guarded(run)
            results.append(result)
            verdict = "survived" if result.survived else "DID NOT SURVIVE"
            print(f"[{i}/{len(runs)}] {result.name}: {result.tried}: {verdict} ({result.seconds:.1f}s)", file=sys.stderr)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    header = (f"featstore fault drills: dataset {bench.scale.label} (clips x frames - H x W), backbone tiny, "
              f"uninterrupted CLI build {build_seconds:.1f}s, seed {args.seed}, "
              f"{time.perf_counter() - started:.0f}s in all")
    print_table(results, header)
    if args.json is not None:
        args.json.write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=2, default=str))
    return 0 if all(r.survived for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
