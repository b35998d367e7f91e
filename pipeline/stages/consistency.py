"""Fine-tuning's consistency phase: FixMatch on the unlabeled train images (Sohn et al. 2020,
arXiv:2001.07685), after the supervised fine-tuning.

Each step takes ``batch_size`` unlabeled images and ``labeled_batch_size`` labeled ones. The
network in eval mode predicts the unlabeled images' weak view (fine-tuning's own augmentation);
where its confidence reaches ``threshold`` that class becomes the target of a strong view (colour
jitter of ``strength``, crop of ``crop_min_scale``). One forward pass over labeled weak views and
unlabeled strong views (BatchNorm sees both, as in the paper) gives
``loss = CE(labeled) + weight · fixmatch(strong, weak)``. With ``distribution_alignment`` the
weak view's probabilities are first scaled by the labeled subset's class frequencies over their
running mean (momentum :data:`ALIGN_MOMENTUM` per step, started at the first batch's mean), which
keeps the targets from drifting towards the classes the network already favours.

The phase continues the stage's history (epochs numbered after the supervised ones) and its
checkpoints carry ``phase: "consistency"``, so a resumed stage skips the finished supervised part.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConsistencyConfig
from pipeline.losses import align_distribution, confident_targets, fixmatch
from pipeline.optim import build_optimizer, warmup_cosine
from pipeline.runtime import HistoryRow, TrainContext
from pipeline.stages.common import (
    Throughput,
    batches,
    restore_training_state,
    training_state,
)
from pipeline.stages.supervised import (
    Evaluate,
    History,
    InMemory,
    autocast_for,
    epoch_order,
    step,
)

log = logging.getLogger(__name__)

__all__ = [
    "ALIGN_MOMENTUM",
    "PHASE",
    "ConsistencyPlan",
    "UnlabeledMemory",
    "UnlabeledStream",
    "fit_consistency",
    "resumes_consistency",
]

#: The ``phase`` entry of this loop's checkpoints.
PHASE = "consistency"
#: Per-step momentum of the running mean of the predictions (distribution alignment).
ALIGN_MOMENTUM = 0.999

Augment = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class ConsistencyPlan:
    """The budget and recipe of the consistency phase (``finetune.consistency`` plus what it
    takes from the stage: weight decay, seed, precision, name)."""

    epochs: int
    batch_size: int = 256
    labeled_batch_size: int = 64
    lr: float = 1e-3
    threshold: float = 0.95
    weight: float = 1.0
    distribution_alignment: bool = False
    weight_decay: float = 1e-4
    seed: int = 0
    bf16: bool = False
    name: str = "consistency"

    @classmethod
    def from_config(
        cls,
        c: ConsistencyConfig,
        *,
        weight_decay: float = 1e-4,
        seed: int = 0,
        bf16: bool = False,
        name: str = "consistency",
    ) -> ConsistencyPlan:
        return cls(
            epochs=c.epochs,
            batch_size=c.batch_size,
            labeled_batch_size=c.labeled_batch_size,
            lr=c.lr,
            threshold=c.threshold,
            weight=c.weight,
            distribution_alignment=c.distribution_alignment,
            weight_decay=weight_decay,
            seed=seed,
            bf16=bf16,
            name=name,
        )


@dataclass
class _Draw:
    """One step's unlabeled batch: its weak and strong views (made when called, in that order),
    its true labels when known (monitoring only) and its size."""

    weak: Callable[[], torch.Tensor]
    strong: Callable[[], torch.Tensor]
    labels: torch.Tensor | None
    size: int


@dataclass
class UnlabeledMemory:
    """The unlabeled images in memory (uint8, N×C×H×W) with the weak and strong augmentations;
    ``labels`` (optional, row-aligned) only measure the pseudo-labels (``pseudo_label_acc``)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    weak: Augment
    strong: Augment

    @property
    def count(self) -> int:
        return int(self.images.shape[0])

    @property
    def knows_labels(self) -> bool:
        return self.labels is not None

    def to(self, device: torch.device) -> UnlabeledMemory:
        labels = self.labels.to(device) if self.labels is not None else None
        return UnlabeledMemory(self.images.to(device), labels, self.weak, self.strong)

    def draws(
        self, epoch: int, batch: int, steps: int, seed: int, ctx: TrainContext
    ) -> Iterator[_Draw]:
        # Every rank takes the same number of steps (DDP), whatever count % world is.
        order = batches(
            self.count, batch, epoch=epoch, seed=seed + 31, rank=ctx.rank, world_size=ctx.world_size
        )
        for idx in itertools.islice(order, steps):
            x = self.images[idx]
            y = self.labels[idx] if self.labels is not None else None
            yield _Draw(partial(self.weak, x), partial(self.strong, x), y, len(idx))


@dataclass
class UnlabeledStream:
    """The unlabeled images as a stream: ``batches(epoch, batch, steps)`` yields exactly ``steps``
    batches ``(weak crops, strong crops, true labels)`` (uint8, cropped in loader workers),
    ``count`` is their number and ``weak_colour`` / ``strong_colour`` finish the views on the
    device; the true labels measure ``pseudo_label_acc``."""

    batches: Callable[[int, int, int], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    count: int
    weak_colour: Augment
    strong_colour: Augment

    @property
    def knows_labels(self) -> bool:
        return True

    def to(self, device: torch.device) -> UnlabeledStream:
        return self

    def draws(
        self, epoch: int, batch: int, steps: int, seed: int, ctx: TrainContext
    ) -> Iterator[_Draw]:
        device = ctx.device
        for wc, sc, y in self.batches(epoch, batch, steps):
            yield _Draw(
                partial(self.weak_colour, wc.to(device)),
                partial(self.strong_colour, sc.to(device)),
                y.to(device),
                len(y),
            )


class _Aligner:
    """Distribution alignment of the weak view's predictions: the labeled subset's class
    frequencies over the running mean of the predictions (momentum :data:`ALIGN_MOMENTUM`)."""

    def __init__(self, labels: torch.Tensor, running: torch.Tensor | None) -> None:
        self.labels = labels
        self.prior: torch.Tensor | None = None  # (K,) the labeled subset's class frequencies
        self.running = running  # (K,) mean prediction on unlabeled weak views

    def __call__(self, weak_logits: torch.Tensor) -> torch.Tensor:
        if self.prior is None:
            # A class missing from the labeled subset counts once (the target must be > 0).
            counts = torch.bincount(self.labels, minlength=weak_logits.shape[1])
            counts = counts.clamp(min=1).float()
            self.prior = counts / counts.sum()
        mean = weak_logits.softmax(dim=1).mean(dim=0)  # (K,)
        if self.running is None:
            self.running = mean
        self.running = ALIGN_MOMENTUM * self.running + (1 - ALIGN_MOMENTUM) * mean
        return align_distribution(weak_logits, self.running, self.prior)


def resumes_consistency(ckpt: dict[str, Any] | None) -> bool:
    """Whether ``ckpt`` (a stage's latest checkpoint) was written by the consistency phase."""
    return ckpt is not None and ckpt.get("phase") == PHASE


@dataclass
class _Phase:
    """The state one consistency epoch runs with."""

    model: nn.Module
    net: nn.Module
    labeled: InMemory
    plan: ConsistencyPlan
    ctx: TrainContext
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    align: _Aligner | None
    steps: int

    def step(self, draw: _Draw, li: torch.Tensor, epoch: int) -> tuple[float, torch.Tensor]:
        """One step on an unlabeled draw and the labeled rows ``li``; returns the loss and
        (labeled loss, unlabeled loss, kept targets, right targets) on the device."""
        plan, labels = self.plan, self.labeled.targets[0]
        autocast = autocast_for(self.ctx.device, plan.bf16)
        self.model.eval()
        with torch.no_grad(), autocast:
            weak_logits = self.model(draw.weak()).float()  # (b_u, K): the targets, no gradient
        if self.align is not None:
            weak_logits = self.align(weak_logits)
        self.net.train()
        x = torch.cat([self.labeled.augment(self.labeled.images[li]), draw.strong()])
        with autocast:
            logits = self.net(x)  # (b_l + b_u, K)
        logits = logits.float()
        sup = F.cross_entropy(logits[: len(li)], labels[li])
        uns = fixmatch(logits[len(li) :], weak_logits, plan.threshold)
        where = f" at consistency epoch {epoch}"
        value = step(sup + plan.weight * uns, self.opt, self.sched, plan.name, where)
        targets, keep = confident_targets(weak_logits, plan.threshold)
        yu = draw.labels
        right = ((targets == yu) & keep).sum() if yu is not None else keep.new_zeros(())
        return value, torch.stack([sup.detach(), uns.detach(), keep.sum(), right]).float()

    def epoch(
        self, unlabeled: UnlabeledMemory | UnlabeledStream, epoch: int, base_epoch: int
    ) -> HistoryRow:
        """Train one epoch; returns its history row (before evaluation)."""
        plan, world, rank = self.plan, self.ctx.world_size, self.ctx.rank
        b_u = max(1, plan.batch_size // world)
        b_l = max(1, min(plan.labeled_batch_size // world, self.labeled.count))
        n_l, steps = self.labeled.count, self.steps
        order_l = epoch_order(n_l, steps * b_l * world, seed=plan.seed * 7919 + 104729 + epoch)
        meter = Throughput()
        loss_sum = 0.0
        sums = torch.zeros(4, device=self.ctx.device)  # read once per epoch
        for s, draw in enumerate(unlabeled.draws(epoch, b_u, steps, plan.seed, self.ctx)):
            li = order_l[(s * world + rank) * b_l : (s * world + rank + 1) * b_l]
            value, step_sums = self.step(draw, li, epoch)
            loss_sum += value
            sums += step_sums
            meter.add((draw.size + len(li)) * world)
        sup_sum, uns_sum, kept, right_sum = sums.tolist()
        metrics: HistoryRow = {
            "epoch": base_epoch + epoch + 1,
            "consistency_epoch": epoch + 1,
            "loss": loss_sum / steps,
            "labeled_loss": sup_sum / steps,
            "unlabeled_loss": uns_sum / steps,
            "mask_rate": 100.0 * kept / (steps * b_u),
            "lr": self.opt.param_groups[0]["lr"],
            "images_per_s": meter.rate,
            "epoch_seconds": meter.seconds,
        }
        if unlabeled.knows_labels:
            metrics["pseudo_label_acc"] = 100.0 * right_sum / max(kept, 1.0)
        return metrics

    def checkpoint(self, epoch: int, history: History, base_epoch: int) -> dict[str, Any]:
        running = self.align.running if self.align is not None else None
        return training_state(
            self.model,
            self.opt,
            self.sched,
            epoch,
            history,
            phase=PHASE,
            base_epoch=base_epoch,
            align_running=None if running is None else running.cpu(),
        )


def _steps(plan: ConsistencyPlan, n_u: int, world: int) -> int:
    steps = n_u // world // max(1, plan.batch_size // world)
    if steps == 0:
        raise ValueError(
            f"{plan.name}: {n_u} unlabeled images are fewer than one batch "
            f"(finetune.consistency.batch_size={plan.batch_size} over {world} worker(s))"
        )
    return steps


def fit_consistency(
    model: nn.Module,
    labeled: InMemory,
    unlabeled: UnlabeledMemory | UnlabeledStream,
    plan: ConsistencyPlan,
    ctx: TrainContext,
    *,
    history: History,
    resume: dict[str, Any] | None = None,
    evaluate: Evaluate | None = None,
) -> History:
    """Run ``plan.epochs`` epochs over the unlabeled images after the supervised ``history``;
    returns that history extended by one row per epoch.

    ``labeled`` holds the labeled subset (targets: its labels) and the weak augmentation.
    Checkpoints every epoch through ``ctx``; ``resume`` (the stage's latest checkpoint, loaded
    by the caller) continues from it when the consistency phase wrote it.
    """
    if labeled.count == 0:
        raise ValueError(f"{plan.name}: no labeled images")
    steps = _steps(plan, unlabeled.count, ctx.world_size)
    device = ctx.device
    net = ctx.prepare_model(model)
    unlabeled = unlabeled.to(device)
    labeled = InMemory(
        labeled.images.to(device), tuple(t.to(device) for t in labeled.targets), labeled.augment
    )
    opt = build_optimizer("adamw", model, lr=plan.lr, weight_decay=plan.weight_decay)
    sched = warmup_cosine(opt, warmup_steps=0, total_steps=steps * plan.epochs)
    history, base_epoch, start, running = list(history), len(history), 0, None
    if resume is not None and resumes_consistency(resume):
        start, history = restore_training_state(resume, model, opt, sched)
        base_epoch = int(resume["base_epoch"])
        if resume.get("align_running") is not None:
            running = resume["align_running"].to(device)
        log.info("%s: resuming after consistency epoch %d", plan.name, start)
    align = _Aligner(labeled.targets[0], running) if plan.distribution_alignment else None
    phase = _Phase(model, net, labeled, plan, ctx, opt, sched, align, steps)
    for epoch in range(start, plan.epochs):
        metrics = phase.epoch(unlabeled, epoch, base_epoch)
        if evaluate is not None and epoch + 1 == plan.epochs:
            metrics.update(evaluate(model))
        history.append(metrics)
        state = phase.checkpoint(epoch, history, base_epoch) if ctx.rank == 0 else None
        ctx.report(metrics, checkpoint=state)
    return history
