"""resize_bilinear is F.interpolate(bilinear, align_corners=False) in value and in gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from decoders.upsampling import interpolation_matrix, resize_bilinear


@pytest.mark.parametrize(
    ("size", "out"),
    [
        ((15, 27), (480, 854)),  # stride 32 to a DAVIS frame: ratios 32 and 31.6
        ((60, 107), (480, 854)),  # stride 8
        ((7, 9), (24, 32)),
        ((30, 54), (15, 27)),  # shrinking
        ((1, 1), (5, 4)),
        ((6, 6), (6, 6)),
    ],
)
def test_matches_interpolate_forward_and_backward(size: tuple[int, int], out: tuple[int, int]) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, *out, dtype=torch.float64)
    expected = F.interpolate(x, size=out, mode="bilinear", align_corners=False)
    (expected_grad,) = torch.autograd.grad(expected, x, grad)
    x32 = x.detach().float().requires_grad_()
    got = resize_bilinear(x32, out)
    (got_grad,) = torch.autograd.grad(got, x32, grad.float())
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad.double(), expected_grad, rtol=1e-4, atol=1e-4)


def test_rows_are_convex_blends_of_at_most_two_inputs() -> None:
    matrix = interpolation_matrix(854, 27, torch.device("cpu"), torch.float64)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(854, dtype=torch.float64))
    assert int((matrix > 0).sum(dim=1).max()) <= 2
    assert float(matrix.min()) >= 0.0


def test_keeps_float32_under_autocast() -> None:
    x = torch.randn(1, 1, 4, 5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        got = resize_bilinear(x, (8, 10))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.interpolate(x, size=(8, 10), mode="bilinear", align_corners=False))
