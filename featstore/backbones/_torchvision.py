"""torchvision classification models as backbones: stage outputs found by shape, extracted with torch.fx.

Any name in ``torchvision.models.list_models(module=torchvision.models)`` works. Its layers are the stage
outputs: the last top-level module (or child of a top-level Sequential such as ``features``) at each output
stride, found by running the model once on the meta device. ``alexnet`` is registered explicitly with the
contest's layer names over its ``features`` stack.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

from featstore.backbones._definition import BackboneDefinition
from featstore.backbones._registry import BackboneSource, register_backbone, register_backbone_source
from featstore.backbones._spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from featstore.backbones._weights import downloads_allowed, missing_weights_error, torch_hub_checkpoint
from featstore.errors import BackboneError

# Probe input sizes, large so odd padding hardly moves the measured strides; one square size for fixed-size ViTs.
_PROBE_SIZES = (((640, 1920), (512, 1280)), ((224, 224),))
_NOT_STAGES = frozenset(
    {"classifier", "fc", "head", "heads", "avgpool", "dropout", "AuxLogits", "aux1", "aux2"}
)

# The contest's AlexNet layers: post-ReLU convolutions and pools of ``features`` (pool5 = the whole stack).
ALEXNET_NODES = {
    "conv1": "features.1",
    "pool1": "features.2",
    "conv2": "features.4",
    "pool2": "features.5",
    "conv3": "features.7",
    "conv4": "features.9",
    "conv5": "features.11",
    "pool5": "features.12",
}


@functools.cache
def torchvision_names() -> tuple[str, ...]:
    """Classification models only (no detection, segmentation or video)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


class TorchvisionBackbone(BackboneDefinition):
    """A torchvision classification model cut at its stage outputs."""

    def __init__(
        self, name: str, *, nodes: dict[str, str] | None = None, default_layers: tuple[str, ...] = ()
    ) -> None:
        self.name = name
        self._nodes = nodes  # layer name -> fx node; None: discover the stages
        self._default_layers = default_layers
        self._spec: BackboneSpec | None = None

    def spec(self) -> BackboneSpec:
        if self._spec is None:
            self._spec = self._probe()
        return self._spec

    def node(self, layer: str) -> str:
        return self._nodes[layer] if self._nodes is not None else layer

    def build(self, layers: tuple[str, ...], *, pretrained: bool) -> nn.Module:
        model = self._model(pretrained).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # fx notes on train/eval graph differences
            return create_feature_extractor(
                model, return_nodes={self.node(layer): layer for layer in layers}, suppress_diff_warning=True
            )

    def _model(self, pretrained: bool) -> nn.Module:
        if not pretrained:
            return torchvision.models.get_model(self.name, weights=None)
        weights = torchvision.models.get_model_weights(self.name).DEFAULT
        path = torch_hub_checkpoint(weights.url)
        if not path.is_file() and not downloads_allowed():
            raise missing_weights_error(f"torchvision {self.name} ({weights})", path, weights.url)
        try:
            return torchvision.models.get_model(self.name, weights=weights)
        except (RuntimeError, OSError, EOFError, ValueError) as exc:
            raise BackboneError(
                f"ImageNet weights file {path} for {self.name} cannot be loaded ({exc}); delete it and download "
                f"{weights.url} again"
            ) from exc

    def _probe(self) -> BackboneSpec:
        model = _meta_model(lambda: torchvision.models.get_model(self.name, weights=None))
        mean, std = _normalization(self.name)
        if self._nodes is not None:
            modules = [(layer, model.get_submodule(node)) for layer, node in self._nodes.items()]
        else:
            modules = _stage_candidates(model)
        found = _output_strides(model, modules)
        if self._nodes is not None:
            missing = [layer for layer in self._nodes if layer not in found]
            if missing:
                raise BackboneError(f"torchvision {self.name}: layers {missing} give no (N, C, H, W) output")
            layers = tuple(self._nodes)
        else:
            # the last module at each stride is that stage's output
            last: dict[int, str] = {}
            for name in found:
                last[found[name][1]] = name
            layers = tuple(last[s] for s in sorted(last))
        if not layers:
            raise BackboneError(
                f"torchvision {self.name} has no convolutional stage outputs (N, C, H, W); use timm:<name> instead"
            )
        return BackboneSpec(
            name=self.name,
            family="torchvision",
            layers=layers,
            default_layers=self._default_layers or (layers[-1],),
            channels={layer: found[layer][0] for layer in layers},
            strides={layer: found[layer][1] for layer in layers},
            mean=mean,
            std=std,
        )


def _meta_model(build: Callable[[], nn.Module]) -> nn.Module:
    """The architecture without memory or init cost; some builders compute on tensors, so fall back to CPU."""
    try:
        with torch.device("meta"):
            return build().eval()
    except (NotImplementedError, RuntimeError):
        return build().eval().to("meta")


def _stage_candidates(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-level modules in order, each Sequential/ModuleList also opened one level, heads left out."""
    out: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if name in _NOT_STAGES:
            continue
        if isinstance(child, nn.Sequential | nn.ModuleList):
            out.extend((f"{name}.{sub}", grandchild) for sub, grandchild in child.named_children())
        out.append((name, child))
    return out


def _output_strides(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> dict[str, tuple[int, int]]:
    """Name -> (channels, stride) of every module whose output is an (N, C, H, W) map, in execution order.

    Two probe sizes tell channels from spatial size: only the channel axis stays fixed when the input grows.
    Fixed-size models (ViTs) get one square probe.
    """
    probes: list[tuple[tuple[int, int], dict[str, torch.Size]]] = []
    for sizes in _PROBE_SIZES:
        probes = []
        for size in sizes:
            shapes = _output_shapes(model, modules, size)
            if shapes is None:
                break
            probes.append((size, shapes))
        if len(probes) == len(sizes):
            break
    else:
        raise BackboneError("the model rejects every probe input size; use timm:<name> instead")
    found: dict[str, tuple[int, int]] = {}
    for name, first in probes[0][1].items():
        seen = [shapes.get(name) for _, shapes in probes]
        if len(first) != 4 or any(shape is None or shape[1:2] != first[1:2] for shape in seen):
            continue  # not a map, or a "channel" axis that grows with the input: (N, H, W, C)
        strides = {
            _stride(shape[2], shape[3], *size) for (size, _), shape in zip(probes, seen, strict=True) if shape
        }
        if len(strides) == 1 and (stride := strides.pop()) is not None:
            found[name] = (int(first[1]), stride)
    return found


def _output_shapes(
    model: nn.Module, modules: list[tuple[str, nn.Module]], size: tuple[int, int]
) -> dict[str, torch.Size] | None:
    """Output shape of each module on one meta-device forward, in the order of each module's last call."""
    shapes: dict[str, torch.Size] = {}

    def hook(name: str, out: object) -> None:
        shapes.pop(name, None)
        if isinstance(out, torch.Tensor):
            shapes[name] = out.shape

    handles = [
        module.register_forward_hook(lambda _m, _a, out, name=name: hook(name, out))
        for name, module in modules
    ]
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, *size, device="meta"))
    except Exception:  # an input size this architecture refuses
        return None
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _stride(h: int, w: int, height: int, width: int) -> int | None:
    """The power-of-two stride mapping (height, width) to (h, w), or None when the two axes disagree."""
    if h <= 0 or w <= 0:
        return None
    a, b = math.log2(height / h), math.log2(width / w)
    if abs(a - b) > 0.2:
        return None
    return int(2 ** round((a + b) / 2))


def _normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Mean and std of the default ImageNet weights (what the features are normalized with)."""
    try:
        transforms = torchvision.models.get_model_weights(name).DEFAULT.transforms()
        mean, std = tuple(transforms.mean), tuple(transforms.std)
    except (AttributeError, ValueError, KeyError):
        return IMAGENET_MEAN, IMAGENET_STD
    return (mean[0], mean[1], mean[2]), (std[0], std[1], std[2])


def _resolve(name: str) -> BackboneDefinition | None:
    return TorchvisionBackbone(name) if name in torchvision_names() else None


register_backbone_source(BackboneSource(label="torchvision", resolve=_resolve, names=torchvision_names))


@register_backbone("alexnet")
def alexnet() -> BackboneDefinition:
    """AlexNet's ``features`` stack only (2,469,696 parameters), as the contest notebooks use it."""
    return TorchvisionBackbone("alexnet", nodes=dict(ALEXNET_NODES), default_layers=("pool5",))
