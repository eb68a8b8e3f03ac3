"""The predict job: a committed decoder on every frame of a dataset, written as a contest result artifact.

Features come from the store when a feature artifact of this very dataset was built with the decoder's
backbone (same dataset digest, weights digest, layers, preprocessing and dtype); otherwise the backbone
runs on the frames, rebuilt exactly as the features were and checked against the recorded weights
digest. Either way the decoder sees one clip at a time (temporal heads read a frame's neighbours within
its clip), so memory stays bounded by one clip's features whatever the dataset's size. The result is
content-keyed: predicting the same dataset with the same decoder again computes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from decoders import Decoder, DeviceFeatures
from decoders.training import autocast_for
from featstore import __version__
from featstore.backbones import FeatureExtractor, create_backbone
from featstore.datasets import Dataset, FrameRecord, load_dataset
from featstore.errors import BackboneError, DatasetError, FeatstoreError, StoreError
from featstore.features import FeatureArtifact, open_features, parse_dtype
from featstore.frame_stream import JPEG_DECODER, NVJPEG, FrameStream, backbone_preprocessing, decodes_on_gpu
from featstore.metrics import probability_to_u8
from featstore.results import METADATA_FILE, OUTPUTS_DIR, PATHS_FILE, write_result_folder
from featstore.store import ArtifactRecord, Store, canonical_hash, hidden_sibling, recompute_hint
from featstore.wandb_sync import WandbJob, wandb_requested
from jobs.featurize import commit_dataset, resolve_device
from jobs.train import load_decoder

DATASET_TABLE = "frames.json"  # written by jobs.featurize.commit_dataset
SOURCE_FEATURES = "features"
SOURCE_BACKBONE = "backbone"
# What must agree between a feature artifact and a decoder for the features to be the decoder's inputs.
_FEATURE_IDENTITY = ("weights_digest", "layers", "dtype", "preprocessing", "extraction")


@dataclass(frozen=True)
class PredictResult:
    """What ``featstore predict`` reports: the result artifact, its contest folder in the store, and
    ``out``: the copy ``--out`` asked for, else that same folder."""

    record: ArtifactRecord
    out: Path
    cached: bool
    folder: Path

    @property
    def ref(self) -> str:
        return self.record.ref

    @property
    def source(self) -> str:
        return str(self.record.metadata["source"])

    @property
    def features(self) -> str | None:
        features = self.record.metadata["lineage"]["features"]
        return str(features) if features else None

    def to_json(self) -> dict[str, Any]:
        meta = self.record.metadata
        return {
            "ref": self.ref,
            "out": str(self.out),
            "folder": str(self.folder),
            "cached": self.cached,
            "source": self.source,
            "features": self.features,
            "decoder": meta["lineage"]["decoder"],
            "dataset": meta["lineage"]["dataset"]["ref"],
            "frames": meta["frames"],
            "fps": None if self.cached else meta["fps"],  # a cache hit computed nothing to time
            "nparams": meta["nparams"],
            "nflops": meta["nflops"],
        }


def result_artifact_name(dataset: Dataset, decoder: ArtifactRecord) -> str:
    """Name results by the dataset predicted and the decoder that predicted it."""
    return f"{dataset.name}.{decoder.name}"


def predict_dataset(
    store: Store,
    decoder_ref: str,
    data: Dataset | str | Path | None,
    *,
    out: str | Path | None = None,
    features: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    progress: bool = True,
    wandb: bool = False,
    force: bool = False,
) -> PredictResult:
    """Predict every frame of ``data`` (a path, a loaded Dataset, or None for the demo) with a decoder.

    ``features`` names a feature artifact to read instead of looking one up by content; the dataset must
    then be that artifact's dataset or some of its clips (same rows, frames and source files), which is
    how a clip subset (e.g. held-out clips) is predicted from features built for the whole dataset.
    ``out`` additionally places a copy of the contest folder there; it must not exist or be empty.
    ``force`` predicts even when a result with the same inputs is committed, as a new version.
    """
    if batch_size < 1:
        raise FeatstoreError(f"--batch-size {batch_size} must be at least 1")
    out_dir = _check_out(out)
    torch_device = resolve_device(device)
    decoder_record = store.resolve(decoder_ref, type="decoder")
    dataset = data if isinstance(data, Dataset) else load_dataset(data, demo_root=store.root / "demo")
    if features:
        artifact: FeatureArtifact | None = _explicit_features(store, features, decoder_record, dataset)
    else:
        artifact = find_features(store, dataset, decoder_record)
    source = SOURCE_FEATURES if artifact is not None else SOURCE_BACKBONE
    gpu_decode = source == SOURCE_BACKBONE and _decode_as_trained(decoder_record, torch_device)
    trained_on_nvjpeg = decodes_on_gpu(decoder_record.metadata.get("preprocessing") or {})
    # The decoder's and features' versions are inputs too: a result answers for exactly the versions it used.
    key = canonical_hash(
        {
            "decoder": decoder_record.key,
            "parents": [decoder_record.ref] + ([artifact.record.ref] if artifact is not None else []),
            "dataset": dataset.digest(),
            "source": source,
            "features": artifact.record.key if artifact is not None else None,
            # Frames PIL decodes for an nvJPEG-trained decoder are other pixels: another result.
            **({JPEG_DECODER: NVJPEG if gpu_decode else "pil"} if source == SOURCE_BACKBONE and trained_on_nvjpeg else {}),
        }
    )
    name = result_artifact_name(dataset, decoder_record)
    config = {"decoder": decoder_record.ref, "dataset": dataset.name, "source": source,
              "features": artifact.record.ref if artifact is not None else None,
              "batch_size": batch_size, "device": str(torch_device), "key": key}
    with WandbJob("predict", config, enabled=wandb_requested(wandb), store=store) as job:
        job.use(decoder_record)
        if artifact is not None:
            job.use(artifact.record)
        record = None if force else store.find("result", name, key)
        cached = record is not None
        if record is not None:
            store.require_intact(record)
        else:
            record = _predict_uncached(store, name, key, decoder_record, dataset, artifact, torch_device,
                                       batch_size=batch_size, progress=progress, fresh=force, gpu_decode=gpu_decode)
        job.log(record)
        folder = store.path(record)
        result = PredictResult(record, out_dir if out_dir is not None else folder, cached, folder)
        summary = result.to_json()  # the figures --json prints, a cache hit's missing speed included
        job.log_metrics({k: summary[k] for k in ("frames", "fps", "cached")})
    if out_dir is not None:
        _copy_result(folder, out_dir)
    return result


def _decode_as_trained(decoder: ArtifactRecord, device: torch.device) -> bool:
    """Whether to decode JPEGs on the GPU when running the backbone: as the decoder's features were.

    Features decoded by nvJPEG need a GPU to be matched; on the CPU, PIL decodes instead and says so.
    """
    if not decodes_on_gpu(decoder.metadata.get("preprocessing") or {}):
        return False
    if device.type == "cuda":
        return True
    print(f"featstore: warning: decoder {decoder.ref} was trained on features of JPEGs decoded by nvJPEG on "
          f"a GPU; on {device} PIL decodes them, whose pixels differ slightly: predict with --device cuda to "
          "decode as in training", file=sys.stderr)
    return False


def find_features(store: Store, dataset: Dataset, decoder: ArtifactRecord) -> FeatureArtifact | None:
    """The newest committed feature artifact of exactly this dataset built as the decoder's features were."""
    digest = dataset.digest()
    # Newest by creation time, then version: a --force rebuild can share its older version's second.
    for record in sorted(store.list("features"), key=lambda r: (r.created, r.version), reverse=True):
        meta = record.metadata
        if meta.get("dataset", {}).get("digest") == digest and not _identity_differences(meta, decoder.metadata):
            return open_features(store, record.ref)
    return None


def _identity_differences(features_meta: dict[str, Any], decoder_meta: dict[str, Any]) -> list[str]:
    differing = [k for k in _FEATURE_IDENTITY if features_meta.get(k) != decoder_meta.get(k)]
    if features_meta.get("backbone", {}).get("name") != decoder_meta.get("backbone", {}).get("name"):
        differing.insert(0, "backbone")
    return differing


def _explicit_features(
    store: Store, ref: str, decoder: ArtifactRecord, dataset: Dataset
) -> FeatureArtifact:
    """Open ``ref`` and check that it holds the decoder's kind of features for every frame of ``dataset``."""
    artifact = open_features(store, ref)
    differing = _identity_differences(artifact.metadata, decoder.metadata)
    if differing:
        raise FeatstoreError(
            f"features {artifact.record.ref} differ from the inputs of decoder {decoder.ref} in "
            f"{', '.join(differing)}: pass features built with {decoder.metadata['backbone']['name']} as the "
            "decoder's were, or leave the features out to run the backbone"
        )
    listed = _frame_table(store, artifact)
    for clip, records in dataset.clips().items():
        if clip not in artifact.clips:
            raise FeatstoreError(
                f"features {artifact.record.ref} have no clip {clip!r} of dataset {dataset.name!r}: "
                "pass features built from this dataset, or leave the features out to run the backbone"
            )
        stored = list(zip(artifact.rows(clip), artifact.frame_numbers(clip), strict=True))
        same_files = all(listed.get(r.row) == (r.clip, r.frame, str(r.raw)) for r in records)
        if stored != [(r.row, r.frame) for r in records] or not same_files:
            raise FeatstoreError(
                f"clip {clip!r} of dataset {dataset.name!r} is not the clip stored in features "
                f"{artifact.record.ref} (rows, frames or files differ): pass features built from this dataset"
            )
    return artifact


def _frame_table(store: Store, artifact: FeatureArtifact) -> dict[int, tuple[str, int, str]]:
    """Row -> (clip, frame, raw file) of the dataset the features were built from (its committed frame table)."""
    recorded = artifact.metadata["dataset"]
    ref = recorded.get("ref")
    if not ref:
        return {}
    # The newest record of that content: a build of that data records a damaged one again.
    found = store.find("dataset", recorded["name"], recorded["digest"]) if recorded.get("digest") else None
    record = found if found is not None else store.resolve(ref, type="dataset")
    table_file = store.path(record) / DATASET_TABLE
    try:
        table = json.loads(table_file.read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"dataset {record.ref}: cannot read {table_file} ({exc}). {recompute_hint('dataset')}") from exc
    return {int(t["row"]): (str(t["clip"]), int(t["frame"]), str(t["raw"])) for t in table}


def _predict_uncached(
    store: Store,
    name: str,
    key: str,
    decoder_record: ArtifactRecord,
    dataset: Dataset,
    artifact: FeatureArtifact | None,
    device: torch.device,
    *,
    batch_size: int,
    progress: bool,
    fresh: bool,
    gpu_decode: bool,
) -> ArtifactRecord:
    decoder, _ = load_decoder(store, decoder_record.ref, device)
    extractor = None if artifact is not None else _rebuild_backbone(decoder_record, device)
    dataset_record = commit_dataset(store, dataset)
    meta = decoder_record.metadata
    metadata: dict[str, Any] = {
        "nparams": meta["nparams"],
        "nparams_backbone": meta["nparams_backbone"],
        "nparams_head": meta["nparams_head"],
        "nflops": meta["nflops"],
        "nflops_backbone": meta["nflops_backbone"],
        "nflops_head": meta["nflops_head"],
        "backbone": meta["backbone"],
        "layers": meta["layers"],
        "dtype": meta["dtype"],
        "decoder": meta["decoder"],
        "head": meta["head"],
        "source": SOURCE_FEATURES if artifact is not None else SOURCE_BACKBONE,
        "frames": len(dataset.frames),
        "clips": len(dataset.clips()),
        "lineage": {
            "decoder": decoder_record.ref,
            "decoder_key": decoder_record.key,
            "features": artifact.record.ref if artifact is not None else None,
            "dataset": {
                "ref": dataset_record.ref,
                "name": dataset.name,
                "digest": dataset.digest(),
                "has_annotations": dataset.has_annotations,
            },
        },
        "featstore_version": __version__,
    }
    parents = [decoder_record.ref, dataset_record.ref] + ([artifact.record.ref] if artifact is not None else [])
    with store.stage("result", name, key, fresh=fresh) as staging:
        if staging.committed is not None:
            return staging.committed
        started = time.perf_counter()
        with tqdm(total=len(dataset.frames), unit="frame", desc="predict", disable=not progress,
                  file=sys.stderr) as bar:
            predictions = _predictions(decoder, dataset, artifact, extractor, device, batch_size, bar, gpu_decode)
            # Interrupted attempts may have left a finished folder in the staging area: replace it.
            write_result_folder(staging.path, predictions, metadata, overwrite=True)
        elapsed = time.perf_counter() - started
        fps = len(dataset.frames) / elapsed if elapsed > 0 else 0.0
        return staging.commit(parents=parents, metadata={**metadata, "seconds": elapsed, "fps": fps})


def _rebuild_backbone(decoder: ArtifactRecord, device: torch.device) -> FeatureExtractor:
    """The backbone exactly as the decoder's features were computed; refused if its weights differ."""
    meta = decoder.metadata
    backbone = meta["backbone"]
    weights = backbone["weights"]
    if weights not in ("imagenet", "random") and not Path(weights).expanduser().is_file():
        raise BackboneError(
            f"decoder {decoder.ref} was trained on {backbone['name']} features of the weights file {weights}, "
            "which is gone; restore the file there to run the backbone on these frames"
        )
    extractor = create_backbone(
        backbone["name"],
        weights=weights,
        layers=meta["layers"],
        seed=int(backbone.get("seed", 0)),
        dtype=parse_dtype(meta["dtype"]),
    )
    if extractor.weights_digest != meta["weights_digest"]:
        raise BackboneError(
            f"the {backbone['name']} weights ({backbone['weights']}) now hash to {extractor.weights_digest[:12]}..., "
            f"but decoder {decoder.ref} was trained on features of weights {meta['weights_digest'][:12]}...: "
            "restore the weights it was trained with, or train a decoder on features of these weights"
        )
    if extractor.preprocessing() != backbone_preprocessing(meta["preprocessing"]):
        raise BackboneError(
            f"the {backbone['name']} preprocessing differs from the one decoder {decoder.ref} was trained with: "
            "train a decoder on features built with this featstore version"
        )
    return extractor.to(device).eval()


def _predictions(
    decoder: Decoder,
    dataset: Dataset,
    artifact: FeatureArtifact | None,
    extractor: FeatureExtractor | None,
    device: torch.device,
    batch_size: int,
    bar: tqdm,
    gpu_decode: bool,
) -> Iterator[tuple[int, npt.NDArray[np.uint8]]]:
    """(row, uint8 mask) for every frame of the dataset, one clip's features on the device at a time."""
    for clip, records in dataset.clips().items():
        if artifact is not None:
            # The clip's own frame size, not the artifact's first one: clips of a dataset may differ in size.
            features = {layer: [artifact.read(clip, layer).to(device)] for layer in artifact.layers}
            data = DeviceFeatures.from_tensors(features, None, [clip], device, strides=artifact.strides(),
                                               frame_size=_frame_size(records[0]))
            rows = artifact.rows(clip)
        else:
            assert extractor is not None
            data = _clip_features(extractor, clip, records, device, batch_size, gpu_decode)
            rows = [r.row for r in records]
        for index, probabilities in _probabilities(decoder, data, batch_size):
            values = probability_to_u8(probabilities).cpu().numpy()
            for i, mask in zip(index.tolist(), values, strict=True):
                yield rows[i], mask
            bar.update(len(values))
        del data


def _frame_size(record: FrameRecord) -> tuple[int, int]:
    """(H, W) of a frame, from its header alone."""
    try:
        with Image.open(record.raw) as image:
            width, height = image.size
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(f"{record.raw}: cannot read frame ({exc}); replace it with a valid JPEG or PNG") from exc
    return height, width


def _padded(index: torch.Tensor) -> torch.Tensor:
    """A one-frame batch repeated to two frames.

    On the CPU, oneDNN runs a batch of one through other kernels than larger batches, which changes the
    last bits of the results; never running single frames keeps every frame's output independent of how
    a clip happens to be batched, so stored features and a fresh backbone run give identical masks.
    """
    return index.repeat(2) if index.shape[0] == 1 else index


@torch.no_grad()
def _probabilities(
    decoder: Decoder, data: DeviceFeatures, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(index, probabilities (B, H, W))`` per batch in frame order, as ``decoders.predict`` (batches padded)."""
    decoder.eval()
    for index in data.batches(batch_size, shuffle=False):
        with autocast_for(data.device):
            logits = decoder(data.gather(_padded(index), decoder.temporal_window), data.frame_size)
        yield index, torch.sigmoid(logits.float()).squeeze(1)[: index.shape[0]]


def _clip_features(
    extractor: FeatureExtractor,
    clip: str,
    records: Sequence[FrameRecord],
    device: torch.device,
    batch_size: int,
    gpu_decode: bool,
) -> DeviceFeatures:
    """Run the backbone on one clip's frames, in batches, keeping the clip's features on the device."""
    per_layer: dict[str, list[torch.Tensor]] = {layer: [] for layer in extractor.layers}
    sizes: set[tuple[int, int]] = set()
    for batch in FrameStream(records, batch_size, device, with_masks=False, decode_on_device=gpu_decode):
        sizes.add((int(batch.pixels.shape[2]), int(batch.pixels.shape[3])))
        n = batch.pixels.shape[0]
        pixels = batch.pixels.repeat(2, 1, 1, 1) if n == 1 else batch.pixels  # see _padded
        for layer, values in extractor.extract(pixels).items():
            per_layer[layer].append(values[:n])
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes))
        raise DatasetError(
            f"clip {clip!r} mixes frame sizes ({shown}) under {records[0].raw.parent}: "
            "resize its frames to one size"
        )
    features = {layer: [torch.cat(values)] for layer, values in per_layer.items()}
    return DeviceFeatures.from_tensors(
        features, None, [clip], device, strides=dict(extractor.spec.strides), frame_size=sizes.pop()
    )


def _check_out(out: str | Path | None) -> Path | None:
    """Refuse an unusable ``--out`` before any work is done."""
    if out is None:
        return None
    out_dir = Path(out).expanduser().absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FeatstoreError(f"--out {out_dir} exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FeatstoreError(f"--out {out_dir} already exists and is not empty; choose another --out, or delete it")
    return out_dir


def _copy_result(folder: Path, out_dir: Path) -> None:
    """Place a copy of the contest folder at ``out_dir``: built beside it, then renamed into place."""
    _check_out(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        scratch = hidden_sibling(out_dir, ".partial")
        scratch.mkdir()
    except OSError as exc:
        raise StoreError(f"cannot write --out {out_dir} ({exc.strerror}): choose a writable folder") from exc
    try:
        shutil.copy2(folder / PATHS_FILE, scratch / PATHS_FILE)
        shutil.copy2(folder / METADATA_FILE, scratch / METADATA_FILE)
        shutil.copytree(folder / OUTPUTS_DIR, scratch / OUTPUTS_DIR)
        os.replace(scratch, out_dir)  # onto nothing, or onto an empty folder
    except OSError as exc:
        shutil.rmtree(scratch, ignore_errors=True)
        raise StoreError(f"cannot write --out {out_dir} ({exc.strerror}): choose another --out") from exc
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
