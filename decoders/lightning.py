"""PyTorch Lightning wrappers: features stay on the device; loaders yield only frame indices.

``FeatureDataModule`` follows the DataModule contract: ``prepare_data`` only opens and verifies the
feature artifact on disk, ``setup`` loads the selected clips onto the trainer's device. Its loaders batch
integer indices, and ``on_after_batch_transfer`` turns them into features by index selection on the
device, so no step copies features from the host.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from decoders.device_data import DeviceFeatures
from decoders.host_allocator import reuse_freed_memory
from decoders.memory import available_bytes, check_memory
from decoders.training import (
    DEFAULT_HOLDOUT_FRACTION,
    HeadConfig,
    TrainedHead,
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


class SeededBatches(Sampler[list[int]]):
    """Batches in the order ``train_heads`` draws them for the same seed and batch size.

    One generator on the features' device and one permutation of it per epoch, as ``train_heads`` does, so
    a head fitted here sees the batches a ``featstore train`` head sees (a DataLoader's own shuffling
    draws a worker seed from its generator first, and would not).
    """

    def __init__(self, data: DeviceFeatures, batch_size: int, seed: int) -> None:
        self.data, self.batch_size = data, batch_size
        self.generator = torch.Generator(device=data.device).manual_seed(seed)

    def __len__(self) -> int:
        return -(-len(self.data) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        batches = list(self.data.batches(self.batch_size, self.generator))
        order = torch.cat(batches).tolist() if batches else []  # one read from the device per epoch
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]


class FeatureDataModule(pl.LightningDataModule):
    """Train/val features from a stored artifact (``ref``) or from ``DeviceFeatures`` already in memory.

    From a ref, clips split as ``featstore train`` splits them (``holdout_fraction`` of them held out by
    ``seed``; ``0`` trains on every clip without validation) unless ``val_ref`` names validation features;
    ``predict_ref`` names features to predict, annotated or not (by default the validation clips).
    """

    def __init__(
        self,
        ref: str | None = None,
        *,
        store: str | Path | None = None,
        val_ref: str | None = None,
        predict_ref: str | None = None,
        holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION,
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
            raise FeatstoreError(f"FeatureDataModule batch_size must be >= 1, got {batch_size}")
        if not 0.0 <= holdout_fraction < 1.0:
            raise FeatstoreError(
                f"FeatureDataModule holdout_fraction {holdout_fraction} must be in [0, 1): the fraction of clips "
                "held out for validation, 0 to train on every clip"
            )
        if predict_ref is not None and ref is None:
            raise FeatstoreError("FeatureDataModule predict_ref needs ref: the features are checked against the training features")
        self.device = torch.device(device) if device is not None else None
        if self.device is not None and self.device.type == "cuda" and not torch.cuda.is_available():
            raise FeatstoreError(f"FeatureDataModule device {device!r} asks for CUDA but torch sees no GPU: "
                                 "use device='cpu', or leave it to the trainer")
        self.ref, self.store_root, self.val_ref, self.predict_ref = ref, store, val_ref, predict_ref
        self.holdout_fraction = holdout_fraction
        self.batch_size, self.seed, self.temporal_window = batch_size, seed, temporal_window
        self.train_features, self.val_features = train, val
        self.predict_features: DeviceFeatures | None = None
        self._loaded: tuple[Any, ...] | None = None  # what setup loaded for: source, device and split
        self.loaded_ref: str | None = None  # the versioned ref of the training features setup loaded

    def _open(self, ref: str, verify: bool, *, masks: bool = True) -> Any:
        from featstore.features import open_features
        from featstore.store import Store

        artifact = open_features(Store(self.store_root), ref, verify=verify)
        if masks and not artifact.has_masks:
            raise FeatstoreError(
                f"{artifact.record.ref} has no masks: build features from an annotated dataset"
            )
        return artifact

    @property
    def channels(self) -> dict[str, int]:
        """Channels per layer, known before ``setup`` (from the artifact's record) to build a head with."""
        return self._layer_sizes()[0]

    @property
    def strides(self) -> dict[str, int]:
        """Strides per layer, known before ``setup``, as ``channels``."""
        return self._layer_sizes()[1]

    def _layer_sizes(self) -> tuple[dict[str, int], dict[str, int]]:
        """Channels and strides of the loaded training features or, before ``setup``, of the artifact's record."""
        if self.train_features is not None:
            return dict(self.train_features.channels), dict(self.train_features.strides)
        assert self.ref is not None
        artifact = self._open(self.ref, verify=False)
        return dict(artifact.channels()), dict(artifact.strides())

    def prepare_data(self) -> None:
        """Disk only: open the artifacts and check every file against its manifest."""
        for ref in (self.ref, self.val_ref):
            if ref is not None:
                self._open(ref, verify=True)
        if self.predict_ref is not None:
            self._open(self.predict_ref, verify=True, masks=False)

    def _target_device(self) -> torch.device:
        if self.device is not None:
            return self.device
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        """Put the selected clips' features and masks on the trainer's device.

        Loaded once, and again only when the device or the split changed since: a ``setup`` called by
        hand before ``trainer.fit`` on a GPU does not leave the features on the CPU.
        """
        if self.ref is None:
            return
        from featstore.features import check_compatible

        device = self._target_device()
        wanted = (self.ref, self.store_root, device, self.val_ref, self.predict_ref, self.holdout_fraction, self.seed)
        if self._loaded == wanted:
            return
        self.train_features = self.val_features = self.predict_features = None  # free the old before loading
        artifact = self._open(self.ref, verify=False)
        val_artifact = artifact
        if self.val_ref is not None:
            train_clips = list(artifact.clips)
            val_artifact = self._open(self.val_ref, verify=False)
            check_compatible(artifact, val_artifact)
            val_clips = list(val_artifact.clips)
            check_disjoint(artifact.record.ref, train_clips, val_artifact.record.ref, val_clips)
        else:
            train_clips, val_clips = holdout_split(artifact.clips, self.holdout_fraction, self.seed)
        check_memory(artifact, train_clips, val_artifact, val_clips, device, available_bytes(device))
        self.train_features = DeviceFeatures.from_artifact(artifact, train_clips, device)
        if val_clips:
            self.val_features = DeviceFeatures.from_artifact(val_artifact, val_clips, device)
        if self.predict_ref is not None:
            predict_artifact = self._open(self.predict_ref, verify=False, masks=False)
            check_compatible(artifact, predict_artifact)
            self.predict_features = DeviceFeatures.from_artifact(predict_artifact, None, device, require_masks=False)
        self._loaded, self.loaded_ref = wanted, artifact.record.ref

    def _loader(self, split: str, data: DeviceFeatures, shuffle: bool) -> DataLoader[Any]:
        def collate(indices: list[int]) -> dict[str, Any]:
            return {"split": split, "index": torch.tensor(indices, dtype=torch.long)}

        if not shuffle:  # in frame order, a plain loader: Lightning then knows every frame is returned
            return DataLoader(FrameIndices(len(data)), batch_size=self.batch_size, collate_fn=collate)
        return DataLoader(
            FrameIndices(len(data)),
            batch_sampler=SeededBatches(data, self.batch_size, self.seed),
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

    def predict_dataloader(self) -> DataLoader[Any]:
        """The ``predict_ref`` features, else the validation clips, in frame order."""
        data = self._split("predict")
        return self._loader("predict", data, shuffle=False)

    def _split(self, split: str) -> DeviceFeatures:
        if split == "predict":
            data = self.predict_features if self.predict_features is not None else self.val_features
        else:
            data = self.train_features if split == "train" else self.val_features
        if data is None:
            raise FeatstoreError(
                f"FeatureDataModule has no {split} features loaded: "
                + ("pass predict_ref, or keep clips for validation (holdout_fraction > 0 or val_ref)"
                   if split == "predict" else "call setup() (a Trainer does) first")
            )
        return data

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Indices (now on the device) become features, masks and clip ids by device-side selection."""
        data = self._split(batch["split"])
        index: Tensor = batch["index"].to(data.device)
        return {
            "index": index,
            "features": data.gather(index, self.temporal_window),
            "window": self.temporal_window,
            "masks": data.mask(index) if data.has_masks else None,
            "clip_ids": data.clip_ids[index],
            "clips": data.clips,
            "frame_size": data.frame_size,
        }


class HostMemoryWhileFitting(pl.Callback):
    """Keeps freed host memory mapped while a CPU fit runs, and gives it back however the fit ends.

    A callback, not the module's ``setup``/``teardown``: Lightning skips a module's ``teardown`` when
    fitting raises, and the process would keep the setting; callbacks hear of the exception.
    """

    def __init__(self) -> None:
        self._held = ExitStack()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._held.enter_context(reuse_freed_memory(trainer.strategy.root_device.type == "cpu"))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._held.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._held.close()


def as_head_config(config: HeadConfig | Mapping[str, Any] | str) -> HeadConfig:
    """A ``HeadConfig`` from itself, its ``to_dict()`` (as checkpoints hold it) or a decoder name."""
    if isinstance(config, HeadConfig):
        return config
    if isinstance(config, str):
        return HeadConfig(config)
    return HeadConfig.from_dict(dict(config))


def _prepared(batch: Any) -> dict[str, Any]:
    if not isinstance(batch, dict) or "features" not in batch:
        raise FeatstoreError(
            "HeadModule steps on batches that FeatureDataModule selects on the device: pass the data module, "
            "trainer.fit(module, datamodule=data), not its loaders"
        )
    return batch


class HeadModule(pl.LightningModule):
    """One head trained with the loss of ``train_heads`` and validated with the contest's mean IoU.

    ``config`` is a ``HeadConfig``, its dict, or a decoder name; ``channels`` and ``strides`` come from the
    features (``FeatureDataModule.channels``, or ``for_features``). With ``FeatureDataModule``'s batches
    and seed, a head fitted here on the CPU takes the steps a ``featstore train`` head takes.
    """

    def __init__(
        self,
        config: HeadConfig | Mapping[str, Any] | str,
        channels: dict[str, int],
        strides: dict[str, int],
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.config = as_head_config(config)
        # Channels-last, the layout of DeviceFeatures and of train_heads' heads: convolutions then sum in
        # the same order, so the two paths end with the same weights.
        self.head = build_head(self.config, channels, strides, seed).to(memory_format=torch.channels_last)
        self.trained_on: str | None = None  # the feature artifact the last fit read, by versioned ref
        self.save_hyperparameters(
            {"config": self.config.to_dict(), "channels": channels, "strides": strides, "seed": seed}
        )
        self._val_terms: list[tuple[Tensor, Tensor, Tensor]] = []
        self._val_clips: tuple[str, ...] = ()
        self.val_scores: Scores | None = None
        self._calibrated_at: int | None = None  # global step of the last BatchNorm recalibration
        self._epoch_sum: Tensor | None = None
        self._epoch_frames = 0
        self._last_loss: Tensor | None = None  # the last step's, kept on the device until read
        self._started = 0.0
        self.epoch_losses: list[float] = []  # training loss per frame of each epoch, as train_heads records
        self.train_seconds = 0.0
        self.train_frames = 0
        self.final_loss = float("nan")

    def configure_callbacks(self) -> list[pl.Callback]:
        """Fitting on the CPU keeps freed host memory mapped, as ``train_heads`` does (``HostMemoryWhileFitting``)."""
        return [HostMemoryWhileFitting()]

    @classmethod
    def for_features(
        cls, config: HeadConfig | Mapping[str, Any] | str, data: DeviceFeatures | FeatureDataModule, *, seed: int = 0
    ) -> HeadModule:
        """A head for these features; a data module answers from its artifact's record, before ``setup``."""
        return cls(config, data.channels, data.strides, seed=seed)

    def forward(self, features: dict[str, Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        return self.head(features, out_size)

    def _logits(self, batch: dict[str, Any], *, full_size: bool = True) -> Tensor:
        batch = _prepared(batch)
        window = self.head.temporal_window
        if window > batch["window"]:
            raise FeatstoreError(
                f"the {self.head.name} head reads {window} neighbour(s) per side but the data module gathers "
                f"{batch['window']}: create FeatureDataModule(temporal_window={window})"
            )
        size = batch["frame_size"] if full_size else None
        return self(window_view(batch["features"], batch["window"], window), size)

    def _datamodule(self) -> FeatureDataModule | None:
        data = getattr(self.trainer, "datamodule", None)
        return data if isinstance(data, FeatureDataModule) else None

    def on_train_start(self) -> None:
        """What the figures of this fit count from: ``trained_head`` reports the last fit.

        A new Trainer counts steps from 0 again, so an earlier fit's recalibration says nothing about this one.
        """
        self.epoch_losses, self.train_frames, self._started = [], 0, time.perf_counter()
        self._epoch_sum, self._epoch_frames = None, 0  # an interrupted fit may have left an epoch open
        self._last_loss = None
        self._calibrated_at = None
        data = self._datamodule()
        self.trained_on = data.loaded_ref if data is not None else None

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        logits = self._logits(batch, full_size=False)
        frames = int(batch["masks"].shape[0])
        loss = segmentation_loss(logits, batch["masks"])  # resized inside
        self.log("train_loss", loss, prog_bar=True, batch_size=frames)
        self._last_loss = loss.detach()
        weighted = self._last_loss * frames  # summed on the device, read once an epoch
        self._epoch_sum = weighted if self._epoch_sum is None else self._epoch_sum + weighted
        self._epoch_frames += frames
        self.train_frames += frames
        return loss

    def _open_epoch_loss(self) -> list[float]:
        """The loss per frame of the epoch being trained, once it has steps; read from the device here."""
        return [float(self._epoch_sum) / self._epoch_frames] if self._epoch_sum is not None and self._epoch_frames else []

    def _final_loss(self) -> float:
        """The last step's loss, as ``train_heads`` reports ``final_loss``."""
        return float(self._last_loss) if self._last_loss is not None else self.final_loss

    def on_train_epoch_end(self) -> None:
        self.epoch_losses += self._open_epoch_loss()
        self._epoch_sum, self._epoch_frames = None, 0

    def on_train_end(self) -> None:
        """Exact BatchNorm statistics for what follows training, validated at its last step or not."""
        if self.trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.train_seconds, self._started = time.perf_counter() - self._started, 0.0
        self._recalibrate()
        self.final_loss = self._final_loss()

    def _recalibrate(self) -> None:
        """BatchNorm statistics over the training frames, as ``train_heads`` computes them after training.

        In the trainer's precision, the one ``training_step`` and ``validation_step`` run in: Lightning
        enters it around the steps, not around the hooks this runs in. Once per trained step.
        """
        data = self._datamodule()
        if data is None or data.train_features is None or self._calibrated_at == self.trainer.global_step:
            return
        recalibrate_batchnorm(
            self.head,
            data.train_features,
            batch_size=data.batch_size,
            autocast=self.trainer.precision_plugin.forward_context,
        )
        self._calibrated_at = self.trainer.global_step

    def on_validation_epoch_start(self) -> None:
        """Exact BatchNorm statistics over the training frames before scoring, as ``train_heads`` does."""
        self._val_terms = []
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self._recalibrate()

    def _probabilities(self, batch: dict[str, Any]) -> Tensor:
        """Foreground probabilities ``(B, H, W)`` at the frame's size, in float32."""
        return torch.sigmoid(self._logits(batch).float()).squeeze(1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        prob = self._probabilities(batch)
        intersection, union = iou_terms(prob, batch["masks"])
        self._val_terms.append((batch["clip_ids"], intersection, union))
        self._val_clips = batch["clips"]

    def on_validation_epoch_end(self) -> None:
        if not self._val_terms:
            return
        clip_ids, intersections, unions = (
            torch.cat(parts).tolist() for parts in zip(*self._val_terms, strict=True)
        )
        score = ContestScore()
        for clip_id, intersection, union in zip(clip_ids, intersections, unions, strict=True):
            score.add_terms(self._val_clips[clip_id], intersection, union)
        self.val_scores = score.result()
        self.log("val_iou", self.val_scores.mean_iou, prog_bar=True)
        self.log("val_j", self.val_scores.j_mean)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Frame indices, their clips and foreground probabilities ``(B, H, W)`` at the frame's size."""
        clips = batch["clips"]
        return {"index": batch["index"], "clips": [clips[i] for i in batch["clip_ids"].tolist()],
                "probabilities": self._probabilities(batch)}

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
        return evaluate(self.head, data, batch_size=batch_size, autocast=self._precision())

    def _precision(self) -> Callable[[], AbstractContextManager[Any]] | None:
        """The precision of the trainer that ran this module; ``None`` (``featstore train``'s) without one."""
        trainer = self._trainer
        return trainer.precision_plugin.forward_context if trainer is not None else None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """The fit's figures so far travel with the weights, so a head reloaded from here commits with them.

        A checkpoint taken at validation comes before ``on_train_epoch_end``: the epoch it closes counts.
        """
        curve = self.epoch_losses + self._open_epoch_loss()
        seconds = time.perf_counter() - self._started if self._started else self.train_seconds
        checkpoint["featstore"] = {"epoch_losses": curve, "train_seconds": seconds, "train_frames": self.train_frames,
                                   "final_loss": self._final_loss(),
                                   "trained_on": self.trained_on}
        if self._trainer is not None and self.trainer.state.fn == "fit":
            # Without a validation at this step the running statistics lag the weights: recompute them, and
            # write them over the state Lightning collected before calling this hook.
            self._recalibrate()
            state = checkpoint.get("state_dict", {})
            for name, value in self.head.state_dict().items():
                if f"head.{name}" in state:
                    state[f"head.{name}"] = value

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        figures = checkpoint.get("featstore", {})
        self.epoch_losses = list(figures.get("epoch_losses", []))
        self.train_seconds = float(figures.get("train_seconds", 0.0))
        self.train_frames = int(figures.get("train_frames", 0))
        self.final_loss = float(figures.get("final_loss", float("nan")))
        self.trained_on = figures.get("trained_on")

    def trained_head(self, val: DeviceFeatures | None) -> TrainedHead:
        """A copy of this head as ``train_heads`` reports one, scored on ``val`` on its device: what
        ``jobs.train.commit_head`` records. The module itself stays where it is."""
        head = copy.deepcopy(self.head)
        scores = None
        if val is not None:
            scores = evaluate(head.to(val.device), val, batch_size=8, autocast=self._precision())
        return TrainedHead(self.config, head, self.train_seconds, self.train_frames, self.final_loss, scores,
                           tuple(self.epoch_losses))
