"""Where weights come from and how they are checked: offline caches, user files, and a content digest."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from featstore.errors import BackboneError

ALLOW_DOWNLOAD_ENV = "FEATSTORE_ALLOW_DOWNLOAD"
WEIGHT_FILE_SUFFIXES = (".pth", ".pt", ".safetensors")


def downloads_allowed() -> bool:
    """Weights are fetched from the network only when the user opted in; offline is the default."""
    return os.environ.get(ALLOW_DOWNLOAD_ENV, "") == "1"


def torch_hub_checkpoint(url: str) -> Path:
    """The file torch.hub's ``load_state_dict_from_url`` reads for ``url`` (resolved now: honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, resolved from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def cached_hf_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The cached snapshot file of a Hugging Face repo, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=hf_hub_cache_dir(), revision=revision)
    return Path(found) if isinstance(found, str) else None


def missing_weights_error(what: str, path: Path, source: str) -> BackboneError:
    """The one message every family uses when ImageNet weights are not on disk."""
    return BackboneError(
        f"ImageNet weights for {what} are not available offline: missing file {path}. "
        f"Download {source} and put it in {path.parent}, or set {ALLOW_DOWNLOAD_ENV}=1 to let featstore "
        f"download it, or pass --weights random|FILE."
    )


def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted (name, dtype, shape, bytes): identical weights give identical digests on any device."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth``/``.pt``/``.safetensors`` state dict (optionally wrapped as ``{"state_dict": ...}``)."""
    if not path.is_file():
        raise BackboneError(
            f"weights file {path} does not exist; pass imagenet, random, or an existing "
            f"{'/'.join(WEIGHT_FILE_SUFFIXES)} state dict"
        )
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise BackboneError(
            f"weights file {path} has an unsupported suffix; save a state dict as {WEIGHT_FILE_SUFFIXES}"
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded: object = load_file(str(path), device="cpu")
        else:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the loaders raise many unrelated types for a corrupt file
        raise BackboneError(
            f"weights file {path} cannot be read ({type(exc).__name__}: {exc}); re-save it"
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise BackboneError(
            f"weights file {path} does not hold a state dict (name -> tensor); save model.state_dict()"
        )
    return {str(k): v for k, v in loaded.items()}


def load_into(module: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` whether it was saved from the full model, this module, or its wrapper.

    Module keys may carry wrapper prefixes (``net.model.``) that the file lacks, and the file may carry a
    ``body.`` prefix (a saved FeatureExtractor) or extra keys (a full model's classifier). Every key of
    ``module`` must be found with the same shape, else BackboneError naming ``source``.
    """
    targets = module.state_dict()
    best: tuple[int, dict[str, str]] = (-1, {})
    for strip in _wrapper_prefixes(list(targets)):
        for add in ("", "body."):
            mapping = {k: add + k[len(strip) :] for k in targets}
            hits = sum(v in state for v in mapping.values())
            if hits == len(mapping):
                _copy_checked(module, targets, state, mapping, source)
                return
            if hits > best[0]:
                best = (hits, mapping)
    missing = [v for v in best[1].values() if v not in state]
    raise BackboneError(
        f"weights file {source} does not fit this backbone: {len(missing)} of {len(targets)} tensors missing "
        f"(e.g. {', '.join(missing[:3])}); save the state dict of the same architecture"
    )


def _wrapper_prefixes(keys: list[str]) -> list[str]:
    """'' plus every dotted prefix shared by all keys, shortest first ('net.', 'net.model.')."""
    prefixes = [""]
    parts = [k.split(".") for k in keys]
    depth = min((len(p) for p in parts), default=1) - 1
    for i in range(depth):
        heads = {tuple(p[: i + 1]) for p in parts}
        if len(heads) != 1:
            break
        prefixes.append(".".join(next(iter(heads))) + ".")
    return prefixes


def _copy_checked(
    module: nn.Module,
    targets: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    mapping: Mapping[str, str],
    source: str,
) -> None:
    selected: dict[str, torch.Tensor] = {}
    for key, target in targets.items():
        value = state[mapping[key]]
        if tuple(value.shape) != tuple(target.shape):
            raise BackboneError(
                f"weights file {source}: tensor {mapping[key]} has shape {tuple(value.shape)}, "
                f"the backbone needs {tuple(target.shape)}; save the state dict of the same architecture"
            )
        selected[key] = value
    module.load_state_dict(selected, strict=True)
