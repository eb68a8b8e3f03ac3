"""Segmentation heads over stored backbone features: per-layer feature maps in, full-resolution logits out.

Every head maps ``features[layer]`` (``(N, C, h, w)``, or ``(N, T, C, h, w)`` for temporal heads, which see
the frames at offsets ``-k..+k`` of the same clip) to logits at its finest stride (``coarse_logits``); the
base class resizes those bilinearly to ``(N, 1, H, W)`` at the frame's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from decoders._registry import register_decoder
from decoders.upsampling import resize_bilinear
from featstore.errors import FeatstoreError

NORMS = ("group", "batch", "none")
DEFAULT_DECODER = "fpn"
"""The head trained when none is named: on clips it never saw, fusing every stored layer with image-level
context beats one layer by a wide margin (``benchmarks/decoder_heads.py``: EfficientNet-Lite0 on DAVIS,
clip-level 3-fold, mean IoU 0.47 against 0.29 for ``conv``, better on every fold)."""


def select_layers(
    channels: dict[str, int], strides: dict[str, int], layers: Sequence[str] | None
) -> tuple[str, ...]:
    """The layers a head reads, finest stride first (ties keep the given order, which is shallow to deep)."""
    if not channels:
        raise FeatstoreError("a decoder needs at least one feature layer: the channels mapping is empty")
    if set(channels) != set(strides):
        raise FeatstoreError(
            f"decoder channels {sorted(channels)} and strides {sorted(strides)} name different layers: "
            "pass both for the same layers"
        )
    chosen = list(channels) if layers is None else list(layers)
    unknown = [layer for layer in chosen if layer not in channels]
    if unknown or not chosen:
        raise FeatstoreError(
            f"decoder layers {unknown or chosen} are not among the feature layers {list(channels)}: pick from those"
        )
    order = {layer: i for i, layer in enumerate(channels)}
    return tuple(sorted(dict.fromkeys(chosen), key=lambda layer: (strides[layer], order[layer])))


def norm_layer(kind: str, width: int) -> nn.Module:
    """BatchNorm by default (it validated best on unseen clips); GroupNorm where batches are tiny."""
    if kind == "group":
        groups = next(g for g in (8, 4, 2, 1) if width % g == 0)
        return nn.GroupNorm(groups, width)
    if kind == "batch":
        return nn.BatchNorm2d(width)
    if kind == "none":
        return nn.Identity()
    raise FeatstoreError(f"decoder norm {kind!r} is unknown: use one of {', '.join(NORMS)}")


def conv_norm_relu(c_in: int, c_out: int, kernel: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=norm == "none"),
        norm_layer(norm, c_out),
        nn.ReLU(inplace=True),
    )


class Decoder(nn.Module):
    """Base of every head: records its construction so a stored head can be rebuilt with ``spec()``."""

    name: ClassVar[str] = ""
    temporal_window: int = 0  # neighbours on each side the data layer gathers (0: the frame alone)

    def __init__(
        self,
        channels: dict[str, int],
        strides: dict[str, int],
        layers: Sequence[str] | None,
        config: dict[str, Any],
    ) -> None:
        super().__init__()
        self.layers = select_layers(channels, strides, layers)
        self.channels = {layer: int(channels[layer]) for layer in channels}
        self.strides = {layer: int(strides[layer]) for layer in strides}
        self.config = {"layers": list(self.layers), **config}

    @property
    def nparams(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def spec(self) -> dict[str, Any]:
        """JSON-ready description: ``create_decoder(s["name"], s["channels"], s["strides"], **s["config"])``."""
        return {
            "name": self.name,
            "channels": dict(self.channels),
            "strides": dict(self.strides),
            "config": dict(self.config),
            "temporal_window": self.temporal_window,
            "nparams": self.nparams,
        }

    def example_features(
        self, feature_sizes: dict[str, tuple[int, int]], batch: int = 1
    ) -> dict[str, Tensor]:
        """Zero inputs of the shapes this head expects, for shape checks and FLOP counting."""
        device = next(self.parameters()).device
        out: dict[str, Tensor] = {}
        for layer in self.layers:
            h, w = feature_sizes[layer]
            window = (2 * self.temporal_window + 1,) if self.temporal_window else ()
            out[layer] = torch.zeros((batch, *window, self.channels[layer], h, w), device=device)
        return out

    def nflops(self, feature_sizes: dict[str, tuple[int, int]]) -> int:
        """FLOPs of one frame's ``coarse_logits``, counted by ``torch.utils.flop_counter``.

        The closing resize to the frame is left out: it has no weights, and its count would describe how
        it is computed (two matmuls here, four taps in ``F.interpolate``), not the head. Counted in eval
        mode: in train mode the zero inputs would move BatchNorm's running statistics.
        """
        from featstore.accounting import count_flops

        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                return int(count_flops(self.coarse_logits, self.example_features(feature_sizes)))
        finally:
            self.train(was_training)

    def inputs(self, features: dict[str, Tensor]) -> list[Tensor]:
        """This head's layers, finest first, as the dtype of its weights unless autocast picks one."""
        missing = [layer for layer in self.layers if layer not in features]
        if missing:
            raise FeatstoreError(
                f"{self.name} decoder needs feature layers {list(self.layers)}; missing {missing}: "
                "train it on features that hold them"
            )
        expected = 5 if self.temporal_window else 4
        dtype = next(self.parameters()).dtype
        out = []
        for layer in self.layers:
            x = features[layer]
            if x.dim() != expected:
                raise FeatstoreError(
                    f"{self.name} decoder expects layer {layer!r} as a {expected}-d tensor "
                    f"({'N, T, C, h, w' if self.temporal_window else 'N, C, h, w'}), got shape {tuple(x.shape)}"
                )
            if not torch.is_autocast_enabled(x.device.type):
                x = x.to(dtype)
            out.append(x)
        return out

    def coarse_logits(self, features: dict[str, Tensor]) -> Tensor:
        """``(N, 1, h, w)`` logits at the head's own resolution; every head defines this."""
        raise NotImplementedError

    def forward(self, features: dict[str, Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        """``(N, 1, H, W)`` float32 logits at ``out_size``, bilinearly resized from ``coarse_logits``.

        Without ``out_size`` it returns ``coarse_logits`` as they are: the loss resizes them itself, chunk by
        chunk, and ``torch.func.functional_call`` reaches a module only through ``forward``.
        """
        coarse = self.coarse_logits(features)
        return coarse if out_size is None else resize_bilinear(coarse, out_size)


@register_decoder("linear")
class LinearHead(Decoder):
    """A 1x1 convolution on the deepest layer: the linear probe of how separable the features are."""

    def __init__(
        self, channels: dict[str, int], strides: dict[str, int], layers: Sequence[str] | None = None
    ):
        super().__init__(channels, strides, layers, {})
        self.layers = self.layers[-1:]
        self.config["layers"] = list(self.layers)
        self.classifier = nn.Conv2d(self.channels[self.layers[0]], 1, 1)

    def coarse_logits(self, features: dict[str, Tensor]) -> Tensor:
        (x,) = self.inputs(features)
        return self.classifier(x)


@register_decoder("conv")
class ConvHead(Decoder):
    """3x3 conv, ReLU, 1x1 conv on the deepest layer: the head of the contest's precompute notebooks."""

    def __init__(
        self,
        channels: dict[str, int],
        strides: dict[str, int],
        layers: Sequence[str] | None = None,
        hidden: int = 64,
    ):
        super().__init__(channels, strides, layers, {"hidden": hidden})
        self.layers = self.layers[-1:]
        self.config["layers"] = list(self.layers)
        self.body = nn.Sequential(
            nn.Conv2d(self.channels[self.layers[0]], hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
        )

    def coarse_logits(self, features: dict[str, Tensor]) -> Tensor:
        (x,) = self.inputs(features)
        return self.body(x)


class GlobalMean(nn.Module):
    """Mean over the spatial grid, ``(N, C, 1, 1)``: ``AdaptiveAvgPool2d(1)``, which vmap can batch."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1), keepdim=True)


class TopDown(nn.Module):
    """FPN top-down path over lateral maps (finest first): upsample, add, 3x3 smooth; global context on top."""

    def __init__(self, levels: int, width: int, norm: str, context: bool) -> None:
        super().__init__()
        self.smooth = nn.ModuleList(conv_norm_relu(width, width, 3, norm) for _ in range(levels))
        # Image-level context (as in PSPNet/ParseNet): which object is "primary" is a whole-frame decision.
        self.context = (
            nn.Sequential(GlobalMean(), nn.Conv2d(width, width, 1), nn.ReLU(inplace=True))
            if context
            else None
        )
        self.predict = nn.Conv2d(width, 1, 1)

    def forward(self, laterals: list[Tensor]) -> Tensor:
        top = laterals[-1]
        if self.context is not None:
            top = top + self.context(top)
        top = self.smooth[-1](top)
        for level in range(len(laterals) - 2, -1, -1):
            lateral = laterals[level]
            top = F.interpolate(top, size=lateral.shape[-2:], mode="bilinear", align_corners=False) + lateral
            top = self.smooth[level](top)
        return self.predict(top)


@register_decoder("fpn")
class FPNHead(Decoder):
    """Feature-pyramid head: every given layer fused top-down at one width, predicted at the finest stride."""

    def __init__(
        self,
        channels: dict[str, int],
        strides: dict[str, int],
        layers: Sequence[str] | None = None,
        width: int = 64,
        norm: str = "batch",
        context: bool = True,
    ):
        super().__init__(channels, strides, layers, {"width": width, "norm": norm, "context": context})
        self.lateral = nn.ModuleList(
            nn.Sequential(nn.Conv2d(self.channels[layer], width, 1, bias=False), norm_layer(norm, width))
            for layer in self.layers
        )
        self.top_down = TopDown(len(self.layers), width, norm, context)

    def coarse_logits(self, features: dict[str, Tensor]) -> Tensor:
        laterals = [lateral(x) for lateral, x in zip(self.lateral, self.inputs(features), strict=True)]
        return self.top_down(laterals)


@register_decoder("temporal")
class TemporalFPNHead(Decoder):
    """FPN over a window of frames: per-frame laterals fused across offsets ``-window..+window`` per level.

    Inputs are ``(N, T, C, h, w)`` with ``T = 2 * window + 1``, the centre frame at ``T // 2``; the data
    layer clamps offsets at clip edges, so a clip's first frame sees itself in place of earlier frames.
    """

    temporal_window = 1

    def __init__(
        self,
        channels: dict[str, int],
        strides: dict[str, int],
        layers: Sequence[str] | None = None,
        width: int = 64,
        norm: str = "batch",
        context: bool = True,
        window: int = 1,
    ):
        if window < 1:
            raise FeatstoreError(f"temporal decoder window must be >= 1 neighbour per side, got {window}")
        super().__init__(
            channels, strides, layers, {"width": width, "norm": norm, "context": context, "window": window}
        )
        self.temporal_window = window
        steps = 2 * window + 1
        self.lateral = nn.ModuleList(
            nn.Conv2d(self.channels[layer], width, 1, bias=False) for layer in self.layers
        )
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(steps * width, width, 1, bias=False), norm_layer(norm, width))
            for _ in self.layers
        )
        self.top_down = TopDown(len(self.layers), width, norm, context)

    def coarse_logits(self, features: dict[str, Tensor]) -> Tensor:
        laterals = []
        steps = 2 * self.temporal_window + 1
        for lateral, fuse, x in zip(self.lateral, self.fuse, self.inputs(features), strict=True):
            n, t, c, h, w = x.shape
            if t != steps:
                raise FeatstoreError(
                    f"temporal decoder with window {self.temporal_window} expects {steps} frames per sample, got {t}"
                )
            per_frame = lateral(x.reshape(n * t, c, h, w))
            laterals.append(fuse(per_frame.reshape(n, t * per_frame.shape[1], h, w)))
        return self.top_down(laterals)
