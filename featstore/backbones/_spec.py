"""The frozen description of a backbone: what it can return, at which resolution, with which preprocessing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from featstore.errors import BackboneError

FAMILIES = ("torchvision", "timm", "efficientnet_lite", "test")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """Layers, channels, strides and normalization of one backbone; written into every feature artifact."""

    name: str
    family: str
    layers: tuple[str, ...]
    default_layers: tuple[str, ...]
    channels: dict[str, int]
    strides: dict[str, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise BackboneError(
                f"backbone {self.name!r}: unknown family {self.family!r}; use one of {FAMILIES}"
            )
        if not self.layers:
            raise BackboneError(f"backbone {self.name!r} declares no layers")
        if len(set(self.layers)) != len(self.layers):
            raise BackboneError(f"backbone {self.name!r} declares a layer twice: {self.layers}")
        for field_name in ("channels", "strides"):
            table = getattr(self, field_name)
            if set(table) != set(self.layers):
                raise BackboneError(
                    f"backbone {self.name!r}: {field_name} must give exactly the layers {self.layers}"
                )
        unknown = [layer for layer in self.default_layers if layer not in self.layers]
        if unknown or not self.default_layers:
            raise BackboneError(
                f"backbone {self.name!r}: default layers {self.default_layers} not among {self.layers}"
            )
        if len(self.mean) != 3 or len(self.std) != 3:
            raise BackboneError(f"backbone {self.name!r}: mean and std need three values (RGB)")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types only, in a fixed key order, so the dict hashes and round-trips."""
        return {
            "name": self.name,
            "family": self.family,
            "layers": list(self.layers),
            "default_layers": list(self.default_layers),
            "channels": {layer: self.channels[layer] for layer in self.layers},
            "strides": {layer: self.strides[layer] for layer in self.layers},
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackboneSpec:
        """Inverse of :meth:`to_dict`; validates while rebuilding."""
        try:
            return cls(
                name=str(data["name"]),
                family=str(data["family"]),
                layers=tuple(str(x) for x in data["layers"]),
                default_layers=tuple(str(x) for x in data["default_layers"]),
                channels={str(k): int(v) for k, v in data["channels"].items()},
                strides={str(k): int(v) for k, v in data["strides"].items()},
                mean=_triple(data["mean"]),
                std=_triple(data["std"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackboneError(
                f"malformed backbone spec ({exc!r}); expected the output of BackboneSpec.to_dict()"
            ) from exc


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)
