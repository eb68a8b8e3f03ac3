"""Whether device-resident features fit: what a device has free, and the refusal when a load would not fit.

Measuring (``available_bytes``) is apart from deciding (``check_fits``, a pure function of numbers), so
the decision is tested with plain numbers and a load is refused before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from decoders.device_data import DeviceFeatures
from featstore.errors import FeatstoreError
from featstore.units import format_bytes

if TYPE_CHECKING:
    from featstore.features import FeatureArtifact

# The share of the available memory left free of features, for training itself. Measured on the CPU at
# DAVIS size (480x854 frames, batch 8): one fpn head's activations, gradients, optimizer state and the
# allocator's cache peak 0.39 GB above the resident features, a grid of three fpn heads 0.46 GB, and the
# load holds one clip's layer in host memory at a time; on CUDA, cuDNN workspaces add a few hundred MB (the
# context is already taken when free memory is measured). A fifth covers that wherever 2.5 GB or more is
# available, and features filling more than 80% of a device leave too little to train in anyway.
HEADROOM_FRACTION = 0.2
MEMINFO = Path("/proc/meminfo")


def available_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take now; ``None`` where that cannot be known.

    CUDA: the driver's free bytes on that GPU plus what PyTorch's caching allocator holds unused (an
    earlier job in the same process, such as a build before training in ``compare``, leaves it reserved).
    CPU: the kernel's ``MemAvailable``, its estimate of what can be allocated without swapping (free
    memory plus reclaimable caches); a container's cgroup memory limit is not read.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        return mem_available(MEMINFO)
    return None


def mem_available(meminfo: Path) -> int | None:
    """``MemAvailable`` of a ``/proc/meminfo`` file in bytes; ``None`` without one (not Linux)."""
    try:
        lines = meminfo.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024  # reported in KiB
    return None


def check_fits(
    needed: int,
    available: int,
    *,
    what: str,
    device: str,
    fixes: Sequence[str],
    headroom: float = HEADROOM_FRACTION,
) -> None:
    """Refuse, in one line naming ``what``, ``device`` and ``fixes``, when ``needed`` bytes exceed the usable share.

    The usable share is ``available`` less ``headroom`` of it; exactly that much still fits.
    """
    usable = int(available * (1.0 - headroom))
    if needed <= usable:
        return
    raise FeatstoreError(
        f"{what} needs {format_bytes(needed)} on {device}, which has {format_bytes(available)} available, "
        f"of which features may take {format_bytes(usable)} ({1.0 - headroom:.0%}; the rest is for training): "
        + "; or ".join(fixes)
    )


def check_memory(
    train: FeatureArtifact,
    train_clips: Sequence[str],
    val: FeatureArtifact,
    val_clips: Sequence[str],
    device: torch.device,
    available: int | None,
) -> None:
    """Refuse training and validation features that together would not fit in ``available`` bytes of ``device``.

    ``available`` is ``available_bytes(device)``, ``None`` where unknown (then nothing is checked).
    """
    if available is None:
        return
    needed = DeviceFeatures.load_nbytes(train, train_clips) + DeviceFeatures.load_nbytes(val, val_clips)
    what = f"loading the features of {train.record.ref}" + (
        f" and --val-features {val.record.ref}" if val.record.ref != train.record.ref else ""
    )
    check_fits(needed, available, what=what, device=str(device), fixes=memory_fixes(train, device))


def memory_fixes(artifact: FeatureArtifact, device: torch.device) -> list[str]:
    """What shrinks a training load that does not fit, in options ``featstore build`` and ``train`` take.

    Validation clips are resident too, so a larger --holdout-fraction would not shrink the load.
    """
    fixes = []
    if artifact.metadata["dtype"] == "float32":  # --val-features share it (checked before)
        fixes.append("rebuild the features with `featstore build --dtype float16` (half the bytes)")
    if len(artifact.layers) > 1:
        fixes.append("rebuild them with fewer `--layers`")
    if device.type == "cuda":
        fixes.append("train with `--device cpu`")
    elif torch.cuda.is_available():
        fixes.append("train with `--device cuda`")
    fixes.append("build features of a dataset with fewer clips (`featstore build --data`) and train on those")
    return fixes
