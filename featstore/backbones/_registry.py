"""Backbone names: decorator-registered backbones first, then dynamic sources (torchvision, ``timm:``)."""

from __future__ import annotations

import difflib
import fnmatch
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from featstore.backbones._definition import BackboneDefinition
from featstore.backbones._spec import BackboneSpec
from featstore.errors import BackboneError

DefinitionFactory = Callable[[], BackboneDefinition]
F = TypeVar("F", bound=DefinitionFactory)

_REGISTERED: dict[str, DefinitionFactory] = {}
_CACHE: dict[str, BackboneDefinition] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class BackboneSource:
    """A family whose names are discovered from a library instead of registered one by one."""

    label: str
    resolve: Callable[[str], BackboneDefinition | None]
    names: Callable[[], Iterable[str]]
    prefix: str = ""  # names of this source are listed only for patterns starting with it (when set)


_SOURCES: list[BackboneSource] = []


def register_backbone(name: str) -> Callable[[F], F]:
    """Register a zero-argument factory (a function or class) returning a :class:`BackboneDefinition`."""
    if not name or name != name.strip():
        raise BackboneError(f"backbone name {name!r} must be non-empty without surrounding spaces")

    def decorator(factory: F) -> F:
        with _LOCK:
            if name in _REGISTERED:
                raise BackboneError(f"backbone {name!r} is already registered; pick another name")
            _REGISTERED[name] = factory
        return factory

    return decorator


def register_backbone_source(source: BackboneSource) -> None:
    """Add a dynamic family; registered names always win over it."""
    if any(s.label == source.label for s in _SOURCES):
        raise BackboneError(f"backbone source {source.label!r} is already registered")
    _SOURCES.append(source)


def list_backbones(pattern: str | None = None) -> list[str]:
    """Sorted backbone names matching the shell-style ``pattern``.

    Registered and torchvision names are always listed; the large timm catalogue only when the pattern starts
    with ``timm:`` (e.g. ``list_backbones("timm:resnet*")``).
    """
    names = set(_REGISTERED)
    for source in _SOURCES:
        if not source.prefix or (pattern is not None and pattern.startswith(source.prefix)):
            names.update(source.names())
    if pattern is not None:
        names = {n for n in names if fnmatch.fnmatchcase(n, pattern)}
    return sorted(names)


def resolve_backbone(name: str) -> BackboneDefinition:
    """The definition behind a user-typed name; BackboneError with a way to find valid names otherwise."""
    with _LOCK:
        cached = _CACHE.get(name)
    if cached is not None:
        return cached
    definition: BackboneDefinition | None = None
    if name in _REGISTERED:
        definition = _REGISTERED[name]()
    else:
        for source in _SOURCES:
            definition = source.resolve(name)
            if definition is not None:
                break
    if definition is None:
        raise BackboneError(_unknown_message(name))
    with _LOCK:
        return _CACHE.setdefault(name, definition)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The spec of a backbone without building it or touching any weights."""
    return resolve_backbone(name).spec()


def _unknown_message(name: str) -> str:
    # A prefixed name (timm:...) is matched against that family's catalogue, so suggestions keep the prefix.
    prefix = next((s.prefix for s in _SOURCES if s.prefix and name.startswith(s.prefix)), "")
    candidates = list_backbones(f"{prefix}*") if prefix else list_backbones()
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown backbone {name!r}.{hint} Use one of {', '.join(sorted(_REGISTERED))}, a torchvision "
        "classification model by name (e.g. resnet18), or timm:<name> for any timm model (e.g. timm:resnet18)."
    )
