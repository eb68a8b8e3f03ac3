"""``create_backbone``: name, weights and layers in; a frozen, truncated FeatureExtractor out."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from featstore.backbones._definition import BackboneDefinition
from featstore.backbones._extractor import STORAGE_DTYPES, FeatureExtractor
from featstore.backbones._registry import resolve_backbone
from featstore.backbones._weights import load_into, read_state_dict
from featstore.errors import BackboneError


def create_backbone(
    name: str,
    *,
    weights: str = "imagenet",
    layers: Sequence[str] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float16,
) -> FeatureExtractor:
    """Build backbone ``name`` on the CPU, holding only the modules its deepest selected layer needs.

    ``weights``: ``imagenet`` (from the offline cache, never silently random), ``random`` (seeded with
    ``seed``), or a state-dict file of the full model or of the extractor. ``dtype`` is the storage dtype
    of extracted features.
    """
    if dtype not in STORAGE_DTYPES:
        raise BackboneError(f"dtype {dtype} is not supported for features; use float16, bfloat16 or float32")
    definition = resolve_backbone(name)
    spec = definition.spec()
    selected = select_layers(definition, name, layers)
    if weights not in ("imagenet", "random"):
        state = read_state_dict(Path(weights).expanduser())  # fail on a bad file before building anything
    # Seed without disturbing the caller's RNG stream: the weights are drawn on the CPU, and
    # torch.manual_seed would also reseed every GPU's generator, which fork_rng(devices=[]) does not restore.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        body = definition.build(selected, pretrained=weights == "imagenet")
    if weights not in ("imagenet", "random"):
        load_into(body, state, weights)
    return FeatureExtractor(
        spec, body, selected, weights=weights, pretrained=weights != "random", seed=seed, dtype=dtype
    )


def select_layers(definition: BackboneDefinition, name: str, layers: Sequence[str] | None) -> tuple[str, ...]:
    """Canonical layer names, shallow to deep; the backbone's defaults when ``layers`` is None."""
    spec = definition.spec()
    if layers is None:
        return spec.default_layers
    if isinstance(layers, str):
        layers = [layers]
    if not layers:
        raise BackboneError(f"no layers selected for {name}; pick from {', '.join(spec.layers)}")
    chosen = set()
    for layer in layers:
        canonical = definition.resolve_layer(str(layer))
        if canonical is None:
            raise BackboneError(
                f"backbone {name!r} has no layer {layer!r}; valid layers: {', '.join(spec.layers)}"
                f"{definition.layer_hint()}"
            )
        chosen.add(canonical)
    return tuple(layer for layer in spec.layers if layer in chosen)
