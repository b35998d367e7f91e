"""Distributed helpers for contrastive training: rank/world, gathers and synchronised batch norm.

Contrastive losses (SimCLR, Chen et al. 2020, arXiv:2002.05709; SupCon, Khosla et al. 2020,
arXiv:2004.11362) get better with more negatives, so with several workers every worker gathers
the embeddings of all workers and scores *its own* anchors against *all* views. For the gradient
to be right the gather must be autograd-aware: worker r's loss depends on worker r''s embeddings,
so the gradient of every worker's loss w.r.t. worker r''s embeddings has to travel back to r'.
:func:`gather_with_grad` does that by all-reducing (summing) the incoming gradient in backward and
keeping this rank's slice. With DDP's gradient averaging (divide by world size) the parameter
gradient then equals the one-process gradient of the global loss, provided each rank's loss is
normalised so that the mean over ranks is the global loss (see ``pipeline.losses``).

A gather that only keeps the local slice differentiable (the common shortcut: ``all_gather``
without grad, then ``out[rank] = x``) drops every cross-rank term and gives a wrong gradient; the
distributed test checks that this module does not.

Batch norm statistics must be global too (SimCLR §B.9 "Global BN"): a per-worker BN lets the
model find a shortcut through the local statistics. PyTorch's ``nn.SyncBatchNorm`` refuses CPU
tensors and DDP refuses it on CPU modules, so :func:`convert_sync_batchnorm` swaps in
:class:`SyncBatchNorm`, a device-agnostic version built on the same autograd-aware gather (gloo on
CPU, NCCL on GPU).

No Ray or MLflow import here: this runs under any launcher that initialised ``torch.distributed``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "SyncBatchNorm",
    "convert_sync_batchnorm",
    "gather_no_grad",
    "gather_sizes",
    "gather_with_grad",
    "is_distributed",
    "rank_and_world",
]

Group = Any  # a torch.distributed ProcessGroup, or None for the default (WORLD) group


def is_distributed(group: Group = None) -> bool:
    """True when ``torch.distributed`` is initialised and the group has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group=group) > 1


def rank_and_world(group: Group = None) -> tuple[int, int]:
    """Return ``(rank, world_size)``; ``(0, 1)`` when ``torch.distributed`` is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group=group), dist.get_world_size(group=group)
    return 0, 1


def gather_sizes(n: int, device: torch.device | str = "cpu", group: Group = None) -> list[int]:
    """All ranks' local batch sizes (dim 0), in rank order; ``[n]`` in one process.

    One tiny collective. Pass the result as ``sizes`` to several gathers of the same batch
    (embeddings and labels) to pay it once.
    """
    if not is_distributed(group):
        return [int(n)]
    _, world = rank_and_world(group)
    local = torch.tensor([int(n)], dtype=torch.long, device=device)
    out = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(out, local, group=group)
    return [int(t.item()) for t in out]


def _all_gather_cat(x: Tensor, sizes: list[int], group: Group) -> Tensor:
    """Concatenate every rank's ``x`` along dim 0 in rank order (no autograd). Sizes may differ."""
    x = x.contiguous()
    longest = max(sizes)
    if x.shape[0] < longest:  # all_gather needs equal shapes: pad, gather, trim
        pad = x.new_zeros((longest - x.shape[0], *x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in sizes]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 whose backward sums the gradient over ranks and keeps this slice."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, sizes: list[int], group: Group) -> Tensor:
        rank, _ = rank_and_world(group)
        ctx.start = sum(sizes[:rank])
        ctx.n = sizes[rank]
        ctx.group = group
        return _all_gather_cat(x, sizes, group)  # (sum(sizes), *x.shape[1:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        # Every rank's loss may depend on this rank's rows: d(sum_r L_r)/dx = sum_r dL_r/dx.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start : ctx.start + ctx.n], None, None


def _check_sizes(x: Tensor, sizes: list[int] | None, group: Group) -> list[int]:
    if sizes is None:
        return gather_sizes(x.shape[0], x.device, group)
    rank, world = rank_and_world(group)
    if len(sizes) != world or sizes[rank] != x.shape[0]:
        raise ValueError(
            f"sizes {sizes} do not match world size {world} and local batch {x.shape[0]} "
            f"at rank {rank}"
        )
    return sizes


def gather_with_grad(x: Tensor, sizes: list[int] | None = None, group: Group = None) -> Tensor:
    """Autograd-aware all-gather: every rank's ``x`` concatenated along dim 0 in rank order.

    Args:
        x: (n_r, ...) this rank's tensor; trailing dims must match on every rank, ``n_r`` may not.
        sizes: every rank's ``n_r`` (from :func:`gather_sizes`); gathered here when omitted.
        group: process group (default WORLD).

    Returns:
        (sum_r n_r, ...). Backward all-reduces (sums) the incoming gradient and returns this rank's
        slice, so cross-rank terms of the loss reach the rank that produced the rows. Returns ``x``
        itself in one process.
    """
    if x.dim() == 0:
        raise ValueError("gather_with_grad needs a tensor with a batch dimension, got a scalar")
    if not is_distributed(group):
        return x
    sizes = _check_sizes(x, sizes, group)
    return _GatherWithGrad.apply(x, sizes, group)


def gather_no_grad(x: Tensor, sizes: list[int] | None = None, group: Group = None) -> Tensor:
    """All-gather along dim 0 in rank order without autograd (labels, indices); ``x`` in 1 process.

    Args:
        x: (n_r, ...) this rank's tensor.
        sizes: every rank's ``n_r`` (from :func:`gather_sizes`); gathered here when omitted.
        group: process group (default WORLD).

    Returns:
        (sum_r n_r, ...), detached.
    """
    if x.dim() == 0:
        raise ValueError("gather_no_grad needs a tensor with a batch dimension, got a scalar")
    if not is_distributed(group):
        return x
    sizes = _check_sizes(x, sizes, group)
    with torch.no_grad():
        return _all_gather_cat(x.detach(), sizes, group)


class SyncBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span all ranks ("Global BN", SimCLR §B.9).

    Works on any device and backend (gloo on CPU included), unlike ``torch.nn.SyncBatchNorm``.
    Each rank computes its per-channel count, mean and sum of squared deviations (two-pass, stable);
    these are gathered with :func:`gather_with_grad` and combined with the parallel variance
    formula, so gradients flow through the global statistics exactly as in one process on the
    joined batch. In eval mode, or without a process group of more than one rank, it is plain
    batch norm. Input (N, C, *) of any rank >= 2.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Group = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Normalise ``input`` (N, C, *) with statistics gathered over every rank when training."""
        self._check_input_dim(input)
        if not (self.training and is_distributed(self.process_group)):
            return super().forward(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"SyncBatchNorm expected {self.num_features} channels, got input {tuple(input.shape)}"
            )

        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)

        dims = [0, *range(2, input.dim())]
        xf = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        n_local = input.numel() // input.shape[1]  # values per channel on this rank
        count = xf.new_tensor([float(n_local)])  # (1,)
        mean_r = xf.mean(dim=dims) if n_local > 0 else xf.new_zeros(self.num_features)  # (C,)
        shape = [1, -1] + [1] * (input.dim() - 2)
        m2_r = ((xf - mean_r.view(shape)) ** 2).sum(dim=dims)  # (C,)
        local = torch.cat([count, mean_r, m2_r]).unsqueeze(0)  # (1, 1 + 2C)
        stats = gather_with_grad(
            local, [1] * rank_and_world(self.process_group)[1], self.process_group
        )  # (W, 1 + 2C)
        counts, means, m2s = (
            stats[:, :1],
            stats[:, 1 : 1 + self.num_features],
            stats[:, 1 + self.num_features :],
        )
        n = counts.sum()
        if n <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input {tuple(input.shape)} "
                f"with {int(n)} values per channel over all ranks"
            )
        mean = (counts * means).sum(0) / n  # (C,)
        m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)  # (C,)
        var = m2 / n  # biased, used to normalise
        if (
            self.track_running_stats
            and self.running_mean is not None
            and self.running_var is not None
        ):
            with torch.no_grad():
                self.running_mean.mul_(1 - factor).add_(
                    mean.detach().to(self.running_mean), alpha=factor
                )
                unbiased = (m2 / (n - 1)).detach().to(self.running_var)
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def _to_sync(module: nn.Module, process_group: Group) -> nn.Module:
    out = module
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        out = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            process_group,
        )
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
    for name, child in module.named_children():
        out.add_module(name, _to_sync(child, process_group))
    return out


def convert_sync_batchnorm(model: nn.Module, process_group: Group = None) -> nn.Module:
    """Replace every ``BatchNorm*d`` in ``model`` by :class:`SyncBatchNorm` (Global BN).

    A no-op (returns ``model`` unchanged) when ``torch.distributed`` is not initialised or the
    world has one process. Parameters and buffers are shared with the original layers, so state
    dict keys are unchanged and a checkpoint loads into the unconverted model.
    """
    if not is_distributed(process_group):
        return model
    return _to_sync(model, process_group)
