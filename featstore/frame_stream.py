"""Decoded frames in batches, read ahead of the consumer so JPEG decoding overlaps backbone compute.

On CUDA threads read the JPEG bytes and the GPU decodes them (nvJPEG through ``torchvision.io.decode_jpeg``)
on a stream of its own; other formats, and on the CPU every frame, are decoded by PIL on worker threads,
which releases the GIL. Only a bounded number of batches is ever in flight, whatever the dataset's size.

The two decoders do not give the same pixels: nvJPEG fills subsampled chroma by repetition where libjpeg
(PIL) interpolates, about half a grey level apart on average on DAVIS frames and a few percent apart in
the features. So the decoder is part of what a feature artifact records (``with_jpeg_decoder``), and a
backbone run for a decoder decodes as its training features did.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision.io

from featstore.datasets import TAIL_BYTES, FrameRecord, has_end_marker, read_frame, read_mask
from featstore.errors import DatasetError

# The preprocessing entry of features whose JPEGs nvJPEG decoded; features without it were decoded by PIL.
JPEG_DECODER = "jpeg_decoder"
NVJPEG = "nvjpeg"


def with_jpeg_decoder(preprocessing: dict[str, Any], on_gpu: bool) -> dict[str, Any]:
    """A backbone's preprocessing plus how JPEGs are decoded; PIL's decoding adds nothing, keeping its keys."""
    return {**preprocessing, JPEG_DECODER: NVJPEG} if on_gpu else dict(preprocessing)


def decodes_on_gpu(preprocessing: dict[str, Any]) -> bool:
    """Whether features with this recorded preprocessing had their JPEGs decoded by nvJPEG."""
    return preprocessing.get(JPEG_DECODER) == NVJPEG


def backbone_preprocessing(preprocessing: dict[str, Any]) -> dict[str, Any]:
    """The recorded preprocessing without the decoder: what the backbone itself does to a frame."""
    return {k: v for k, v in preprocessing.items() if k != JPEG_DECODER}


def _complete(encoded: torch.Tensor) -> bool:
    """Whether JPEG bytes end in the end-of-image marker: nvJPEG may decode a truncated file to garbage
    without an error, where PIL names it."""
    return has_end_marker(bytes(encoded[-TAIL_BYTES:].tolist()), "JPEG")


@dataclass
class FrameBatch:
    """Frames of one size, in dataset order, as ``(N, 3, H, W)`` uint8 on the target device."""

    records: list[FrameRecord]
    pixels: torch.Tensor
    masks: np.ndarray | None  # (N, H, W) uint8 {0, 1}, or None when the frames have no annotations


def _read_bytes(record: FrameRecord) -> torch.Tensor:
    try:
        data = record.raw.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read frame {record.raw}: {exc.strerror}; fix or remove that file") from exc
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _load_cpu(record: FrameRecord) -> torch.Tensor:
    """(H, W, 3): decoders produce pixels interleaved, and stacking them so keeps the batch channels-last."""
    return torch.from_numpy(read_frame(record.raw))


def _is_jpeg(record: FrameRecord) -> bool:
    return record.raw.suffix.lower() in (".jpg", ".jpeg")


def _read_annotation(record: FrameRecord) -> np.ndarray:
    if record.annotation is None:
        raise DatasetError(f"frame {record.raw} has no mask, but its dataset was read as annotated")
    return read_mask(record.annotation)


@dataclass
class _Pending:
    records: list[FrameRecord]
    frames: list[Future]
    masks: list[Future]


def _check_mask(record: FrameRecord, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if mask.shape != size:
        raise DatasetError(
            f"mask {record.annotation} is {mask.shape[1]}x{mask.shape[0]} but its frame is {size[1]}x{size[0]}: "
            "masks must match their frames"
        )
    return mask


class FrameStream:
    """Iterate ``FrameBatch`` es over ``records``, decoding up to ``prefetch`` batches ahead.

    ``decode_on_device`` decodes JPEGs with torchvision on ``device`` (nvJPEG on CUDA, where it is the
    default) instead of PIL on threads.
    """

    def __init__(
        self,
        records: Sequence[FrameRecord],
        batch_size: int,
        device: torch.device,
        *,
        with_masks: bool,
        prefetch: int = 2,
        workers: int | None = None,
        decode_on_device: bool | None = None,
    ) -> None:
        self.records = list(records)
        self.batch_size = batch_size
        self.device = device
        self.with_masks = with_masks
        self.prefetch = prefetch
        self.workers = workers or min(8, max(2, os.cpu_count() or 2))
        self.decode_on_device = device.type == "cuda" if decode_on_device is None else decode_on_device
        # nvJPEG writes on a stream of its own into memory allocated on the caller's current stream, and
        # never waits for that stream: memory the backbone freed, with kernels still queued on it, could be
        # overwritten. Decoding with a dedicated stream current gives the outputs memory of their own.
        self._decode_stream = torch.cuda.Stream(device) if self.decode_on_device and device.type == "cuda" else None
        # JPEGs PIL decoded although this stream decodes on the device, with the reason: said once on stderr.
        self.fallbacks: list[tuple[str, str]] = []

    def _decode_batch(self, pool: ThreadPoolExecutor, batch: list[FrameRecord]) -> _Pending:
        frames = [
            pool.submit(_read_bytes if self.decode_on_device and _is_jpeg(r) else _load_cpu, r) for r in batch
        ]
        masks = [pool.submit(_read_annotation, r) for r in batch] if self.with_masks else []
        return _Pending(batch, frames, masks)

    def _on_device(self, image: torch.Tensor) -> torch.Tensor:
        """A PIL-decoded ``(H, W, 3)`` frame as ``(3, H, W)`` on the device, like nvJPEG's output."""
        planar = image.permute(2, 0, 1)
        if self.device.type != "cuda":
            return planar
        return planar.pin_memory().to(self.device, non_blocking=True)

    def _decode_jpegs(self, records: list[FrameRecord], encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        """The JPEGs of a batch decoded in one call on the device, as RGB whatever their colour model.

        Files nvJPEG cannot take (truncated, or a colour model it refuses) are decoded by PIL instead,
        which names a broken file; the first such file is reported on stderr.
        """
        whole = [i for i, data in enumerate(encoded) if _complete(data)]
        for i in range(len(records)):
            if i not in whole:
                self._fell_back(records[i], "it does not end in a JPEG end-of-image marker")
        images: list[torch.Tensor | None] = [None] * len(records)
        try:
            decoded = self._nvjpeg([encoded[i] for i in whole])
            for i, image in zip(whole, decoded, strict=True):
                images[i] = image
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # one file spoils the batch call: find which, one at a time
            for i in whole:
                try:
                    images[i] = self._nvjpeg([encoded[i]])[0]
                except torch.OutOfMemoryError:
                    raise
                except RuntimeError as exc:
                    self._fell_back(records[i], str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return [image if image is not None else self._on_device(_load_cpu(r))
                for r, image in zip(records, images, strict=True)]

    def _nvjpeg(self, encoded: list[torch.Tensor]) -> list[torch.Tensor]:
        mode = torchvision.io.ImageReadMode.RGB
        if not encoded:
            return []
        if self._decode_stream is None:
            return list(torchvision.io.decode_jpeg(encoded, mode=mode, device=self.device))
        with torch.cuda.stream(self._decode_stream):
            images = list(torchvision.io.decode_jpeg(encoded, mode=mode, device=self.device))
        consumer = torch.cuda.current_stream(self.device)
        consumer.wait_stream(self._decode_stream)
        for image in images:
            image.record_stream(consumer)
        return images

    def _fell_back(self, record: FrameRecord, reason: str) -> None:
        if not self.fallbacks:
            print(f"featstore: warning: decoding {record.raw} with PIL, not on {self.device}: {reason}; such "
                  "frames differ slightly from device-decoded ones", file=sys.stderr)
        self.fallbacks.append((str(record.raw), reason))

    def _images(self, pending: _Pending) -> list[torch.Tensor]:
        loaded = [f.result() for f in pending.frames]
        if not self.decode_on_device:
            return loaded
        records = pending.records
        images = [data if _is_jpeg(r) else self._on_device(data) for r, data in zip(records, loaded, strict=True)]
        jpegs = [i for i, r in enumerate(records) if _is_jpeg(r)]
        if jpegs:
            decoded = self._decode_jpegs([records[i] for i in jpegs], [loaded[i] for i in jpegs])
            for i, image in zip(jpegs, decoded, strict=True):
                images[i] = image
        return images

    def _finish(self, pending: _Pending) -> list[FrameBatch]:
        batch = pending.records
        images = self._images(pending)
        masks_by_record = [f.result() for f in pending.masks] if self.with_masks else None
        # Batches may span clips; frames of different sizes go into separate sub-batches.
        groups: list[tuple[list[FrameRecord], list[torch.Tensor]]] = []
        for record, image in zip(batch, images, strict=True):
            if groups and groups[-1][1][0].shape == image.shape:
                groups[-1][0].append(record)
                groups[-1][1].append(image)
            else:
                groups.append(([record], [image]))
        out = []
        start = 0
        for records, group in groups:
            # PIL decodes interleaved (H, W, 3): stacking is a plain copy and the permuted view is already
            # the channels-last batch the backbone runs on, so no transposing copy is made.
            if self.decode_on_device:
                pixels = torch.stack(group)
            else:
                stacked = torch.stack(group)
                if self.device.type == "cuda":  # PIL's frames for a GPU that does not decode them
                    stacked = stacked.pin_memory().to(self.device, non_blocking=True)
                pixels = stacked.permute(0, 3, 1, 2)
            masks = None
            if masks_by_record is not None:
                size = (int(pixels.shape[2]), int(pixels.shape[3]))
                spans = zip(records, masks_by_record[start : start + len(records)], strict=True)
                masks = np.stack([_check_mask(r, m, size) for r, m in spans])
            start += len(records)
            out.append(FrameBatch(records=records, pixels=pixels, masks=masks))
        return out

    def __iter__(self) -> Iterator[FrameBatch]:
        batches = [self.records[i : i + self.batch_size] for i in range(0, len(self.records), self.batch_size)]
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="featstore-decode") as pool:
            pending: deque[_Pending] = deque()
            upcoming = iter(batches)
            for batch in upcoming:
                pending.append(self._decode_batch(pool, batch))
                if len(pending) > self.prefetch:
                    break
            while pending:
                current = pending.popleft()
                nxt = next(upcoming, None)
                if nxt is not None:
                    pending.append(self._decode_batch(pool, nxt))
                yield from self._finish(current)
