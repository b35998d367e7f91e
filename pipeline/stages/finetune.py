"""Fine-tuning on a label fraction (SimCLRv2, Chen et al. 2020, arXiv:2006.10029) and the
supervised-from-scratch baseline on the same labels.

The fine-tuned network is the pretrained encoder plus the first ``finetune.from_head_layer``
projection-head layers plus a linear classifier. With ``finetune.consistency.epochs`` it then trains
on the unlabeled train images too (FixMatch, :mod:`pipeline.stages.consistency`); the baseline
does so only with ``finetune.consistency.baseline``. The baseline is the very same architecture from
random initialisation, trained with the same augmentation, optimiser, schedule and step budget;
only its learning rate may differ (``finetune.baseline_lr``, one value or one per label fraction),
so that each side gets its own best.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch.nn.functional as F
from torch import Tensor

from pipeline.config import ConsistencyConfig
from pipeline.data import load_split
from pipeline.data.transforms import BatchTwoViewAugment
from pipeline.models import (
    Classifier,
    backbone_from,
    build_contrastive_model,
    count_params,
)
from pipeline.runtime import StageResult, TrainContext
from pipeline.slices import SupervisedSlice
from pipeline.stages.classifier import ClassifierStage
from pipeline.stages.common import (
    SplitData,
    load_contrastive,
    load_data,
    single_view_augment,
    subset_keys,
)
from pipeline.stages.consistency import (
    Augment,
    ConsistencyPlan,
    UnlabeledMemory,
    UnlabeledStream,
    fit_consistency,
    resumes_consistency,
)
from pipeline.stages.supervised import InMemory, SupervisedPlan, fit

__all__ = ["build_network", "plan_for", "run"]


def plan_for(cfg: SupervisedSlice, name: str, fraction: float) -> SupervisedPlan:
    """The supervised plan of a fine-tuning run at ``fraction`` % labels, or of the baseline
    (``finetune.baseline_lr`` when set, one value or one per fraction: a network from random init
    usually wants a larger step than a pretrained one, and a larger one still on six images per
    class)."""
    f = cfg.finetune
    lr = cfg.lr_for(fraction)
    return SupervisedPlan(
        epochs=f.epochs,
        batch_size=f.batch_size,
        lr=lr,
        weight_decay=f.weight_decay,
        optimizer=f.optimizer,
        min_steps=f.min_steps,
        seed=cfg.seed,
        bf16=cfg.bf16,
        name=name,
    )


def build_network(
    cfg: SupervisedSlice, channels: int, n_classes: int, pretrained: str | None
) -> Classifier:
    """Encoder + first j head layers + linear classifier; from ``pretrained`` (a 'contrastive'
    model file) or randomly initialised (the baseline)."""
    j = cfg.finetune.from_head_layer
    if pretrained is not None:
        source = load_contrastive(pretrained)
    else:
        source = build_contrastive_model(cfg.model, in_channels=channels)
    backbone, feat_dim = backbone_from(source, j)
    return Classifier(backbone, feat_dim, n_classes)


def run(
    cfg: SupervisedSlice,
    inputs: dict[str, str],
    out_dir: str,
    ctx: TrainContext | None = None,
    *,
    fraction: float,
    baseline: bool = False,
) -> StageResult:
    """Train on the ``fraction`` % labeled subset; from ``inputs['pretrain']`` unless
    ``baseline``. Writes ``model.pt`` (kind 'classifier') and ``history.json``."""
    stage = ClassifierStage.open(cfg, inputs, out_dir, ctx)
    name = f"{'baseline' if baseline else 'finetune'}@{fraction:g}"
    keys = subset_keys(stage.dataset, fraction)
    labeled, train = _labeled(stage, keys)
    pretrained = None if baseline else inputs["pretrain"]
    model = stage.prepare(build_network(cfg, stage.channels, stage.n_classes, pretrained))
    evaluate = stage.val_top1()
    augment = single_view_augment(stage.channels, stage.size, cfg.finetune.crop_min_scale)
    data = InMemory(labeled.images, (labeled.labels,), augment)
    c = cfg.consistency
    if c is None or c.epochs == 0:
        history = fit(
            model,
            data,
            F.cross_entropy,
            plan_for(cfg, name, fraction),
            stage.ctx,
            evaluate,
        )
    else:
        ckpt = stage.ctx.load_checkpoint()
        history = []  # resumed in the consistency phase: the supervised rows are in ckpt
        if not resumes_consistency(ckpt):
            history = fit(model, data, F.cross_entropy, plan_for(cfg, name, fraction), stage.ctx)
        plan = ConsistencyPlan.from_config(
            c, weight_decay=cfg.finetune.weight_decay, seed=cfg.seed, bf16=cfg.bf16, name=name
        )
        unlabeled = _unlabeled(stage, cfg, c, train, keys, augment)
        history = fit_consistency(
            model, data, unlabeled, plan, stage.ctx, history=history, resume=ckpt, evaluate=evaluate
        )
    extra = {"labeled_images": float(len(labeled)), "params": float(count_params(model))}
    return stage.finish(history, model, cfg.model, cfg.finetune.from_head_layer, extra)


def _labeled(stage: ClassifierStage, keys: list[str]) -> tuple[SplitData, SplitData | None]:
    """The labeled subset in memory, and the whole train split when it is held in memory too (the
    streaming path reads only the subset: it is small)."""
    if stage.streaming:
        images, labels, got = load_split(stage.dataset, "train", keys=keys)
        return SplitData(images, labels, got), None
    train = load_data(stage.dataset, "train")
    return train.take(keys), train


def _unlabeled(
    stage: ClassifierStage,
    cfg: SupervisedSlice,
    c: ConsistencyConfig,
    train: SplitData | None,
    keys: list[str],
    weak: Augment,
) -> UnlabeledMemory | UnlabeledStream:
    """The train images outside the labeled subset, with the consistency phase's weak (fine-tuning's
    crop + flip) and strong (colour jitter, crop) views."""
    size, channels = stage.size, stage.channels
    strong = BatchTwoViewAugment(
        size=size, channels=channels, strength=c.strength, crop_min_scale=c.crop_min_scale
    )
    if train is not None:
        rest = train.drop(keys)
        return UnlabeledMemory(rest.images, rest.labels, weak, strong.single)
    from pipeline.data.decode import CropViews

    stream = stage.train_stream()
    crops = CropViews(size, channels, (cfg.finetune.crop_min_scale, c.crop_min_scale))
    excluded = frozenset(keys)

    def batches(epoch: int, batch: int, steps: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for (w, st), y, _k in stream.batches(crops, batch, steps, epoch=epoch, exclude=excluded):
            yield w, st, y

    weak_colour = BatchTwoViewAugment(size=size, channels=channels, strength=0.0).colour
    return UnlabeledStream(batches, stream.count - len(keys), weak_colour, strong.colour)
