"""Featurize throughput: `featstore build` against the naive precompute loop and the bare forward pass.

Runs, on the same frames in one process:
  (a) naive: a map-style Dataset decoding each JPEG with PIL + ToTensor/Normalize, a DataLoader of
      batch 32 with no workers, an fp32 forward per batch appended to a list, torch.cat, one np.save;
  (b) floor: the bare backbone forward (as featstore runs it) on frames decoded beforehand;
  (c) featstore build into a fresh store: decode, forward, compress, write, hash and commit.
and prints frames/s of each with the ratios.

    python benchmarks/bench_build.py --backbone alexnet --device cpu --frames 200
    python benchmarks/bench_build.py --backbone alexnet --device cuda --repeat 8
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from featstore.backbones import create_backbone
from featstore.datasets import load_dataset
from featstore.store import Store
from jobs.featurize import StageClock, build_features, resolve_device

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016-dev"


class NaiveFrames(torch.utils.data.Dataset):
    """The precompute notebooks' dataset: PIL decode, ToTensor, Normalize, one frame per item."""

    def __init__(self, paths: list[Path], mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.paths = paths
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(Image.open(self.paths[index]).convert("RGB"))


def tiled_dataset(source: Path, repeat: int, limit: int | None, workdir: Path) -> Path:
    """A DAVIS-layout folder whose clips link to the source clips ``repeat`` times (more frames, same pixels)."""
    dataset = load_dataset(source)
    clips = dataset.clips()
    root = workdir / f"tiled-x{repeat}"
    budget = limit
    for copy in range(repeat):
        for clip, records in clips.items():
            for record in records:
                if budget is not None and budget <= 0:
                    return root
                name = f"{clip}-r{copy}" if repeat > 1 else clip
                for kind, path in (("JPEGImages", record.raw), ("Annotations", record.annotation)):
                    if path is None:
                        continue
                    target = root / kind / "480p" / name / path.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.symlink_to(path)
                if budget is not None:
                    budget -= 1
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_naive(paths: list[Path], backbone: str, device: torch.device, out: Path) -> float:
    extractor = create_backbone(backbone, weights="random", dtype=torch.float32).to(device).eval()
    spec = extractor.spec
    loader = DataLoader(NaiveFrames(paths, spec.mean, spec.std), batch_size=32, num_workers=0)
    started = time.perf_counter()
    outputs = []
    with torch.no_grad():
        for batch in loader:
            features = extractor(batch.to(device))
            outputs.append(next(iter(features.values())).cpu())
    np.save(out, torch.cat(outputs).numpy())
    return len(paths) / (time.perf_counter() - started)


def run_floor(paths: list[Path], backbone: str, device: torch.device, batch_size: int) -> float:
    extractor = create_backbone(backbone, weights="random", dtype=torch.float16).to(device).eval()
    frames = [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in paths]
    batches = [torch.stack(frames[i : i + batch_size]).to(device) for i in range(0, len(frames), batch_size)]
    extractor.extract(batches[0])
    sync(device)
    started = time.perf_counter()
    for batch in batches:
        for values in extractor.extract(batch).values():
            values.cpu()
    sync(device)
    return len(paths) / (time.perf_counter() - started)


def run_build(
    data: Path, backbone: str, device: str, batch_size: int, store_root: Path
) -> tuple[float, float, dict[str, float]]:
    """Returns wall-clock frames/s of the whole command, the job's own featurize frames/s, and the seconds
    its loop spent per stage (waiting for frames, forward, waiting for the device, waiting for writers)."""
    started = time.perf_counter()
    result = build_features(Store(store_root), backbone, data, weights="random", batch_size=batch_size,
                            device=device, progress=False)
    wall = time.perf_counter() - started
    assert not result.cached
    return result.frames / wall, result.fps, dict(result.record.metadata["stage_seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="alexnet")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--frames", type=int, default=None, help="use only the first N frames")
    parser.add_argument("--repeat", type=int, default=1, help="tile the clips N times (steady-state GPU figures)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"dataset {args.data} not found: pass --data PATH (the DAVIS dev clips live in ../shared/data)")
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="featstore-bench-") as tmp:
        work = Path(tmp)
        data = tiled_dataset(args.data, args.repeat, args.frames, work)
        paths = [r.raw for r in load_dataset(data).frames]
        print(f"{len(paths)} frames, backbone {args.backbone}, device {device}, torch threads {torch.get_num_threads()}",
              file=sys.stderr)
        figures: dict[str, float] = {}
        # warm-up build on a few frames so one-off costs (cuDNN autotune, allocator) hit no one run
        build_features(Store(work / "warm"), args.backbone, tiled_dataset(args.data, 1, 8, work / "w"),
                       weights="random", batch_size=args.batch_size, device=args.device, progress=False)
        figures["build_fps"], figures["build_job_fps"], stages = run_build(
            data, args.backbone, args.device, args.batch_size, work / "store"
        )
        figures["floor_fps"] = run_floor(paths, args.backbone, device, args.batch_size)
        if not args.skip_naive:
            figures["naive_fps"] = run_naive(paths, args.backbone, device, work / "naive.npy")
    print(f"(a) naive notebook loop      {figures.get('naive_fps', float('nan')):9.1f} frames/s")
    print(f"(b) bare forward (floor)     {figures['floor_fps']:9.1f} frames/s")
    print(f"(c) featstore build, wall    {figures['build_fps']:9.1f} frames/s  (job's own figure {figures['build_job_fps']:.1f})")
    if "naive_fps" in figures:
        print(f"build / naive                {figures['build_fps'] / figures['naive_fps']:9.2f}x")
    print(f"floor / build                {figures['floor_fps'] / figures['build_fps']:9.2f}x  (1.0 = as fast as the bare forward)")
    job_seconds = len(paths) / figures["build_job_fps"]
    print(f"build loop's time            {StageClock(seconds=stages).describe(job_seconds)}"
          "  (frames: waiting for decode; device: for the GPU; writers: for compression and writes)")
    if args.json:
        args.json.write_text(json.dumps(
            {"frames": len(paths), "device": str(device), **figures, "stage_seconds": stages}, indent=2
        ))


if __name__ == "__main__":
    main()
