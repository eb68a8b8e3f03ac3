"""Decoded frames in batches, read ahead of the consumer so JPEG decoding overlaps backbone compute.

On CUDA the file bytes are read by threads and decoded on the GPU (nvJPEG through
``torchvision.io.decode_jpeg``); on the CPU worker threads decode with PIL, which releases the GIL.
Only a bounded number of batches is ever in flight, whatever the dataset's size.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.io

from featstore.datasets import FrameRecord, read_frame, read_mask
from featstore.errors import DatasetError


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
    """Iterate ``FrameBatch`` es over ``records``, decoding up to ``prefetch`` batches ahead."""

    def __init__(
        self,
        records: Sequence[FrameRecord],
        batch_size: int,
        device: torch.device,
        *,
        with_masks: bool,
        prefetch: int = 2,
        workers: int | None = None,
    ) -> None:
        self.records = list(records)
        self.batch_size = batch_size
        self.device = device
        self.with_masks = with_masks
        self.prefetch = prefetch
        self.workers = workers or min(8, max(2, os.cpu_count() or 2))
        self._gpu_decode = device.type == "cuda"

    def _decode_batch(self, pool: ThreadPoolExecutor, batch: list[FrameRecord]) -> _Pending:
        loader = _read_bytes if self._gpu_decode else _load_cpu
        frames = [pool.submit(loader, r) for r in batch]
        masks = [pool.submit(_read_annotation, r) for r in batch] if self.with_masks else []
        return _Pending(batch, frames, masks)

    def _finish(self, pending: _Pending) -> list[FrameBatch]:
        batch = pending.records
        if self._gpu_decode:
            encoded = [f.result() for f in pending.frames]
            if all(r.raw.suffix.lower() in (".jpg", ".jpeg") for r in batch):
                images = list(torchvision.io.decode_jpeg(encoded, device=self.device))
            else:
                images = [torchvision.io.decode_image(e).to(self.device) for e in encoded]
            images = [img if img.shape[0] == 3 else img.expand(3, -1, -1) for img in images]
        else:
            images = [f.result() for f in pending.frames]
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
            # CPU frames decode interleaved (H, W, 3): stacking them is a plain copy and the permuted view
            # is already the channels-last batch the backbone runs on, so no transposing copy is made.
            pixels = torch.stack(group) if self._gpu_decode else torch.stack(group).permute(0, 3, 1, 2)
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
