"""The train job: a grid of decoder heads from one feature artifact, the best committed as a decoder artifact.

Features (and masks) are loaded onto the device once; every head of the grid trains over the same
batches in one loop. The budget is checked on backbone plus head before any training starts.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from decoders import (
    DEFAULT_DECODER,
    Decoder,
    DeviceFeatures,
    HeadConfig,
    best_head,
    holdout_split,
    train_heads,
)
from decoders._registry import create_decoder
from decoders.memory import available_bytes, check_memory
from decoders.training import DEFAULT_HOLDOUT_FRACTION, build_head, check_disjoint
from featstore.accounting import CONTEST_FRAME, check_budget
from featstore.errors import FeatstoreError
from featstore.features import FeatureArtifact, check_compatible, open_features
from featstore.store import ArtifactRecord, Store, canonical_hash, write_json_atomic
from featstore.units import format_bytes
from featstore.wandb_sync import WandbJob, wandb_requested
from jobs.featurize import resolve_device
from jobs.training_curves import PLOT_FILE, write_training_curves

if TYPE_CHECKING:  # Lightning loads only for its users
    from decoders.lightning import FeatureDataModule, HeadModule

DEFAULT_BUDGET = 50_000_000
WEIGHTS_FILE = "decoder.pt"
SPEC_FILE = "decoder.json"
METRICS_FILE = "heads.json"


@dataclass(frozen=True)
class TrainResult:
    """What ``featstore train`` reports."""

    record: ArtifactRecord
    cached: bool

    @property
    def ref(self) -> str:
        return self.record.ref

    def to_json(self) -> dict[str, Any]:
        meta = self.record.metadata
        keys = ("nparams_backbone", "nparams_head", "nparams", "nflops_backbone", "nflops_head", "nflops",
                "train_frames_per_s", "train_seconds", "val_mean_iou", "val_j_mean", "val_per_clip", "head",
                "train_clips", "val_clips", "heads")
        return {"ref": self.ref, "cached": self.cached, **{k: meta[k] for k in keys}}


def head_grid(decoders: Sequence[str], lrs: Sequence[float], weight_decays: Sequence[float]) -> list[HeadConfig]:
    """One config per (decoder, learning rate, weight decay) combination."""
    return [
        HeadConfig(decoder=name, lr=lr, weight_decay=wd)
        for name, lr, wd in itertools.product(decoders, lrs, weight_decays)
    ]


def contest_feature_sizes(artifact: FeatureArtifact) -> dict[str, tuple[int, int]]:
    """Feature map sizes of one 480x854 contest frame, for the FLOP count, without touching real data."""
    if artifact.frame_size == tuple(CONTEST_FRAME[1:]):
        return {layer: (int(s[1]), int(s[2])) for layer, s in artifact.metadata["feature_shape"].items()}
    from featstore.backbones import create_backbone

    backbone = artifact.backbone
    extractor = create_backbone(backbone["name"], weights="random", layers=artifact.layers)
    with torch.inference_mode():
        outputs = extractor(torch.zeros((1, *CONTEST_FRAME)))
    return {layer: (int(v.shape[2]), int(v.shape[3])) for layer, v in outputs.items()}


def check_head_budget(artifact: FeatureArtifact, decoder: str, nparams_head: int, budget: int) -> None:
    """Refuse a head whose backbone plus head parameters exceed the budget, naming both counts."""
    total = artifact.nparams_backbone + nparams_head
    try:
        check_budget(total, budget)
    except FeatstoreError as exc:
        raise type(exc)(
            f"{decoder} head: backbone {artifact.nparams_backbone:,} + head {nparams_head:,} = "
            f"{total:,} parameters exceeds --budget {budget:,}: pick a smaller backbone or head"
        ) from exc


def load_decoder(store: Store, ref: str, device: torch.device | str = "cpu") -> tuple[Decoder, ArtifactRecord]:
    """Rebuild a committed decoder head with its trained weights."""
    record = store.resolve(ref, type="decoder")
    store.require_intact(record)
    folder = store.path(record)
    spec = record.metadata["decoder"]
    decoder = create_decoder(spec["name"], spec["channels"], spec["strides"], **spec["config"])
    state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    decoder.load_state_dict(state)
    return decoder.to(device).eval(), record


def train_decoders(
    store: Store,
    features: str,
    *,
    val_features: str | None = None,
    holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
    seed: int = 0,
    decoders: Sequence[str] | None = None,
    lrs: Sequence[float] = (1e-3,),
    weight_decays: Sequence[float] = (1e-4,),
    epochs: int = 10,
    batch_size: int = 8,
    budget: int = DEFAULT_BUDGET,
    device: str = "auto",
    progress: bool = True,
    wandb: bool = False,
    force: bool = False,
) -> TrainResult:
    """Train one head per grid point on device-resident features; commit the best on validation clips.

    The same features, split and grid again are a cache hit; ``force`` trains anyway and commits a new version.
    """
    if batch_size < 1:
        raise FeatstoreError(f"--batch-size {batch_size} must be at least 1")
    if epochs < 1:
        raise FeatstoreError(f"--epochs {epochs} must be at least 1")
    if budget < 1:
        raise FeatstoreError(f"--budget {budget} must be a positive number of parameters")
    decoders = list(decoders or [DEFAULT_DECODER])
    artifact = open_features(store, features)
    configs = head_grid(decoders, lrs, weight_decays)
    channels, strides = artifact.channels(), artifact.strides()
    for config in configs:
        check_head_budget(artifact, config.decoder, build_head(config, channels, strides, seed).nparams, budget)
    val_artifact = open_features(store, val_features) if val_features else None
    if val_artifact is not None:
        check_compatible(artifact, val_artifact)
        train_clips, val_clips = list(artifact.clips), list(val_artifact.clips)
        check_disjoint(artifact.record.ref, train_clips, val_artifact.record.ref, val_clips)
        split: dict[str, Any] = {"val_features": val_artifact.record.ref}
    else:
        train_clips, val_clips = holdout_split(artifact.clips, holdout_fraction, seed)
        split = {"holdout_fraction": holdout_fraction, "seed": seed}
    if not val_clips and len(configs) > 1:
        raise FeatstoreError(
            f"--holdout-fraction 0 trains on every clip, which leaves no clip to choose among {len(configs)} heads: "
            "choose the setting on a split first, then train that one decoder and learning rate on every clip"
        )
    grid = [c.to_dict() for c in configs]
    parents = [artifact.record.ref] + ([val_artifact.record.ref] if val_artifact else [])
    # The parents' versions, not only their content, are inputs: a version that --force rebuilt supersedes
    # the old one, so what trains on it again is a new decoder whose lineage names it. The budget is not:
    # it only gates (checked above, before any lookup), and every head that passes it trains the same.
    key = canonical_hash(
        {"features": artifact.record.key, "val": val_artifact.record.key if val_artifact else None, "split": split,
         "grid": grid, "epochs": epochs, "batch_size": batch_size, "seed": seed, "parents": parents}
    )
    name = f"{artifact.record.name}.{'-'.join(dict.fromkeys(decoders))}"
    torch_device = resolve_device(device)
    run_config = {"features": artifact.record.ref, "grid": grid, "epochs": epochs, "batch_size": batch_size,
              "budget": budget, "device": str(torch_device), **split}
    with WandbJob("train", run_config, enabled=wandb_requested(wandb), store=store) as job:
        for parent in parents:
            job.use(store.resolve(parent))
        cached = None if force else store.find("decoder", name, key)
        if cached is not None:
            store.require_intact(cached)  # small files: a damaged decoder is named now, not at predict time
            job.log(cached)
            job.log_metrics({**_summary_metrics(cached), "cached": True})
            return TrainResult(cached, cached=True)
        val_source = val_artifact or artifact
        check_memory(artifact, train_clips, val_source, val_clips, torch_device, available_bytes(torch_device))
        train = DeviceFeatures.from_artifact(artifact, train_clips, torch_device)
        val = DeviceFeatures.from_artifact(val_source, val_clips, torch_device) if val_clips else None
        validating = (f"validating on {len(val)} frames of {len(val_clips)} clip(s)" if val is not None
                      else "validating on none (--holdout-fraction 0)")
        print(
            f"featstore: training {len(configs)} head(s) on {len(train)} frames of {len(train_clips)} clip(s), "
            f"{validating}, {format_bytes(train.nbytes)} on {torch_device}",
            file=sys.stderr,
        )
        heads = train_heads(train, val, configs, epochs=epochs, batch_size=batch_size, seed=seed, progress=progress)
        best = best_head(heads) if val is not None else heads[0]
        if best.val is not None and best.val.mean_iou == 0.0:
            print(f"featstore: warning: every head scored 0 mean IoU on the validation clips (no predicted "
                  f"foreground overlaps a mask); kept {best.config.label}, the lowest training loss among them: "
                  "train longer (--epochs), try other --lr, or use pretrained features", file=sys.stderr)
        record = _commit(store, name, key, parents, artifact, best, heads, train_clips, val_clips, split,
                         fresh=force)
        job.log(record)
        for epoch in range(epochs):  # the loss curves as W&B charts, one line per head
            job.log_metrics({"epoch": epoch + 1, **{f"train_loss/{h.config.label}": h.epoch_losses[epoch] for h in heads}})
        job.log_metrics({**_summary_metrics(record), "cached": False})
    return TrainResult(record, cached=False)


def _summary_metrics(record: ArtifactRecord) -> dict[str, Any]:
    """A decoder's figures for its W&B run: its counts, timing and validation scores."""
    return {k: v for k, v in record.metadata.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and k != "extraction"}


def commit_head(
    data: FeatureDataModule, module: HeadModule, *, budget: int = DEFAULT_BUDGET, force: bool = False
) -> TrainResult:
    """Commit a head fitted in a Lightning ``Trainer`` as a decoder artifact, as ``featstore train`` commits
    its best, so that ``featstore predict --decoder REF`` makes contest results from it.

    ``data`` is the module's ``FeatureDataModule`` (made from a ref, set up); its validation clips, if any,
    score the head for the record. The weights are part of the key: committing the same head again is a
    cache hit, and another fit of it a new artifact.
    """
    if data.ref is None:
        raise FeatstoreError("commit_head needs a FeatureDataModule made from a stored feature artifact "
                             "(FeatureDataModule(ref, store=...)): the decoder's lineage starts there")
    data.setup("fit")  # a no-op when the trainer already loaded this split
    store = Store(data.store_root)
    artifact = open_features(store, data.ref)
    if module.trained_on is not None and module.trained_on != artifact.record.ref:
        raise FeatstoreError(
            f"the head was fitted on features {module.trained_on} but the data module holds {artifact.record.ref}: "
            "commit it with the data module it was fitted with, whose features are its lineage"
        )
    val_artifact = open_features(store, data.val_ref) if data.val_ref else None
    check_head_budget(artifact, module.config.decoder, module.head.nparams, budget)
    assert data.train_features is not None
    split: dict[str, Any] = (
        {"val_features": val_artifact.record.ref} if val_artifact is not None
        else {"holdout_fraction": data.holdout_fraction, "seed": data.seed}
    )
    parents = [artifact.record.ref] + ([val_artifact.record.ref] if val_artifact else [])
    weights = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.head.state_dict().items()}, weights)
    key = canonical_hash(
        {"features": artifact.record.key, "val": val_artifact.record.key if val_artifact else None, "split": split,
         "head": module.config.to_dict(), "weights": hashlib.sha256(weights.getvalue()).hexdigest(),
         "parents": parents}
    )
    name = f"{artifact.record.name}.{module.config.decoder}"
    cached = None if force else store.find("decoder", name, key)
    if cached is not None:
        return TrainResult(cached, cached=True)
    trained = module.trained_head(data.val_features)
    val_clips = list(data.val_features.clips) if data.val_features is not None else []
    record = _commit(store, name, key, parents, artifact, trained, [trained], list(data.train_features.clips),
                     val_clips, split, fresh=force)
    return TrainResult(record, cached=False)


def _commit(
    store: Store,
    name: str,
    key: str,
    parents: list[str],
    artifact: FeatureArtifact,
    best: Any,
    heads: list[Any],
    train_clips: list[str],
    val_clips: list[str],
    split: dict[str, Any],
    *,
    fresh: bool,
) -> ArtifactRecord:
    decoder: Decoder = best.decoder.cpu().float()
    head_metrics = [h.metrics() for h in heads]
    sizes = contest_feature_sizes(artifact)
    nflops_head = decoder.nflops(sizes)
    nparams_head = decoder.nparams
    metadata = {
        "features": artifact.record.ref,
        "backbone": artifact.backbone,
        "layers": list(artifact.layers),
        "dtype": artifact.metadata["dtype"],
        "preprocessing": artifact.metadata.get("preprocessing"),
        "extraction": artifact.metadata.get("extraction"),
        "weights_digest": artifact.metadata.get("weights_digest"),
        "decoder": decoder.spec(),
        "head": best.config.to_dict(),
        "nparams_backbone": artifact.nparams_backbone,
        "nparams_head": nparams_head,
        "nparams": artifact.nparams_backbone + nparams_head,
        "nflops_backbone": artifact.nflops_backbone,
        "nflops_head": nflops_head,
        "nflops": artifact.nflops_backbone + nflops_head,
        "train_frames_per_s": best.train_frames_per_s,
        "train_seconds": sum(h.train_seconds for h in heads),
        "val_mean_iou": best.val.mean_iou if best.val is not None else None,  # None: trained on every clip
        "val_j_mean": best.val.j_mean if best.val is not None else None,
        "val_per_clip": dict(best.val.per_clip) if best.val is not None else None,
        "train_clips": train_clips,
        "val_clips": val_clips,
        "split": split,
        "heads": [{k: v for k, v in m.items() if k != "val_per_clip"} for m in head_metrics],
    }
    with store.stage("decoder", name, key, fresh=fresh) as staging:
        if staging.committed is not None:
            return staging.committed
        buffer = io.BytesIO()
        torch.save(decoder.state_dict(), buffer)
        (staging.path / WEIGHTS_FILE).write_bytes(buffer.getvalue())
        write_json_atomic(staging.path / SPEC_FILE, decoder.spec())
        write_json_atomic(staging.path / METRICS_FILE, head_metrics)
        write_training_curves(head_metrics, staging.path / PLOT_FILE, best=best.config.label,
                              title=f"{name}: {len(heads)} head(s) on {artifact.record.ref}")
        return staging.commit(parents=parents, metadata=metadata)
