"""Frozen backbones by name: a registry, one spec per backbone, and one extraction contract.

Names: ``alexnet`` (its ``features`` stack), any torchvision classification model (``resnet18``), any timm
model as ``timm:<name>``, ``efficientnet_lite0/1/2`` with offline ImageNet weights, and ``tiny`` for tests.
"""

from featstore.backbones import _efficientnet_lite, _test_models, _timm, _torchvision  # noqa: F401  (registration)
from featstore.backbones._definition import BackboneDefinition
from featstore.backbones._efficientnet_lite import efficientnet_lite_classifier
from featstore.backbones._extractor import FeatureExtractor
from featstore.backbones._factory import create_backbone, select_layers
from featstore.backbones._registry import (
    BackboneSource,
    get_backbone_spec,
    list_backbones,
    register_backbone,
    register_backbone_source,
    resolve_backbone,
)
from featstore.backbones._spec import BackboneSpec
from featstore.backbones._weights import ALLOW_DOWNLOAD_ENV, state_dict_digest

__all__ = [
    "ALLOW_DOWNLOAD_ENV",
    "BackboneDefinition",
    "BackboneSource",
    "BackboneSpec",
    "FeatureExtractor",
    "create_backbone",
    "efficientnet_lite_classifier",
    "get_backbone_spec",
    "list_backbones",
    "register_backbone",
    "register_backbone_source",
    "resolve_backbone",
    "select_layers",
    "state_dict_digest",
]
