"""PyTorch Lightning wrappers: features stay on the device; loaders yield only frame indices.

``FeatureDataModule`` follows the DataModule contract: ``prepare_data`` only opens and verifies the
feature artifact on disk, ``setup`` loads the selected clips onto the trainer's device. Its loaders batch
integer indices, and ``on_after_batch_transfer`` turns them into features by index selection on the
device, so no step copies features from the host.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from decoders.device_data import DeviceFeatures
from decoders.host_allocator import reuse_freed_memory
from decoders.memory import available_bytes, check_memory
from decoders.training import (
    HeadConfig,
    build_head,
    check_disjoint,
    evaluate,
    holdout_split,
    lr_factor,
    recalibrate_batchnorm,
    segmentation_loss,
    window_view,
)
from featstore.errors import FeatstoreError
from featstore.metrics import ContestScore, Scores, iou_terms


class FrameIndices(Dataset[int]):
    """Frame ``i`` is just ``i``: the features it stands for already sit on the device."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class FeatureDataModule(pl.LightningDataModule):
    """Train/val features from a stored artifact (``ref``) or from ``DeviceFeatures`` already in memory."""

    def __init__(
        self,
        ref: str | None = None,
        *,
        store: str | Path | None = None,
        val_ref: str | None = None,
        holdout_fraction: float = 0.2,
        train: DeviceFeatures | None = None,
        val: DeviceFeatures | None = None,
        batch_size: int = 8,
        seed: int = 0,
        temporal_window: int = 0,
        device: str | torch.device | None = None,
    ) -> None:
        super().__init__()
        if (ref is None) == (train is None):
            raise FeatstoreError(
                "FeatureDataModule needs exactly one source: a feature artifact ref or train features"
            )
        if batch_size < 1:
            raise FeatstoreError(f"--batch-size must be >= 1, got {batch_size}")
        self.ref, self.store_root, self.val_ref = ref, store, val_ref
        self.holdout_fraction = holdout_fraction
        self.batch_size, self.seed, self.temporal_window = batch_size, seed, temporal_window
        self.device = torch.device(device) if device is not None else None
        self.train_features, self.val_features = train, val

    def _open(self, ref: str, verify: bool) -> Any:
        from featstore.features import open_features
        from featstore.store import Store

        artifact = open_features(Store(self.store_root), ref, verify=verify)
        if not artifact.has_masks:
            raise FeatstoreError(
                f"{artifact.record.ref} has no masks: build features from an annotated dataset"
            )
        return artifact

    def prepare_data(self) -> None:
        """Disk only: open the artifacts and check every file against its manifest."""
        for ref in (self.ref, self.val_ref):
            if ref is not None:
                self._open(ref, verify=True)

    def _target_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        """Put the selected clips' features and masks on the trainer's device (once)."""
        if self.train_features is not None or self.ref is None:
            return
        device = self._target_device()
        artifact = self._open(self.ref, verify=False)
        if self.val_ref is not None:
            train_clips = list(artifact.clips)
            val_artifact = self._open(self.val_ref, verify=False)
            val_clips = list(val_artifact.clips)
            check_disjoint(artifact.record.ref, train_clips, val_artifact.record.ref, val_clips)
        else:
            val_artifact = artifact
            train_clips, val_clips = holdout_split(artifact.clips, self.holdout_fraction, self.seed)
        check_memory(artifact, train_clips, val_artifact, val_clips, device, available_bytes(device))
        self.train_features = DeviceFeatures.from_artifact(artifact, train_clips, device)
        self.val_features = DeviceFeatures.from_artifact(val_artifact, val_clips, device)

    def _loader(self, split: str, data: DeviceFeatures, shuffle: bool) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(self.seed)

        def collate(indices: list[int]) -> dict[str, Any]:
            return {"split": split, "index": torch.tensor(indices, dtype=torch.long)}

        return DataLoader(
            FrameIndices(len(data)),
            batch_size=self.batch_size,
            shuffle=shuffle,
            generator=generator,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader[Any]:
        if self.train_features is None:
            raise FeatstoreError("FeatureDataModule.setup() has not run: no training features are loaded")
        return self._loader("train", self.train_features, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        if self.val_features is None:
            return []  # type: ignore[return-value]  # Lightning skips validation on an empty loader list
        return self._loader("val", self.val_features, shuffle=False)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Indices (now on the device) become features, masks and clip ids by device-side selection."""
        data = self.train_features if batch["split"] == "train" else self.val_features
        assert data is not None
        index: Tensor = batch["index"].to(data.device)
        return {
            "features": data.gather(index, self.temporal_window),
            "window": self.temporal_window,
            "masks": data.mask(index),
            "clip_ids": data.clip_ids[index],
            "frame_size": data.frame_size,
        }


class HeadModule(pl.LightningModule):
    """One head trained with the loss of ``train_heads`` and validated with the contest's mean IoU."""

    def __init__(
        self, config: HeadConfig, channels: dict[str, int], strides: dict[str, int], *, seed: int = 0
    ) -> None:
        super().__init__()
        self.config = config
        self.head = build_head(config, channels, strides, seed)
        self.save_hyperparameters(
            {"config": config.to_dict(), "channels": channels, "strides": strides, "seed": seed}
        )
        self._val_terms: list[tuple[Tensor, Tensor, Tensor]] = []
        self.val_scores: Scores | None = None
        self._host_memory = ExitStack()

    def setup(self, stage: str) -> None:
        """Fitting on the CPU keeps freed host memory mapped, as ``train_heads`` does."""
        if stage == "fit":
            on_cpu = self.trainer.strategy.root_device.type == "cpu"
            self._host_memory.enter_context(reuse_freed_memory(on_cpu))

    def teardown(self, stage: str) -> None:
        self._host_memory.close()

    @classmethod
    def for_features(cls, config: HeadConfig, data: DeviceFeatures, *, seed: int = 0) -> HeadModule:
        return cls(config, data.channels, data.strides, seed=seed)

    def forward(self, features: dict[str, Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        return self.head(features, out_size)

    def _logits(self, batch: dict[str, Any], *, full_size: bool = True) -> Tensor:
        window = self.head.temporal_window
        if window > batch["window"]:
            raise FeatstoreError(
                f"the {self.head.name} head reads {window} neighbour(s) per side but the data module gathers "
                f"{batch['window']}: create FeatureDataModule(temporal_window={window})"
            )
        size = batch["frame_size"] if full_size else None
        return self(window_view(batch["features"], batch["window"], window), size)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = segmentation_loss(self._logits(batch, full_size=False), batch["masks"])  # resized inside
        self.log("train_loss", loss, prog_bar=True, batch_size=int(batch["masks"].shape[0]))
        return loss

    def on_validation_epoch_start(self) -> None:
        """Exact BatchNorm statistics over the training frames before scoring, as ``train_heads`` does.

        In the trainer's precision, the one ``training_step`` and ``validation_step`` run in: Lightning
        enters it around the steps, not around this hook.
        """
        self._val_terms = []
        data = getattr(self.trainer, "datamodule", None)
        fitting = self.trainer.state.fn == "fit" and not self.trainer.sanity_checking
        if fitting and isinstance(data, FeatureDataModule) and data.train_features is not None:
            recalibrate_batchnorm(
                self.head,
                data.train_features,
                batch_size=data.batch_size,
                autocast=self.trainer.precision_plugin.forward_context,
            )

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prob = torch.sigmoid(self._logits(batch).float()).squeeze(1)
        intersection, union = iou_terms(prob, batch["masks"])
        self._val_terms.append((batch["clip_ids"], intersection, union))

    def on_validation_epoch_end(self) -> None:
        if not self._val_terms:
            return
        clip_ids, intersections, unions = (
            torch.cat(parts).tolist() for parts in zip(*self._val_terms, strict=True)
        )
        score = ContestScore()
        for clip_id, intersection, union in zip(clip_ids, intersections, unions, strict=True):
            score.add_terms(str(clip_id), intersection, union)
        self.val_scores = score.result()
        self.log("val_iou", self.val_scores.mean_iou, prog_bar=True)
        self.log("val_j", self.val_scores.j_mean)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(
            self.head.parameters(), lr=self.config.lr, weight_decay=self.config.weight_decay
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_factor(self.config.schedule, step, total)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def evaluate(self, data: DeviceFeatures, *, batch_size: int = 8) -> Scores:
        """Contest scores with the clip names of ``data``: the rule and, once a trainer has run this module,
        the precision of ``val_iou`` (without one, that of ``featstore train``)."""
        trainer = self._trainer
        autocast = trainer.precision_plugin.forward_context if trainer is not None else None
        return evaluate(self.head, data, batch_size=batch_size, autocast=autocast)
