"""One supervised training loop for fine-tuning, the from-scratch baseline and distillation.

The three differ only in where the network starts and what the targets are; sharing the loop
(same augmentation, optimiser, schedule and step budget) keeps the baseline honest.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from pipeline.optim import build_optimizer, warmup_cosine
from pipeline.runtime import HistoryRow, TrainContext
from pipeline.stages.common import Throughput, restore_training_state, training_state

log = logging.getLogger(__name__)

__all__ = [
    "Evaluate",
    "InMemory",
    "Streamed",
    "SupervisedPlan",
    "autocast_for",
    "epoch_order",
    "fit",
    "step",
]

#: Row-aligned targets of a batch: ``(hard labels (B,),)``, ``(teacher logits (B, K),)`` or
#: ``(teacher logits (B, K), hard labels (B,) with -1 for unlabeled rows)``.
Targets = tuple[torch.Tensor, ...]
#: A validation hook: the metrics of a model (e.g. ``{"val_top1": ...}``).
Evaluate = Callable[[nn.Module], dict[str, float]]
#: Per-epoch history rows (JSON-ready: numbers).
History = list[HistoryRow]


#: ``loss_fn(logits, *targets)``: a scalar loss.
LossFn = Callable[..., torch.Tensor]


@dataclass
class SupervisedPlan:
    """The budget and recipe of a supervised run."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: Literal["lars", "sgd", "adamw"] = "adamw"
    min_steps: int = 1
    warmup_fraction: float = 0.05
    seed: int = 0
    bf16: bool = False
    name: str = "train"

    def steps_per_epoch(self, n: int, world: int = 1) -> int:
        per_rank = max(1, self.batch_size // world)
        natural = math.ceil(n / world / per_rank)
        return max(natural, math.ceil(self.min_steps / self.epochs))


@dataclass
class InMemory:
    """Training rows held in memory: uint8 images (N, C, H, W) and row-aligned targets, augmented
    per batch by ``augment``."""

    images: torch.Tensor
    targets: Targets
    augment: Callable[[torch.Tensor], torch.Tensor]

    @property
    def count(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Streamed:
    """Training rows read as a stream: ``batches(epoch, batch, steps)`` yields exactly ``steps``
    batches ``(augmented x, targets)`` of this rank's share; ``count`` is the split's size."""

    batches: Callable[[int, int, int], Iterator[tuple[torch.Tensor, Targets]]]
    count: int


def epoch_order(n: int, length: int, seed: int) -> torch.Tensor:
    """``length`` row indices: random permutations of ``range(n)`` laid end to end, so an epoch
    of ``ceil(n / batch)`` steps sees every row once and a longer one (``min_steps``) cycles.
    Every rank draws the same order (same seed) and takes its own slice of each step."""
    g = torch.Generator().manual_seed(seed)
    reps = max(1, math.ceil(length / n))
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:length]


def autocast_for(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast on ``device`` when ``bf16``, else a no-op context."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step(
    loss: torch.Tensor,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    name: str,
    where: str,
) -> float:
    """One optimisation step on ``loss``; returns its value (the step's one wait for the device).
    A non-finite loss is a ``FloatingPointError`` "``name``: loss is nan ``where``"."""
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"{name}: loss is {value}{where}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return value


def _batches(
    data: InMemory | Streamed, plan: SupervisedPlan, ctx: TrainContext, epoch: int, b: int
) -> Iterator[tuple[torch.Tensor, Targets]]:
    """This rank's ``(augmented x, targets)`` batches of one epoch."""
    steps = plan.steps_per_epoch(data.count, ctx.world_size)
    if isinstance(data, Streamed):
        yield from data.batches(epoch, b, steps)
        return
    world = ctx.world_size
    order = epoch_order(data.count, steps * b * world, seed=plan.seed * 7919 + epoch)
    for s in range(steps):
        start = (s * world + ctx.rank) * b
        idx = order[start : start + b]
        yield data.augment(data.images[idx]), tuple(t[idx] for t in data.targets)


def _epoch(
    net: nn.Module,
    data: InMemory | Streamed,
    loss_fn: LossFn,
    plan: SupervisedPlan,
    ctx: TrainContext,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
) -> HistoryRow:
    """Train one epoch; returns its history row (before evaluation)."""
    world, device = ctx.world_size, ctx.device
    steps = plan.steps_per_epoch(data.count, world)
    b = max(1, min(max(1, plan.batch_size // world), data.count // world))
    autocast = autocast_for(device, plan.bf16)
    net.train()
    meter = Throughput()
    loss_sum = 0.0
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for x, t in _batches(data, plan, ctx, epoch, b):
        with autocast:
            logits = net(x)
        logits = logits.float()
        loss_sum += step(loss_fn(logits, *t), opt, sched, plan.name, f" at epoch {epoch}")
        hard = t[0] if t[0].ndim == 1 else t[0].argmax(1)
        correct += (logits.detach().argmax(1) == hard).sum()  # on the device; read per epoch
        seen += len(x)
        meter.add(len(x) * world)
    return {
        "epoch": epoch + 1,
        "loss": loss_sum / steps,
        "train_top1": 100.0 * float(correct) / max(seen, 1),
        "lr": opt.param_groups[0]["lr"],
        "images_per_s": meter.rate,
        "epoch_seconds": meter.seconds,
    }


def fit(
    model: nn.Module,
    data: InMemory | Streamed,
    loss_fn: LossFn,
    plan: SupervisedPlan,
    ctx: TrainContext,
    evaluate: Evaluate | None = None,
) -> History:
    """Train ``model`` on ``data`` against its targets (``loss_fn(logits, *targets)``).

    In memory, rows are visited in shuffled epochs (:func:`epoch_order`): each step takes the next
    ``batch_size`` rows, ``batch_size / world`` per rank (the whole subset when it is smaller than
    the batch); a stream gives the same step budget. Checkpoints every epoch through ``ctx``;
    resumes from ``ctx.load_checkpoint()``. Returns the per-epoch history; ``evaluate``'s metrics
    join the last epoch's row."""
    n = data.count
    if n == 0:
        raise ValueError(f"{plan.name}: no training images")
    total = plan.steps_per_epoch(n, ctx.world_size) * plan.epochs
    net = ctx.prepare_model(model)
    if isinstance(data, InMemory):
        # Images and targets go to the device once (a no-op on the CPU); augmentation runs there.
        device = ctx.device
        data = InMemory(
            data.images.to(device), tuple(t.to(device) for t in data.targets), data.augment
        )
    opt = build_optimizer(plan.optimizer, model, lr=plan.lr, weight_decay=plan.weight_decay)
    sched = warmup_cosine(opt, warmup_steps=int(plan.warmup_fraction * total), total_steps=total)
    history: History = []
    start_epoch = 0
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        start_epoch, history = restore_training_state(ckpt, model, opt, sched)
        log.info("%s: resuming after epoch %d", plan.name, start_epoch)
    for epoch in range(start_epoch, plan.epochs):
        metrics = _epoch(net, data, loss_fn, plan, ctx, opt, sched, epoch)
        if evaluate is not None and epoch + 1 == plan.epochs:
            metrics.update(evaluate(model))
        history.append(metrics)
        state = training_state(model, opt, sched, epoch, history) if ctx.rank == 0 else None
        ctx.report(metrics, checkpoint=state)
    return history
