"""Synthetic device features whose first channel encodes the mask: a task a decoder can learn in seconds."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from decoders import DeviceFeatures

LAYERS = {"fine": (4, 8), "coarse": (16, 16)}  # layer -> (stride, channels)


def moving_disc(frames: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """(frames, H, W) uint8 {0, 1}: a disc of random radius moving in a straight line across the clip."""
    height, width = size
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    start, end = torch.rand(2, 2, generator=generator) * torch.tensor([height, width])
    radius = float(0.15 + 0.2 * torch.rand((), generator=generator)) * min(height, width)
    masks = []
    for t in torch.linspace(0, 1, frames):
        cy, cx = start + t * (end - start)
        masks.append(((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() < radius)
    return torch.stack(masks).to(torch.uint8)


def encode(masks: torch.Tensor, generator: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Per-layer features: channel 0 is the mask averaged to the layer's grid plus noise, the rest noise."""
    height, width = masks.shape[-2:]
    features = {}
    for layer, (stride, channels) in LAYERS.items():
        grid = (height // stride, width // stride)
        coverage = F.adaptive_avg_pool2d(masks[:, None].float(), grid)[:, 0]
        values = torch.randn(masks.shape[0], channels, *grid, generator=generator)
        values[:, 0] = 0.3 * values[:, 0] + 2.0 * coverage - 1.0
        features[layer] = values.to(dtype)
    return features


def synthetic_features(
    clips: dict[str, int],
    *,
    size: tuple[int, int] = (64, 96),
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
    device: str = "cpu",
) -> DeviceFeatures:
    """Clips of moving discs with features that encode them, built through ``DeviceFeatures.from_tensors``."""
    generator = torch.Generator().manual_seed(seed)
    masks = [moving_disc(n, size, generator) for n in clips.values()]
    encoded = [encode(m, generator, dtype) for m in masks]
    features = {layer: [e[layer] for e in encoded] for layer in LAYERS}
    strides = {layer: stride for layer, (stride, _) in LAYERS.items()}
    return DeviceFeatures.from_tensors(features, masks, list(clips), device, strides=strides)
