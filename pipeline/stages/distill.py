"""Distillation of the fine-tuned teacher into a (smaller) student on the unlabeled images.

SimCLRv2 (Chen et al. 2020, arXiv:2006.10029, eq. 2), after Hinton et al. 2015: the teacher's
tempered class probabilities over every train image are the student's targets,
loss = −Σ_y P_T(y|x; τ) log P_S(y|x; τ), optionally mixed with cross-entropy on the labeled
subset (``distill.label_weight``). Teacher logits are computed once on the un-augmented images; the
student sees crop + flip with ``distill.crop_min_scale`` (default: fine-tuning's crop). 1.0 — flip
only, so the student's input is the image its target was computed on — closed most of the
student-teacher gap on Fashion-MNIST (docs/recipe.md). The labeled subset's hard labels (with
``distill.label_weight``) travel as their own row-aligned tensor, -1 for unlabeled rows.

Streaming: the teacher's logits are computed per batch on the clean (resized, un-augmented) view
of the same samples the student sees cropped, instead of once for the whole split: the same
targets, with no N x K table held.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from pipeline.data import load_subset
from pipeline.data.transforms import BatchTwoViewAugment
from pipeline.losses import DistillationLoss
from pipeline.models import (
    Classifier,
    backbone_from,
    build_contrastive_model,
    count_params,
    load_model,
)
from pipeline.runtime import StageResult, TrainContext
from pipeline.slices import DistillSlice
from pipeline.stages.classifier import ClassifierStage
from pipeline.stages.common import encode, load_data, single_view_augment
from pipeline.stages.supervised import InMemory, Streamed, SupervisedPlan, Targets, fit

__all__ = ["run"]


def run(
    cfg: DistillSlice,
    inputs: dict[str, str],
    out_dir: str,
    ctx: TrainContext | None = None,
    *,
    fraction: float,
) -> StageResult:
    """Distil ``inputs['teacher']`` (a classifier model file) into a student on all train
    images. Writes ``model.pt`` (the student) and ``history.json``."""
    stage = ClassifierStage.open(cfg, inputs, out_dir, ctx)
    teacher = load_model(inputs["teacher"], map_location=stage.ctx.device)
    teacher_params = count_params(teacher)
    if stage.streaming:
        data: InMemory | Streamed = _streamed(stage, cfg, teacher, fraction)
    else:
        data = _in_memory(stage, cfg, teacher, fraction)
    del teacher
    backbone, feat_dim = backbone_from(build_contrastive_model(cfg.student, stage.channels), 0)
    student = stage.prepare(Classifier(backbone, feat_dim, stage.n_classes))
    d = cfg.distill
    loss = DistillationLoss(temperature=d.temperature, label_weight=d.label_weight)
    history = fit(student, data, loss, _plan(cfg, fraction), stage.ctx, stage.val_top1())
    extra = {
        "student_params": float(count_params(student)),
        "teacher_params": float(teacher_params),
    }
    return stage.finish(history, student, cfg.student, 0, extra)


def _plan(cfg: DistillSlice, fraction: float) -> SupervisedPlan:
    d = cfg.distill
    return SupervisedPlan(
        epochs=d.epochs,
        batch_size=d.batch_size,
        lr=d.lr,
        weight_decay=d.weight_decay,
        optimizer="adamw",
        seed=cfg.seed,
        bf16=cfg.bf16,
        name=f"distill@{fraction:g}",
    )


def _known_labels(stage: ClassifierStage, fraction: float, label_weight: float) -> dict[str, int]:
    """Key -> label of the ``fraction`` % labeled subset when the loss mixes in cross-entropy
    (``label_weight > 0``), else empty."""
    if label_weight <= 0:
        return {}
    keys, labels = load_subset(stage.dataset, fraction)
    return dict(zip(keys, labels.tolist(), strict=True))


def _hard_labels(keys: list[str], known: dict[str, int]) -> Tensor:
    """(N,) int64: each key's label in ``known``, -1 for the others."""
    return torch.tensor([known.get(k, -1) for k in keys], dtype=torch.long)


def _in_memory(
    stage: ClassifierStage, cfg: DistillSlice, teacher: nn.Module, fraction: float
) -> InMemory:
    """Every train image with the teacher's logits on it (computed once, on the clean images)
    and, with ``distill.label_weight``, the labeled subset's hard labels."""
    train = load_data(stage.dataset, "train")
    teacher_logits = encode(teacher, train.images, size=stage.size)  # (N, K)
    known = _known_labels(stage, fraction, cfg.distill.label_weight)
    targets: Targets = (teacher_logits,)
    if known:
        targets = (teacher_logits, _hard_labels(train.keys, known))
    augment = single_view_augment(stage.channels, stage.size, cfg.crop_min_scale)
    return InMemory(train.images, targets, augment)


def _streamed(
    stage: ClassifierStage, cfg: DistillSlice, teacher: nn.Module, fraction: float
) -> Streamed:
    """The train split as a stream of the student's cropped views with the teacher's logits on
    their clean views (and the hard labels, as in :func:`_in_memory`)."""
    from pipeline.data.decode import CropViews

    size, channels, device = stage.size, stage.channels, stage.ctx.device
    train = stage.train_stream()
    known = _known_labels(stage, fraction, cfg.distill.label_weight)
    teacher.eval()
    finish = BatchTwoViewAugment(size=size, channels=channels, strength=0.0).colour
    crops = CropViews(size, channels, (cfg.crop_min_scale,), eval_view=True)

    def batches(epoch: int, batch: int, steps: int) -> Iterator[tuple[Tensor, Targets]]:
        for (crop, clean), _y, keys in train.batches(crops, batch, steps, epoch=epoch):
            x = finish(crop.to(device))
            with torch.no_grad():
                t = encode(teacher, clean.to(device), batch_size=batch).to(device)
            if known:
                yield x, (t, _hard_labels(keys, known).to(device))
            else:
                yield x, (t,)

    return Streamed(batches, train.count)
