"""The fused BCE + Dice loss equals the op-by-op definition, per head, in value and gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decoders.losses import (
    frames_per_chunk,
    reference_segmentation_loss,
    segmentation_loss,
    segmentation_losses,
)
from featstore.errors import FeatstoreError


def _case(scale: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 1, 12, 17, generator=generator, dtype=torch.float64) * scale
    masks = (torch.rand(3, 12, 17, generator=generator) > 0.6).to(torch.uint8)
    masks[1] = 0  # a frame without the object: Dice's smoothing term carries it
    return logits, masks


@pytest.mark.parametrize("scale", [0.1, 3.0, 60.0])
def test_fused_loss_matches_reference_value_and_gradient(scale: float) -> None:
    logits, masks = _case(scale)
    ref_in = logits.clone().requires_grad_()
    expected = reference_segmentation_loss(ref_in, masks)
    expected.backward()
    got_in = logits.float().requires_grad_()
    got = segmentation_loss(got_in, masks)
    got.backward()
    assert torch.isfinite(got) and got_in.grad is not None and ref_in.grad is not None
    torch.testing.assert_close(got.double(), expected.float().double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_in.grad.double(), ref_in.grad, rtol=1e-4, atol=1e-7)


def test_heads_get_their_own_loss_and_gradient() -> None:
    heads = [_case(s, seed)[0].float() for s, seed in ((1.0, 1), (4.0, 2), (0.5, 3))]
    _, masks = _case(1.0)
    stacked = torch.stack(heads).requires_grad_()
    losses = segmentation_losses(stacked, masks)
    (losses * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert stacked.grad is not None
    for k, logits in enumerate(heads):
        alone = logits.clone().requires_grad_()
        loss = segmentation_loss(alone, masks)
        (loss * (k + 1)).backward()
        assert alone.grad is not None
        torch.testing.assert_close(losses[k], loss)
        torch.testing.assert_close(stacked.grad[k], alone.grad)


@pytest.mark.parametrize("backward_in_autocast", [False, True])
def test_autocast_leaves_the_loss_in_float32(backward_in_autocast: bool) -> None:
    logits, masks = _case(3.0)
    logits = logits.float()
    plain = logits.clone().requires_grad_()
    expected = segmentation_loss(plain, masks)
    expected.backward()
    mixed = logits.clone().requires_grad_()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = segmentation_loss(mixed, masks)
        if backward_in_autocast:
            got.backward()
    if not backward_in_autocast:
        got.backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(mixed.grad, plain.grad, rtol=0, atol=0)


def test_a_perfect_prediction_scores_near_zero_and_the_opposite_high() -> None:
    _, masks = _case(1.0)
    right = (masks.float() * 2 - 1).unsqueeze(1) * 20
    assert float(segmentation_loss(right, masks)) < 0.05
    assert float(segmentation_loss(-right, masks)) > 1.5


def test_coarse_logits_are_scored_as_their_bilinear_resize_chunk_by_chunk() -> None:
    """At DAVIS size the loss runs a frame at a time; it must equal the notebook form on F.interpolate's output."""
    frame = (480, 854)
    generator = torch.Generator().manual_seed(5)
    coarse = torch.randn(2, 5, 1, 15, 27, generator=generator, dtype=torch.float64) * 4
    masks = (torch.rand(5, *frame, generator=generator) > 0.6).to(torch.uint8)
    masks[1] = 0
    assert frames_per_chunk(torch.device("cpu"), 2, frame[0] * frame[1]) < 5  # several chunks, one partial
    got_in = coarse.float().requires_grad_()
    losses = segmentation_losses(got_in, masks)
    (losses * torch.tensor([1.0, 3.0])).sum().backward()
    assert got_in.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(segmentation_losses(coarse.float(), masks), losses.detach(), rtol=0, atol=0)
    for k in range(2):
        ref_in = coarse[k].clone().requires_grad_()
        resized = F.interpolate(ref_in, size=frame, mode="bilinear", align_corners=False)
        expected = reference_segmentation_loss(resized, masks)
        expected.backward()
        assert ref_in.grad is not None
        torch.testing.assert_close(losses[k].detach(), expected.detach(), rtol=1e-5, atol=1e-6)
        expected_grad = (2 * k + 1) * ref_in.grad
        atol = 1e-5 * float(expected_grad.abs().max())
        torch.testing.assert_close(got_in.grad[k].double(), expected_grad, rtol=1e-4, atol=atol)


def test_mismatched_shapes_are_refused() -> None:
    logits, masks = _case(1.0)
    with pytest.raises(FeatstoreError, match=r"logits \(K, N, 1, h, w\)"):
        segmentation_losses(logits, masks)
    with pytest.raises(FeatstoreError, match="as many frames as masks"):
        segmentation_loss(logits, masks[:2])
    with pytest.raises(FeatstoreError, match="larger than their masks"):
        segmentation_loss(logits, masks[:, :5])


@pytest.mark.gpu
def test_cuda_loss_under_autocast_matches_the_cpu() -> None:
    """On CUDA a batch is one chunk; under bfloat16 autocast the loss still runs in float32, as on the CPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    generator = torch.Generator().manual_seed(7)
    coarse = torch.randn(3, 6, 1, 60, 107, generator=generator) * 3
    masks = (torch.rand(6, 480, 854, generator=generator) > 0.6).to(torch.uint8)
    on_cpu = coarse.clone().requires_grad_()
    expected = segmentation_losses(on_cpu, masks)
    expected.sum().backward()
    on_gpu = coarse.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = segmentation_losses(on_gpu, masks.cuda())
    got.sum().backward()
    assert got.dtype == torch.float32 and on_gpu.grad is not None and on_cpu.grad is not None
    torch.testing.assert_close(got.cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(on_gpu.grad.cpu(), on_cpu.grad, rtol=1e-4, atol=1e-4 * float(on_cpu.grad.abs().max()))
