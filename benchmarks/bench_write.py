"""Host-side write path of `featstore build`: compress and write clip arrays, then hash and fsync them.

On a GPU the forward pass is cheap (AlexNet: ~9,000 frames/s on an H100) and the build's ceiling is the
host work per frame: Blosc-compressing the features and masks into zarr chunks and hashing every file
at commit. This measures that work alone, per writer thread, on features the real backbone computes for
real DAVIS frames (tiled to more clips), so the frames/s a machine with N cores can sustain is
known before a GPU is at hand.

    python benchmarks/bench_write.py --backbone alexnet --frames 64 --tile 15 --threads 1,2
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from featstore.backbones import create_backbone
from featstore.datasets import load_dataset, read_mask
from featstore.features import ClipArrays, open_group, to_storage
from featstore.frame_stream import FrameStream
from featstore.store import hash_files

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016-dev"
CLIP_FRAMES = 64  # frames per written clip: a DAVIS clip is 50-100


def compute_features(
    data: Path, backbone: str, frames: int, batch_size: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The backbone's stored-form features (random weights, seeded) and the masks of the first frames."""
    dataset = load_dataset(data)
    records = dataset.frames[:frames]
    if any(r.annotation is None for r in records):
        sys.exit(f"bench_write: {data} has frames without annotations; pick an annotated dataset")
    extractor = create_backbone(backbone, weights="random", seed=0)
    parts: dict[str, list[np.ndarray]] = {}
    for batch in FrameStream(records, batch_size, torch.device("cpu"), with_masks=False):
        for layer, values in extractor.extract(batch.pixels).items():
            parts.setdefault(layer, []).append(to_storage(values.cpu()))
    masks = np.stack([read_mask(r.annotation) for r in records if r.annotation is not None])
    return {layer: np.concatenate(chunks) for layer, chunks in parts.items()}, masks


def write_clips(
    root: Path, features: dict[str, np.ndarray], masks: np.ndarray, clips: int, threads: int
) -> float:
    """Seconds to write ``clips`` clips of ``CLIP_FRAMES`` frames with ``threads`` writers, as the job does."""
    group = open_group(root / "features.zarr")
    shapes = {layer: (int(v.shape[1]), int(v.shape[2]), int(v.shape[3])) for layer, v in features.items()}
    frame_size = (int(masks.shape[1]), int(masks.shape[2]))
    n = next(iter(features.values())).shape[0]

    def one_clip(index: int) -> None:
        rows = [(index * CLIP_FRAMES + i) % n for i in range(CLIP_FRAMES)]
        arrays = ClipArrays(group, f"clip{index:04d}", CLIP_FRAMES, shapes, "float16", frame_size, {})
        step = arrays.chunk_len()
        for start in range(0, CLIP_FRAMES, step):
            span = rows[start : start + step]
            arrays.write(start, {layer: v[span] for layer, v in features.items()}, masks[span])

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one_clip, range(clips)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="alexnet")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--frames", type=int, default=64, help="real frames to featurize (then tiled)")
    parser.add_argument("--tile", type=int, default=15, help="clips of 64 frames written per run")
    parser.add_argument("--threads", default="1,2", help="writer thread counts to measure")
    parser.add_argument("--target", type=float, default=1500.0, help="frames/s the estimate is for")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(f"dataset {args.data} not found: pass --data PATH (the DAVIS dev clips live in ../shared/data)")
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        sys.exit(f"--threads {args.threads!r}: give comma-separated whole numbers, e.g. 1,2,4")
    if min(thread_counts) < 1 or args.frames < 1 or args.tile < 1:
        sys.exit(
            f"--threads {args.threads}, --frames {args.frames} and --tile {args.tile} must all be at least 1"
        )
    features, masks = compute_features(args.data, args.backbone, args.frames, batch_size=16)
    frames = args.tile * CLIP_FRAMES
    raw = sum(v[0].nbytes for v in features.values()) + masks[0].nbytes
    print(
        f"# {args.backbone} (random weights) on {masks.shape[0]} real frames tiled to {args.tile} clips x "
        f"{CLIP_FRAMES} = {frames} frames; per frame {raw / 1e3:.0f} kB raw "
        f"({', '.join(f'{k} {tuple(v.shape[1:])} float16' for k, v in features.items())}; mask {masks.shape[1:]} uint8)"
    )
    print(f"{'writers':>7} {'write fps':>10} {'hash+fsync fps':>15} {'both fps':>9} {'per thread':>11} {'ratio':>6}")
    per_thread = 0.0
    for threads in thread_counts:
        work = Path(tempfile.mkdtemp(prefix="featstore-bench-write-"))
        try:
            write_seconds = write_clips(work, features, masks, args.tile, threads)
            relpaths = [str(p.relative_to(work)) for p in work.rglob("*") if p.is_file()]
            stored = sum((work / rel).stat().st_size for rel in relpaths)
            started = time.perf_counter()
            hash_files(work, relpaths, fsync=True)
            hash_seconds = time.perf_counter() - started
        finally:
            shutil.rmtree(work, ignore_errors=True)
        both = frames / (write_seconds + hash_seconds)
        per_thread = both / threads
        print(
            f"{threads:>7} {frames / write_seconds:>10.0f} {frames / hash_seconds:>15.0f} {both:>9.0f} "
            f"{per_thread:>11.0f} {raw * frames / stored:>6.1f}"
        )
    print(
        f"at {per_thread:.0f} frames/s per thread, {args.target:.0f} frames/s of host writing needs about "
        f"{math.ceil(args.target / per_thread)} cores busy beside decode and the GPU feed"
    )


if __name__ == "__main__":
    main()
