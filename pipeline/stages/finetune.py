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

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.data import dataset_info, load_split
from pipeline.data.transforms import BatchTwoViewAugment
from pipeline.distributed import convert_sync_batchnorm
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
    SplitData,
    StreamSplit,
    accuracy,
    encode,
    fit_linear_probe,
    load_data,
    seed_everything,
    single_view_augment,
    subset_keys,
    use_memory,
)
from pipeline.stages.consistency import fit_consistency, resumes_consistency
from pipeline.stages.pretrain import view_size
from pipeline.stages.supervised import SupervisedPlan, fit

__all__ = ["build_network", "plan_for", "run"]


def plan_for(cfg: Config, name: str, fraction: float, baseline: bool = False) -> SupervisedPlan:
    """The supervised plan of a fine-tuning run at ``fraction`` % labels, or of the baseline
    (``finetune.baseline_lr`` when set, one value or one per fraction: a network from random init
    usually wants a larger step than a pretrained one, and a larger one still on six images per
    class)."""
    f = cfg.finetune
    lr = f.baseline_lr_for(fraction) if baseline else f.lr
    return SupervisedPlan(
        epochs=f.epochs,
        batch_size=f.batch_size,
        lr=lr,
        weight_decay=f.weight_decay,
        optimizer=f.optimizer,
        min_steps=f.min_steps,
        seed=cfg.supervised_seed,
        bf16=cfg.pretrain.bf16,
        name=name,
    )


def build_network(cfg: Config, channels: int, n_classes: int, pretrained: str | None) -> Classifier:
    """Encoder + first j head layers + linear classifier; from ``pretrained`` (a 'contrastive'
    model file) or randomly initialised (the baseline)."""
    j = cfg.finetune.from_head_layer
    if pretrained is not None:
        source = load_model(pretrained)
    else:
        source = build_contrastive_model(cfg.model, in_channels=channels)
    backbone, feat_dim = backbone_from(source, j)
    return Classifier(backbone, feat_dim, n_classes)


@torch.no_grad()
def probe_init(
    model: Classifier,
    images: torch.Tensor,
    labels: torch.Tensor,
    size: int,
    n_classes: int,
    seed: int = 0,
    epochs: int = 200,
) -> None:
    """Start ``model.fc`` from a linear probe on the starting network's (frozen, eval-mode)
    features of ``images`` — "linear probing, then fine-tuning" (Kumar et al. 2022,
    arXiv:2202.10054): the first fine-tuning steps then follow a classifier that already fits
    the features instead of a random one that distorts them. The probe's standardisation is
    folded into the weights."""
    feats = encode(model.backbone, images, size=size)
    with torch.enable_grad():
        probe = fit_linear_probe(feats, labels, n_classes, epochs=epochs, seed=seed)
    w = probe.linear.weight / probe.std  # (K, D)
    b = probe.linear.bias - (w * probe.mean).sum(dim=1)
    model.fc.weight.copy_(w)
    model.fc.bias.copy_(b)


def run(
    cfg: Config,
    inputs: dict[str, str],
    out_dir: str,
    ctx: TrainContext | None = None,
    *,
    fraction: float,
    baseline: bool = False,
) -> StageResult:
    """Train on the ``fraction`` % labeled subset; from ``inputs['pretrain']`` unless
    ``baseline``. Writes ``model.pt`` (kind 'classifier') and ``history.json``."""
    ds = inputs["dataset"]
    out = Path(out_dir)
    ctx = ctx or LocalContext(out / "checkpoints")
    name = f"{'baseline' if baseline else 'finetune'}@{fraction:g}"
    seed_everything(cfg.supervised_seed * 100 + ctx.rank)
    info = dataset_info(ds)
    channels, size, n_classes = int(info["channels"]), view_size(cfg, info), len(info["classes"])
    streaming = not use_memory(cfg, info)
    keys = subset_keys(ds, fraction)
    if streaming:  # the labeled subset is small: in memory; the rest streams
        images, labels_l, keys_l = load_split(ds, "train", keys=keys)
        labeled = SplitData(images, labels_l, keys_l)
        train_stream = StreamSplit(cfg, ds, "train", ctx.rank, ctx.world_size)
        val_stream = StreamSplit(cfg, ds, "val")
    else:
        train = load_data(ds, "train")
        labeled = train.take(keys)
        val = load_data(ds, "val")
    model = build_network(cfg, channels, n_classes, None if baseline else inputs["pretrain"])
    if ctx.world_size > 1:
        model = convert_sync_batchnorm(model)

    if cfg.finetune.classifier_init == "probe":
        probe_init(model, labeled.images, labeled.labels, size, n_classes, seed=cfg.supervised_seed)

    def evaluate(m: torch.nn.Module) -> dict[str, float]:
        if streaming:
            logits, labels, _ = val_stream.features(m, size)
            return {"val_top1": accuracy(logits, labels)} if len(labels) else {}
        logits = encode(m, val.images, size=size)
        return {"val_top1": accuracy(logits, val.labels)} if len(val) else {}

    augment = single_view_augment(cfg, channels, size, cfg.finetune.crop_min_scale)
    c = cfg.finetune.consistency
    consistency = c.epochs > 0 and (c.baseline or not baseline)
    ckpt = ctx.load_checkpoint() if consistency else None
    if resumes_consistency(ckpt):
        history: list[dict[str, Any]] = []  # the supervised part finished; its rows are in ckpt
    else:
        history = fit(
            model,
            labeled.images,
            labeled.labels,
            loss_fn=F.cross_entropy,
            augment=augment,
            plan=plan_for(cfg, name, fraction, baseline),
            ctx=ctx,
            evaluate=None if consistency else evaluate,
        )
    if consistency:
        strong_aug = BatchTwoViewAugment(
            size=size, channels=channels, strength=c.strength, crop_min_scale=c.crop_min_scale
        )
        strong = strong_aug.single
        unlabeled_stream = None
        if streaming:
            from pipeline.data.decode import CropViews

            weak_colour = BatchTwoViewAugment(size=size, channels=channels, strength=0.0).colour
            crops = CropViews(size, channels, (cfg.finetune.crop_min_scale, c.crop_min_scale))
            excluded = frozenset(keys)

            def unlabeled_stream(epoch: int, batch: int, steps: int):
                for (w, st), y, _k in train_stream.batches(
                    crops, batch, steps, epoch=epoch, exclude=excluded
                ):
                    yield w, st, y

            unlabeled_stream.count = train_stream.count - len(keys)  # type: ignore[attr-defined]
            unlabeled_stream.colours = (weak_colour, strong_aug.colour)  # type: ignore[attr-defined]
            unlabeled = SplitData(torch.empty(0, dtype=torch.uint8), torch.empty(0), [])
        else:
            unlabeled = train.drop(keys)
        history = fit_consistency(
            model,
            labeled.images,
            labeled.labels,
            unlabeled.images,
            stream=unlabeled_stream,
            cfg=c,
            weak=augment,
            strong=strong,
            ctx=ctx,
            history=history,
            resume=ckpt,
            seed=cfg.supervised_seed,
            weight_decay=cfg.finetune.weight_decay,
            bf16=cfg.pretrain.bf16,
            name=name,
            evaluate=evaluate,
            unlabeled_labels=None if streaming else unlabeled.labels,
        )
    outputs = {"model": str(out / "model.pt"), "history": str(out / "history.json")}
    metrics: dict[str, Any] = {}
    final = history[-1]
    if "val_top1" in final:
        metrics["val_top1"] = final["val_top1"]
    metrics.update(
        labeled_images=float(len(labeled)),
        params=float(count_params(model)),
        train_loss=final["loss"],
        data_streaming=float(streaming),
    )
    if ctx.rank == 0:
        from pipeline.stages.common import write_json

        save_model(
            outputs["model"],
            kind="classifier",
            model_section=cfg.model.model_dump(),
            in_channels=channels,
            num_classes=n_classes,
            state_dict=model.state_dict(),
            head_layers=cfg.finetune.from_head_layer,
        )
        write_json(outputs["history"], history)
    return StageResult(outputs=outputs, metrics=metrics, history=history)
