"""The training loss of every head: BCE-with-logits plus soft Dice at full resolution, in few memory passes.

The loss reads 400k logits per DAVIS frame, so at a head's low resolution the loss, not the head, is most
of a step's work. Written with separate torch ops it makes a dozen full-resolution passes (sigmoid twice,
log-sigmoid with its buffer, products, their backward); the ``autograd.Function`` here keeps one
sigmoid for both terms and writes the gradient in closed form, with the same value and gradient.
It also takes a leading head dimension, so K heads trained together share one mask conversion.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from featstore.errors import FeatstoreError


def _float32(like: Tensor) -> torch.autocast:
    """Autocast off: sums over 400k pixels per frame lose digits in bfloat16 matmuls."""
    return torch.autocast(device_type=like.device.type, enabled=False)


class _BceDice(torch.autograd.Function):
    """Per-head ``mean BCE + mean over frames of (1 - Dice)``; logits ``(K, N, P)``, targets ``(N, P)``."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor) -> Tensor:
        with _float32(logits):
            return _BceDice._forward(ctx, logits, target)

    @staticmethod
    def _forward(ctx: Any, logits: Tensor, target: Tensor) -> Tensor:
        _, frames, pixels = logits.shape
        prob = torch.sigmoid(logits)
        # BCE with logits x and target y in {0, 1} is softplus(x) - x * y.
        softplus = F.softplus(logits).sum(dim=(1, 2))
        agreement = torch.einsum("knp,np->kn", logits, target)  # sum of x * y
        overlap = torch.einsum("knp,np->kn", prob, target)  # sum of p * y
        total = prob.sum(dim=2) + target.sum(dim=1)  # (K, N) sum of p + sum of y
        bce = (softplus - agreement.sum(dim=1)) / (frames * pixels)
        dice = 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)
        ctx.save_for_backward(prob, target, overlap, total)
        return bce + dice.mean(dim=1)

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None]:
        with _float32(grad_loss):
            return _BceDice._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, None]:
        prob, target, overlap, total = ctx.saved_tensors
        heads, frames, pixels = prob.shape
        scale = grad_loss.view(heads, 1, 1)
        # d BCE / dx = (p - y) / (N P); d Dice_n / dx = p (1 - p) ((2 O + 1) / (T + 1)^2 - 2 y / (T + 1)).
        denominator = total + 1.0
        constant = ((2.0 * overlap + 1.0) / denominator.square() / frames).unsqueeze(-1)
        per_target = (2.0 / denominator / frames).unsqueeze(-1)
        dice_slope = torch.addcmul(constant, per_target, target, value=-1.0)  # (K, N, P)
        grad = prob - prob.square()
        grad.mul_(dice_slope)
        grad.add_(prob, alpha=1.0 / (frames * pixels))
        grad.sub_(target, alpha=1.0 / (frames * pixels))
        return grad.mul_(scale), None


def segmentation_losses(logits: Tensor, masks: Tensor) -> Tensor:
    """One loss per head: ``logits`` ``(K, N, 1, H, W)`` for K heads over the same ``(N, H, W)`` masks."""
    if logits.dim() != 5 or logits.shape[2] != 1 or logits.shape[1:2] + logits.shape[3:] != masks.shape:
        raise FeatstoreError(
            f"loss needs logits (K, N, 1, H, W) matching masks (N, H, W); got {tuple(logits.shape)} "
            f"and {tuple(masks.shape)}"
        )
    heads, frames, _, height, width = logits.shape
    flat = logits.float().reshape(heads, frames, height * width)
    target = masks.reshape(frames, height * width).to(flat.dtype)
    return _BceDice.apply(flat, target)


def segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """BCE-with-logits plus soft Dice, both at full resolution; ``logits`` (N,1,H,W), ``masks`` (N,H,W)."""
    return segmentation_losses(logits.unsqueeze(0), masks)[0]


def reference_segmentation_loss(logits: Tensor, masks: Tensor) -> Tensor:
    """The same loss written op by op, as a notebook would: the specification the fused loss is tested on."""
    logits = logits.float().squeeze(1)
    target = masks.float()
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    overlap = (prob * target).sum(dim=(1, 2))
    total = prob.sum(dim=(1, 2)) + target.sum(dim=(1, 2))
    dice = 1.0 - (2.0 * overlap + 1.0) / (total + 1.0)
    return bce + dice.mean()
