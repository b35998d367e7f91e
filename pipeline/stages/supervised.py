"""One supervised training loop for fine-tuning, the from-scratch baseline and distillation.

The three differ only in where the network starts and what the targets are; sharing the loop
(same augmentation, optimiser, schedule and step budget) keeps the baseline honest.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.optim import build_optimizer, warmup_cosine
from pipeline.runtime import TrainContext
from pipeline.stages.common import Throughput, restore_training_state, training_state

log = logging.getLogger(__name__)

__all__ = ["SupervisedPlan", "epoch_order", "fit"]


@dataclass
class SupervisedPlan:
    """The budget and recipe of a supervised run."""

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    optimizer: str = "adamw"
    min_steps: int = 1
    warmup_fraction: float = 0.05
    seed: int = 0
    bf16: bool = False
    name: str = "train"

    def steps_per_epoch(self, n: int, world: int = 1) -> int:
        per_rank = max(1, self.batch_size // world)
        natural = math.ceil(n / world / per_rank)
        return max(natural, math.ceil(self.min_steps / self.epochs))


def epoch_order(n: int, length: int, seed: int) -> torch.Tensor:
    """``length`` row indices: random permutations of ``range(n)`` laid end to end, so an epoch
    of ``ceil(n / batch)`` steps sees every row once and a longer one (``min_steps``) cycles.
    Every rank draws the same order (same seed) and takes its own slice of each step."""
    g = torch.Generator().manual_seed(seed)
    reps = max(1, math.ceil(length / n))
    return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:length]


def fit(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    augment: Callable[[torch.Tensor], torch.Tensor],
    plan: SupervisedPlan,
    ctx: TrainContext,
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    extra_state: dict[str, Any] | None = None,
    stream: Callable[[int, int, int], Any] | None = None,
    stream_count: int = 0,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``images`` (uint8, N×C×H×W) against ``targets`` (row-aligned: hard
    labels (N,) or teacher logits (N, K)). Rows are visited in shuffled epochs (:func:`epoch_order`):
    each step takes the next ``batch_size`` rows, ``batch_size / world`` per rank (the whole
    subset when it is smaller than the batch).
    Checkpoints every epoch through ``ctx``; resumes from ``ctx.load_checkpoint()``.
    Returns the per-epoch history.

    Streaming: with ``stream(epoch, batch, steps)`` (an iterator of exactly ``steps`` batches
    ``(augmented x, targets)`` of this rank's share) and ``stream_count`` (the split's size) in
    place of ``images`` / ``targets``, the same step budget is drawn from the stream."""
    n = int(images.shape[0]) if stream is None else int(stream_count)
    if n == 0:
        raise ValueError(f"{plan.name}: no training images")
    rank, world = ctx.rank, ctx.world_size
    per_rank = max(1, plan.batch_size // world)
    steps_per_epoch = plan.steps_per_epoch(n, world)
    total = steps_per_epoch * plan.epochs
    net = ctx.prepare_model(model)
    device = ctx.device
    # Images and targets go to the device once (a no-op on the CPU); augmentation runs there.
    if stream is None:
        images, targets = images.to(device), targets.to(device)
    opt = build_optimizer(plan.optimizer, model, lr=plan.lr, weight_decay=plan.weight_decay)
    sched = warmup_cosine(opt, warmup_steps=int(plan.warmup_fraction * total), total_steps=total)
    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        start_epoch, history = restore_training_state(ckpt, model, opt, sched)
        log.info("%s: resuming after epoch %d", plan.name, start_epoch)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if plan.bf16
        else contextlib.nullcontext()
    )
    b = max(1, min(per_rank, n // world))
    for epoch in range(start_epoch, plan.epochs):
        net.train()
        meter = Throughput()
        loss_sum = 0.0
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = 0
        if stream is None:
            order = epoch_order(n, steps_per_epoch * b * world, seed=plan.seed * 7919 + epoch)
        else:
            drawn = iter(stream(epoch, b, steps_per_epoch))
        for step in range(steps_per_epoch):
            if stream is None:
                start = (step * world + rank) * b
                idx = order[start : start + b]
                x = augment(images[idx])
                t = targets[idx]
            else:
                x, t = next(drawn)
                idx = t
            with autocast:
                logits = net(x)
            logits = logits.float()
            loss = loss_fn(logits, t)
            value = loss.item()  # the step's one wait for the device
            if not math.isfinite(value):
                raise FloatingPointError(f"{plan.name}: loss is {value} at epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += value
            hard = t if t.ndim == 1 else t[:, : logits.shape[1]].argmax(1)
            correct += (logits.detach().argmax(1) == hard).sum()  # on the device; read per epoch
            seen += len(idx)
            meter.add(len(idx) * world)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": loss_sum / steps_per_epoch,
            "train_top1": 100.0 * float(correct) / max(seen, 1),
            "lr": opt.param_groups[0]["lr"],
            "images_per_s": meter.rate,
            "epoch_seconds": meter.seconds,
        }
        if evaluate is not None and epoch + 1 == plan.epochs:
            metrics.update(evaluate(model))
        history.append(metrics)
        state = None
        if rank == 0:
            state = training_state(model, opt, sched, epoch, history, **(extra_state or {}))
        ctx.report(metrics, checkpoint=state)
    return history
