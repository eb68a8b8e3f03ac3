"""Stacked heads: K heads of one architecture in one vmapped pass end exactly where each would end alone."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from decoders import create_decoder, segmentation_loss
from decoders.heads import Decoder
from decoders.losses import segmentation_losses
from decoders.stacked import StackedAdamW, StackedHeads
from featstore.errors import FeatstoreError

CHANNELS = {"fine": 8, "coarse": 16}
STRIDES = {"fine": 2, "coarse": 4}
SIZES = {"fine": (12, 16), "coarse": (6, 8)}
FRAME = (24, 32)
BATCH = 4
K = 3
LRS = (1e-2, 3e-3, 1e-3)
WEIGHT_DECAYS = (0.0, 1e-2, 1e-1)

CASES: list[tuple[str, dict[str, Any]]] = [
    ("linear", {}),
    ("conv", {"hidden": 8}),
    ("fpn", {"width": 8, "norm": "batch"}),
    # 16 wide, so GroupNorm's 8 groups hold 2 channels each. With one channel a group, the pooled context
    # input is exactly the norm's bias and its weight's gradient is round-off, which Adam blows up to a
    # full step that differs with the order of summation.
    ("fpn", {"width": 16, "norm": "group"}),
    ("temporal", {"width": 8, "norm": "batch"}),
]
IDS = [f"{name}-{options.get('norm', 'plain')}" for name, options in CASES]


def make_heads(name: str, options: dict[str, Any], k: int = K) -> list[Decoder]:
    heads = []
    for i in range(k):
        torch.manual_seed(100 + i)
        heads.append(create_decoder(name, CHANNELS, STRIDES, **options))
    return heads


def make_batch(head: Decoder, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    window = (2 * head.temporal_window + 1,) if head.temporal_window else ()
    features = {
        layer: torch.randn((BATCH, *window, CHANNELS[layer], *SIZES[layer]), generator=generator).half()
        for layer in CHANNELS
    }
    masks = (torch.rand((BATCH, *FRAME), generator=generator) > 0.6).to(torch.uint8)
    return features, masks


def _train_alone(head: Any, i: int, batches: Any, schedule: Any) -> None:
    """Head ``i`` trained by itself with torch's AdamW, over the batches and learning-rate schedule given."""
    own = torch.optim.AdamW(head.parameters(), lr=LRS[i], weight_decay=WEIGHT_DECAYS[i])
    for (features, masks), factor in zip(batches, schedule, strict=True):
        for group in own.param_groups:
            group["lr"] = LRS[i] * factor
        loss = segmentation_loss(head(features, FRAME), masks)
        own.zero_grad()
        loss.backward()
        own.step()


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_stacked_forward_equals_each_heads_own(name: str, options: dict[str, Any], training: bool) -> None:
    heads = make_heads(name, options)
    features, _ = make_batch(heads[0], seed=0)
    with torch.no_grad():
        for i, head in enumerate(heads):
            # Running statistics that differ per head, so eval mode shows each head reads its own.
            head(make_batch(head, seed=10 + i)[0], FRAME)
            head.train(training)
    stacked = StackedHeads(heads)
    assert len(stacked) == K
    logits = stacked(features, FRAME)
    assert logits.shape == (K, BATCH, 1, *FRAME)
    for i, head in enumerate(heads):
        torch.testing.assert_close(logits[i], head(features, FRAME), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_stacked_forward_runs_under_autocast_on_half_features(name: str, options: dict[str, Any]) -> None:
    heads = make_heads(name, options)
    features, masks = make_batch(heads[0], seed=0)
    stacked = StackedHeads(heads)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = stacked(features, FRAME)
        own = torch.stack([head(features, FRAME) for head in heads])
    assert logits.shape == own.shape
    torch.testing.assert_close(logits, own.float(), rtol=0.05, atol=0.05)
    segmentation_losses(logits, masks).sum().backward()
    assert all(p.grad is not None for p in stacked.parameters())


def test_the_mapped_forward_runs_outside_the_callers_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    heads = make_heads("fpn", {"width": 8, "norm": "batch"})
    features, _ = make_batch(heads[0], seed=0)
    stacked = StackedHeads(heads)
    seen: list[bool] = []
    own_forward = type(heads[0]).coarse_logits

    def watched(self: Decoder, features: dict[str, Tensor]) -> Tensor:
        seen.append(torch.is_autocast_enabled("cpu"))
        return own_forward(self, features)

    monkeypatch.setattr(type(heads[0]), "coarse_logits", watched)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = stacked(features, FRAME)
        heads[0](features, FRAME)  # a head on its own keeps the caller's autocast
    assert seen == [False, True]
    assert logits.dtype == torch.float32


def _convolution_in_bfloat16(input: Tensor, weight: Tensor, bias: Tensor | None, *args: Any) -> Tensor:
    """What CUDA's autocast kernel for ``aten::convolution`` does: cast to bfloat16, run below autocast."""
    with torch.autocast("cpu", enabled=False):
        cast = None if bias is None else bias.to(torch.bfloat16)
        return torch.ops.aten.convolution(input.to(torch.bfloat16), weight.to(torch.bfloat16), cast, *args)


class _ConvolutionDtypes(TorchDispatchMode):
    """The dtypes every convolution computes in, seen below autocast and below vmap."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func is torch.ops.aten.convolution.default:
            self.dtypes.add(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_stacked_heads_stay_float32_where_autocast_reaches_the_mapped_convolutions(
    name: str, options: dict[str, Any]
) -> None:
    """On CUDA, autocast casts the ``aten::convolution`` that vmap turns ``conv2d`` into; the CPU's does not.

    Giving the CPU's autocast that kernel here shows what CUDA would do to a stacked forward left under
    autocast: it must still compute in float32, exactly as with no autocast at all.
    """
    heads = make_heads(name, options)
    features, _ = make_batch(heads[0], seed=0)
    stacked = StackedHeads(heads)
    expected = stacked(features, FRAME)
    log = _ConvolutionDtypes()
    with torch.library._scoped_library("aten", "IMPL") as lib:
        lib.impl("convolution", _convolution_in_bfloat16, "AutocastCPU")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with log:
                logits = stacked(features, FRAME)
            with torch.no_grad():
                single = heads[0](features, FRAME)
    assert log.dtypes == {torch.float32}
    assert logits.dtype == torch.float32
    assert torch.equal(logits, expected)
    assert not torch.allclose(single, expected[0], rtol=1e-4, atol=1e-4), "a lone head keeps bfloat16"


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_stacked_training_ends_where_each_head_alone_ends(name: str, options: dict[str, Any]) -> None:
    heads = make_heads(name, options)
    alone = [copy.deepcopy(head) for head in heads]
    initial = [{n: p.detach().clone() for n, p in head.named_parameters()} for head in heads]
    batches = [make_batch(heads[0], seed) for seed in range(5)]
    schedule = (1.0, 0.8, 0.5, 0.3, 0.1)

    stacked = StackedHeads(heads).train()
    optimizer = StackedAdamW(stacked.parameters(), WEIGHT_DECAYS)
    base = torch.tensor(LRS)
    for (features, masks), factor in zip(batches, schedule, strict=True):
        per_head = segmentation_losses(stacked(features, FRAME), masks)
        assert per_head.shape == (K,)
        optimizer.zero_grad()
        per_head.sum().backward()
        optimizer.step(base * factor)
    stacked.write_back()

    for i, head in enumerate(alone):
        head.train()
        _train_alone(head, i, batches, schedule)
        trained = dict(heads[i].named_parameters())
        for param_name, value in head.named_parameters():
            assert not torch.equal(value, initial[i][param_name]), f"{param_name} of head {i} never moved"
            torch.testing.assert_close(trained[param_name], value, rtol=1e-5, atol=1e-5)

    # Written back, the heads are ordinary modules again: they train on their own.
    features, masks = batches[0]
    segmentation_loss(heads[0](features, FRAME), masks).backward()
    assert all(p.grad is not None and p.is_leaf for p in heads[0].parameters())


@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_every_op_has_a_batching_rule(name: str, options: dict[str, Any]) -> None:
    """An op without one makes vmap loop over the heads, one launch each: what stacking exists to avoid."""
    heads = [h.to(memory_format=torch.channels_last) for h in make_heads(name, options)]
    features, masks = make_batch(heads[0], seed=0)
    if not heads[0].temporal_window:
        features = {k: v.contiguous(memory_format=torch.channels_last) for k, v in features.items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        segmentation_losses(StackedHeads(heads)(features, FRAME), masks).sum().backward()
    assert not [str(w.message) for w in caught if "batching rule" in str(w.message)]


def test_mixed_architectures_are_refused_naming_both() -> None:
    fpn = create_decoder("fpn", CHANNELS, STRIDES, width=8)
    conv = create_decoder("conv", CHANNELS, STRIDES, hidden=8)
    with pytest.raises(FeatstoreError, match=r"fpn .*and conv"):
        StackedHeads([fpn, conv])
    wider = create_decoder("fpn", CHANNELS, STRIDES, width=16)
    with pytest.raises(FeatstoreError, match=r"'width': 8.*'width': 16"):
        StackedHeads([fpn, wider])
    grouped = create_decoder("fpn", CHANNELS, STRIDES, width=8, norm="group")
    with pytest.raises(FeatstoreError, match=r"'norm': 'batch'.*'norm': 'group'"):
        StackedHeads([fpn, grouped])
    with pytest.raises(FeatstoreError, match="at least one head"):
        StackedHeads([])


def test_stacked_adamw_matches_torch_adamw_per_head() -> None:
    generator = torch.Generator().manual_seed(0)
    shapes = [(K, 5, 3, 1, 1), (K, 7), (K,)]
    initial = [torch.randn(shape, generator=generator) for shape in shapes]
    stacked = [t.clone().requires_grad_() for t in initial]
    alone = [[t[i].clone().requires_grad_() for t in initial] for i in range(K)]
    optimizer = StackedAdamW(stacked, torch.tensor(WEIGHT_DECAYS))
    own = [
        torch.optim.AdamW(params, lr=LRS[i], weight_decay=WEIGHT_DECAYS[i]) for i, params in enumerate(alone)
    ]
    for step in range(10):
        lrs = [lr * (1.0 - 0.05 * step) * (1 + i) for i, lr in enumerate(LRS)]
        grads = [torch.randn(shape, generator=generator) for shape in shapes]
        optimizer.zero_grad()
        for t, g in zip(stacked, grads, strict=True):
            t.grad = g.clone()
        optimizer.step(torch.tensor(lrs))
        for i, (params, opt) in enumerate(zip(alone, own, strict=True)):
            opt.zero_grad()
            for t, g in zip(params, grads, strict=True):
                t.grad = g[i].clone()
            for group in opt.param_groups:
                group["lr"] = lrs[i]
            opt.step()
    for j, t in enumerate(stacked):
        for i in range(K):
            torch.testing.assert_close(t[i], alone[i][j], rtol=1e-6, atol=1e-6)


def test_stacked_adamw_refuses_mismatched_shapes() -> None:
    with pytest.raises(FeatstoreError, match="leading head dimension"):
        StackedAdamW([torch.zeros(3, 2), torch.zeros(2, 2)], 0.0)
    optimizer = StackedAdamW([torch.zeros(3, 2, requires_grad=True)], 0.0)
    with pytest.raises(FeatstoreError, match="one value per head"):
        optimizer.step(torch.ones(2))


@pytest.mark.gpu
@pytest.mark.parametrize(("name", "options"), CASES, ids=IDS)
def test_stacked_heads_on_cuda_compute_in_float32_under_the_training_autocast(
    name: str, options: dict[str, Any]
) -> None:
    """Under the bfloat16 autocast ``train_heads`` uses on CUDA, stacked heads still train as each would alone
    in float32: float32 convolutions and logits, and the same AdamW updates."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    device = torch.device("cuda")
    heads = [head.to(device) for head in make_heads(name, options)]
    alone = [copy.deepcopy(head) for head in heads]
    batches = []
    for seed in range(5):
        features, masks = make_batch(heads[0], seed)
        batches.append(({layer: x.to(device) for layer, x in features.items()}, masks.to(device)))
    schedule = (1.0, 0.8, 0.5, 0.3, 0.1)
    # Exact float32 convolutions on both sides, so what is left to differ is bfloat16 reaching the stack.
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        stacked = StackedHeads(heads).train()
        optimizer = StackedAdamW(stacked.parameters(), WEIGHT_DECAYS)
        base = torch.tensor(LRS, device=device)
        for step, ((features, masks), factor) in enumerate(zip(batches, schedule, strict=True)):
            log = _ConvolutionDtypes()
            with torch.autocast("cuda", dtype=torch.bfloat16), log:
                logits = stacked(features, FRAME)
            assert log.dtypes == {torch.float32}
            assert logits.dtype == torch.float32
            if step == 0:
                with torch.no_grad():
                    own = torch.stack([head(features, FRAME) for head in alone])
                torch.testing.assert_close(logits, own, rtol=1e-4, atol=1e-4)
            per_head = segmentation_losses(logits, masks)
            optimizer.zero_grad()
            per_head.sum().backward()
            optimizer.step(base * factor)
        stacked.write_back()

        for i, head in enumerate(alone):
            _train_alone(head, i, batches, schedule)
            trained = dict(heads[i].named_parameters())
            for param_name, value in head.named_parameters():
                torch.testing.assert_close(trained[param_name], value, rtol=1e-4, atol=1e-4)
