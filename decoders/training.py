"""Train a grid of heads in one pass over device-resident features and score them by the contest rule.

Every head sees the same batches in the same order (one seeded permutation per epoch) and has its own
AdamW state, so K heads cost one pass of batch gathering, and head i trained in a grid ends where it
would end trained alone with the same seed (dinov2's linear evaluation, for segmentation heads). Heads
of one architecture can step as one vmapped computation (``decoders.stacked``), with the updates each
would get alone in float32.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from decoders._registry import create_decoder, get_decoder_class
from decoders.device_data import DeviceFeatures
from decoders.heads import DEFAULT_DECODER, Decoder
from decoders.host_allocator import reuse_freed_memory
from decoders.losses import segmentation_loss, segmentation_losses
from decoders.stacked import StackedAdamW, StackedHeads
from featstore.errors import FeatstoreError
from featstore.metrics import ContestScore, Scores, iou_terms

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class HeadConfig:
    """One point of the grid: which head, its options, and how it is optimised."""

    decoder: str = DEFAULT_DECODER
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine decay after a short linear warm-up, or a constant rate
    options: dict[str, Any] = field(default_factory=dict)  # passed to create_decoder

    def __post_init__(self) -> None:
        get_decoder_class(self.decoder)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FeatstoreError(f"--lr {self.lr} must be a positive number")
        if self.weight_decay < 0:
            raise FeatstoreError(f"weight decay {self.weight_decay} must be >= 0")
        if self.schedule not in SCHEDULES:
            raise FeatstoreError(f"schedule {self.schedule!r} is unknown: use one of {', '.join(SCHEDULES)}")

    @property
    def label(self) -> str:
        options = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        name = f"{self.decoder}({options})" if options else self.decoder
        return f"{name} lr={self.lr:g} wd={self.weight_decay:g} {self.schedule}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "decoder": self.decoder,
            "lr": self.lr,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule,
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeadConfig:
        return cls(
            decoder=data["decoder"],
            lr=float(data["lr"]),
            weight_decay=float(data["weight_decay"]),
            schedule=data.get("schedule", "cosine"),
            options=dict(data.get("options", {})),
        )

    def init_seed(self, seed: int) -> int:
        """Initialisation seed from the run seed and this config alone, not its place in the grid."""
        payload = json.dumps([seed, self.to_dict()], sort_keys=True, default=str).encode()
        return int.from_bytes(hashlib.sha256(payload).digest()[:7], "big")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class TrainedHead:
    """A trained head with its timing and validation scores (``None`` without validation data).

    ``final_loss`` is the last step's loss; ``epoch_losses`` each epoch's loss per frame (batch losses
    weighted by their frames, so a short last batch counts for its size), the curve
    that tells a learning rate that diverged or stalled from one that converged.
    """

    config: HeadConfig
    decoder: Decoder
    train_seconds: float
    train_frames: int
    final_loss: float
    val: Scores | None
    epoch_losses: tuple[float, ...] = ()

    @property
    def nparams(self) -> int:
        return self.decoder.nparams

    @property
    def train_frames_per_s(self) -> float:
        return self.train_frames / self.train_seconds if self.train_seconds > 0 else 0.0

    @property
    def val_mean_iou(self) -> float | None:
        return self.val.mean_iou if self.val is not None else None

    def metrics(self) -> dict[str, Any]:
        return {
            "head": self.config.label,
            "config": self.config.to_dict(),
            "nparams_head": self.nparams,
            "train_seconds": self.train_seconds,
            "train_frames": self.train_frames,
            "train_frames_per_s": self.train_frames_per_s,
            # None where a head diverged: NaN and infinity are not JSON, and strict readers refuse them.
            "final_loss": _finite_or_none(self.final_loss),
            "epoch_losses": [_finite_or_none(loss) for loss in self.epoch_losses],
            "val_mean_iou": self.val.mean_iou if self.val else None,
            "val_j_mean": self.val.j_mean if self.val else None,
            "val_per_clip": dict(self.val.per_clip) if self.val else None,
        }


def autocast_for(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast for the heads on CUDA; plain float32 on the CPU."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def window_view(features: dict[str, Tensor], gathered: int, window: int) -> dict[str, Tensor]:
    """Narrow features gathered with ``gathered`` neighbours per side to what a head with ``window`` reads."""
    if gathered == 0:
        return features
    if window == 0:
        return {layer: x[:, gathered] for layer, x in features.items()}
    return {layer: x[:, gathered - window : gathered + window + 1] for layer, x in features.items()}


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base rate at ``step`` of ``total``: warm-up over 5% of the steps, then cosine to 1%."""
    if schedule == "constant":
        return 1.0
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def recalibrate_batchnorm(
    head: Decoder,
    data: DeviceFeatures,
    *,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> None:
    """Recompute BatchNorm statistics for the final weights with one pass over ``data``.

    Running averages lag behind the weights (badly after few steps); an exact average over the training
    frames makes evaluation match what training saw. torch.optim.swa_utils.update_bn does this for models
    of one argument; heads take two. ``autocast`` is the precision the head is evaluated in, so the
    statistics come from the activations evaluation normalizes: by default ``autocast_for``, as
    ``evaluate`` runs.
    """
    norms = [m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over every batch of the pass
    was_training = head.training
    head.train()
    precision = autocast or (lambda: autocast_for(data.device))
    for index in data.batches(batch_size, shuffle=False):
        with precision():
            head.coarse_logits(data.gather(index, head.temporal_window))  # the resize has no statistics
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    head.train(was_training)


class HeadClock:
    """Time spent in each stepper's steps (a head, or a stacked group of heads), without stalling the GPU.

    Synchronizing after every step would keep the host from queueing the next stepper's kernels while
    the GPU runs this one; on CUDA each step is bracketed by events instead, read once at the end. The
    events go on ``device``'s current stream, where the steps' kernels run, not on the current device's:
    a caller may train on ``cuda:1`` without making it the current device.
    """

    def __init__(self, steppers: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.totals = [0.0] * steppers
        self.started = [0.0] * steppers
        self.events: list[list[tuple[Any, Any]]] = [[] for _ in range(steppers)]

    def _record(self) -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def start(self, stepper: int) -> None:
        if self.cuda:
            self.events[stepper].append((self._record(), None))
        else:
            self.started[stepper] = time.perf_counter()

    def stop(self, stepper: int) -> None:
        if self.cuda:
            self.events[stepper][-1] = (self.events[stepper][-1][0], self._record())
        else:
            self.totals[stepper] += time.perf_counter() - self.started[stepper]

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            for stepper, pairs in enumerate(self.events):
                self.totals[stepper] += sum(begin.elapsed_time(end) for begin, end in pairs) / 1000.0
                pairs.clear()
        return list(self.totals)


def build_head(config: HeadConfig, channels: dict[str, int], strides: dict[str, int], seed: int) -> Decoder:
    """A head initialised from ``config.init_seed(seed)``, leaving the global random state untouched."""
    with torch.random.fork_rng(devices=[]):  # reseeds the CPU generator only, the one heads draw from
        torch.default_generator.manual_seed(config.init_seed(seed))
        return create_decoder(config.decoder, channels, strides, **config.options)


class SingleHead:
    """One head with its own AdamW and schedule, stepped on its own."""

    def __init__(self, head: Decoder, config: HeadConfig, total_steps: int) -> None:
        self.heads = [head]
        self.optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, functools.partial(lr_factor, config.schedule, total=total_steps)
        )

    def step(self, features: dict[str, Tensor], gathered: int, masks: Tensor) -> Tensor:
        """One AdamW step on a batch; returns the loss as a one-element tensor."""
        head = self.heads[0]
        with autocast_for(masks.device):
            coarse = head(window_view(features, gathered, head.temporal_window))
        loss = segmentation_loss(coarse, masks)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach().unsqueeze(0)

    def finish(self) -> None:
        """Nothing to hand back: the head trained in place."""


class StackedGroup:
    """Heads of one architecture stepped as one vmapped computation, each with its own rate and decay."""

    def __init__(self, heads: Sequence[Decoder], configs: Sequence[HeadConfig], total_steps: int) -> None:
        self.heads = list(heads)
        self.stack = StackedHeads(heads)
        self.optimizer = StackedAdamW(self.stack.parameters(), [c.weight_decay for c in configs])
        # Every step's rate for every head, computed once: no host-to-device copy per step.
        self.rates = torch.tensor(
            [
                [c.lr * lr_factor(c.schedule, step, total_steps) for c in configs]
                for step in range(total_steps)
            ],
            dtype=torch.float64,
            device=self.stack.parameters()[0].device,
        )
        self.steps = 0

    def step(self, features: dict[str, Tensor], gathered: int, masks: Tensor) -> Tensor:
        """One AdamW step of every head on a batch, in float32 on every device; returns the heads' losses.

        No autocast here: ``StackedHeads`` runs its mapped forward outside autocast, and the loss computes
        in float32 either way.
        """
        coarse = self.stack(window_view(features, gathered, self.stack.temporal_window))
        losses = segmentation_losses(coarse, masks)
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()  # heads share no weights: each gets exactly its own loss's gradient
        self.optimizer.step(self.rates[self.steps])
        self.steps += 1
        return losses.detach()

    def finish(self) -> None:
        """Copy the trained weights back into the heads."""
        self.stack.write_back()


def steppers(
    heads: Sequence[Decoder], configs: Sequence[HeadConfig], total_steps: int, stack: bool
) -> list[SingleHead | StackedGroup]:
    """Heads grouped by architecture into stacked groups when ``stack``, else one stepper per head."""
    if not stack:
        return [SingleHead(h, c, total_steps) for h, c in zip(heads, configs, strict=True)]
    groups: dict[str, list[int]] = {}
    for i, config in enumerate(configs):
        key = json.dumps([config.decoder, config.options], sort_keys=True, default=str)
        groups.setdefault(key, []).append(i)
    out: list[SingleHead | StackedGroup] = []
    for members in groups.values():
        if len(members) == 1:
            out.append(SingleHead(heads[members[0]], configs[members[0]], total_steps))
        else:
            chosen = [configs[i] for i in members]
            out.append(StackedGroup([heads[i] for i in members], chosen, total_steps))
    return out


def stacks_by_default(device: torch.device) -> bool:
    """Whether ``train_heads`` stacks heads of one architecture when not told: on CUDA, not on the CPU."""
    return device.type == "cuda"


def train_heads(
    train: DeviceFeatures,
    val: DeviceFeatures | None,
    configs: Sequence[HeadConfig],
    *,
    epochs: int = 10,
    batch_size: int = 8,
    seed: int = 0,
    progress: bool = True,
    stack: bool | None = None,
) -> list[TrainedHead]:
    """Train one head per config over the same seeded batches; score each on ``val`` when given.

    With ``stack`` (the default on CUDA), heads of one architecture step as one vmapped computation, one
    launch sequence for all of them; on the CPU they step one after another, which measured faster there
    (vmap turns their convolutions into grouped ones). On the CPU both give each head the same updates, in
    float32. On CUDA a stacked group still computes in float32 while a head stepped alone runs under
    bfloat16 autocast, so the two end close but not equal; scoring runs under the same autocast for both.
    """
    if not configs:
        raise FeatstoreError("train_heads needs at least one head config")
    if epochs < 1:
        raise FeatstoreError(f"--epochs {epochs} must be at least 1")
    if not train.has_masks:
        raise FeatstoreError("the training features have no masks: build them from an annotated dataset")
    device = train.device
    with reuse_freed_memory(device.type == "cpu"):
        heads = [build_head(config, train.channels, train.strides, seed).to(device) for config in configs]
        for head in heads:
            head.to(memory_format=torch.channels_last)  # the layout DeviceFeatures holds
            head.train()
        total_steps = epochs * math.ceil(len(train) / batch_size)
        units = steppers(heads, configs, total_steps, stacks_by_default(device) if stack is None else stack)
        # Where each head landed: (its stepper, its place among that stepper's heads).
        place = {id(head): (u, k) for u, unit in enumerate(units) for k, head in enumerate(unit.heads)}
        gathered = max(head.temporal_window for head in heads)
        generator = torch.Generator(device=device).manual_seed(seed)
        clock = HeadClock(len(units), device)
        losses = [torch.zeros(len(unit.heads), device=device) for unit in units]
        # Summed on the device and read once at the end: a per-epoch read would wait for the GPU.
        epoch_sums = [torch.zeros((epochs, len(unit.heads)), device=device) for unit in units]
        frames_per_epoch = max(1, len(train))  # every epoch's batches cover every frame once
        frames = 0
        with tqdm(
            total=total_steps, desc=f"training {len(heads)} head(s)", file=sys.stderr, disable=not progress
        ) as bar:
            for epoch in range(epochs):
                for index in train.batches(batch_size, generator):
                    features = train.gather(index, gathered)
                    masks = train.mask(index)  # uint8: the loss converts each chunk of frames as it reads it
                    batch = int(index.shape[0])
                    for u, unit in enumerate(units):
                        clock.start(u)
                        losses[u] = unit.step(features, gathered, masks)
                        clock.stop(u)
                        epoch_sums[u][epoch] += losses[u] * batch
                    frames += batch
                    bar.update(1)
                if progress:  # once an epoch: reading the loss waits for the GPU
                    best = float(torch.cat([sums[epoch] for sums in epoch_sums]).min()) / frames_per_epoch
                    bar.set_postfix(loss=f"{best:.3f}")
        for unit in units:
            unit.finish()
        unit_seconds = clock.seconds()
        curves = [(sums / frames_per_epoch).T.tolist() for sums in epoch_sums]  # per unit: head -> epochs
        results = []
        for config, head in zip(configs, heads, strict=True):
            u, k = place[id(head)]
            loss = float(losses[u][k])
            recalibrate_batchnorm(head, train, batch_size=batch_size)
            head.eval()
            scores = evaluate(head, val, batch_size=batch_size) if val is not None else None
            elapsed = unit_seconds[u] / len(units[u].heads)  # a group's time, shared by its heads
            results.append(TrainedHead(config, head, elapsed, frames, loss, scores, tuple(curves[u][k])))
        return results


def best_head(heads: Sequence[TrainedHead]) -> TrainedHead:
    """The head with the highest validation mean IoU; on ties (all zero, say), the higher J, then the lower
    last-epoch training loss, then the first listed."""
    scored = [h for h in heads if h.val is not None]
    if not scored:
        raise FeatstoreError("no head has validation scores: pass validation features or a holdout fraction")

    def rank(head: TrainedHead) -> tuple[float, float, float]:
        assert head.val is not None
        loss = head.epoch_losses[-1] if head.epoch_losses else head.final_loss
        return head.val.mean_iou, head.val.j_mean, -loss if math.isfinite(loss) else -math.inf

    return max(scored, key=rank)


@torch.no_grad()
def predict(
    decoder: Decoder,
    data: DeviceFeatures,
    *,
    batch_size: int = 8,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(index, probabilities)`` per batch in frame order; probabilities ``(B, H, W)`` float32 on the device.

    ``autocast``: the precision to run in, by default ``autocast_for`` (a Lightning trainer passes its own).
    """
    decoder.eval()
    precision = autocast or (lambda: autocast_for(data.device))
    for index in data.batches(batch_size, shuffle=False):
        with precision():
            logits = decoder(data.gather(index, decoder.temporal_window), data.frame_size)
        yield index, torch.sigmoid(logits.float()).squeeze(1)


def evaluate(
    decoder: Decoder,
    data: DeviceFeatures,
    *,
    batch_size: int = 8,
    autocast: Callable[[], AbstractContextManager[Any]] | None = None,
) -> Scores:
    """Contest scores: round(255 p) binarized as round(v / 255), both-empty frames left out, pooled mean."""
    if not data.has_masks:
        raise FeatstoreError("the validation features have no masks: build them from an annotated dataset")
    indices, intersections, unions = [], [], []
    for index, prob in predict(decoder, data, batch_size=batch_size, autocast=autocast):
        intersection, union = iou_terms(prob, data.mask(index))
        indices.append(index)
        intersections.append(intersection)
        unions.append(union)
    score = ContestScore()
    clip_ids = data.clip_ids[torch.cat(indices)].tolist()
    for clip_id, inter, union in zip(
        clip_ids, torch.cat(intersections).tolist(), torch.cat(unions).tolist(), strict=True
    ):
        score.add_terms(data.clips[clip_id], inter, union)
    return score.result()


DEFAULT_HOLDOUT_FRACTION = 0.25  # of clips held out for validation, in every command and the data module


def holdout_split(clips: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Split clips (never frames) into sorted (train, val); deterministic for a seed, training never empty.

    A fraction of 0 trains on every clip and validates on none: the final fit of a setting chosen on a split.
    """
    names = sorted(clips)
    if len(set(names)) != len(names):
        raise FeatstoreError(f"clip names must be unique for a holdout split, got {list(clips)}")
    if not 0.0 <= fraction < 1.0:
        raise FeatstoreError(
            f"--holdout-fraction {fraction} must be at least 0 and below 1 (0 trains on every clip, unvalidated)"
        )
    if fraction == 0.0:
        return names, []
    n_val = max(1, round(fraction * len(names)))
    if n_val >= len(names):
        raise FeatstoreError(
            f"--holdout-fraction {fraction} of {len(names)} clip(s) leaves no clip to train on: "
            "use a smaller fraction or more clips"
        )
    shuffled = names.copy()
    random.Random(seed).shuffle(shuffled)
    val = sorted(shuffled[:n_val])
    return [c for c in names if c not in val], val


def check_disjoint(train_ref: str, train_clips: Sequence[str], val_ref: str, val_clips: Sequence[str]) -> None:
    """Refuse validation features that share clips with the training features: validation is by clip."""
    shared = sorted(set(train_clips) & set(val_clips))
    if shared:
        listed = ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else "")
        raise FeatstoreError(
            f"validation features {val_ref} share {len(shared)} clip(s) with training features {train_ref} "
            f"({listed}): validation would score frames the heads trained on; pass features of other clips, "
            "or split one artifact by clip with --holdout-fraction"
        )
