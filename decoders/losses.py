"""The training loss of every head: BCE-with-logits plus soft Dice at the frame's full resolution.

Heads predict at stride 8-32 and are scored at 854x480, so the loss reads 400k logits per frame and, not
the head, is most of a step's work. ``segmentation_losses`` takes the heads' logits at their own
resolution, resizes them bilinearly (``resize_bilinear``'s two matmuls) and evaluates both terms a few
frames at a time, writing the gradient with respect to the small logits in closed form as it goes. The
batch's full-resolution logits are never held: on the CPU each chunk stays in cache, on CUDA memory
stays flat in the number of heads, and only the small gradient is kept for backward. The value and
gradient equal ``reference_segmentation_loss`` of the resized logits; the tests hold it to that.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from decoders.upsampling import interpolation_matrix
from featstore.errors import FeatstoreError

# Full-resolution values per chunk, over all heads: on the CPU about one DAVIS frame (2 MB) so each
# chunk's passes hit the cache (larger chunks measured up to 1.4x slower per step); on CUDA enough that a
# batch is one or two chunks and the kernel launches stay few.
CHUNK_VALUES = {"cpu": 1 << 19, "cuda": 1 << 26}


def frames_per_chunk(device: torch.device, heads: int, pixels: int) -> int:
    """How many frames of ``heads`` heads the loss evaluates at once (at least one)."""
    return max(1, CHUNK_VALUES.get(device.type, CHUNK_VALUES["cuda"]) // (heads * pixels))


def _float32(like: Tensor) -> torch.autocast:
    """Autocast off: sums over 400k pixels per frame lose digits in bfloat16 matmuls."""
    return torch.autocast(device_type=like.device.type, enabled=False)


def _bce_dice(logits: Tensor, masks: Tensor, with_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Per-head losses of ``(K, N, h, w)`` logits against ``(N, H, W)`` masks, and their gradient if asked."""
    heads, frames, height_in, width_in = logits.shape
    height, width = int(masks.shape[1]), int(masks.shape[2])
    pixels = height * width
    resize = (height_in, width_in) != (height, width)
    if resize:
        rows = interpolation_matrix(height, height_in, logits.device, logits.dtype)
        cols = interpolation_matrix(width, width_in, logits.device, logits.dtype)
    bce = logits.new_zeros(heads)
    dice = logits.new_zeros(heads)
    grad = torch.empty_like(logits) if with_grad else None
    per_value = 1.0 / (frames * pixels)
    step = frames_per_chunk(logits.device, heads, pixels)
    for start in range(0, frames, step):
        stop = min(frames, start + step)
        x = logits[:, start:stop]
        if resize:
            x = torch.matmul(rows, torch.matmul(x, cols.T))
        x = x.reshape(heads, stop - start, pixels)
        target = masks[start:stop].reshape(stop - start, pixels).to(x.dtype)
        prob = torch.sigmoid(x)
        # BCE with target y in {0, 1} is softplus(x) - x y, and softplus(x) = relu(x) - log(max(p, 1 - p)):
        # the sigmoid already computed serves it, and max(p, 1 - p) >= 1/2 keeps the log finite.
        confident = (prob - 0.5).abs_().add_(0.5).log_()
        # vecdot, not einsum: einsum lowers these to batched matmuls that MKL runs an order slower.
        agreement = torch.linalg.vecdot(x, target).sum(dim=1)  # sum of x * y
        bce += torch.relu(x).sum(dim=(1, 2)) - confident.sum(dim=(1, 2)) - agreement
        overlap = torch.linalg.vecdot(prob, target)  # sum of p * y per frame
        denominator = prob.sum(dim=2) + target.sum(dim=1) + 1.0  # sum of p + sum of y, smoothed
        dice += (1.0 - (2.0 * overlap + 1.0) / denominator).sum(dim=1)
        if grad is None:
            continue
        # d BCE / dx = (p - y) / (N P); d Dice_n / dx = p (1 - p) ((2 O + 1) / D^2 - 2 y / D) / N.
        constant = ((2.0 * overlap + 1.0) / denominator.square() / frames).unsqueeze(-1)
        per_target = (2.0 / denominator / frames).unsqueeze(-1)
        slope = torch.addcmul(constant, per_target, target, value=-1.0)
        g = torch.addcmul(prob, prob, prob, value=-1.0)  # p (1 - p)
        g.mul_(slope).add_(prob, alpha=per_value).sub_(target, alpha=per_value)
        g = g.view(heads, stop - start, height, width)
        # Shrink the height first: fewer products than the forward's order, the wide side summed early.
        grad[:, start:stop] = torch.matmul(torch.matmul(rows.T, g), cols) if resize else g
    return bce * per_value + dice / frames, grad


class _ResizedBceDice(torch.autograd.Function):
    """Per-head ``mean BCE + mean over frames of (1 - Dice)``; logits ``(K, N, h, w)``, masks ``(N, H, W)``."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, masks: Tensor) -> Tensor:
        with _float32(logits):
            losses, grad = _bce_dice(logits, masks, with_grad=bool(ctx.needs_input_grad[0]))
        if grad is not None:
            ctx.save_for_backward(grad)
        return losses

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_losses: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_losses.view(-1, 1, 1, 1).to(grad.dtype), None


def segmentation_losses(logits: Tensor, masks: Tensor) -> Tensor:
    """One loss per head: ``logits`` ``(K, N, 1, h, w)`` of K heads over the same ``(N, H, W)`` masks.

    Logits smaller than the masks are scored as ``resize_bilinear(logits, (H, W))``, which is how heads
    predict; pass a head's ``coarse_logits`` rather than its resized output to skip holding the latter.
    """
    if logits.dim() != 5 or logits.shape[2] != 1 or masks.dim() != 3 or logits.shape[1] != masks.shape[0]:
        raise FeatstoreError(
            f"loss needs logits (K, N, 1, h, w) with as many frames as masks (N, H, W); got "
            f"{tuple(logits.shape)} and {tuple(masks.shape)}"
        )
    if logits.shape[3] > masks.shape[1] or logits.shape[4] > masks.shape[2]:
        raise FeatstoreError(
            f"logits {tuple(logits.shape)} are larger than their masks {tuple(masks.shape)}: the loss resizes "
            "logits up to the masks' resolution, never down; pass masks of the frames' size"
        )
    return _ResizedBceDice.apply(logits.float().squeeze(2), masks)


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """BCE-with-logits plus soft Dice at the masks' resolution; ``logits`` (N, 1, h, w), ``masks`` (N, H, W)."""
    return segmentation_losses(logits.unsqueeze(0), masks)[0]


def reference_segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """The same loss, op by op on full-resolution logits as a notebook writes it: what the tests hold it to."""
    logits = logits.float().squeeze(1)
    target = masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    overlap = (prob * target).sum(dim=(1, 2))
    total = prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2))
    dice = 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)
    return bce + dice.mean()
