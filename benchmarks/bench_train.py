"""Decoder training throughput: `train_heads` on device-resident features against the notebooks' loop.

Runs, on the same stored features and the same head type, loss, batch size, seed and epochs, in one process:
  (a) naive: the precompute notebooks' loop. The stored features are saved as one array with ``np.save``;
      a map-style Dataset memory-maps it and reads each annotation PNG with PIL, its ``__getitem__``
      behind ``functools.lru_cache``; a ``DataLoader`` (batch 32, shuffled, no workers) feeds an AdamW
      step per batch, each batch moved host -> device. The head's layers are featstore's; the resize to
      full resolution and the loss are written as a notebook writes them: ``F.interpolate`` and
      ``reference_segmentation_loss`` (BCE-with-logits and soft Dice op by op).
  (b) featstore: ``DeviceFeatures.from_artifact`` once (timed on its own), then ``train_heads`` with one head.
  (c) K heads: ``train_heads`` with K configs (learning rates) in one pass, against K single-head runs.
Both loops compute the same function per frame (tests hold the fused loss and the matmul resize to the
op-by-op forms; both use the autocast ``train_heads`` uses), so the ratio of (b) to (a) measures
featstore's data path, fused loss, matmul resize and host allocator setting together; the naive loop's
time spent waiting for batches is printed to separate the data path. ``train_heads`` also runs one
forward pass to recompute BatchNorm statistics after training; its whole-call figure counts that pass,
and the loop-only figure subtracts it (timed again on its own).

    python benchmarks/bench_train.py --backbone tiny --weights random --epochs 1
    python benchmarks/bench_train.py --clips car-shadow,motocross-jump,kite-surf --epochs 1
    python benchmarks/bench_train.py --device cuda --epochs 2 --json train.json
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from decoders import (
    DEFAULT_DECODER,
    DeviceFeatures,
    HeadConfig,
    get_decoder_class,
    train_heads,
)
from decoders.losses import reference_segmentation_loss
from decoders.training import (
    autocast_for,
    build_head,
    lr_factor,
    recalibrate_batchnorm,
    stacks_by_default,
)
from featstore.datasets import load_dataset, read_mask
from featstore.errors import FeatstoreError
from featstore.features import FeatureArtifact, open_features
from featstore.store import Store
from jobs.featurize import build_features, resolve_device

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "davis2016-dev"
BATCH_SIZE = 32  # the notebooks' DataLoader batch, used by both loops
LEARNING_RATES = (1e-3, 1e-4, 2e-4, 5e-4, 2e-3, 5e-3, 1e-2, 2e-2)  # the first is the single-head run's


def subset_dataset(source: Path, clips: list[str] | None, limit: int | None, workdir: Path) -> Path:
    """A DAVIS-layout folder of symlinks to the chosen clips' first ``limit`` frames.

    Its name depends only on the selection, so a store given with ``--store`` finds the features again.
    """
    dataset = load_dataset(source)
    chosen = dataset.subset(clips) if clips else dataset
    selection = json.dumps([sorted(clips) if clips else None, limit]).encode()
    root = workdir / f"{dataset.name}-subset-{hashlib.sha256(selection).hexdigest()[:8]}"
    records = chosen.frames[:limit] if limit is not None else chosen.frames
    for record in records:
        for kind, path in (("JPEGImages", record.raw), ("Annotations", record.annotation)):
            if path is None:
                continue
            target = root / kind / "480p" / record.clip / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SavedFeatureFrames(torch.utils.data.Dataset):
    """The notebooks' dataset: rows of one saved array (memory-mapped) plus each frame's mask PNG.

    The array holds every layer of a frame flattened into one row; ``layout`` splits a row back into
    ``(C, h, w)`` maps per layer, so multi-layer heads read exactly what ``DeviceFeatures`` holds.
    """

    def __init__(self, array: Path, layout: dict[str, tuple[int, int, int]], annotations: list[Path]) -> None:
        self.features = np.load(array, mmap_mode="r")
        self.layout = layout
        self.annotations = annotations

    def __len__(self) -> int:
        return len(self.annotations)

    # The notebooks' unbounded lru_cache per item: epochs after the first are served from memory.
    @functools.cache  # noqa: B019 - the dataset lives exactly as long as its run
    def __getitem__(self, index: int) -> tuple[dict[str, Tensor], Tensor]:
        row = self.features[index]
        out, offset = {}, 0
        for layer, shape in self.layout.items():
            size = math.prod(shape)
            out[layer] = torch.from_numpy(np.array(row[offset : offset + size]).reshape(shape))
            offset += size
        return out, torch.from_numpy(read_mask(self.annotations[index]))


def save_naive_array(
    artifact: FeatureArtifact, annotation_of_row: dict[int, Path], path: Path
) -> tuple[dict[str, tuple[int, int, int]], list[Path]]:
    """Every clip's features as one ``(frames, sum C*h*w)`` array via ``np.save``; returns layout and masks.

    The array keeps the stored dtype (float16 unless built otherwise; bfloat16 becomes float32, which
    numpy can hold), so both loops move the same feature bytes per frame.
    """
    rows, layout = [], {}
    for clip in artifact.clips:
        per_layer = []
        for layer in artifact.layers:
            values = artifact.read(clip, layer)
            if values.dtype == torch.bfloat16:
                values = values.float()
            c, h, w = (int(s) for s in values.shape[1:])
            layout[layer] = (c, h, w)
            per_layer.append(values.numpy().reshape(values.shape[0], -1))
        rows.append(np.concatenate(per_layer, axis=1))
    np.save(path, np.concatenate(rows))
    return layout, [annotation_of_row[row] for clip in artifact.clips for row in artifact.rows(clip)]


def run_naive(
    dataset: SavedFeatureFrames,
    config: HeadConfig,
    data: DeviceFeatures,
    *,
    epochs: int,
    seed: int,
) -> tuple[float, int, float]:
    """The notebooks' training loop; returns (seconds, frames processed, seconds spent loading batches)."""
    device = data.device
    head = build_head(config, data.channels, data.strides, seed).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loader = DataLoader(
        dataset,
        batch_size=BATCH_SIZE,
        shuffle=True,
        num_workers=0,
        generator=torch.Generator().manual_seed(seed),
    )
    total_steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, config.schedule, total=total_steps)
    )
    head.train()
    frames, waiting = 0, 0.0
    sync(device)
    started = time.perf_counter()
    for _epoch in range(epochs):
        batches = iter(loader)
        while True:
            fetch = time.perf_counter()
            try:
                features, masks = next(batches)
            except StopIteration:
                break
            features = {layer: values.to(device) for layer, values in features.items()}
            masks = masks.to(device)
            sync(device)
            waiting += time.perf_counter() - fetch
            with autocast_for(device):
                coarse = head.coarse_logits(features)
            logits = F.interpolate(coarse.float(), size=data.frame_size, mode="bilinear", align_corners=False)
            loss = reference_segmentation_loss(logits, masks)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sync(device)
            frames += int(masks.shape[0])
    return time.perf_counter() - started, frames, waiting


def run_featstore(
    data: DeviceFeatures,
    configs: list[HeadConfig],
    *,
    epochs: int,
    seed: int,
    stack: bool | None = None,
    time_bn_pass: bool = False,
) -> dict[str, Any]:
    """One ``train_heads`` call, timed whole; with ``time_bn_pass``, its closing BatchNorm pass again."""
    sync(data.device)
    started = time.perf_counter()
    heads = train_heads(
        data, None, configs, epochs=epochs, batch_size=BATCH_SIZE, seed=seed, progress=False, stack=stack
    )
    sync(data.device)
    wall = time.perf_counter() - started
    started = time.perf_counter()
    if time_bn_pass:
        for trained in heads:
            recalibrate_batchnorm(trained.decoder, data, batch_size=BATCH_SIZE)
        sync(data.device)
    return {
        "seconds": wall,
        "bn_pass_seconds": time.perf_counter() - started if time_bn_pass else float("nan"),
        "frames": heads[0].train_frames,
        "step_seconds": sum(h.train_seconds for h in heads),
        "nparams_head": heads[0].nparams,
        "final_losses": [h.final_loss for h in heads],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet", help="imagenet, random or a weights file")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--clips", default=None, help="comma-separated clips to use (default: all)")
    parser.add_argument(
        "--frames", type=int, default=None, help="use only the first N frames (after --clips)"
    )
    parser.add_argument(
        "--store", type=Path, default=None, help="store root to build in or reuse (default: temporary)"
    )
    parser.add_argument("--decoder", default=DEFAULT_DECODER)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--heads", type=int, default=len(LEARNING_RATES), help="K for the K-heads run (0 skips it)"
    )
    parser.add_argument(
        "--stack",
        choices=("auto", "on", "off"),
        default="auto",
        help="K heads as one vmapped group (on), one after another (off), or train_heads' choice for the "
        "device (auto: stacked on CUDA)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="time (a) and (b) N times each, keep the best")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    if not args.data.exists():
        sys.exit(
            f"dataset {args.data} not found: pass --data PATH (the DAVIS dev clips live in ../shared/data)"
        )
    if get_decoder_class(args.decoder).temporal_window:
        sys.exit(
            f"--decoder {args.decoder} reads neighbouring frames, which the notebooks' per-frame "
            "Dataset cannot serve: pick a single-frame head such as linear, conv or fpn"
        )
    if not 0 <= args.heads <= len(LEARNING_RATES):
        sys.exit(f"--heads {args.heads} must be between 0 and {len(LEARNING_RATES)}")
    if args.repeat < 1:
        sys.exit(f"--repeat {args.repeat} must be at least 1")
    if args.epochs < 1:
        sys.exit(f"--epochs {args.epochs} must be at least 1")
    return args


def benchmark(args: argparse.Namespace, store: Store, work: Path) -> dict[str, Any]:
    device = resolve_device(args.device)
    clips = args.clips.split(",") if args.clips else None
    data = subset_dataset(args.data, clips, args.frames, work) if clips or args.frames else args.data
    built = build_features(store, args.backbone, data, weights=args.weights, device=args.device)
    annotation_of_row = {r.row: r.annotation for r in load_dataset(data).frames if r.annotation is not None}
    artifact = open_features(store, built.ref)
    print(
        f"features {built.ref} ({'reused' if built.cached else 'built'}): {built.frames} frames, "
        f"{built.shapes}, {built.bytes / 1e6:.1f} MB on disk",
        file=sys.stderr,
    )

    sync(device)
    started = time.perf_counter()
    resident = DeviceFeatures.from_artifact(artifact, None, device)
    sync(device)
    load_seconds = time.perf_counter() - started

    started = time.perf_counter()
    layout, annotations = save_naive_array(artifact, annotation_of_row, work / "features.npy")
    save_seconds = time.perf_counter() - started

    configs = [HeadConfig(decoder=args.decoder, lr=lr) for lr in LEARNING_RATES]
    # One-off costs (allocator growth, cuDNN autotuning, thread pools) land on a short run over one clip.
    train_heads(
        resident.subset(resident.clips[:1]),
        None,
        configs[:1],
        epochs=1,
        batch_size=BATCH_SIZE,
        seed=args.seed,
        progress=False,
    )

    naive_runs, single_runs = [], []
    for attempt in range(args.repeat):  # alternate the two, keep each one's best: the CPU may be shared
        print(
            f"[{attempt + 1}/{args.repeat}] naive loop, {len(resident)} frames x {args.epochs} epoch(s) ...",
            file=sys.stderr,
        )
        naive_runs.append(
            run_naive(
                SavedFeatureFrames(work / "features.npy", layout, annotations),
                configs[0],
                resident,
                epochs=args.epochs,
                seed=args.seed,
            )
        )
        print(f"[{attempt + 1}/{args.repeat}] featstore train_heads, one head ...", file=sys.stderr)
        single_runs.append(
            run_featstore(resident, configs[:1], epochs=args.epochs, seed=args.seed, time_bn_pass=True)
        )
    naive_seconds, naive_frames, naive_data_seconds = min(naive_runs)
    single = min(single_runs, key=lambda run: run["seconds"])
    figures: dict[str, Any] = {
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "backbone": args.backbone,
        "weights": args.weights,
        "features": built.ref,
        "feature_shape": built.shapes,
        "frames": len(resident),
        "clips": len(resident.clips),
        "epochs": args.epochs,
        "repeat": args.repeat,
        "batch_size": BATCH_SIZE,
        "decoder": args.decoder,
        "nparams_head": single["nparams_head"],
        "device_load_seconds": load_seconds,
        "device_bytes": resident.nbytes,
        "naive_save_seconds": save_seconds,
        "naive_seconds": naive_seconds,
        "naive_fps": naive_frames / naive_seconds,
        "naive_data_seconds": naive_data_seconds,
        "naive_ratio_bound": naive_seconds / max(1e-9, naive_seconds - naive_data_seconds),
        "featstore_seconds": single["seconds"],
        "featstore_fps": single["frames"] / single["seconds"],
        "featstore_loop_fps": single["frames"] / max(1e-9, single["seconds"] - single["bn_pass_seconds"]),
        "featstore_step_fps": single["frames"] / single["step_seconds"],
        "bn_pass_seconds": single["bn_pass_seconds"],
    }
    figures["ratio"] = figures["featstore_fps"] / figures["naive_fps"]
    figures["loop_ratio"] = figures["featstore_loop_fps"] / figures["naive_fps"]
    if args.heads:
        separate = [single["seconds"]]
        for config in configs[1 : args.heads]:
            print(f"featstore train_heads, single head lr={config.lr:g} ...", file=sys.stderr)
            separate.append(run_featstore(resident, [config], epochs=args.epochs, seed=args.seed)["seconds"])
        print(f"featstore train_heads, {args.heads} heads in one pass ...", file=sys.stderr)
        stack = {"auto": None, "on": True, "off": False}[args.stack]
        grid = run_featstore(resident, configs[: args.heads], epochs=args.epochs, seed=args.seed, stack=stack)
        figures.update(
            {
                "k_heads": args.heads,
                "k_stacked": stacks_by_default(device) if stack is None else stack,
                "k_one_pass_seconds": grid["seconds"],
                "k_separate_seconds": sum(separate),
                "k_one_pass_over_one_head": grid["seconds"] / single["seconds"],
                "k_separate_over_one_pass": sum(separate) / grid["seconds"],
            }
        )
    return figures


def print_table(f: dict[str, Any]) -> None:
    target = 100 if f["device"].startswith("cuda") else 20
    print(
        f"# {f['frames']} frames ({f['clips']} clips) x {f['epochs']} epoch(s), batch {f['batch_size']}, "
        f"device {f['device']}, torch threads {f['torch_threads']}, best of {f['repeat']} for (a) and (b)"
    )
    print(f"# features {f['features']} {f['feature_shape']}")
    print(
        f"# head {f['decoder']}, nparams_head {f['nparams_head']:,}, "
        "loss: BCE + soft Dice at full resolution"
    )
    print(f"{'run':58s} {'frames/s':>10s} {'vs naive':>9s}")
    print(
        f"{'(a) naive: np.save array, mmap Dataset, DataLoader(32)':58s} {f['naive_fps']:10.1f} {1.0:8.2f}x"
    )
    print(
        f"{'(b) featstore train_heads, whole call':58s} {f['featstore_fps']:10.1f} {f['ratio']:8.2f}x"
        f"  (target >= {target}x on {f['device'].split(':')[0]})"
    )
    print(
        f"{'    same, without its BatchNorm pass':58s} {f['featstore_loop_fps']:10.1f} "
        f"{f['loop_ratio']:8.2f}x"
    )
    print(f"{'    train_heads own figure (head steps only)':58s} {f['featstore_step_fps']:10.1f}")
    print(
        f"one-time load onto {f['device']}: {f['device_load_seconds']:.2f} s "
        f"for {f['device_bytes'] / 1e6:.1f} MB "
        f"(not in (b)); naive np.save: {f['naive_save_seconds']:.2f} s (not in (a)); "
        f"BatchNorm pass: {f['bn_pass_seconds']:.2f} s"
    )
    print(
        f"naive loop spent {f['naive_data_seconds']:.2f} s of {f['naive_seconds']:.2f} s loading batches "
        f"(DataLoader + host->device): a free data path alone would make it at most "
        f"{f['naive_ratio_bound']:.2f}x faster"
    )
    if "k_heads" in f:
        k = f["k_heads"]
        how = "stacked, one vmapped group" if f["k_stacked"] else "one after another"
        print(
            f"{k} heads (lr grid) in one pass ({how})    {f['k_one_pass_seconds']:8.2f} s  = "
            f"{f['k_one_pass_over_one_head']:.2f}x one head (target < 2x)"
        )
        print(
            f"{k} separate single-head runs     {f['k_separate_seconds']:8.2f} s  = "
            f"{f['k_separate_over_one_pass']:.2f}x the one pass"
        )


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="featstore-bench-") as tmp:
        work = Path(tmp)
        store = Store(args.store if args.store is not None else work / "store")
        try:
            figures = benchmark(args, store, work)
        except FeatstoreError as exc:
            sys.exit(f"bench_train: {exc}")
    print_table(figures)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
