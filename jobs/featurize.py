"""The featurize job: every frame of every clip through a frozen backbone, into a committed feature artifact.

The job is split so that it runs the same locally and on dask: ``prepare_build`` validates inputs and
derives the content key; ``featurize_clips`` computes and writes the arrays of some clips into a staging
group (one writer per clip); ``commit_build`` publishes the version once every clip is finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from PIL import Image
from tqdm import tqdm

from featstore.accounting import CONTEST_FRAME, count_flops
from featstore.backbones import FeatureExtractor, create_backbone
from featstore.datasets import Dataset, FrameRecord, load_dataset
from featstore.errors import FeatstoreError, StoreError
from featstore.features import (
    GROUP_DIR,
    ClipArrays,
    features_path,
    masks_path,
    open_group,
    parse_dtype,
    to_storage,
)
from featstore.frame_stream import FrameBatch, FrameStream, decodes_on_gpu, with_jpeg_decoder
from featstore.store import (
    ArtifactRecord,
    Staging,
    Store,
    canonical_hash,
    describe_os_error,
    write_json_atomic,
)
from featstore.wandb_sync import WandbJob, wandb_requested

DONE_DIR = "done"
# Part of every feature content key: bump it when a change to the extraction path changes the numbers
# it produces (memory layout, normalisation, precision), so features cached by older code are rebuilt.
EXTRACTION_VERSION = 2


def parse_device(device: str) -> torch.device | None:
    """The device ``device`` names (``None`` for ``auto``), without asking whether this machine has it."""
    if device == "auto":
        return None
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise FeatstoreError(f"--device {device!r} is not a device: use auto, cpu, cuda or cuda:N") from exc
    if parsed.type not in ("cpu", "cuda"):
        raise FeatstoreError(f"--device {device!r}: featstore runs on cpu, cuda or cuda:N")
    return parsed


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an explicit CUDA request without CUDA is an error.

    ``cuda:N`` also becomes the current CUDA device, so the streams and events that work on the current
    device (nvJPEG's, the copies to the host, the training clocks) are those of GPU N.
    """
    resolved = parse_device(device)
    if resolved is None:
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FeatstoreError(f"--device {device} asks for CUDA but torch sees no GPU: use --device cpu or auto")
    if resolved.type != "cuda":
        return resolved
    if resolved.index is None:
        # Always with its index: torchvision keeps one nvJPEG decoder per device spelling and rebuilds
        # it, leaking the old one, whenever "cuda" and "cuda:0" alternate.
        return torch.device("cuda", torch.cuda.current_device())
    if resolved.index >= torch.cuda.device_count():
        raise FeatstoreError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible")
    torch.cuda.set_device(resolved)
    return resolved


JPEG_DECODERS = ("auto", "pil", "nvjpeg")


def choose_gpu_decode(jpeg_decoder: str, device: str, chosen: torch.device | None) -> bool:
    """Whether a build decodes its JPEGs with nvJPEG (``--jpeg-decoder``; ``chosen`` is the parsed device).

    ``auto`` does when the build runs on a GPU; on a cluster only when ``--device`` names CUDA, since the
    client cannot know what its workers have and every clip of an artifact must decode alike. ``pil`` keeps
    the CPU's pixels (and keys) on a GPU, e.g. to match features built elsewhere.
    """
    if jpeg_decoder not in JPEG_DECODERS:
        raise FeatstoreError(f"--jpeg-decoder {jpeg_decoder!r} is not one of {', '.join(JPEG_DECODERS)}")
    on_gpu = chosen is not None and chosen.type == "cuda"
    if jpeg_decoder == "nvjpeg" and not on_gpu:
        raise FeatstoreError(f"--jpeg-decoder nvjpeg decodes on a GPU but --device {device} does not name one "
                             "there: use --device cuda (or cuda:N), or --jpeg-decoder pil")
    return on_gpu if jpeg_decoder == "auto" else jpeg_decoder == "nvjpeg"


def feature_artifact_name(dataset: Dataset, backbone: str, weights: str) -> str:
    """Name features by dataset, architecture and weights tag, e.g. ``davis2016-dev.alexnet.imagenet``."""
    tag = weights if weights in ("imagenet", "random") else "file"
    return f"{dataset.name}.{backbone.replace(':', '-')}.{tag}"


def commit_dataset(store: Store, dataset: Dataset) -> ArtifactRecord:
    """Record the dataset (its frame table and digest) as an artifact, the root of every lineage.

    A committed record of the same content is reused unless its files are damaged; then the dataset is
    recorded again as a new version (the table is rebuilt from the files at hand, so nothing is lost).
    """
    existing = store.find("dataset", dataset.name, dataset.digest())
    if existing is not None and not store.verify(existing):
        return existing  # intact: nothing is written, so a cached build works on a read-only store
    if existing is not None:
        print(f"featstore: the dataset record {existing.ref} is damaged; recording {dataset.name} again",
              file=sys.stderr)
    with store.stage("dataset", dataset.name, dataset.digest(), intact=True) as staging:
        if staging.committed is not None:
            return staging.committed
        table = [
            {
                "row": r.row,
                "clip": r.clip,
                "frame": r.frame,
                "raw": str(r.raw),
                "annotation": str(r.annotation) if r.annotation else None,
            }
            for r in dataset.frames
        ]
        write_json_atomic(staging.path / "frames.json", table)
        return staging.commit(
            parents=[],
            metadata={
                "name": dataset.name,
                "root": str(dataset.root),
                "digest": dataset.digest(),
                "frames": len(dataset.frames),
                "clips": len(dataset.clips()),
                "has_annotations": dataset.has_annotations,
            },
        )


@dataclass
class BuildPlan:
    """Everything a build needs that does not depend on where it runs."""

    store: Store
    dataset: Dataset
    backbone: str
    weights: str
    layers: tuple[str, ...]
    dtype: str
    seed: int
    key: str
    name: str
    weights_digest: str
    spec: dict[str, Any]
    preprocessing: dict[str, Any]
    nparams_backbone: int


def prepare_build(
    store: Store,
    backbone: str,
    data: str | Path | None = None,
    *,
    weights: str = "imagenet",
    layers: Sequence[str] | None = None,
    dtype: str = "float16",
    seed: int = 0,
    gpu_decode: bool = False,
) -> tuple[BuildPlan, FeatureExtractor]:
    """Validate every input and derive the content key; nothing is written when anything is wrong.

    ``gpu_decode``: JPEGs are decoded by nvJPEG, whose pixels differ from PIL's, so it is in the key.
    """
    parse_dtype(dtype)
    dataset = load_dataset(data, demo_root=store.root / "demo")
    extractor = create_backbone(backbone, weights=weights, layers=layers, seed=seed, dtype=parse_dtype(dtype))
    preprocessing = with_jpeg_decoder(extractor.preprocessing(), gpu_decode)
    key = canonical_hash(
        {
            "dataset": dataset.digest(),
            "backbone": backbone,
            "weights": extractor.weights_digest,
            "layers": list(extractor.layers),
            "preprocessing": preprocessing,
            "dtype": dtype,
            "extraction": EXTRACTION_VERSION,
        }
    )
    plan = BuildPlan(
        store=store,
        dataset=dataset,
        backbone=backbone,
        weights=weights,
        layers=tuple(extractor.layers),
        dtype=dtype,
        seed=seed,
        key=key,
        name=feature_artifact_name(dataset, backbone, weights),
        weights_digest=extractor.weights_digest,
        spec=extractor.spec.to_dict(),
        preprocessing=preprocessing,
        nparams_backbone=extractor.nparams,
    )
    return plan, extractor


@dataclass
class ClipProgress:
    """Features of one clip waiting to be written in chunk-aligned spans."""

    arrays: ClipArrays
    written: int = 0
    features: list[dict[str, np.ndarray]] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    buffered: int = 0
    futures: list[Future] = field(default_factory=list)

    def append(self, features: dict[str, np.ndarray], masks: np.ndarray | None) -> None:
        self.features.append(features)
        if masks is not None:
            self.masks.append(masks)
        self.buffered += next(iter(features.values())).shape[0]

    def next_span(self) -> int:
        """Frames ready to write now: a whole chunk, or the clip's last partial chunk; 0 when neither."""
        chunk = self.arrays.chunk_len()
        if self.buffered >= chunk:
            return chunk
        if self.buffered and self.written + self.buffered == self.arrays.n_frames:
            return self.buffered
        return 0

    def take(self, n: int) -> tuple[int, dict[str, np.ndarray], np.ndarray | None]:
        """Remove the first ``n`` buffered frames; returns their start frame, features and masks."""
        feats = {layer: np.concatenate([f[layer] for f in self.features]) for layer in self.features[0]}
        masks = np.concatenate(self.masks) if self.masks else None
        self.features = [{layer: v[n:] for layer, v in feats.items()}] if self.buffered > n else []
        self.masks = [masks[n:]] if masks is not None and self.buffered > n else []
        start = self.written
        self.written += n
        self.buffered -= n
        return start, {layer: v[:n] for layer, v in feats.items()}, masks[:n] if masks is not None else None


STAGES = ("frames", "forward", "device", "writers")


@dataclass
class StageClock:
    """Seconds the featurize loop spent in, or waiting on, each stage: where a build's time goes.

    ``frames``: waiting for decoded batches; ``forward``: the backbone call (compute on the CPU, kernel
    launches on CUDA); ``device``: waiting for features to reach the host (the GPU still computing);
    ``writers``: waiting for compression and writes to catch up. The rest is buffering.
    """

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @contextlib.contextmanager
    def timing(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - started

    def describe(self, total: float) -> str:
        """One line of shares of ``total`` seconds, e.g. ``frames 12%, forward 70%, ...``."""
        shares = {**self.seconds, "other": max(0.0, total - sum(self.seconds.values()))}
        return ", ".join(f"{stage} {100 * sec / total:.0f}%" for stage, sec in shares.items()) if total > 0 else ""


class HostCopy:
    """A batch's features on their way to host memory.

    On CUDA the copy goes asynchronously into pinned memory with an event that marks its end, so the job
    can queue the next batch's decode and forward before it waits: the GPU works on batch i while the host
    buffers and hands batch i - 1 to the writers. On the CPU the tensors are already there.
    """

    def __init__(self, outputs: dict[str, torch.Tensor]) -> None:
        self.values = {layer: v.to("cpu", non_blocking=True) for layer, v in outputs.items()}
        self.ready: torch.cuda.Event | None = None
        on_gpu = [v.device for v in outputs.values() if v.is_cuda]
        if on_gpu:
            self.ready = torch.cuda.Event(blocking=True)  # the waiting thread sleeps instead of spinning a core
            self.ready.record(torch.cuda.current_stream(on_gpu[0]))  # the copies' stream, whichever GPU is current

    def arrays(self) -> dict[str, np.ndarray]:
        """The features as numpy arrays, once the copy has finished."""
        if self.ready is not None:
            self.ready.synchronize()
        return {layer: to_storage(v) for layer, v in self.values.items()}


def _clip_attrs(records: Sequence[FrameRecord]) -> dict[str, Any]:
    return {
        "clip": records[0].clip,
        "rows": [r.row for r in records],
        "frames": [r.frame for r in records],
        "raw": [str(r.raw) for r in records],
        "annotation": [str(r.annotation) if r.annotation else None for r in records],
    }


def finished_clips(scratch: Path) -> set[str]:
    """Clips whose arrays were completely written by an earlier (possibly killed) run."""
    done = scratch / DONE_DIR
    return {p.stem for p in done.glob("*.json")} if done.is_dir() else set()


def discard_clips_with_holes(group_path: Path, scratch: Path, *, with_masks: bool) -> list[str]:
    """Drop the done markers of finished clips whose arrays lack chunk files; returns those clips, sorted.

    A marker is written only after every chunk of its clip, but a staging folder can lose files later (a
    full disk cleaned by hand, a partial copy) and zarr would read a lost chunk as zeros. Such a clip is
    computed again rather than committed with a hole.
    """
    done = finished_clips(scratch)
    if not done:
        return []
    try:
        group = open_group(group_path, mode="r")
    except (FileNotFoundError, ValueError):  # the data is gone altogether: no marker stands
        group = None
    holed = []
    for clip in sorted(done):
        layers = json.loads((scratch / DONE_DIR / f"{clip}.json").read_text())["shapes"]
        paths = [features_path(layer, clip) for layer in layers] + ([masks_path(clip)] if with_masks else [])
        if group is None or not all(_fully_written(group, path) for path in paths):
            (scratch / DONE_DIR / f"{clip}.json").unlink()
            holed.append(clip)
    return holed


def _fully_written(group: zarr.Group, path: str) -> bool:
    """Whether the array at ``path`` exists with every one of its chunk files."""
    array = group.get(path)
    return isinstance(array, zarr.Array) and array.nchunks_initialized == array.nchunks


class ClipWriter:
    """Buffers each clip's features into chunk-aligned spans, writes them on threads, and marks clips done.

    Each clip array has this one writer. A clip is marked done (a file under ``scratch/done``) only once
    every one of its chunks is on disk, so a killed run resumes from exactly the finished clips.
    """

    def __init__(
        self, group: zarr.Group, dataset: Dataset, scratch: Path, dtype: str, threads: int, clock: StageClock
    ) -> None:
        self.group = group
        self.clock = clock
        self.by_clip = dataset.clips()
        self.with_masks = dataset.has_annotations
        self.done_dir = scratch / DONE_DIR
        self.done_dir.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featstore-write")
        self.max_pending = 2 * threads
        self.in_flight: list[Future] = []
        self.open_clips: dict[str, ClipProgress] = {}

    def add(self, batch: FrameBatch, host: dict[str, np.ndarray]) -> None:
        """Buffer a batch's features and masks; submit every whole chunk (or a clip's last one) it completes."""
        for clip, lo, hi in _clip_runs(batch.records):
            state = self.open_clips.get(clip)
            if state is None:
                state = self._open(clip, batch, host)
            state.append({layer: v[lo:hi] for layer, v in host.items()},
                         batch.masks[lo:hi] if batch.masks is not None else None)
            while n := state.next_span():
                future = self.pool.submit(state.arrays.write, *state.take(n))
                state.futures.append(future)
                self.in_flight.append(future)
                while len(self.in_flight) > self.max_pending:
                    with self.clock.timing("writers"):
                        self.in_flight.pop(0).result()
            if state.written == state.arrays.n_frames:
                self._mark_done(clip)

    def __enter__(self) -> ClipWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        """Let the writes in flight finish; after a clean run, raise any write's error or a clip left open."""
        with self.clock.timing("writers"):
            self.pool.shutdown(wait=True)
        if exc_type is not None:
            return
        for future in self.in_flight:
            future.result()
        if self.open_clips:
            raise FeatstoreError(f"clips {', '.join(self.open_clips)} were not completely written")

    def _open(self, clip: str, batch: FrameBatch, host: dict[str, np.ndarray]) -> ClipProgress:
        frame_size = (int(batch.pixels.shape[2]), int(batch.pixels.shape[3]))
        state = ClipProgress(
            ClipArrays(
                self.group,
                clip,
                len(self.by_clip[clip]),
                {layer: (v.shape[1], v.shape[2], v.shape[3]) for layer, v in host.items()},
                self.dtype,
                frame_size if self.with_masks else None,
                _clip_attrs(self.by_clip[clip]),
            )
        )
        self.open_clips[clip] = state
        return state

    def _mark_done(self, clip: str) -> None:
        state = self.open_clips.pop(clip)
        with self.clock.timing("writers"):
            for future in state.futures:
                future.result()
        shapes = {layer: list(a.shape) for layer, a in state.arrays.features.items()}
        write_json_atomic(self.done_dir / f"{clip}.json", {"clip": clip, "shapes": shapes})


def featurize_clips(
    extractor: FeatureExtractor,
    dataset: Dataset,
    clips: Sequence[str],
    group_path: Path,
    scratch: Path,
    *,
    dtype: str,
    batch_size: int,
    progress: bool = True,
    clock: StageClock | None = None,
    gpu_decode: bool = False,
) -> int:
    """Compute and write the arrays of ``clips``; mark each clip done once all its chunks are on disk.

    Memory stays bounded: a few decoded batches ahead, one batch of features on its way to the host, at
    most one chunk per clip buffered, and a few writes in flight. Returns the number of frames computed;
    ``clock``, when given, collects where the time went.
    """
    clock = clock if clock is not None else StageClock()
    by_clip = dataset.clips()
    records = [r for clip in clips for r in by_clip[clip]]
    if not records:
        return 0
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    if gpu_decode and device.type != "cuda":
        raise FeatstoreError(f"these features decode JPEGs with nvJPEG, which needs a GPU; the backbone is on {device}")
    stream = FrameStream(records, batch_size, device, with_masks=dataset.has_annotations, decode_on_device=gpu_decode)
    threads = min(8, max(2, (os.cpu_count() or 2) // 2))

    def hand_over(batch: FrameBatch, copy: HostCopy, bar: tqdm) -> None:
        with clock.timing("device"):
            host = copy.arrays()
        writer.add(batch, host)
        bar.update(len(batch.records))

    # The bar as a context: an error closes it onto its own line before the error is printed.
    with (
        tqdm(total=len(records), unit="frame", desc="featurize", disable=not progress, file=sys.stderr) as bar,
        ClipWriter(open_group(group_path), dataset, scratch, dtype, threads, clock) as writer,
    ):
        batches = iter(stream)
        previous: tuple[FrameBatch, HostCopy] | None = None
        while True:
            with clock.timing("frames"):
                batch = next(batches, None)
            if batch is None:
                break
            with clock.timing("forward"):
                copy = HostCopy(extractor.extract(batch.pixels))
            if previous is not None:  # on CUDA, while the device runs this batch
                hand_over(*previous, bar)
            previous = (batch, copy)
        if previous is not None:
            hand_over(*previous, bar)
    return len(records)


def _clip_runs(records: Sequence[FrameRecord]) -> list[tuple[str, int, int]]:
    """Split a batch into runs of consecutive frames of the same clip: ``(clip, start, stop)``."""
    runs: list[tuple[str, int, int]] = []
    for i, record in enumerate(records):
        if runs and runs[-1][0] == record.clip:
            runs[-1] = (record.clip, runs[-1][1], i + 1)
        else:
            runs.append((record.clip, i, i + 1))
    return runs


@dataclass(frozen=True)
class BuildResult:
    """What ``featstore build`` reports."""

    record: ArtifactRecord
    path: Path
    cached: bool
    frames: int
    clips: int
    bytes: int
    fps: float
    nparams_backbone: int
    shapes: dict[str, list[int]]

    @property
    def ref(self) -> str:
        return self.record.ref

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "path": str(self.path),
            "cached": self.cached,
            "frames": self.frames,
            "clips": self.clips,
            "bytes": self.bytes,
            "fps": None if self.cached else self.fps,  # a cache hit computed nothing to time
            "nparams_backbone": self.nparams_backbone,
            "feature_shape": self.shapes,
        }


def _result(store: Store, record: ArtifactRecord, cached: bool) -> BuildResult:
    meta = record.metadata
    return BuildResult(
        record=record,
        path=store.path(record) / GROUP_DIR,
        cached=cached,
        frames=int(meta["frames"]),
        clips=len(meta["clips"]),
        bytes=int(meta["bytes"]),
        fps=0.0 if cached else float(meta["fps"]),
        nparams_backbone=int(meta["nparams_backbone"]),
        shapes={k: list(v) for k, v in meta["feature_shape"].items()},
    )


def commit_build(
    plan: BuildPlan,
    staging: Staging,
    dataset_record: ArtifactRecord,
    extractor: FeatureExtractor,
    *,
    fps: float,
    stage_seconds: dict[str, float] | None = None,
) -> ArtifactRecord:
    """Publish the staged group once every clip is marked done; ``stage_seconds`` come from a ``StageClock``."""
    scratch = staging.scratch
    done = finished_clips(scratch)
    missing = sorted(set(plan.dataset.clips()) - done)
    if missing:
        raise FeatstoreError(f"cannot commit {plan.name}: clips {', '.join(missing[:5])} are not finished")
    first = json.loads((scratch / DONE_DIR / f"{sorted(done)[0]}.json").read_text())
    shapes = {layer: shape[1:] for layer, shape in first["shapes"].items()}
    # zarr writes each file through a "<name>.<uuid>.partial" sibling; a run killed mid-write leaves one
    # behind (group metadata is rewritten whenever an array is created), and it is no part of the artifact.
    for stale in (staging.path / GROUP_DIR).rglob("*.partial"):
        stale.unlink()
    nbytes = sum(p.stat().st_size for p in (staging.path / GROUP_DIR).rglob("*") if p.is_file())
    frame = plan.dataset.frames[0]
    frame_size = _frame_size(frame)
    device = next(iter(extractor.parameters())).device
    nflops = count_flops(extractor, torch.zeros((1, *CONTEST_FRAME), device=device))
    metadata = {
        "backbone": {**plan.spec, "weights": plan.weights, "pretrained": plan.weights != "random", "seed": plan.seed},
        "weights_digest": plan.weights_digest,
        "layers": list(plan.layers),
        "channels": {layer: int(s[0]) for layer, s in shapes.items()},
        "strides": {layer: int(plan.spec["strides"][layer]) for layer in plan.layers},
        "dtype": plan.dtype,
        "preprocessing": plan.preprocessing,
        "extraction": EXTRACTION_VERSION,
        "nparams_backbone": plan.nparams_backbone,
        "nflops_backbone": nflops,
        "dataset": {
            "ref": dataset_record.ref,
            "name": plan.dataset.name,
            "digest": plan.dataset.digest(),
            "has_annotations": plan.dataset.has_annotations,
        },
        "clips": {clip: len(recs) for clip, recs in plan.dataset.clips().items()},
        "frames": len(plan.dataset.frames),
        "frame_size": list(frame_size),
        "feature_shape": {layer: list(s) for layer, s in shapes.items()},
        "bytes": nbytes,
        "fps": fps,
        "stage_seconds": stage_seconds or {},
    }
    return staging.commit(parents=[dataset_record.ref], metadata=metadata)


def _frame_size(record: FrameRecord) -> tuple[int, int]:
    with Image.open(record.raw) as image:
        width, height = image.size
    return height, width


def build_features(
    store: Store,
    backbone: str,
    data: str | Path | None = None,
    *,
    weights: str = "imagenet",
    layers: Sequence[str] | None = None,
    dtype: str = "float16",
    batch_size: int = 16,
    device: str = "auto",
    seed: int = 0,
    scheduler: str | None = None,
    progress: bool = True,
    wandb: bool = False,
    force: bool = False,
    jpeg_decoder: str = "auto",
) -> BuildResult:
    """Featurize a dataset into a committed artifact; the same inputs again are a cache hit.

    ``force`` recomputes every clip even so (no cache hit, no resume) and commits a new version, which then
    supersedes the old one as ``latest`` and as the cache entry: the way to replace a damaged artifact.
    """
    if batch_size < 1:
        raise FeatstoreError(f"--batch-size {batch_size} must be at least 1")
    # With a scheduler each dask worker resolves the device: the client may have no GPU at all.
    chosen = parse_device(device) if scheduler is not None else resolve_device(device)
    gpu_decode = choose_gpu_decode(jpeg_decoder, device, chosen)
    if scheduler is not None:
        from jobs.distributed import local_workers  # dask loads only for distributed builds

        local_workers(scheduler)
    plan, extractor = prepare_build(store, backbone, data, weights=weights, layers=layers, dtype=dtype, seed=seed,
                                    gpu_decode=gpu_decode)
    unmasked = [record for record in plan.dataset.frames if record.annotation is None]
    if progress and 0 < len(unmasked) < len(plan.dataset.frames):
        named = ", ".join(f"{r.clip}/{r.frame:05d} (row {r.row})" for r in unmasked[:3])
        more = f" and {len(unmasked) - 3} more" if len(unmasked) > 3 else ""
        print(f"featstore: {len(plan.dataset.frames) - len(unmasked)} of {len(plan.dataset.frames)} frames have "
              f"masks; features are stored without masks, which training needs on every frame. No mask: "
              f"{named}{more}", file=sys.stderr)
    config = {"backbone": backbone, "weights": weights, "layers": list(plan.layers), "dtype": dtype,
              "batch_size": batch_size, "device": str(chosen or device), "scheduler": scheduler,
              "jpeg_decoder": "nvjpeg" if gpu_decode else "pil", "key": plan.key}
    with WandbJob("featurize", config, enabled=wandb_requested(wandb), store=store) as job:
        result = _build(plan, extractor, batch_size=batch_size, device=device,
                        scheduler=scheduler, progress=progress, force=force)
        job.log(result.record)
        summary = result.to_json()  # the figures --json prints, a cache hit's missing speed included
        job.log_metrics({k: summary[k] for k in ("frames", "fps", "bytes", "nparams_backbone", "cached")})
    return result


def _build(
    plan: BuildPlan,
    extractor: FeatureExtractor,
    *,
    batch_size: int,
    device: str,
    scheduler: str | None,
    progress: bool,
    force: bool,
) -> BuildResult:
    store = plan.store
    cached = None if force else store.find("features", plan.name, plan.key) or _built_under_another_name(plan)
    if cached is not None:
        try:
            commit_dataset(store, plan.dataset)  # records the dataset again if its record was damaged
        except StoreError as exc:  # e.g. a read-only store: the cached features are still good to use
            print(f"featstore: warning: could not check the dataset record: {exc}", file=sys.stderr)
        return _result(store, cached, cached=True)
    try:
        return _build_uncached(plan, extractor, batch_size=batch_size, device=device,
                               scheduler=scheduler, progress=progress, force=force)
    except OSError as exc:  # a full disk or unwritable store surfaces from zarr's writes as a bare OSError
        if exc.errno is None:  # not a filesystem error (dask's closed connections are OSErrors too)
            raise
        _settle_zarr_writes()
        raise StoreError(describe_os_error(exc, store.root)) from exc


def _built_under_another_name(plan: BuildPlan) -> ArtifactRecord | None:
    """The newest features of this very content built from a dataset of another name (a copy elsewhere):
    the key covers the dataset's content, not its name or place, so they are these features."""
    same = [r for r in plan.store.list("features", damaged=[]) if r.key == plan.key]
    if not same:
        return None
    found = max(same, key=lambda r: (r.created, r.version))
    print(f"featstore: dataset {plan.dataset.name!r} holds the frames of {found.metadata['dataset']['name']!r}, "
          f"whose features {found.ref} are these; reusing them", file=sys.stderr)
    return found


def _settle_zarr_writes(timeout: float = 10.0) -> None:
    """Let the sibling chunk writes of a failed zarr write finish, so the user sees one error line.

    zarr writes a selection's chunks as concurrent tasks on its own event loop; when one fails the
    others are still pending, and at exit asyncio would report each of them as destroyed.
    """
    from zarr.core.sync import sync

    async def settle() -> None:
        current = asyncio.current_task()
        pending = [task for task in asyncio.all_tasks() if task is not current]
        if pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), timeout)

    sync(settle())


def _build_uncached(
    plan: BuildPlan,
    extractor: FeatureExtractor,
    *,
    batch_size: int,
    device: str,
    scheduler: str | None,
    progress: bool,
    force: bool,
) -> BuildResult:
    store, dtype = plan.store, plan.dtype
    dataset_record = commit_dataset(store, plan.dataset)
    with store.stage("features", plan.name, plan.key, fresh=force) as staging:
        if staging.committed is not None:
            return _result(store, staging.committed, cached=True)
        group_path = staging.path / GROUP_DIR
        holed = discard_clips_with_holes(group_path, staging.scratch, with_masks=plan.dataset.has_annotations)
        if holed:
            print(f"featstore: resuming {plan.name}: the staged arrays of clip(s) {', '.join(holed[:5])} lost "
                  "chunk files since they were finished; computing them again", file=sys.stderr)
        todo = [c for c in plan.dataset.clips() if c not in finished_clips(staging.scratch)]
        if len(todo) < len(plan.dataset.clips()):
            print(
                f"featstore: resuming {plan.name}: {len(plan.dataset.clips()) - len(todo)} clip(s) already finished",
                file=sys.stderr,
            )
        open_group(group_path)
        started = time.perf_counter()
        clock: StageClock | None = None
        if scheduler:
            from jobs.distributed import featurize_on_dask

            frames = featurize_on_dask(plan, todo, group_path, staging.scratch, scheduler=scheduler,
                                       batch_size=batch_size, device=device, progress=progress)
        else:
            extractor = extractor.to(resolve_device(device)).eval()
            clock = StageClock()
            frames = featurize_clips(
                extractor, plan.dataset, todo, group_path, staging.scratch,
                dtype=dtype, batch_size=batch_size, progress=progress, clock=clock,
                gpu_decode=decodes_on_gpu(plan.preprocessing),
            )
        elapsed = time.perf_counter() - started
        fps = frames / elapsed if frames and elapsed > 0 else 0.0
        if clock is not None and progress and frames:
            print(f"featstore: featurized {frames} frames in {elapsed:.1f} s ({fps:.1f} frames/s); time spent: "
                  f"{clock.describe(elapsed)}", file=sys.stderr)
        stages = {stage: round(sec, 3) for stage, sec in clock.seconds.items()} if clock is not None else {}
        record = commit_build(plan, staging, dataset_record, extractor, fps=fps, stage_seconds=stages)
    return _result(store, record, cached=False)
