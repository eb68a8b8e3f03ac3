"""Decoder registry: heads register by name, and jobs create them from a name plus the feature layout."""

from __future__ import annotations

import fnmatch
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from featstore.errors import FeatstoreError

if TYPE_CHECKING:
    from decoders.heads import Decoder

DecoderClass = TypeVar("DecoderClass", bound="type[Decoder]")

_DECODERS: dict[str, type[Decoder]] = {}


def register_decoder(name: str) -> Callable[[DecoderClass], DecoderClass]:
    """Class decorator that makes a head available to ``create_decoder(name, ...)``; names are unique."""

    def register(cls: DecoderClass) -> DecoderClass:
        if name in _DECODERS:
            raise ValueError(f"decoder {name!r} is already registered by {_DECODERS[name].__qualname__}")
        cls.name = name
        _DECODERS[name] = cls
        return cls

    return register


def list_decoders(pattern: str | None = None) -> list[str]:
    """Registered decoder names, sorted; ``pattern`` is a shell-style filter such as ``"f*"``."""
    names = sorted(_DECODERS)
    return names if pattern is None else [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def get_decoder_class(name: str) -> type[Decoder]:
    if name not in _DECODERS:
        raise FeatstoreError(f"--decoder {name!r} is unknown: use one of {', '.join(list_decoders())}")
    return _DECODERS[name]


def create_decoder(name: str, channels: dict[str, int], strides: dict[str, int], **config: Any) -> Decoder:
    """A freshly initialised head for features with these per-layer ``channels`` and ``strides``."""
    cls = get_decoder_class(name)
    accepted = [
        p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "channels", "strides")
    ]
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise FeatstoreError(
            f"decoder {name!r} has no option {', '.join(unknown)}: it takes {', '.join(accepted)}"
        )
    return cls(channels, strides, **config)
