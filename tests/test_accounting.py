"""Parameter and FLOP accounting, checked against hand-computed counts on small real modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from featstore.accounting import (
    CONTEST_FRAME,
    check_budget,
    count_executed_parameters,
    count_flops,
    count_parameters,
)
from featstore.errors import BudgetError


class Branchy(nn.Module):
    """A used path, an unused branch, a tied weight, and a tensor the container uses directly."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 4, 1)  # 16 params
        self.unused = nn.Conv2d(4, 8, 3)  # 296 params, never called
        self.offset = nn.Parameter(torch.zeros(1, 4, 1, 1))  # 4 params, used by the container itself
        self.tied = nn.Conv2d(3, 4, 1)
        self.tied.weight = self.embed.weight  # shares 12 params; its own bias (4) is unique

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x) + self.tied(x) + self.offset


def test_count_parameters_counts_shared_tensors_once() -> None:
    model = Branchy()
    assert count_parameters(model) == 16 + 296 + 4 + 4


def test_count_executed_parameters_skips_modules_that_never_ran() -> None:
    model = Branchy()
    executed = count_executed_parameters(model, torch.zeros(1, 3, 5, 5))
    assert executed == 16 + 4 + 4  # embed, the container's offset, tied's bias; shared weight once
    assert executed < count_parameters(model)


def test_count_executed_parameters_counts_containers_called_through_another_method() -> None:
    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = Branchy()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner.features(x)  # Branchy.forward itself never runs

    assert count_executed_parameters(Wrapper(), torch.zeros(1, 3, 5, 5)) == 16 + 4 + 4


def test_count_executed_parameters_removes_its_hooks() -> None:
    model = Branchy()
    count_executed_parameters(model, torch.zeros(1, 3, 5, 5))
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(
    ("cin", "cout", "k", "h", "w"), [(3, 8, 3, 16, 20), (16, 4, 1, 7, 9), (8, 8, 5, 12, 12)]
)
def test_count_flops_of_one_convolution_matches_the_formula(
    cin: int, cout: int, k: int, h: int, w: int
) -> None:
    conv = nn.Conv2d(cin, cout, k, padding=k // 2)  # same-size output
    assert count_flops(conv, torch.zeros(1, cin, h, w)) == 2 * cin * cout * k * k * h * w


def test_count_flops_scales_with_batch_and_counts_linear_layers() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    assert count_flops(net, torch.zeros(3, 3, 2, 2)) == 3 * 2 * 12 * 5


def test_check_budget_raises_with_both_numbers_only_when_over() -> None:
    check_budget(49_999_999, 50_000_000)
    check_budget(50_000_000, 50_000_000)
    with pytest.raises(BudgetError, match=r"50,000,001.*50,000,000"):
        check_budget(50_000_001, 50_000_000)


def test_contest_frame_is_one_davis_frame() -> None:
    assert CONTEST_FRAME == (3, 480, 854)
