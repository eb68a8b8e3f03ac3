"""Any timm model as ``timm:<name>``: stages from timm's ``feature_info``, built ``features_only`` and pruned.

Layers are the feature_info module names (``layer1``, ``blocks.4``, ...); a stage index (``"3"``) is accepted
too. Models with ``forward_intermediates`` are wrapped by timm's getter, which prunes every block past the
deepest selected stage, so the built module holds only what runs.
"""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import Tensor, nn

from featstore.backbones._definition import BackboneDefinition
from featstore.backbones._registry import BackboneSource, register_backbone_source
from featstore.backbones._spec import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec
from featstore.backbones._weights import (
    ALLOW_DOWNLOAD_ENV,
    cached_hf_file,
    downloads_allowed,
    hf_hub_cache_dir,
    missing_weights_error,
    torch_hub_checkpoint,
)
from featstore.errors import BackboneError

PREFIX = "timm:"
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class TimmFeatures(nn.Module):
    """timm's feature list renamed to layer names, always (N, C, h, w)."""

    def __init__(self, net: nn.Module, layers: tuple[str, ...], channels: dict[str, int]) -> None:
        super().__init__()
        self.net = net
        self.layer_names = layers
        self.channels = channels

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        outs = self.net(x)
        if isinstance(outs, dict):
            outs = list(outs.values())
        result = {}
        for layer, out in zip(self.layer_names, outs, strict=True):
            if out.shape[1] != self.channels[layer] and out.shape[-1] == self.channels[layer]:
                out = out.permute(0, 3, 1, 2)  # models whose native layout is (N, H, W, C)
            result[layer] = out
        return result


class TimmBackbone(BackboneDefinition):
    """A timm model cut at its feature stages."""

    family = "timm"

    def __init__(
        self,
        model_name: str,
        *,
        name: str | None = None,
        default_layers: tuple[str, ...] = (),
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        create_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self.model_name = model_name
        self.name = name or PREFIX + model_name
        self._default_layers = default_layers
        self._mean, self._std = mean, std
        self.create_kwargs = dict(create_kwargs or {})
        self._spec: BackboneSpec | None = None
        self._getter = False

    def spec(self) -> BackboneSpec:
        if self._spec is None:
            self._spec = self._probe()
        return self._spec

    def resolve_layer(self, layer: str) -> str | None:
        layers = self.spec().layers
        if layer in layers:
            return layer
        if layer.isdigit() and int(layer) < len(layers):
            return layers[int(layer)]
        return None

    def layer_hint(self) -> str:
        return f" (or a stage index 0-{len(self.spec().layers) - 1})"

    def build(self, layers: tuple[str, ...], *, pretrained: bool) -> nn.Module:
        spec = self.spec()
        indices = tuple(spec.layers.index(layer) for layer in layers)
        kwargs: dict[str, Any] = dict(self.create_kwargs)
        if self._getter:
            kwargs["feature_cls"] = "getter"
        if pretrained:
            kwargs.update(self._pretrained_kwargs())
        try:
            net = timm.create_model(self.model_name, features_only=True, out_indices=indices, **kwargs)
        except (RuntimeError, OSError, ValueError) as exc:
            raise BackboneError(f"{self.name}: timm could not build or load the model ({exc})") from exc
        return TimmFeatures(net, layers, {layer: spec.channels[layer] for layer in layers})

    def _probe(self) -> BackboneSpec:
        try:
            with torch.device("meta"):
                model = timm.create_model(self.model_name, **self.create_kwargs)
        except (NotImplementedError, RuntimeError):
            model = timm.create_model(self.model_name, **self.create_kwargs)
        info = getattr(model, "feature_info", None)
        if not isinstance(info, list) or not info:
            raise BackboneError(
                f"{self.name} does not describe its feature stages (no feature_info); pick another"
            )
        self._getter = hasattr(model, "forward_intermediates") and hasattr(model, "prune_intermediate_layers")
        names = [str(stage.get("module") or f"stage{i}") for i, stage in enumerate(info)]
        if len(set(names)) != len(names):
            names = [f"stage{i}" for i in range(len(info))]
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean = self._mean or _triple(cfg.get("mean", IMAGENET_MEAN))
        std = self._std or _triple(cfg.get("std", IMAGENET_STD))
        layers = tuple(names)
        return BackboneSpec(
            name=self.name,
            family=self.family,
            layers=layers,
            default_layers=self._default_layers or (layers[-1],),
            channels={n: int(stage["num_chs"]) for n, stage in zip(names, info, strict=True)},
            strides={n: int(stage["reduction"]) for n, stage in zip(names, info, strict=True)},
            mean=mean,
            std=std,
        )

    def _pretrained_kwargs(self) -> dict[str, Any]:
        """Point timm at the cached weight file; no download unless the user allowed it."""
        try:
            cfg = timm.models.get_pretrained_cfg(self.model_name)
        except RuntimeError as exc:
            raise BackboneError(
                f"{self.name}: {exc}; see timm.list_pretrained('{self.model_name}*')"
            ) from exc
        if cfg is None or not (cfg.url or cfg.hf_hub_id or cfg.file):
            raise BackboneError(f"{self.name} has no pretrained weights in timm; pass --weights random|FILE")
        if downloads_allowed():
            return {"pretrained": True}
        if cfg.hf_hub_id:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            for filename in (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_WEIGHT_FILES:
                found = cached_hf_file(repo, filename, revision or None)
                if found is not None:
                    return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(found)}}
        url = cfg.url[0] if isinstance(cfg.url, tuple) else cfg.url
        if url:
            path = torch_hub_checkpoint(url)
            if path.is_file():
                return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
            raise missing_weights_error(self.name, path, url)
        repo = (cfg.hf_hub_id or "").partition("@")[0]
        folder = hf_hub_cache_dir() / ("models--" + repo.replace("/", "--"))
        raise BackboneError(
            f"ImageNet weights for {self.name} are not available offline: no {_HF_WEIGHT_FILES[0]} in {folder}. "
            f"Download https://huggingface.co/{repo}/resolve/main/{_HF_WEIGHT_FILES[0]} and pass it as "
            f"--weights FILE, or set {ALLOW_DOWNLOAD_ENV}=1 to let featstore download it."
        )


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _resolve(name: str) -> BackboneDefinition | None:
    if not name.startswith(PREFIX):
        return None
    model_name = name[len(PREFIX) :]
    arch = timm.models.split_model_name_tag(model_name)[0]
    return TimmBackbone(model_name) if timm.is_model(arch) else None


def _names() -> list[str]:
    return [PREFIX + n for n in timm.list_models()]


register_backbone_source(BackboneSource(label="timm", resolve=_resolve, names=_names, prefix=PREFIX))
