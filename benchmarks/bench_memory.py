"""Peak memory of `featstore build` as the dataset grows, against the naive loop that holds every feature.

The SPEC promises that a build streams: host (and device) memory stay bounded by a few batches in flight,
whatever the dataset's size. This runs, for each dataset size, in a fresh process each (peak RSS is a
per-process high-water mark):
  (a) naive: the precompute notebooks' loop of ``bench_build.py``: a DataLoader of batch 32, an fp32
      forward per batch appended to a list, ``torch.cat``, one ``np.save``;
  (b) ``featstore build`` into a fresh store;
and prints each one's peak resident memory above its baseline (the process after importing torch and
loading the backbone), the peaks of the run's first and second halves, the growth per 100 frames, and on
CUDA the peak device memory. A streaming build plateaus (its second half peaks where its first did)
however many frames it writes; the naive loop climbs by a frame's features per frame.

    python benchmarks/bench_memory.py --frames 64,256
    python benchmarks/bench_memory.py --device cuda --frames 512,2048 --repeat 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from bench_build import DEFAULT_DATA, NaiveFrames, tiled_dataset
from torch.utils.data import DataLoader

from featstore.backbones import create_backbone
from featstore.datasets import load_dataset
from featstore.store import Store
from jobs.featurize import build_features, resolve_device


def peak_rss_mb() -> float:
    """This process's resident-memory high-water mark (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Resident memory every 0.2 s on a thread, to tell a plateau (bounded) from a climb (accumulating).

    The peak alone grows a little with run length even for a bounded process (a longer run meets a larger
    transient); comparing the peaks of the run's first and second halves does not.
    """

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20
        with open("/proc/self/statm") as statm:
            while not self._stop.is_set():
                statm.seek(0)
                self.samples.append((time.perf_counter(), int(statm.read().split()[1]) * page_mb))
                self._stop.wait(0.2)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def half_peaks(self) -> tuple[float, float]:
        start, end = self.samples[0][0], self.samples[-1][0]
        middle = (start + end) / 2
        first = max((rss for t, rss in self.samples if t <= middle), default=0.0)
        second = max((rss for t, rss in self.samples if t > middle), default=first)
        return first, second


def child(run: str, data: Path, backbone: str, device_name: str, batch_size: int, scratch: Path) -> dict[str, float]:
    """One measurement in this (fresh) process: the baseline after loading the backbone, then the peak."""
    device = resolve_device(device_name)
    if run == "naive":
        extractor = create_backbone(backbone, weights="random", dtype=torch.float32).to(device).eval()
    else:  # built here only to load the same libraries and weights before the baseline is read
        create_backbone(backbone, weights="random").to(device)
    baseline = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frames = 0
    sampler = RssSampler().__enter__()
    if run == "naive":
        spec = extractor.spec
        paths = [r.raw for r in load_dataset(data).frames]
        outputs = []
        with torch.no_grad():
            for batch in DataLoader(NaiveFrames(paths, spec.mean, spec.std), batch_size=32, num_workers=0):
                features = extractor(batch.to(device))
                outputs.append(next(iter(features.values())).cpu())
        np.save(scratch / "features.npy", torch.cat(outputs).numpy())
        frames = len(paths)
    else:
        result = build_features(Store(scratch / "store"), backbone, data, weights="random", batch_size=batch_size,
                                device=device_name, progress=False)
        frames = result.frames
    sampler.__exit__()
    first_half, second_half = sampler.half_peaks()
    figures = {"frames": frames, "baseline_mb": baseline, "peak_mb": peak_rss_mb(),
               "first_half_peak_mb": first_half, "second_half_peak_mb": second_half}
    if device.type == "cuda":
        figures["device_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return figures


def measure(run: str, data: Path, args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    scratch.mkdir(parents=True)
    command = [sys.executable, __file__, "--child", run, "--data", str(data), "--backbone", args.backbone,
               "--device", args.device, "--batch-size", str(args.batch_size), "--scratch", str(scratch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{run} on {data} failed:\n{done.stderr[-2000:]}")
    figures: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Lite0's stored layers hold ~1.1 MB a frame in float16 (blocks.2 alone 1 MB in float32, what the naive
    # loop keeps), so growth shows within a few hundred frames; AlexNet's 180 KB hides under activations.
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--frames", default="64,256", help="comma-separated dataset sizes, in frames")
    parser.add_argument("--repeat", type=int, default=1, help="tile the clips N times, for sizes beyond the data")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    parser.add_argument("--child", choices=["naive", "build"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--scratch", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.backbone, args.device, args.batch_size, args.scratch)))
        return
    if not args.data.exists():
        sys.exit(f"dataset {args.data} not found: pass --data PATH (the DAVIS dev clips live in ../shared/data)")
    try:
        sizes = sorted({int(n) for n in args.frames.split(",")})
    except ValueError:
        sys.exit(f"--frames {args.frames!r}: give comma-separated whole numbers, e.g. 64,256")
    if min(sizes) < 1 or args.repeat < 1 or args.batch_size < 1:
        sys.exit(f"--frames {args.frames}, --repeat {args.repeat} and --batch-size {args.batch_size} must all be "
                 "at least 1")
    rows: list[dict[str, float | str]] = []
    with tempfile.TemporaryDirectory(prefix="featstore-bench-memory-") as tmp:
        work = Path(tmp)
        for size in sizes:
            data = tiled_dataset(args.data, args.repeat, size, work / f"data-{size}")
            available = len(load_dataset(data).frames)
            if available < size:
                sys.exit(f"only {available} frames at --repeat {args.repeat}: raise --repeat to reach {size}")
            for run in ("naive", "build"):
                print(f"{run}: {size} frames ...", file=sys.stderr)
                rows.append({"run": run, **measure(run, data, args, work / f"{run}-{size}")})
    print(f"# backbone {args.backbone}, device {args.device}, build batch {args.batch_size}, one process per row")
    print(f"{'run':<8} {'frames':>7} {'baseline MB':>12} {'peak MB':>9} {'growth MB':>10} {'1st half':>9} {'2nd half':>9}"
          + ("  device peak MB" if args.device.startswith("cuda") else ""))
    for row in rows:
        growth = float(row["peak_mb"]) - float(row["baseline_mb"])
        row["growth_mb"] = growth
        line = (f"{row['run']:<8} {row['frames']:>7} {row['baseline_mb']:>12.0f} {row['peak_mb']:>9.0f} {growth:>10.0f}"
                f" {row['first_half_peak_mb']:>9.0f} {row['second_half_peak_mb']:>9.0f}")
        if "device_peak_mb" in row:
            line += f"  {row['device_peak_mb']:>15.0f}"
        print(line)
    if len(sizes) > 1:
        slopes = {}
        for run in ("naive", "build"):
            small, large = (next(r for r in rows if r["run"] == run and r["frames"] == n) for n in (sizes[0], sizes[-1]))
            slopes[run] = (float(large["growth_mb"]) - float(small["growth_mb"])) / (sizes[-1] - sizes[0]) * 100
            print(f"{run:<8} grows {slopes[run]:6.1f} MB per 100 frames between {sizes[0]} and {sizes[-1]} frames")
        largest = {run: next(float(r["growth_mb"]) for r in rows if r["run"] == run and r["frames"] == sizes[-1])
                   for run in ("naive", "build")}
        print(f"at {sizes[-1]} frames the naive loop needs {largest['naive'] / max(largest['build'], 1.0):.1f}x "
              "the build's extra memory")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
