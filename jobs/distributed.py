"""The featurize job on dask.distributed: one task per clip, each worker holding its own backbone.

Workers write their clip's arrays straight into the shared staging group (one task per clip array, so
never two writers in one chunk), failed tasks are retried, and the client commits the manifest only
after every task has succeeded. Point ``--scheduler`` at a running scheduler (``tcp://host:8786``) whose
workers see the store path; ``local:N`` starts a LocalCluster of N worker processes.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from featstore.backbones import FeatureExtractor, create_backbone
from featstore.datasets import Dataset
from featstore.errors import FeatstoreError
from featstore.features import parse_dtype
from featstore.frame_stream import decodes_on_gpu

TASK_RETRIES = 2


@dataclass(frozen=True)
class ClipTask:
    """What a worker needs to featurize one clip; small and picklable."""

    backbone: str
    weights: str
    layers: tuple[str, ...]
    seed: int
    dtype: str
    weights_digest: str
    device: str
    gpu_decode: bool
    batch_size: int
    dataset: Dataset
    clip: str
    group_path: str
    scratch: str


# One backbone per worker process, loaded by its first task and reused by the rest.
_WORKER_BACKBONES: dict[tuple[Any, ...], FeatureExtractor] = {}


def _worker_device(requested: str) -> torch.device:
    """The worker's device, resolved where it runs.

    ``auto`` and ``cuda`` mean the worker's current GPU: start one worker per GPU, each seeing only its own
    (``CUDA_VISIBLE_DEVICES``), as the README shows. The workers of ``local:N`` all share the current GPU.
    """
    from jobs.featurize import resolve_device

    return resolve_device(requested)


def _backbone_for(task: ClipTask) -> FeatureExtractor:
    device = _worker_device(task.device)
    # The digest too: a weights file overwritten in place between builds must not be served from memory.
    cache_key = (task.backbone, task.weights, task.weights_digest, task.layers, task.seed, task.dtype, str(device))
    if cache_key not in _WORKER_BACKBONES:
        extractor = create_backbone(
            task.backbone, weights=task.weights, layers=list(task.layers), seed=task.seed, dtype=parse_dtype(task.dtype)
        )
        if extractor.weights_digest != task.weights_digest:
            raise FeatstoreError(
                f"worker {os.uname().nodename} loaded different {task.backbone} weights than the client "
                f"({extractor.weights_digest[:12]} vs {task.weights_digest[:12]}): give every worker the same weights"
            )
        _WORKER_BACKBONES[cache_key] = extractor.to(device).eval()
    return _WORKER_BACKBONES[cache_key]


def featurize_clip_task(task: ClipTask) -> int:
    """Runs on a worker: featurize one clip into the shared staging group; returns its frame count."""
    from jobs.featurize import featurize_clips

    if torch.get_num_threads() > 1 and os.environ.get("FEATSTORE_WORKER_THREADS"):
        torch.set_num_threads(int(os.environ["FEATSTORE_WORKER_THREADS"]))
    return featurize_clips(
        _backbone_for(task),
        task.dataset,
        [task.clip],
        Path(task.group_path),
        Path(task.scratch),
        dtype=task.dtype,
        batch_size=task.batch_size,
        progress=False,
        gpu_decode=task.gpu_decode,
    )


def local_workers(scheduler: str) -> int | None:
    """N of ``local:N``; None for a scheduler address. Checks the value's form without connecting anywhere.

    Called before the cache lookup, so a mistyped ``--scheduler`` is refused even when nothing would run.
    Addresses are ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (``HOST:PORT`` means tcp), as `dask scheduler`
    prints them.
    """
    from distributed.comm.addressing import parse_address, parse_host_port

    if scheduler.lower().startswith("local:"):
        if not scheduler.startswith("local:"):
            raise FeatstoreError(f"--scheduler {scheduler!r}: write local:N in lower case")
        try:
            n_workers = int(scheduler.split(":", 1)[1])
        except ValueError as exc:
            raise FeatstoreError(f"--scheduler {scheduler!r}: use local:N with N a number of workers") from exc
        if n_workers < 1:
            raise FeatstoreError(f"--scheduler {scheduler!r}: N must be at least 1")
        return n_workers
    problem = None
    try:
        protocol, location = parse_address(scheduler)
        host, port = parse_host_port(location) if protocol in ("tcp", "tls") else ("", 0)
        if protocol not in ("tcp", "tls"):
            problem = f"featstore connects over tcp:// or tls://, not {protocol}://"
        elif not host:
            problem = "no host"
        elif not 0 < int(port) < 65536:
            problem = f"port {port} is not 1-65535"
    except ValueError as exc:
        problem = str(exc)
    if problem:
        raise FeatstoreError(
            f"--scheduler {scheduler!r} is not a dask scheduler address ({problem}): give tcp://HOST:PORT, as "
            "`dask scheduler` prints it, or local:N for a LocalCluster of N workers"
        )
    return None


def connect(scheduler: str) -> Any:
    """A dask Client for ``ADDRESS`` or a new LocalCluster for ``local:N``."""
    from distributed import Client, LocalCluster

    n_workers = local_workers(scheduler)
    if n_workers is not None:
        threads = max(1, (os.cpu_count() or 1) // n_workers)
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env={"FEATSTORE_WORKER_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)},
        )
        return Client(cluster)
    try:
        return Client(scheduler, timeout="20s")
    except (OSError, ValueError, TypeError) as exc:  # what dask raises for addresses it cannot use
        raise FeatstoreError(
            f"cannot reach the dask scheduler at {scheduler!r} ({exc}): start one with `dask scheduler` "
            "and workers with `dask worker ADDRESS`, or use --scheduler local:N"
        ) from exc


def featurize_on_dask(
    plan: Any,
    clips: list[str],
    group_path: Path,
    scratch: Path,
    *,
    scheduler: str,
    batch_size: int,
    device: str,
    progress: bool,
) -> int:
    """Submit one task per unfinished clip, wait for all; any task failing after its retries fails the build."""
    from distributed import as_completed

    client = connect(scheduler)
    try:
        tasks = [
            ClipTask(
                backbone=plan.backbone,
                weights=plan.weights,
                layers=plan.layers,
                seed=plan.seed,
                dtype=plan.dtype,
                weights_digest=plan.weights_digest,
                device=device,
                gpu_decode=decodes_on_gpu(plan.preprocessing),
                batch_size=batch_size,
                # A one-clip subset, with the whole dataset's answer to "are masks stored": one clip may
                # be fully annotated where the dataset is not, and a local build then stores no masks.
                dataset=dataclasses.replace(plan.dataset.subset([clip]), has_annotations=plan.dataset.has_annotations),
                clip=clip,
                group_path=str(group_path),
                scratch=str(scratch),
            )
            for clip in clips
        ]
        # Workers started with `--resources GPU=1` get one clip task per GPU at a time.
        workers = client.scheduler_info()["workers"].values()
        resources = {"GPU": 1} if any("GPU" in w.get("resources", {}) for w in workers) else None
        futures = [
            client.submit(
                featurize_clip_task,
                task,
                key=f"featurize-{plan.key[:16]}-{task.clip}",
                retries=TASK_RETRIES,
                resources=resources,
            )
            for task in tasks
        ]
        frames = 0
        total = sum(len(t.dataset.frames) for t in tasks)
        with tqdm(total=total, unit="frame", desc="featurize (dask)", disable=not progress, file=sys.stderr) as bar:
            for future in as_completed(futures):
                done = int(future.result())
                frames += done
                bar.update(done)
        return frames
    finally:
        cluster = getattr(client, "cluster", None)
        client.close()
        if cluster is not None and scheduler.startswith("local:"):
            cluster.close()
