"""One extraction contract for every backbone: uint8 frames in, a dict of per-layer feature maps out."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor, nn

from featstore.accounting import count_parameters
from featstore.backbones._spec import BackboneSpec
from featstore.backbones._weights import state_dict_digest

LOW_PRECISION = (torch.float16, torch.bfloat16)
STORAGE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class FeatureExtractor(nn.Module):
    """A frozen, truncated backbone plus its preprocessing; ``nparams`` counts exactly what runs."""

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        spec: BackboneSpec,
        body: nn.Module,
        layers: tuple[str, ...],
        *,
        weights: str,
        pretrained: bool,
        seed: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage dtype must be one of {STORAGE_DTYPES}, got {dtype}")
        self.spec = spec
        self.layers = tuple(layers)
        self.weights = weights
        self.pretrained = pretrained
        self.seed = seed
        self.dtype = dtype
        self.body = body.eval().requires_grad_(False)
        # Scaled to 0..255 so normalization of uint8 frames is one subtract and one divide.
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, 3, 1, 1) * 255.0, persistent=False)
        self.weights_digest = state_dict_digest(self.state_dict())
        self._channels_last = False
        self.train(False)

    @property
    def nparams(self) -> int:
        """Parameters of the truncated backbone: every module in it runs to produce the selected layers."""
        return count_parameters(self.body)

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always eval: the backbone is frozen, so batch-norm statistics and dropout never change."""
        return super().train(False)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Normalized float batch (N, 3, H, W) -> {layer: (N, C, h, w)} in compute precision."""
        out = self.body(x)
        return {layer: out[layer] for layer in self.layers}

    def extract(self, frames: Tensor) -> dict[str, Tensor]:
        """uint8 RGB frames (N, 3, H, W) -> contiguous features in the storage dtype, on the frames' device.

        Convolutions run channels-last (1.4-1.6x faster than NCHW for AlexNet and EfficientNet-Lite on
        CPU too); on CUDA under autocast when the storage dtype is half precision, on CPU in float32 with
        only the result cast.
        """
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(
                f"extract expects uint8 frames (N, 3, H, W), got {frames.dtype} {tuple(frames.shape)}"
            )
        device = self.mean.device
        frames = frames.to(device, non_blocking=True)
        cuda = device.type == "cuda"
        if not self._channels_last:
            self.body.to(memory_format=torch.channels_last)
            self._channels_last = True
        with torch.inference_mode():
            x = frames.float().sub_(self.mean).div_(self.std)  # in place: no extra full-size buffers
            x = x.contiguous(memory_format=torch.channels_last)
            autocast: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if cuda and self.dtype in LOW_PRECISION:
                autocast = torch.autocast("cuda", dtype=self.dtype)
            with autocast:
                features = self(x)
            return {layer: f.to(self.dtype).contiguous() for layer, f in features.items()}

    def preprocessing(self) -> dict[str, Any]:
        """Canonical description of what happens to a frame before the backbone (part of the content key)."""
        return {
            "input": "uint8 RGB (N, 3, H, W)",
            "resize": "none",
            "crop": "none",
            "scale": "x / 255",
            "mean": list(self.spec.mean),
            "std": list(self.spec.std),
        }

    def describe(self) -> dict[str, Any]:
        """Everything that identifies these features, as JSON types: spec, weights, layers, dtype, size."""
        return {
            **self.spec.to_dict(),
            "weights": self.weights,
            "pretrained": self.pretrained,
            "seed": self.seed,
            "weights_digest": self.weights_digest,
            "selected_layers": list(self.layers),
            "dtype": str(self.dtype).removeprefix("torch."),
            "nparams": self.nparams,
        }
