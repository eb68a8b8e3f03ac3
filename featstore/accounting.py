"""Parameter and FLOP accounting that is measured, not trusted: the contest limit is on what actually runs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from featstore.errors import BudgetError

CONTEST_FRAME = (3, 480, 854)
"""(C, H, W) of one contest frame: FLOPs are reported for a single frame of this size."""


def count_parameters(module: nn.Module) -> int:
    """All parameters of ``module``, shared tensors counted once."""
    return sum(p.numel() for p in _unique(module.parameters()))


def count_executed_parameters(module: nn.Module, *inputs: Any) -> int:
    """Parameters of the modules that ran during ``module(*inputs)``, shared tensors counted once.

    Forward hooks on every submodule record which ones ran. A module whose child ran also counts as having
    run: models may call children from a method other than ``forward`` (timm's ``forward_intermediates``)
    and use tensors they own directly (position embeddings, class tokens).
    """
    ran: set[nn.Module] = set()
    handles = [m.register_forward_hook(lambda mod, _args, _out: ran.add(mod)) for m in module.modules()]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    counted: set[nn.Module] = set()
    for name, sub in module.named_modules(remove_duplicate=False):
        if sub in ran:
            counted.add(sub)
            # every ancestor along this path took part
            parts = name.split(".") if name else []
            parent: nn.Module = module
            counted.add(parent)
            for part in parts[:-1]:
                parent = parent.get_submodule(part)
                counted.add(parent)
    owned = (p for sub in counted for p in sub.parameters(recurse=False))
    return sum(p.numel() for p in _unique(owned))


def count_flops(module: Callable[..., Any], *inputs: Any) -> int:
    """FLOPs of ``module(*inputs)``, a module or a method of one, as ``torch.utils.flop_counter`` counts them.

    A multiply-add is 2 FLOPs.
    """
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        module(*inputs)
    return int(counter.get_total_flops())


def check_budget(nparams: int, budget: int) -> None:
    """BudgetError when a model is over the parameter budget (the contest allows 50,000,000)."""
    if nparams > budget:
        raise BudgetError(
            f"model has {nparams:,} parameters, over the budget of {budget:,} by {nparams - budget:,}; "
            "choose a smaller backbone or head, fewer layers, or raise --budget"
        )


def _unique(params: Any) -> list[nn.Parameter]:
    seen: dict[int, nn.Parameter] = {}
    for p in params:
        seen.setdefault(id(p), p)
    return list(seen.values())
