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

import contextlib
import itertools
import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConsistencyConfig
from pipeline.losses import align_distribution, confident_targets, fixmatch
from pipeline.optim import build_optimizer, warmup_cosine
from pipeline.runtime import TrainContext
from pipeline.stages.common import (
    Throughput,
    batches,
    restore_training_state,
    training_state,
)
from pipeline.stages.supervised import epoch_order

log = logging.getLogger(__name__)

__all__ = ["ALIGN_MOMENTUM", "PHASE", "fit_consistency", "resumes_consistency"]

#: The ``phase`` entry of this loop's checkpoints.
PHASE = "consistency"
#: Per-step momentum of the running mean of the predictions (distribution alignment).
ALIGN_MOMENTUM = 0.999


def resumes_consistency(ckpt: dict[str, Any] | None) -> bool:
    """Whether ``ckpt`` (a stage's latest checkpoint) was written by the consistency phase."""
    return ckpt is not None and ckpt.get("phase") == PHASE


def fit_consistency(
    model: nn.Module,
    labeled_images: torch.Tensor,
    labeled_labels: torch.Tensor,
    unlabeled_images: torch.Tensor,
    *,
    cfg: ConsistencyConfig,
    weak: Callable[[torch.Tensor], torch.Tensor],
    strong: Callable[[torch.Tensor], torch.Tensor],
    ctx: TrainContext,
    history: list[dict[str, Any]],
    resume: dict[str, Any] | None = None,
    seed: int = 0,
    weight_decay: float = 1e-4,
    bf16: bool = False,
    name: str = "consistency",
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    unlabeled_labels: torch.Tensor | None = None,
    stream: Any = None,
) -> list[dict[str, Any]]:
    """Run ``cfg.epochs`` epochs over ``unlabeled_images`` (uint8, N×C×H×W) after the supervised
    ``history``; returns that history extended by one row per epoch.

    ``unlabeled_labels`` (optional, row-aligned) are never trained on: they only measure how
    often the confident pseudo-labels are right (``pseudo_label_acc``, monitoring).
    Checkpoints every epoch through ``ctx``; ``resume`` (the stage's latest checkpoint, loaded
    by the caller) continues from it when the consistency phase wrote it.

    Streaming: ``stream(epoch, batch, steps)`` yields exactly ``steps`` batches ``(weak crops,
    strong crops, true labels)`` of the unlabeled images (uint8, cropped in loader workers),
    ``stream.count`` is their number and ``stream.colours`` the (weak, strong) colour halves;
    ``unlabeled_images`` is then unused and the true labels measure ``pseudo_label_acc``.
    """
    n_u = int(unlabeled_images.shape[0]) if stream is None else int(stream.count)
    n_l = int(labeled_images.shape[0])
    if n_l == 0:
        raise ValueError(f"{name}: no labeled images")
    rank, world = ctx.rank, ctx.world_size
    b_u = max(1, cfg.batch_size // world)
    steps = n_u // world // b_u
    if steps == 0:
        raise ValueError(
            f"{name}: {n_u} unlabeled images are fewer than one batch "
            f"(finetune.consistency.batch_size={cfg.batch_size} over {world} worker(s))"
        )
    b_l = max(1, min(cfg.labeled_batch_size // world, n_l))
    total = steps * cfg.epochs
    net = ctx.prepare_model(model)
    device = ctx.device
    if stream is None:
        unlabeled_images = unlabeled_images.to(device)
    labeled_images, labeled_labels = labeled_images.to(device), labeled_labels.to(device)
    if unlabeled_labels is not None:
        unlabeled_labels = unlabeled_labels.to(device)
    opt = build_optimizer("adamw", model, lr=cfg.lr, weight_decay=weight_decay)
    sched = warmup_cosine(opt, warmup_steps=0, total_steps=total)
    history = list(history)
    base_epoch = len(history)
    start = 0
    prior: torch.Tensor | None = None  # (K,) the labeled subset's class frequencies
    running: torch.Tensor | None = None  # (K,) mean prediction on unlabeled weak views
    if resumes_consistency(resume):
        start, history = restore_training_state(resume, model, opt, sched)
        base_epoch = int(resume["base_epoch"])
        if resume.get("align_running") is not None:
            running = resume["align_running"].to(device)
        log.info("%s: resuming after consistency epoch %d", name, start)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    for epoch in range(start, cfg.epochs):
        order_l = epoch_order(n_l, steps * b_l * world, seed=seed * 7919 + 104729 + epoch)
        meter = Throughput()
        loss_sum = 0.0
        # labeled loss, unlabeled loss, kept targets, right targets: on the device, read per epoch
        sums = torch.zeros(4, device=device)
        # Every rank takes the same number of steps (DDP), whatever n_u % world is.
        if stream is None:
            draws = batches(n_u, b_u, epoch=epoch, seed=seed + 31, rank=rank, world_size=world)
            draws = itertools.islice(draws, steps)
        else:
            draws = stream(epoch, b_u, steps)
            weak_c, strong_c = stream.colours
        for step, item in enumerate(draws):
            if stream is None:
                idx = item
                xu = unlabeled_images[idx]
                weak_u, strong_u = (lambda xu=xu: weak(xu)), (lambda xu=xu: strong(xu))
                yu = unlabeled_labels[idx] if unlabeled_labels is not None else None
            else:
                wc, sc, yu = item
                idx = yu
                wc, sc, yu = wc.to(device), sc.to(device), yu.to(device)
                weak_u = lambda wc=wc, f=weak_c: f(wc)  # noqa: E731
                strong_u = lambda sc=sc, f=strong_c: f(sc)  # noqa: E731
            model.eval()
            with torch.no_grad(), autocast:
                weak_logits = model(weak_u()).float()  # (b_u, K): the targets, no gradient
            if cfg.distribution_alignment:
                if prior is None:
                    # A class missing from the labeled subset counts once (the target must be > 0).
                    counts = torch.bincount(labeled_labels, minlength=weak_logits.shape[1])
                    counts = counts.clamp(min=1).float()
                    prior = counts / counts.sum()
                mean = weak_logits.softmax(dim=1).mean(dim=0)  # (K,)
                if running is None:
                    running = mean
                running = ALIGN_MOMENTUM * running + (1 - ALIGN_MOMENTUM) * mean
                weak_logits = align_distribution(weak_logits, running, prior)
            net.train()
            li = order_l[(step * world + rank) * b_l : (step * world + rank + 1) * b_l]
            x = torch.cat([weak(labeled_images[li]), strong_u()])  # (b_l + b_u, C, H, W)
            with autocast:
                logits = net(x)
            logits = logits.float()
            sup = F.cross_entropy(logits[: len(li)], labeled_labels[li])
            uns = fixmatch(logits[len(li) :], weak_logits, cfg.threshold)
            loss = sup + cfg.weight * uns
            value = loss.item()  # the step's one wait for the device
            if not math.isfinite(value):
                raise FloatingPointError(f"{name}: loss is {value} at consistency epoch {epoch}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += value
            targets, keep = confident_targets(weak_logits, cfg.threshold)
            right = ((targets == yu) & keep).sum() if yu is not None else keep.new_zeros(())
            sums += torch.stack([sup.detach(), uns.detach(), keep.sum(), right]).float()
            meter.add((len(idx) + len(li)) * world)
        sup_sum, uns_sum, kept, right_sum = sums.tolist()
        metrics: dict[str, Any] = {
            "epoch": base_epoch + epoch + 1,
            "consistency_epoch": epoch + 1,
            "loss": loss_sum / steps,
            "labeled_loss": sup_sum / steps,
            "unlabeled_loss": uns_sum / steps,
            "mask_rate": 100.0 * kept / (steps * b_u),
            "lr": opt.param_groups[0]["lr"],
            "images_per_s": meter.rate,
            "epoch_seconds": meter.seconds,
        }
        if unlabeled_labels is not None or stream is not None:
            metrics["pseudo_label_acc"] = 100.0 * right_sum / max(kept, 1.0)
        if evaluate is not None and epoch + 1 == cfg.epochs:
            metrics.update(evaluate(model))
        history.append(metrics)
        state = None
        if rank == 0:
            state = training_state(
                model,
                opt,
                sched,
                epoch,
                history,
                phase=PHASE,
                base_epoch=base_epoch,
                align_running=None if running is None else running.cpu(),
            )
        ctx.report(metrics, checkpoint=state)
    return history
