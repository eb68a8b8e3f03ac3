"""Every frame's features held on one device, so a training step is an index selection, not a data load.

Frames of all clips are concatenated clip after clip; each frame knows its clip and position, so the
temporal neighbours of a frame are precomputed index arithmetic, clamped to the frame's own clip.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from featstore.errors import FeatstoreError

if TYPE_CHECKING:
    from featstore.features import FeatureArtifact


class DeviceFeatures:
    """Per-layer ``(N, C, h, w)`` channels-last features in their stored dtype, ``(N, H, W)`` uint8 masks, clip bookkeeping."""

    def __init__(
        self,
        features: dict[str, Tensor],
        masks: Tensor | None,
        clips: Sequence[str],
        clip_lengths: Sequence[int],
        frame_size: tuple[int, int],
        strides: dict[str, int] | None = None,
        rows: Sequence[int] | None = None,
    ) -> None:
        if not features:
            raise FeatstoreError("device features need at least one layer")
        if len(clips) != len(clip_lengths) or len(set(clips)) != len(clips):
            raise FeatstoreError(f"device features need one length per distinct clip, got {list(clips)}")
        if any(n < 1 for n in clip_lengths):
            raise FeatstoreError(f"every clip needs at least one frame, got lengths {list(clip_lengths)}")
        total = sum(clip_lengths)
        first = next(iter(features.values()))
        self.device = first.device
        for layer, values in features.items():
            if values.dim() != 4 or values.shape[0] != total or values.device != self.device:
                raise FeatstoreError(
                    f"layer {layer!r} must be ({total}, C, h, w) on {self.device}, got {tuple(values.shape)} "
                    f"on {values.device}"
                )
        if masks is not None and (masks.shape != (total, *frame_size) or masks.dtype != torch.uint8):
            raise FeatstoreError(
                f"masks must be uint8 ({total}, {frame_size[0]}, {frame_size[1]}), got {masks.dtype} {tuple(masks.shape)}"
            )
        # Channels-last: oneDNN and cuDNN run the heads' convolutions without transposing each batch,
        # and selecting frames keeps the layout.
        self.features = {
            layer: values.contiguous(memory_format=torch.channels_last) for layer, values in features.items()
        }
        self.masks = masks.to(self.device) if masks is not None else None
        self.clips = tuple(clips)
        self.clip_lengths = tuple(int(n) for n in clip_lengths)
        self.frame_size = (int(frame_size[0]), int(frame_size[1]))
        self.channels = {layer: int(v.shape[1]) for layer, v in self.features.items()}
        self.feature_sizes = {layer: (int(v.shape[2]), int(v.shape[3])) for layer, v in self.features.items()}
        # Without recorded strides, the ratio of frame to feature height is the stride (up to padding).
        self.strides = (
            {layer: int(strides[layer]) for layer in self.features}
            if strides is not None
            else {
                layer: max(1, round(self.frame_size[0] / h)) for layer, (h, _) in self.feature_sizes.items()
            }
        )
        self.rows = list(rows) if rows is not None else list(range(total))
        lengths = torch.tensor(self.clip_lengths, device=self.device)
        starts = torch.cumsum(lengths, 0) - lengths
        self.clip_ids = torch.repeat_interleave(torch.arange(len(self.clips), device=self.device), lengths)
        self.clip_starts = starts[self.clip_ids]
        self.positions = torch.arange(total, device=self.device) - self.clip_starts
        self.frame_clip_lengths = lengths[self.clip_ids]
        self._neighbours: dict[int, Tensor] = {}

    def __len__(self) -> int:
        return int(self.clip_ids.shape[0])

    def __repr__(self) -> str:
        layers = ", ".join(f"{k}: {tuple(v.shape[1:])} {v.dtype}" for k, v in self.features.items())
        return f"DeviceFeatures({len(self)} frames, {len(self.clips)} clips, {{{layers}}}, on {self.device})"

    @property
    def nbytes(self) -> int:
        held = [*self.features.values(), *([self.masks] if self.masks is not None else [])]
        return sum(t.numel() * t.element_size() for t in held)

    @property
    def has_masks(self) -> bool:
        return self.masks is not None

    @classmethod
    def from_tensors(
        cls,
        features: dict[str, list[Tensor]],
        masks: list[Tensor] | None,
        clips: list[str],
        device: torch.device | str,
        *,
        strides: dict[str, int] | None = None,
        frame_size: tuple[int, int] | None = None,
    ) -> DeviceFeatures:
        """From per-clip tensors: ``features[layer][i]`` is clip ``clips[i]`` as ``(frames, C, h, w)``."""
        if not clips:
            raise FeatstoreError("device features need at least one clip")
        if masks is None and frame_size is None:
            raise FeatstoreError("without masks, pass frame_size=(H, W) so heads know the output resolution")
        for layer, per_clip in features.items():
            if len(per_clip) != len(clips):
                raise FeatstoreError(
                    f"layer {layer!r} has {len(per_clip)} clip tensors for {len(clips)} clips"
                )
        if masks is not None and len(masks) != len(clips):
            raise FeatstoreError(f"masks are missing: {len(masks)} mask tensors for {len(clips)} clips")
        lengths = []
        for i, clip in enumerate(clips):
            counts = {layer: int(per_clip[i].shape[0]) for layer, per_clip in features.items()}
            if masks is not None:
                counts["masks"] = int(masks[i].shape[0])
            if len(set(counts.values())) != 1:
                raise FeatstoreError(f"clip {clip!r} has differing frame counts per layer and mask: {counts}")
            lengths.append(next(iter(counts.values())))
        if frame_size is not None:
            size = (int(frame_size[0]), int(frame_size[1]))
        else:
            assert masks is not None
            size = (int(masks[0].shape[-2]), int(masks[0].shape[-1]))
        stacked = {layer: _concat(layer, per_clip, clips, device) for layer, per_clip in features.items()}
        stacked_masks = _concat_masks(masks, clips, size, device) if masks is not None else None
        return cls(stacked, stacked_masks, clips, lengths, size, strides)

    @classmethod
    def from_artifact(
        cls,
        artifact: FeatureArtifact,
        clips: Sequence[str] | None,
        device: torch.device | str,
        *,
        layers: Sequence[str] | None = None,
        require_masks: bool = True,
    ) -> DeviceFeatures:
        """Load clips (all when ``None``) of a feature artifact onto ``device``, one clip in host memory at a time."""
        names, chosen = _selection(artifact, clips, layers)
        if require_masks and not artifact.has_masks:
            raise FeatstoreError(
                f"masks are missing: {artifact.record.ref} was built from dataset "
                f"{artifact.metadata['dataset']['name']!r}, which has frames without masks (a build of a partly "
                "annotated dataset names them); add the masks and build again, or train on features of a dataset "
                "annotated throughout"
            )
        lengths = [len(artifact.rows(clip)) for clip in names]
        rows = [row for clip in names for row in artifact.rows(clip)]
        total = sum(lengths)
        stacked: dict[str, Tensor] = {}
        masks = (
            torch.empty((total, *artifact.frame_size), dtype=torch.uint8, device=device)
            if artifact.has_masks
            else None
        )
        start = 0
        for clip, length in zip(names, lengths, strict=True):
            for layer in chosen:
                values = artifact.read(clip, layer)
                if layer not in stacked:
                    stacked[layer] = torch.empty(
                        (total, *values.shape[1:]),
                        dtype=values.dtype,
                        device=device,
                        memory_format=torch.channels_last,
                    )
                _copy_into(stacked[layer], start, values, f"layer {layer!r} of clip {clip!r}")
            if masks is not None:
                _copy_into(masks, start, artifact.read_masks(clip), f"masks of clip {clip!r}")
            start += length
        strides = artifact.strides()
        return cls(stacked, masks, names, lengths, artifact.frame_size, {k: strides[k] for k in chosen}, rows)

    @staticmethod
    def load_nbytes(
        artifact: FeatureArtifact, clips: Sequence[str] | None, *, layers: Sequence[str] | None = None
    ) -> int:
        """The ``nbytes`` that ``from_artifact`` with these clips and layers will hold, from metadata alone.

        Every chosen layer's ``(frames, C, h, w)`` in the stored dtype, plus ``(frames, H, W)`` uint8 masks
        when the artifact has them (``from_artifact`` loads them whenever it does); no chunk is read.
        """
        names, chosen = _selection(artifact, clips, layers)
        frames = sum(int(artifact.metadata["clips"][clip]) for clip in names)
        shapes = artifact.metadata["feature_shape"]
        per_frame = sum(math.prod(shapes[layer]) for layer in chosen) * artifact.dtype.itemsize
        if artifact.has_masks:
            per_frame += math.prod(artifact.frame_size)
        return frames * per_frame

    def neighbours(self, window: int) -> Tensor:
        """``(N, 2*window+1)`` frame indices at offsets ``-window..+window``, clamped within each frame's clip."""
        if window not in self._neighbours:
            offsets = torch.arange(-window, window + 1, device=self.device)
            position = (self.positions[:, None] + offsets[None, :]).clamp(min=0)
            position = torch.minimum(position, self.frame_clip_lengths[:, None] - 1)
            self._neighbours[window] = self.clip_starts[:, None] + position
        return self._neighbours[window]

    def gather(self, index: Tensor, window: int = 0) -> dict[str, Tensor]:
        """Features of frames ``index`` in the stored dtype: ``(B, C, h, w)``, or ``(B, T, C, h, w)`` with a window."""
        if window == 0:
            return {layer: values[index] for layer, values in self.features.items()}
        neighbours = self.neighbours(window)[index]
        flat = neighbours.reshape(-1)
        return {
            layer: values[flat].reshape(*neighbours.shape, *values.shape[1:])
            for layer, values in self.features.items()
        }

    def mask(self, index: Tensor) -> Tensor:
        if self.masks is None:
            raise FeatstoreError(
                "these features have no masks: training and scoring need an annotated dataset"
            )
        return self.masks[index]

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, shuffle: bool = True
    ) -> Iterator[Tensor]:
        """Index tensors on the device covering every frame once; shuffled with ``generator`` when asked."""
        if batch_size < 1:
            raise FeatstoreError(f"--batch-size must be >= 1, got {batch_size}")
        n = len(self)
        if shuffle:
            order = torch.randperm(n, generator=generator, device=self.device)
        else:
            order = torch.arange(n, device=self.device)
        yield from order.split(batch_size)

    def subset(self, clips: Sequence[str]) -> DeviceFeatures:
        """The frames of ``clips`` (in that order) as new device tensors."""
        unknown = [c for c in clips if c not in self.clips]
        if unknown:
            raise FeatstoreError(f"clips {unknown} are not among {list(self.clips)}")
        ids = [self.clips.index(c) for c in clips]
        index = torch.cat([torch.nonzero(self.clip_ids == i).flatten() for i in ids])
        return DeviceFeatures(
            {layer: values[index] for layer, values in self.features.items()},
            self.masks[index] if self.masks is not None else None,
            clips,
            [self.clip_lengths[i] for i in ids],
            self.frame_size,
            self.strides,
            [self.rows[i] for i in index.tolist()],
        )


def _selection(
    artifact: FeatureArtifact, clips: Sequence[str] | None, layers: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The clips (all when ``None``) and layers (all when ``None``) to load, checked against the artifact."""
    names = list(artifact.clips if clips is None else clips)
    chosen = list(artifact.layers if layers is None else layers)
    if not names:
        raise FeatstoreError(f"no clips selected from {artifact.record.ref}")
    unknown = [c for c in names if c not in artifact.clips]
    if unknown:
        raise FeatstoreError(
            f"clips {unknown} are not in {artifact.record.ref}; it has {list(artifact.clips)}"
        )
    missing = [layer for layer in chosen if layer not in artifact.layers]
    if missing:
        raise FeatstoreError(
            f"layers {missing} are not in {artifact.record.ref}; it has {list(artifact.layers)}"
        )
    return names, chosen


def _copy_into(target: Tensor, start: int, values: Tensor, what: str) -> None:
    expected = tuple(target.shape[1:])
    if tuple(values.shape[1:]) != expected:
        raise FeatstoreError(
            f"{what} has frames of shape {tuple(values.shape[1:])}, others {expected}: "
            "all frames must share one size; rebuild the features from frames of one resolution"
        )
    if values.dtype != target.dtype:
        raise FeatstoreError(
            f"{what} is {values.dtype}, other clips {target.dtype}: store one dtype per layer"
        )
    target[start : start + values.shape[0]].copy_(values)


def _concat(layer: str, per_clip: list[Tensor], clips: list[str], device: torch.device | str) -> Tensor:
    for clip, values in zip(clips, per_clip, strict=True):
        if values.dim() != 4:
            raise FeatstoreError(
                f"layer {layer!r} of clip {clip!r} must be (frames, C, h, w), got {tuple(values.shape)}"
            )
    total = sum(int(v.shape[0]) for v in per_clip)
    out = torch.empty(
        (total, *per_clip[0].shape[1:]),
        dtype=per_clip[0].dtype,
        device=device,
        memory_format=torch.channels_last,
    )
    start = 0
    for clip, values in zip(clips, per_clip, strict=True):
        _copy_into(out, start, values, f"layer {layer!r} of clip {clip!r}")
        start += values.shape[0]
    return out


def _concat_masks(
    masks: list[Tensor], clips: list[str], size: tuple[int, int], device: torch.device | str
) -> Tensor:
    total = sum(int(m.shape[0]) for m in masks)
    out = torch.empty((total, *size), dtype=torch.uint8, device=device)
    start = 0
    for clip, values in zip(clips, masks, strict=True):
        if values.dim() != 3:
            raise FeatstoreError(f"masks of clip {clip!r} must be (frames, H, W), got {tuple(values.shape)}")
        if values.numel() and int(values.max()) > 1:
            raise FeatstoreError(
                f"masks of clip {clip!r} hold values above 1: pass masks in {{0, 1}} (round(v / 255))"
            )
        _copy_into(out, start, values.to(torch.uint8), f"masks of clip {clip!r}")
        start += values.shape[0]
    return out
