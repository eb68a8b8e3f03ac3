"""K heads of one architecture trained as one batched computation.

Heads that differ only in initial weights and optimisation (learning rate, weight decay, schedule) run the
same kernels on the same batch; stacking their weights along a leading head dimension and mapping the
forward over it with ``torch.func.vmap`` turns K launch sequences per step into one, for GPUs, where small
heads wait on launches. On the CPU there is nothing to save that way, and vmap's grouped convolutions run
slower than K plain ones. Head i's forward, loss gradient and AdamW update equal what it would get alone,
in float32: the mapped forward runs with autocast turned off, so where a single head runs under bfloat16
autocast on CUDA, a stacked one runs in float32 (TF32 convolutions). Autocast left on would reach the
mapped convolutions on CUDA but not on the CPU: vmap rewrites ``conv2d`` as ``aten::convolution``, which
CUDA's autocast casts to bfloat16 and the CPU's does not, so a stacked group would compute in a different
precision on each device.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, replace_all_batch_norm_modules_, stack_module_state, vmap

from decoders.heads import Decoder
from featstore.errors import FeatstoreError


def _describe(head: Decoder) -> str:
    return f"{head.name or type(head).__name__} ({type(head).__name__}, config {head.config})"


class StackedHeads:
    """Weights of K same-architecture heads stacked on a leading dimension, run with one vmapped forward.

    The stacked tensors are copies: train them (``parameters()``), then ``write_back()`` to put head i's
    weights into ``heads[i]``. BatchNorm in training mode uses batch statistics and tracks no running ones,
    which keeps in-place buffer updates out of the vmapped forward; ``recalibrate_batchnorm`` recomputes
    them afterwards. Eval mode uses the heads' running statistics as they were when stacked.
    """

    def __init__(self, heads: Sequence[Decoder]) -> None:
        if not heads:
            raise FeatstoreError("StackedHeads needs at least one head")
        first = heads[0]
        for other in heads[1:]:
            if type(other) is not type(first) or other.spec() != first.spec():
                raise FeatstoreError(
                    f"cannot stack heads of different architectures: {_describe(first)} and "
                    f"{_describe(other)}; stack only heads built with the same decoder and options"
                )
        if len({h.training for h in heads}) != 1:
            raise FeatstoreError("cannot stack heads in different train/eval modes: set one mode for all")
        places = {(p.device, p.dtype) for h in heads for p in h.parameters()}
        if len(places) != 1:
            raise FeatstoreError(
                f"cannot stack heads whose weights lie on different devices or dtypes: {sorted(map(str, places))}"
            )
        self.heads = list(heads)
        self.params, self.buffers = stack_module_state(self.heads)
        # Shape-only copies: functional_call substitutes every tensor, so templates hold no memory.
        self._eval_template = copy.deepcopy(first).to("meta").eval()
        self._train_template = replace_all_batch_norm_modules_(copy.deepcopy(first).to("meta")).train()
        self._train_buffers = {name for name, _ in self._train_template.named_buffers()}
        self.training = first.training

    def __len__(self) -> int:
        return len(self.heads)

    @property
    def temporal_window(self) -> int:
        return self.heads[0].temporal_window

    def parameters(self) -> list[Tensor]:
        """The stacked leaf tensors (leading dimension K) that an optimizer updates."""
        return list(self.params.values())

    def train(self, mode: bool = True) -> StackedHeads:
        self.training = mode
        return self

    def eval(self) -> StackedHeads:
        return self.train(False)

    def forward(self, features: dict[str, Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        """Logits ``(K, N, 1, H, W)``: head i's output at index i, all heads over the same ``features``.

        Without ``out_size``, the heads' ``coarse_logits`` ``(K, N, 1, h, w)``, as ``Decoder.forward`` does.
        """
        size = None if out_size is None else (int(out_size[0]), int(out_size[1]))
        # The heads' own dtype, once for all K heads: stored half-precision features would otherwise meet
        # float32 weights inside the mapped forward, which runs outside autocast.
        first = next(iter(self.params.values()))
        dtype = first.dtype
        used = set(self.heads[0].layers)
        features = {layer: x.to(dtype) if layer in used else x for layer, x in features.items()}
        if self.training:
            template: nn.Module = self._train_template
            buffers = {k: v for k, v in self.buffers.items() if k in self._train_buffers}
        else:
            template = self._eval_template
            buffers = self.buffers

        def one_head(params: dict[str, Tensor], buffers: dict[str, Tensor], x: dict[str, Tensor]) -> Any:
            return functional_call(template, (params, buffers), (x, size))

        # In the weights' dtype on every device, whatever autocast the caller runs under (module docstring).
        with torch.autocast(device_type=first.device.type, enabled=False):
            out: Tensor = vmap(one_head, in_dims=(0, 0, None))(self.params, buffers, features)
        return out

    __call__ = forward

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy stacked weights into the original heads (index i into ``heads[i]``), leaving them ordinary modules."""
        for i, head in enumerate(self.heads):
            own = dict(head.named_parameters())
            for name, stacked in self.params.items():
                own[name].copy_(stacked[i])


class StackedAdamW:
    """``torch.optim.AdamW`` applied to each head of stacked tensors, with a learning rate and weight decay per head.

    Every update is a ``torch._foreach_*`` op over all tensors, per-head factors broadcasting along the
    leading dimension, so a step costs the same launches for any K.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        weight_decay: Tensor | Sequence[float] | float,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        if not self.params:
            raise FeatstoreError("StackedAdamW needs at least one stacked tensor")
        self.heads = int(self.params[0].shape[0]) if self.params[0].dim() else 0
        if self.heads < 1 or any(p.dim() == 0 or p.shape[0] != self.heads for p in self.params):
            raise FeatstoreError(
                f"StackedAdamW needs tensors with one leading head dimension of equal size, got shapes "
                f"{[tuple(p.shape) for p in self.params]}"
            )
        self.weight_decay = self._per_head(weight_decay, "weight decay")
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    def _per_head(self, values: Tensor | Sequence[float] | float, what: str) -> Tensor:
        """Float64 per-head values: factors are formed in double and rounded once, as AdamW's Python floats are."""
        device = self.params[0].device
        out = torch.as_tensor(values, dtype=torch.float64, device=device)
        if out.dim() == 0:
            out = out.expand(self.heads)
        if out.shape != (self.heads,):
            raise FeatstoreError(
                f"{what} needs one value per head ({self.heads}), got shape {tuple(out.shape)}"
            )
        return out

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, lrs: Tensor | Sequence[float] | float) -> None:
        """One AdamW step with head i at learning rate ``lrs[i]``; tensors without a gradient are skipped."""
        lr = self._per_head(lrs, "learning rate")
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avg: list[Tensor] = []
        exp_avg_sq: list[Tensor] = []
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq, strict=True):
            if p.grad is not None:
                params.append(p)
                grads.append(p.grad)
                exp_avg.append(m)
                exp_avg_sq.append(v)
        if not params:
            return
        beta1, beta2 = self.betas
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        decay = 1 - lr * self.weight_decay
        step_size = -lr / bias_correction1
        cast: dict[torch.dtype, tuple[Tensor, Tensor]] = {}
        for p in params:
            if p.dtype not in cast:
                cast[p.dtype] = (decay.to(p.dtype), step_size.to(p.dtype))
        # Views, not copies: each per-head factor broadcasts over its tensor's trailing dimensions.
        decays = [cast[p.dtype][0].view(-1, *([1] * (p.dim() - 1))) for p in params]
        step_sizes = [cast[p.dtype][1].view(-1, *([1] * (p.dim() - 1))) for p in params]
        torch._foreach_mul_(params, decays)
        torch._foreach_lerp_(exp_avg, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(exp_avg_sq)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avg, step_sizes), denom)
