"""Distillation of the fine-tuned teacher into a (smaller) student on the unlabeled images.

SimCLRv2 (Chen et al. 2020, arXiv:2006.10029, eq. 2), after Hinton et al. 2015: the teacher's
tempered class probabilities over every train image are the student's targets,
loss = −Σ_y P_T(y|x; τ) log P_S(y|x; τ), optionally mixed with cross-entropy on the labeled
subset (``distill.label_weight``). Teacher logits are computed once on the un-augmented images; the
student sees crop + flip with ``distill.crop_min_scale`` (default: fine-tuning's crop). 1.0 — flip
only, so the student's input is the image its target was computed on — closed most of the
student-teacher gap on Fashion-MNIST (docs/recipe.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.config import Config, ModelConfig
from pipeline.data import dataset_info, load_subset
from pipeline.data.transforms import BatchTwoViewAugment
from pipeline.distributed import convert_sync_batchnorm
from pipeline.losses import DistillationLoss
from pipeline.models import (
    Classifier,
    backbone_from,
    build_contrastive_model,
    count_params,
    load_model,
    save_model,
)
from pipeline.runtime import LocalContext, StageResult, TrainContext
from pipeline.stages.common import (
    StreamSplit,
    accuracy,
    encode,
    load_data,
    seed_everything,
    single_view_augment,
    subset_keys,
    use_memory,
    write_json,
)
from pipeline.stages.pretrain import view_size
from pipeline.stages.supervised import SupervisedPlan, fit

__all__ = ["run", "student_model_config"]


def student_model_config(cfg: Config) -> ModelConfig:
    """The teacher's model section with the student's arch, width and (when set) stem stride."""
    student = cfg.distill.student.model_dump(exclude_none=True)
    return cfg.model.model_copy(update=student)


def run(
    cfg: Config,
    inputs: dict[str, str],
    out_dir: str,
    ctx: TrainContext | None = None,
    *,
    fraction: float,
) -> StageResult:
    """Distil ``inputs['teacher']`` (a classifier model file) into a student on all train
    images. Writes ``model.pt`` (the student) and ``history.json``."""
    ds = inputs["dataset"]
    out = Path(out_dir)
    ctx = ctx or LocalContext(out / "checkpoints")
    d = cfg.distill
    seed_everything(cfg.supervised_seed * 100 + ctx.rank)
    info = dataset_info(ds)
    channels, size, n_classes = int(info["channels"]), view_size(cfg, info), len(info["classes"])
    streaming = not use_memory(cfg, info)
    if streaming:
        return _run_streaming(cfg, inputs, out, ctx, info, fraction)
    train = load_data(ds, "train")
    val = load_data(ds, "val")

    teacher = load_model(inputs["teacher"], map_location=ctx.device)
    teacher_logits = encode(teacher, train.images, size=size)  # (N, K), clean images
    teacher_params = count_params(teacher)
    del teacher
    if d.label_weight > 0:
        keep = set(subset_keys(ds, fraction))
        hard = torch.tensor(
            [
                int(y) if k in keep else -1
                for k, y in zip(train.keys, train.labels.tolist(), strict=False)
            ]
        )
        targets = torch.cat([teacher_logits, hard[:, None].float()], dim=1)  # (N, K+1)
    else:
        targets = teacher_logits
    loss = DistillationLoss(temperature=d.temperature, label_weight=d.label_weight)

    def loss_fn(student_logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if d.label_weight > 0:
            return loss(student_logits, t[:, :-1], t[:, -1].long())
        return loss(student_logits, t)

    smodel_cfg = student_model_config(cfg)
    backbone, feat_dim = backbone_from(build_contrastive_model(smodel_cfg, channels), 0)
    student = Classifier(backbone, feat_dim, n_classes)
    if ctx.world_size > 1:
        student = convert_sync_batchnorm(student)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        logits = encode(m, val.images, size=size)
        return {"val_top1": accuracy(logits, val.labels)} if len(val) else {}

    plan = _plan(cfg, fraction)
    history = fit(
        student,
        train.images,
        targets,
        loss_fn=loss_fn,
        augment=single_view_augment(
            cfg,
            channels,
            size,
            d.crop_min_scale if d.crop_min_scale is not None else cfg.finetune.crop_min_scale,
        ),
        plan=plan,
        ctx=ctx,
        evaluate=evaluate,
    )
    return _finish(out, ctx, history, student, smodel_cfg, channels, n_classes, teacher_params)


def _plan(cfg: Config, fraction: float) -> SupervisedPlan:
    d = cfg.distill
    return SupervisedPlan(
        epochs=d.epochs,
        batch_size=d.batch_size,
        lr=d.lr,
        weight_decay=d.weight_decay,
        optimizer="adamw",
        seed=cfg.supervised_seed,
        bf16=cfg.pretrain.bf16,
        name=f"distill@{fraction:g}",
    )


def _student(cfg: Config, channels: int, n_classes: int, world: int) -> tuple[Any, Classifier]:
    smodel_cfg = student_model_config(cfg)
    backbone, feat_dim = backbone_from(build_contrastive_model(smodel_cfg, channels), 0)
    student = Classifier(backbone, feat_dim, n_classes)
    if world > 1:
        student = convert_sync_batchnorm(student)
    return smodel_cfg, student


def _run_streaming(
    cfg: Config,
    inputs: dict[str, str],
    out: Path,
    ctx: TrainContext,
    info: dict[str, Any],
    fraction: float,
) -> StageResult:
    """:func:`run` on the streaming path. The teacher's logits are computed per batch on the
    clean (resized, un-augmented) view of the same samples the student sees cropped, instead
    of once for the whole split: the same targets, with no N x K table held."""
    from pipeline.data.decode import CropViews

    d = cfg.distill
    ds = inputs["dataset"]
    channels, size, n_classes = int(info["channels"]), view_size(cfg, info), len(info["classes"])
    train = StreamSplit(cfg, ds, "train", ctx.rank, ctx.world_size)
    val = StreamSplit(cfg, ds, "val")
    device = ctx.device
    teacher = load_model(inputs["teacher"], map_location=device)
    teacher_params = count_params(teacher)
    teacher.eval()
    known: dict[str, int] = {}
    if d.label_weight > 0:
        keys, labels = load_subset(ds, fraction)
        known = dict(zip(keys, labels.tolist(), strict=True))
    loss = DistillationLoss(temperature=d.temperature, label_weight=d.label_weight)

    def loss_fn(student_logits: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if d.label_weight > 0:
            return loss(student_logits, t[:, :-1], t[:, -1].long())
        return loss(student_logits, t)

    smodel_cfg, student = _student(cfg, channels, n_classes, ctx.world_size)
    crop_scale = d.crop_min_scale if d.crop_min_scale is not None else cfg.finetune.crop_min_scale
    finish = BatchTwoViewAugment(size=size, channels=channels, strength=0.0).colour
    crops = CropViews(size, channels, (crop_scale,), eval_view=True)

    def stream(epoch: int, batch: int, steps: int):
        for (crop, clean), _y, keys in train.batches(crops, batch, steps, epoch=epoch):
            x = finish(crop.to(device))
            with torch.no_grad():
                t = encode(teacher, clean.to(device), batch_size=batch).to(device)
            if d.label_weight > 0:
                hard = torch.tensor([known.get(k, -1) for k in keys], dtype=torch.float32)
                t = torch.cat([t, hard[:, None].to(device)], dim=1)
            yield x, t

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        logits, labels, _ = val.features(m, size)
        return {"val_top1": accuracy(logits, labels)} if len(labels) else {}

    history = fit(
        student,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        loss_fn=loss_fn,
        augment=finish,
        plan=_plan(cfg, fraction),
        ctx=ctx,
        evaluate=evaluate,
        stream=stream,
        stream_count=train.count,
    )
    result = _finish(out, ctx, history, student, smodel_cfg, channels, n_classes, teacher_params)
    result.metrics["data_streaming"] = 1.0
    return result


def _finish(
    out: Path,
    ctx: TrainContext,
    history: list[dict[str, Any]],
    student: Classifier,
    smodel_cfg: ModelConfig,
    channels: int,
    n_classes: int,
    teacher_params: int,
) -> StageResult:
    outputs = {"model": str(out / "model.pt"), "history": str(out / "history.json")}
    final = history[-1]
    metrics: dict[str, Any] = {}
    if "val_top1" in final:
        metrics["val_top1"] = final["val_top1"]
    metrics.update(
        student_params=float(count_params(student)),
        teacher_params=float(teacher_params),
        train_loss=final["loss"],
        data_streaming=0.0,
    )
    if ctx.rank == 0:
        save_model(
            outputs["model"],
            kind="classifier",
            model_section=smodel_cfg.model_dump(),
            in_channels=channels,
            num_classes=n_classes,
            state_dict=student.state_dict(),
            head_layers=0,
        )
        write_json(outputs["history"], history)
    return StageResult(outputs=outputs, metrics=metrics, history=history)
