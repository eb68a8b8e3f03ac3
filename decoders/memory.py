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
PROC_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
# cgroup v1 writes "no limit" as 2**63 - 1 rounded down to a page; no real limit comes near this.
_NO_LIMIT = 2**62


def available_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take now; ``None`` where that cannot be known.

    CUDA: the driver's free bytes on that GPU plus what PyTorch's caching allocator holds unused (an
    earlier job in the same process, such as a build before training in ``compare``, leaves it reserved).
    CPU: the kernel's ``MemAvailable``, its estimate of what can be allocated without swapping (free
    memory plus reclaimable caches), or less where the process's memory cgroup (a container's limit, a
    batch scheduler's allocation) lets it take less before the OOM killer ends it.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type == "cpu":
        known = [n for n in (mem_available(MEMINFO), cgroup_available(PROC_CGROUP, CGROUP_ROOT)) if n is not None]
        return min(known) if known else None
    return None


def cgroup_available(proc_cgroup: Path, root: Path) -> int | None:
    """Bytes the memory cgroup of this process lets it still allocate; ``None`` where no limit is set.

    No well-kept library reads this (psutil reports the host's memory), so it is read here, for cgroup v2
    (``memory.max``) and v1 (``memory.limit_in_bytes``): the tightest of the process's cgroup and its
    ancestors, each its limit less its usage, counting inactive file cache as free since the kernel
    reclaims it before killing (the kubelet's "working set"). Inside a container the cgroup's own path may
    be absent under the mount, whose root is then the container's cgroup; missing levels are skipped.
    """
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    v1 = [path for _, controllers, path in (line.split(":", 2) for line in lines if line.count(":") >= 2)
          if "memory" in controllers.split(",")]
    v2 = [line.split(":", 2)[2] for line in lines if line.startswith("0::")]
    if v1:
        base, path = root / "memory", v1[0]
        files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
    elif v2:
        base, path = root, v2[0]
        files = ("memory.max", "memory.current", "inactive_file")
    else:
        return None
    parts = [p for p in path.split("/") if p]
    levels = [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    room = [n for n in (_cgroup_room(level, *files) for level in levels) if n is not None]
    return min(room) if room else None


def _cgroup_room(level: Path, limit_file: str, usage_file: str, inactive_stat: str) -> int | None:
    """Limit less working set of one cgroup directory; ``None`` without a limit or without the files."""
    try:
        limit_text = (level / limit_file).read_text().strip()
        usage = int((level / usage_file).read_text())
        stats = (level / "memory.stat").read_text().splitlines()
    except (OSError, ValueError):
        return None
    if limit_text == "max" or not limit_text.isdigit() or int(limit_text) >= _NO_LIMIT:
        return None
    inactive = next((int(line.split()[1]) for line in stats if line.split()[:1] == [inactive_stat]), 0)
    return max(int(limit_text) - (usage - inactive), 0)


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
    needed = DeviceFeatures.load_nbytes(train, train_clips)
    if val_clips:  # none when training on every clip
        needed += DeviceFeatures.load_nbytes(val, val_clips)
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
