"""Compare decoder heads on clips they did not train on: clip-level K-fold over one feature artifact.

Builds (or reuses) features of ``--backbone`` for ``--data``, loads every clip onto the device once, and
for each fold trains the whole grid of heads in one pass with ``train_heads``, scoring each head on the
held-out clips by the contest rule. Prints one row per head: mean IoU over folds, parameters, frames/s.
``--in-memory`` featurizes straight onto the device without a store (for machines without zarr).

    python benchmarks/decoder_heads.py --data ../shared/data/davis2016-dev --backbone efficientnet_lite0
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from decoders import DeviceFeatures, HeadConfig, train_heads
from featstore.backbones import create_backbone
from featstore.datasets import load_dataset, read_frame, read_mask

DEFAULT_GRID = [
    {"decoder": "linear", "lr": 1e-3},
    {"decoder": "conv", "lr": 1e-3},
    {"decoder": "fpn", "lr": 1e-3},
    {"decoder": "fpn", "lr": 1e-3, "options": {"norm": "group"}},
    {"decoder": "fpn", "lr": 1e-3, "options": {"width": 128}},
    {"decoder": "temporal", "lr": 1e-3},
]


def folds(clips: list[str], k: int, seed: int) -> list[tuple[list[str], list[str]]]:
    """Clip-level K-fold: every clip is validated exactly once, by heads that never saw it."""
    shuffled = sorted(clips)
    random.Random(seed).shuffle(shuffled)
    parts = [sorted(shuffled[i::k]) for i in range(k)]
    return [(sorted(c for c in clips if c not in part), part) for part in parts]


def featurize_in_memory(
    data: str, backbone: str, weights: str, layers: list[str] | None, device: torch.device
) -> DeviceFeatures:
    """Every clip through the backbone, features kept on ``device`` (float16), no store involved."""
    extractor = create_backbone(backbone, weights=weights, layers=layers).to(device).eval()
    dataset = load_dataset(data)
    features: dict[str, list[torch.Tensor]] = {layer: [] for layer in extractor.layers}
    masks, clips = [], []
    started = time.perf_counter()
    for clip, records in dataset.clips().items():
        per_layer: dict[str, list[torch.Tensor]] = {layer: [] for layer in extractor.layers}
        for start in range(0, len(records), 16):
            batch = records[start : start + 16]
            frames = torch.from_numpy(np.stack([read_frame(r.raw) for r in batch])).permute(0, 3, 1, 2)
            for layer, values in extractor.extract(frames.to(device)).items():
                per_layer[layer].append(values.clone())
        for layer in extractor.layers:
            features[layer].append(torch.cat(per_layer[layer]))
        masks.append(torch.from_numpy(np.stack([read_mask(r.annotation) for r in records if r.annotation])))
        clips.append(clip)
    frames_total = sum(len(r) for r in dataset.clips().values())
    print(f"featurized {frames_total} frames in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    strides = {layer: extractor.spec.strides[layer] for layer in extractor.layers}
    return DeviceFeatures.from_tensors(features, masks, clips, device, strides=strides)


def from_store(args: argparse.Namespace, device: torch.device) -> DeviceFeatures:
    from featstore.features import open_features
    from featstore.store import Store
    from jobs.featurize import build_features

    store = Store(args.store or tempfile.mkdtemp(prefix="featstore-bench-"))
    built = build_features(
        store, args.backbone, args.data, weights=args.weights, layers=args.layers, device=str(device)
    )
    print(
        f"features {built.ref}: {built.frames} frames, {built.shapes}, {built.fps:.1f} frames/s",
        file=sys.stderr,
    )
    return DeviceFeatures.from_artifact(open_features(store, built.ref, verify=False), None, device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True)
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--layers", nargs="*", default=None)
    parser.add_argument("--store", default=None, help="store root (default: a temporary folder)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--grid", default=None, help="JSON list of HeadConfig dicts (default: a built-in grid)"
    )
    parser.add_argument("--in-memory", action="store_true", help="featurize onto the device, skip the store")
    args = parser.parse_args()

    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    if args.in_memory:
        everything = featurize_in_memory(args.data, args.backbone, args.weights, args.layers, device)
    else:
        everything = from_store(args, device)
    shapes = {layer: tuple(v.shape[1:]) for layer, v in everything.features.items()}
    configs = [
        HeadConfig.from_dict({"options": {}, "weight_decay": 1e-4, **g})
        for g in json.loads(args.grid or "null") or DEFAULT_GRID
    ]
    scores: dict[str, list[float]] = {c.label: [] for c in configs}
    speed: dict[str, list[float]] = {c.label: [] for c in configs}
    nparams: dict[str, int] = {}
    started = time.perf_counter()
    for fold, (train_clips, val_clips) in enumerate(folds(list(everything.clips), args.folds, args.seed)):
        heads = train_heads(
            everything.subset(train_clips),
            everything.subset(val_clips),
            configs,
            epochs=args.epochs,
            batch_size=args.batch_size,
            seed=args.seed,
        )
        for head in heads:
            assert head.val is not None
            scores[head.config.label].append(head.val.mean_iou)
            speed[head.config.label].append(head.train_frames_per_s)
            nparams[head.config.label] = head.nparams
            print(
                f"fold {fold} {head.config.label}: {head.val.mean_iou:.3f} {head.val.per_clip}",
                file=sys.stderr,
            )
    print(
        f"# {args.backbone} {shapes} on {device}, {args.folds} folds, {args.epochs} epochs, "
        f"{time.perf_counter() - started:.0f} s"
    )
    print(f"{'head':60s} {'mean IoU':>8s} {'min fold':>8s} {'params':>9s} {'frames/s':>9s}")
    for label in scores:
        print(
            f"{label:60s} {statistics.mean(scores[label]):8.3f} {min(scores[label]):8.3f} "
            f"{nparams[label]:9d} {statistics.mean(speed[label]):9.1f}"
        )


if __name__ == "__main__":
    main()
