"""Feature artifacts on disk: one zarr v3 group, one array per clip and layer, masks beside them.

Layout of ``features.zarr``::

    features/<layer>/<clip>   (frames, C, h, w)  stored dtype, chunked along frames (>= ~1 MB a chunk)
    masks/<clip>              (frames, H, W)     uint8 {0, 1}, chunked along frames

Every chunk is written exactly once, aligned to chunk boundaries, by the one writer of its clip, and
chunks are written even when they hold only zeros, so a missing chunk file always means damage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

from featstore.errors import FeatstoreError, StoreError
from featstore.frame_stream import decodes_on_gpu
from featstore.store import ArtifactRecord, Store

GROUP_DIR = "features.zarr"
CHUNK_TARGET_BYTES = 1 << 20
MAX_CHUNK_FRAMES = 64  # bounds a clip's write buffer; arrays of under 16 kB a frame get chunks under 1 MB
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# numpy has no bfloat16: those features are stored as their raw 16-bit patterns and viewed back in torch.
_NUMPY_STORAGE = {"float16": "float16", "bfloat16": "uint16", "float32": "float32"}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise StoreError(f"--dtype {name!r} is not supported: use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise StoreError(f"feature dtype {dtype} is not supported: use one of {', '.join(DTYPES)}")


def chunk_frames(frame_bytes: int, n_frames: int) -> int:
    """Frames per chunk so that a chunk holds about ``CHUNK_TARGET_BYTES`` or more (one clip, one writer).

    A power of two, at most ``MAX_CHUNK_FRAMES``: a clip's arrays are written in spans that align with every
    array's chunks (their least common multiple), and powers of two keep that span the longest chunk, so a
    build buffers at most ``MAX_CHUNK_FRAMES`` frames per clip whatever the clip's length. Arbitrary counts
    (18, 35, 37 frames) would align only every 23,310 frames: whole clips held in memory.
    """
    wanted = math.ceil(CHUNK_TARGET_BYTES / max(1, frame_bytes))
    return max(1, min(n_frames, MAX_CHUNK_FRAMES, 1 << (wanted - 1).bit_length()))


def _compressor(itemsize: int) -> BloscCodec:
    # zarr's Blosc codec runs numcodecs' Blosc. Measured on DAVIS frames: zstd level 1 with byte
    # shuffle keeps most of level 3's ratio on float16 features (1.60 vs 1.72 for AlexNet) at ~4x the
    # speed, and shrinks 0/1 masks ~200x at over 2 GB/s, where bitshuffle was 2.5x slower.
    return BloscCodec(cname="zstd", clevel=1 if itemsize > 1 else 3, shuffle="shuffle", typesize=itemsize)


# Chunk files side by side ("c.0.0.0.0") rather than a folder per chunk: fewer inodes to create and flush.
_FLAT_KEYS = DefaultChunkKeyEncoding(separator=".")


def features_path(layer: str, clip: str) -> str:
    return f"features/{layer}/{clip}"


def masks_path(clip: str) -> str:
    return f"masks/{clip}"


class ClipArrays:
    """The arrays of one clip while it is being written: features per layer, and its masks."""

    def __init__(
        self,
        group: zarr.Group,
        clip: str,
        n_frames: int,
        feature_shapes: dict[str, tuple[int, int, int]],
        dtype: str,
        mask_size: tuple[int, int] | None,
        attrs: dict[str, Any],
    ) -> None:
        self.clip = clip
        self.n_frames = n_frames
        self.dtype = dtype
        storage = np.dtype(_NUMPY_STORAGE[dtype])
        self.features: dict[str, zarr.Array] = {}
        for layer, (channels, height, width) in feature_shapes.items():
            per_frame = channels * height * width * storage.itemsize
            self.features[layer] = group.create_array(
                features_path(layer, clip),
                shape=(n_frames, channels, height, width),
                chunks=(chunk_frames(per_frame, n_frames), channels, height, width),
                dtype=storage,
                compressors=[_compressor(storage.itemsize)],
                fill_value=0,
                overwrite=True,
                config={"write_empty_chunks": True},
                chunk_key_encoding=_FLAT_KEYS,
                attributes={**attrs, "layer": layer, "featstore_dtype": dtype},
            )
        self.masks: zarr.Array | None = None
        if mask_size is not None:
            height, width = mask_size
            self.masks = group.create_array(
                masks_path(clip),
                shape=(n_frames, height, width),
                chunks=(chunk_frames(height * width, n_frames), height, width),
                dtype="uint8",
                compressors=[_compressor(1)],
                fill_value=0,
                overwrite=True,
                config={"write_empty_chunks": True},
                chunk_key_encoding=_FLAT_KEYS,
                attributes=attrs,
            )

    def chunk_len(self) -> int:
        """The frame count that aligns writes with every array's chunks (their least common multiple)."""
        lengths = [a.chunks[0] for a in self.features.values()]
        if self.masks is not None:
            lengths.append(self.masks.chunks[0])
        return min(self.n_frames, math.lcm(*lengths))

    def write(self, start: int, features: dict[str, np.ndarray], masks: np.ndarray | None) -> None:
        """Write frames ``start:start+n``; callers pass chunk-aligned spans so no chunk is written twice."""
        stop = start + next(iter(features.values())).shape[0]
        for layer, values in features.items():
            self.features[layer][start:stop] = values
        if self.masks is not None and masks is not None:
            self.masks[start:stop] = masks


def to_storage(values: torch.Tensor) -> np.ndarray:
    """A CPU tensor as the numpy array zarr stores (bfloat16 as its raw bits)."""
    if values.dtype == torch.bfloat16:
        return values.view(torch.uint16).numpy()
    return values.numpy()


def open_group(path: Path, mode: Literal["r", "a"] = "a") -> zarr.Group:
    return zarr.open_group(store=str(path), mode=mode, zarr_format=3)


class FeatureArtifact:
    """A committed feature artifact opened for reading; each array is checked against the manifest once."""

    def __init__(self, store: Store, record: ArtifactRecord, *, verify: bool = True) -> None:
        self.store = store
        self.record = record
        self.path = store.path(record) / GROUP_DIR
        self.verify = verify
        self._checked: set[str] = set()
        self._group: zarr.Group | None = None

    @property
    def metadata(self) -> dict[str, Any]:
        return self.record.metadata

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.metadata["layers"])

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.metadata["dtype"]]

    @property
    def clips(self) -> tuple[str, ...]:
        return tuple(self.metadata["clips"])

    @property
    def backbone(self) -> dict[str, Any]:
        return dict(self.metadata["backbone"])

    @property
    def nparams_backbone(self) -> int:
        return int(self.metadata["nparams_backbone"])

    @property
    def nflops_backbone(self) -> int:
        return int(self.metadata["nflops_backbone"])

    @property
    def has_masks(self) -> bool:
        return bool(self.metadata["dataset"]["has_annotations"])

    @property
    def frame_size(self) -> tuple[int, int]:
        height, width = self.metadata["frame_size"]
        return int(height), int(width)

    def channels(self) -> dict[str, int]:
        return {layer: int(c) for layer, c in self.metadata["channels"].items()}

    def strides(self) -> dict[str, int]:
        return {layer: int(s) for layer, s in self.metadata["strides"].items()}

    def _array(self, relpath: str) -> zarr.Array:
        if self.verify and relpath not in self._checked:
            self.store.require_intact(self.record, f"{GROUP_DIR}/{relpath}/")
            self._checked.add(relpath)
        if self._group is None:
            self._group = open_group(self.path, mode="r")
        try:
            array = self._group[relpath]
        except KeyError as exc:
            raise StoreError(f"artifact {self.record.ref} has no array {relpath}: run `featstore verify {self.record.ref}`") from exc
        assert isinstance(array, zarr.Array)
        return array

    def _check_clip(self, clip: str) -> None:
        if clip not in self.metadata["clips"]:
            raise StoreError(f"clip {clip!r} is not in {self.record.ref}; it has {', '.join(self.clips)}")

    def _clip_attrs(self, clip: str) -> dict[str, Any]:
        self._check_clip(clip)
        return dict(self._array(features_path(self.layers[0], clip)).attrs)

    def rows(self, clip: str) -> list[int]:
        """The dataset row index of each stored frame of the clip."""
        return [int(r) for r in self._clip_attrs(clip)["rows"]]

    def frame_numbers(self, clip: str) -> list[int]:
        return [int(f) for f in self._clip_attrs(clip)["frames"]]

    def read(self, clip: str, layer: str) -> torch.Tensor:
        """All frames of one clip and layer, ``(frames, C, h, w)`` in the stored dtype, on the CPU."""
        if layer not in self.layers:
            raise StoreError(f"layer {layer!r} is not in {self.record.ref}; it has {', '.join(self.layers)}")
        self._check_clip(clip)
        values = torch.from_numpy(np.ascontiguousarray(self._array(features_path(layer, clip))[...]))
        return values.view(torch.bfloat16) if self.metadata["dtype"] == "bfloat16" else values

    def read_masks(self, clip: str) -> torch.Tensor:
        """The clip's masks, ``(frames, H, W)`` uint8 in {0, 1}."""
        if not self.has_masks:
            raise StoreError(f"{self.record.ref} was built from a dataset without annotations: it has no masks")
        self._check_clip(clip)
        return torch.from_numpy(np.ascontiguousarray(self._array(masks_path(clip))[...]))


def open_features(store: Store, ref: str, *, verify: bool = True) -> FeatureArtifact:
    """Open a committed feature artifact by reference (``NAME:vN``, ``NAME:latest`` or ``NAME``)."""
    return FeatureArtifact(store, store.resolve(ref, type="features"), verify=verify)


def check_compatible(train: FeatureArtifact, val: FeatureArtifact) -> None:
    """Refuse validation features computed otherwise than the training features: a head scored on them
    would be judged on inputs it never saw the like of."""
    same = ("backbone", "layers", "dtype", "weights_digest", "preprocessing")
    differing = [k for k in same if train.metadata.get(k) != val.metadata.get(k)]
    if differing:
        decoded = decodes_on_gpu(train.metadata.get("preprocessing") or {}) != decodes_on_gpu(
            val.metadata.get("preprocessing") or {}
        )
        raise FeatstoreError(
            f"features {val.record.ref} differ from the training features {train.record.ref} in "
            f"{', '.join(differing)}: build both with the same backbone, weights, layers and dtype"
            + (", both on a GPU (nvJPEG decodes their JPEGs) or both on the CPU" if decoded else "")
        )
