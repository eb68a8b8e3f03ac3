"""What every backbone family implements: a spec, layer-name resolution, and a truncated model builder."""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from featstore.backbones._spec import BackboneSpec


class BackboneDefinition(ABC):
    """One nameable backbone. Instances are cached per name, so ``spec`` may be computed once."""

    @abstractmethod
    def spec(self) -> BackboneSpec:
        """Layers, channels, strides and normalization; must not download or load weights."""

    @abstractmethod
    def build(self, layers: tuple[str, ...], *, pretrained: bool) -> nn.Module:
        """A module mapping a normalized float batch to ``{layer: (N, C, h, w)}`` for ``layers``.

        It holds only the modules needed for the deepest of ``layers``, so its parameters are exactly those
        that run. ``pretrained`` loads ImageNet weights or raises BackboneError naming the missing file;
        otherwise parameters come from the global RNG, which the caller seeds.
        """

    def resolve_layer(self, layer: str) -> str | None:
        """The canonical name for what the user typed, or None when unknown."""
        return layer if layer in self.spec().layers else None

    def layer_hint(self) -> str:
        """Extra words for the unknown-layer error (e.g. that stage indices are accepted)."""
        return ""
