"""Bilinear resizing as two small matrix products, the same values as ``F.interpolate`` at a fraction of the cost.

Heads predict at stride 8-32 and are scored at full resolution, so every training step resizes logits by
up to 32x and back-propagates through that. ``F.interpolate``'s CPU backward scatters into the input one
output pixel at a time and was the largest single cost of a linear head's step; bilinear interpolation
is separable and linear, so it is exactly ``A_h @ x @ A_w.T`` with fixed interpolation matrices, whose
forward and backward are both dense matmuls (BLAS on the CPU, tensor cores on CUDA). ``Decoder.forward``
resizes with ``resize_bilinear``; the training loss applies the same matrices a few frames at a time.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.lru_cache(maxsize=64)
def interpolation_matrix(out_size: int, in_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(out_size, in_size)`` weights of 1-d linear interpolation, ``align_corners=False``.

    Source positions follow PyTorch's rule for a given output size: ``(i + 0.5) * in/out - 0.5``, clamped
    at 0, blending the two nearest inputs (the last input repeats past the edge).
    """
    scale = in_size / out_size
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * scale - 0.5).clamp(min=0.0)
    lower = source.floor().long().clamp(max=in_size - 1)
    upper = (lower + 1).clamp(max=in_size - 1)
    upper_weight = source - lower
    matrix = torch.zeros((out_size, in_size), dtype=torch.float64)
    rows = torch.arange(out_size)
    matrix.index_put_((rows, lower), 1.0 - upper_weight, accumulate=True)
    matrix.index_put_((rows, upper), upper_weight, accumulate=True)
    return matrix.to(device=device, dtype=dtype)


def resize_bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for ``(..., h, w)`` input, in float32.

    Runs outside autocast: the interpolation weights are not exact in bfloat16, and the loss reads the
    result in float32 anyway.
    """
    height, width = int(size[0]), int(size[1])
    with torch.autocast(device_type=x.device.type, enabled=False):
        x = x.float()
        rows = interpolation_matrix(height, x.shape[-2], x.device, x.dtype)
        cols = interpolation_matrix(width, x.shape[-1], x.device, x.dtype)
        # Widen first: the small side is multiplied while the map is still short.
        return torch.matmul(rows, torch.matmul(x, cols.T))
