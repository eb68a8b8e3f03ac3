"""The contest score: IoU of binarized greyscale predictions against annotations.

Rules (shared by the numpy path that scores PNG result folders and the torch path used for validation
inside training loops, so that a validation number is the number the contest will report):

* a greyscale value v in 0..255 is foreground iff round(v / 255) == 1, i.e. v >= 128;
* a probability p becomes the PNG value round(255 * p) (clipped to 0..255), then is binarized as above;
* per-frame IoU = |pred AND target| / |pred OR target|; a frame where both are empty is left out;
* ``mean_iou`` is the mean over every frame scored, pooled across clips; ``j_mean`` is the mean over
  clips of each clip's mean IoU (the DAVIS "J mean").

When nothing is left to score (every frame has an empty prediction and an empty annotation) the score is
1.0, the DAVIS convention for an empty prediction of an empty mask: predicting nothing where there is
nothing is perfect, never NaN. The same holds per clip.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # torch is imported lazily so that scoring result folders does not pay for it
    import torch

FOREGROUND_MIN_VALUE = 128
"""Smallest 8-bit value with round(v / 255) == 1."""

EMPTY_SCORE = 1.0
"""Score of a clip or dataset in which every frame is empty in both prediction and annotation."""


def binarize(values: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Foreground mask of greyscale values: round(v / 255) == 1 (127 -> background, 128 -> foreground).

    Boolean input is taken as already binary; integer input uses the exact threshold v >= 128; float input
    is rounded half-to-even like Python's ``round``.
    """
    values = np.asarray(values)
    if values.dtype == np.bool_:
        return values
    if np.issubdtype(values.dtype, np.integer):
        return values >= FOREGROUND_MIN_VALUE
    return np.rint(values.astype(np.float64) / 255.0) >= 1


def frame_terms(pred: npt.NDArray[Any], target: npt.NDArray[Any]) -> tuple[int, int]:
    """(intersection, union) pixel counts of a greyscale prediction against a binary annotation.

    ``pred`` holds greyscale values 0..255 (or booleans); ``target`` holds {0, 1} or booleans, as
    ``featstore.datasets.read_mask`` returns it.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from annotation shape {target.shape}")
    pred_fg = binarize(pred)
    target_fg = _as_binary_mask(target)
    intersection = int(np.count_nonzero(pred_fg & target_fg))
    union = int(np.count_nonzero(pred_fg | target_fg))
    return intersection, union


def frame_iou(pred: npt.NDArray[Any], target: npt.NDArray[Any]) -> float | None:
    """IoU of one frame, or None when prediction and annotation are both empty (the frame is left out)."""
    intersection, union = frame_terms(pred, target)
    return None if union == 0 else intersection / union


def _as_binary_mask(target: npt.NDArray[Any]) -> npt.NDArray[np.bool_]:
    """Check that an annotation is already binary, so a raw 0/255 mask is not silently misread as {0, 1}."""
    target = np.asarray(target)
    if target.dtype == np.bool_:
        return target
    if target.size and int(target.max()) > 1:
        raise ValueError(
            "annotation holds values above 1; pass the binary mask from featstore.datasets.read_mask "
            "(or binarize(raw_values)), not the raw 0..255 PNG values"
        )
    return target != 0


@dataclass(frozen=True)
class Scores:
    """Contest scores of one result against one annotated dataset."""

    mean_iou: float
    j_mean: float
    per_clip: dict[str, float] = field(default_factory=dict)
    frames_scored: int = 0
    frames_both_empty: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ContestScore:
    """Accumulates per-frame IoU, clip by clip, and reduces it to the contest scores."""

    def __init__(self) -> None:
        self._ious: dict[str, list[float]] = {}
        self._both_empty = 0

    def add(self, clip: str, pred_u8: npt.NDArray[Any], target_u8: npt.NDArray[Any]) -> float | None:
        """Score one frame: greyscale prediction (0..255) against its binary annotation ({0, 1}).

        Returns the frame's IoU, or None when the frame is left out because both are empty.
        """
        return self.add_terms(clip, *frame_terms(pred_u8, target_u8))

    def add_terms(self, clip: str, intersection: int, union: int) -> float | None:
        """Score one frame from its pixel counts, for callers that computed them elsewhere."""
        if not 0 <= intersection <= union:
            raise ValueError(f"need 0 <= intersection <= union, got {intersection} and {union}")
        ious = self._ious.setdefault(clip, [])
        if union == 0:
            self._both_empty += 1
            return None
        iou = intersection / union
        ious.append(iou)
        return iou

    def result(self) -> Scores:
        """Pooled mean IoU, per-clip J and its mean over clips; see the module docstring for empty frames."""
        if not self._ious:
            raise ValueError("no frames were added; there is nothing to score")
        per_clip = {clip: _mean_or_empty(self._ious[clip]) for clip in sorted(self._ious)}
        pooled = [iou for ious in self._ious.values() for iou in ious]
        return Scores(
            mean_iou=_mean_or_empty(pooled),
            j_mean=float(np.mean(list(per_clip.values()))),
            per_clip=per_clip,
            frames_scored=len(pooled),
            frames_both_empty=self._both_empty,
        )


def _mean_or_empty(ious: list[float]) -> float:
    return float(np.mean(ious)) if ious else EMPTY_SCORE


# Torch versions, for validation on device-resident batches inside training loops.


def probability_to_u8(p: torch.Tensor) -> torch.Tensor:
    """The 8-bit value a probability is written as in a result PNG: round(255 * p), clipped to 0..255.

    Computed in float64, where 255 * p is exact for float32, float16 and bfloat16 input (a float32 product
    rounds some k + 0.5 + e down to k + 0.5, and then to the even neighbour), and rounded half-to-even, so
    the training-loop score and the written PNGs agree bit for bit. NaN becomes 0 (background).
    """
    import torch

    p = p.to(torch.float64)
    values = torch.round(torch.nan_to_num(p, nan=0.0) * 255.0).clamp_(0, 255)
    return values.to(torch.uint8)


def binarize_probability(p: torch.Tensor) -> torch.Tensor:
    """Foreground mask of probabilities exactly as the PNG round trip yields it: round(round(255 p) / 255)."""
    return probability_to_u8(p) >= FOREGROUND_MIN_VALUE


def iou_terms(pred_prob: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame (intersection, union) pixel counts, int64 tensors of shape (N,), on the input's device.

    ``pred_prob`` is (N, H, W) float probabilities in [0, 1]; ``target`` is (N, H, W) uint8 {0, 1} or bool.
    """
    if pred_prob.shape != target.shape or pred_prob.dim() != 3:
        raise ValueError(
            f"need prediction and target of the same (N, H, W) shape, got {tuple(pred_prob.shape)} "
            f"and {tuple(target.shape)}"
        )
    pred_fg = binarize_probability(pred_prob)
    target_fg = target.to(pred_fg.device) != 0
    intersection = (pred_fg & target_fg).sum(dim=(1, 2))
    union = (pred_fg | target_fg).sum(dim=(1, 2))
    return intersection, union


def mean_iou_from_terms(intersection: torch.Tensor, union: torch.Tensor) -> float:
    """Pooled mean IoU of per-frame counts, leaving out frames where both are empty (1.0 if all are)."""
    scored = union > 0
    if not bool(scored.any()):
        return EMPTY_SCORE
    return float((intersection[scored].double() / union[scored].double()).mean())
