"""Contrastive pretraining: SimCLR, SupCon (L_out) or the semi-supervised mix of both.

SimCLR: Chen et al. 2020, arXiv:2002.05709. SupCon: Khosla et al. 2020, arXiv:2004.11362.
Semi-supervised: labeled anchors take class positives, unlabeled ones (label -1) only their own
other view — the same ``SupConLoss`` covers all three. Optionally
(``pretrain.pseudo_label_from_epoch``) the most confident unlabeled images take their nearest class
prototype's label from some epoch on (:func:`pseudo_labels`).

One process or many: with ``ctx.world_size > 1`` each rank takes a disjoint slice of every epoch,
BatchNorm is synchronised and the loss gathers every rank's views with gradients.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.config import Config
from pipeline.data import dataset_info, load_split, load_subset
from pipeline.data.transforms import BatchTwoViewAugment
from pipeline.distributed import convert_sync_batchnorm
from pipeline.losses import SupConLoss
from pipeline.models import build_contrastive_model, count_params, save_model
from pipeline.optim import build_optimizer, scale_lr, warmup_cosine
from pipeline.runtime import LocalContext, StageResult, TrainContext
from pipeline.stages.common import (
    SplitData,
    StreamSplit,
    Throughput,
    accuracy,
    batches,
    encode,
    knn_predict,
    load_data,
    restore_training_state,
    seed_everything,
    subset_keys,
    training_state,
    use_memory,
    write_json,
)

log = logging.getLogger(__name__)

__all__ = ["pretrain_labels", "pseudo_labels", "run", "view_size"]


def view_size(cfg: Config, info: dict[str, Any]) -> int:
    return int(cfg.augment.image_size or info["height"])


def pretrain_labels(cfg: Config, dataset_dir: str, train: SplitData) -> torch.Tensor | None:
    """The labels the loss sees: None (SimCLR), all (SupCon), or the labeled subset with -1
    elsewhere (semi-supervised; the subset is ``pretrain.label_fraction``, by default the smallest
    fine-tuning fraction, so no evaluated fraction sees more labels than it is credited with)."""
    method = cfg.pretrain.method
    if method == "simclr":
        return None
    if method == "supcon":
        return train.labels.clone()
    keep = set(subset_keys(dataset_dir, cfg.pretrain_label_fraction))
    mask = torch.tensor([k in keep for k in train.keys], dtype=torch.bool)
    labels = torch.full_like(train.labels, -1)
    labels[mask] = train.labels[mask]
    return labels


def _labeled_pool(cfg: Config, labels: torch.Tensor | None, world: int) -> torch.Tensor | None:
    """Rows of the labeled subset when ``pretrain.labeled_per_batch`` asks to oversample them
    (semisup only; with 60 labels among 57k images a batch of 256 holds 0.3 of them on average,
    too few for the class positives to matter)."""
    k = cfg.pretrain.labeled_per_batch // world
    if k <= 0 or labels is None or cfg.pretrain.method != "semisup":
        return None
    pool = (labels >= 0).nonzero().flatten()
    if len(pool) == 0:
        return None
    if k >= cfg.pretrain.batch_size // world:
        raise ValueError(
            f"pretrain.labeled_per_batch {cfg.pretrain.labeled_per_batch} leaves no unlabeled "
            f"images in a batch of {cfg.pretrain.batch_size}"
        )
    return pool


def _mix_labeled(
    idx: torch.Tensor, pool: torch.Tensor, k: int, gen: torch.Generator
) -> torch.Tensor:
    """``idx`` with its first ``k`` rows replaced by labeled rows drawn without replacement
    (all of ``pool`` when it is smaller than k); labeled rows already in ``idx`` are dropped
    first, so no image appears twice in a batch."""
    pick = pool[torch.randperm(len(pool), generator=gen)[:k]]
    rest = idx[~torch.isin(idx, pick)]
    return torch.cat([pick, rest])[: len(idx)]


def pseudo_labels(
    features: torch.Tensor, labels: torch.Tensor, fraction: float, temperature: float = 0.1
) -> torch.Tensor:
    """``labels`` with the most confident unlabeled rows given their nearest class prototype.

    A prototype is the normalised mean feature of a class's labeled rows (``labels >= 0``); an
    unlabeled row (``-1``) is assigned the class of the most similar prototype, with confidence the
    softmax of its cosine similarities at ``temperature``. Per predicted class the
    ``fraction * n_unlabeled / n_classes`` most confident rows keep their assignment (class-balanced,
    so a prototype that attracts many rows does not take over); the rest stay -1. Labeled rows are
    unchanged. This is the pseudo-labelling of self-training (Lee 2013; with prototypes as in
    Snell et al. 2017, arXiv:1703.05175) applied to the semi-supervised contrastive loss.

    Args:
        features: (N, D) features of every row (normalised here).
        labels: (N,) class index, -1 for unlabeled rows.
        fraction: share of the unlabeled rows to pseudo-label, in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"pseudo-label fraction must be in (0, 1], got {fraction}")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} feature rows for {labels.shape[0]} labels")
    labeled = labels >= 0
    classes = labels[labeled].unique()  # (C,)
    out = labels.clone()
    unlabeled = (~labeled).nonzero().flatten()
    if len(classes) < 2 or len(unlabeled) == 0:
        return out
    f = F.normalize(features.float(), dim=1)
    onehot = (labels[labeled].unsqueeze(1) == classes.unsqueeze(0)).float()  # (L, C)
    protos = F.normalize(onehot.T @ f[labeled], dim=1)  # (C, D)
    probs = (f[unlabeled] @ protos.T / temperature).softmax(dim=1)  # (U, C)
    conf, pred = probs.max(dim=1)  # (U,)
    per_class = int(fraction * len(unlabeled) / len(classes))
    for c in range(len(classes)):
        rows = (pred == c).nonzero().flatten()
        top = rows[conf[rows].argsort(descending=True, stable=True)[:per_class]]
        out[unlabeled[top]] = classes[c]
    return out


def _lr(cfg: Config) -> float:
    p = cfg.pretrain
    if p.lr is not None:
        return p.lr
    return scale_lr(p.base_lr, p.batch_size, p.lr_scaling)


def _step(
    cfg: Config,
    net: torch.nn.Module,
    loss_fn: Any,
    opt: Any,
    sched: Any,
    autocast: Any,
    v1: torch.Tensor,
    v2: torch.Tensor,
    y: torch.Tensor | None,
    epoch: int,
    step: int,
) -> float:
    """One optimisation step on two views ``(b, C, S, S)`` of a batch (labels ``y`` or None);
    the same for the in-memory and the streaming path. Returns the loss."""
    x = torch.cat([v1, v2])
    if cfg.model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast:
        _, z = net(x)  # (2b, D)
    z = z.float().view(2, -1, z.shape[-1]).transpose(0, 1)  # (b, 2, D)
    loss = loss_fn(z, y)
    value = loss.item()  # the step's one wait for the device
    if not math.isfinite(value):
        raise FloatingPointError(f"pretrain: loss is {value} at epoch {epoch} step {step}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    return value


def run(
    cfg: Config,
    inputs: dict[str, str],
    out_dir: str,
    ctx: TrainContext | None = None,
) -> StageResult:
    """Pretrain the encoder + projection head on the train split of ``inputs['dataset']``.

    Writes ``model.pt`` (kind 'contrastive') and ``history.json`` into ``out_dir`` (rank 0).
    """
    ds = inputs["dataset"]
    out = Path(out_dir)
    ctx = ctx or LocalContext(out / "checkpoints")
    p = cfg.pretrain
    rank, world = ctx.rank, ctx.world_size
    if p.batch_size % world:
        raise ValueError(f"pretrain.batch_size {p.batch_size} is not divisible by {world} workers")
    local_bs = p.batch_size // world
    seed_everything(cfg.seed * 100 + rank)

    info = dataset_info(ds)
    channels, size = int(info["channels"]), view_size(cfg, info)
    in_memory = use_memory(cfg, info)
    if not in_memory:
        return _run_streaming(cfg, ds, out, ctx, info)
    train = load_data(ds, "train")
    if len(train) < p.batch_size:
        raise ValueError(
            f"pretrain.batch_size {p.batch_size} exceeds the {len(train)} train images"
        )
    labels = pretrain_labels(cfg, ds, train)
    labeled_pool = _labeled_pool(cfg, labels, world)
    val = load_data(ds, "val") if p.knn_every else None

    model = build_contrastive_model(cfg.model, in_channels=channels)
    n_params = count_params(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        model = convert_sync_batchnorm(model)
    net = ctx.prepare_model(model)
    device = ctx.device
    # The decoded split goes to the training device once (uint8; a no-op on the CPU), so the
    # batched augmentation runs where the model does instead of copying each batch's views there.
    images = train.images.to(device)
    labels = labels.to(device) if labels is not None else None  # (N,); -1: unlabeled (semisup)
    steps_per_epoch = len(train) // world // local_bs
    if p.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, p.max_steps_per_epoch)
    total_steps = steps_per_epoch * p.epochs
    opt = build_optimizer(
        p.optimizer, model, lr=_lr(cfg), weight_decay=p.weight_decay, momentum=p.momentum
    )
    sched = warmup_cosine(
        opt, warmup_steps=int(p.warmup_epochs * steps_per_epoch), total_steps=total_steps
    )
    loss_fn = SupConLoss(temperature=p.temperature, gather_distributed=world > 1)
    aug = BatchTwoViewAugment(
        size=size,
        channels=channels,
        strength=cfg.augment.strength,
        crop_min_scale=cfg.augment.crop_min_scale,
    )

    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        start_epoch, history = restore_training_state(ckpt, model, opt, sched)
        log.info("pretrain: resuming after epoch %d", start_epoch)

    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if p.bf16
        else contextlib.nullcontext()
    )
    for epoch in range(start_epoch, p.epochs):
        net.train()
        meter = Throughput()
        loss_sum, n_steps = 0.0, 0
        mix_gen = torch.Generator().manual_seed((cfg.seed * 7919 + epoch) * 131 + rank)
        step_labels, pseudo_metrics = labels, {}
        # Config validation allows pseudo-labels with semisup only, so `labels` is set here.
        if p.pseudo_label_from_epoch and epoch + 1 >= p.pseudo_label_from_epoch:
            feats = encode(model.encoder, images, size=size).to(device)  # (N, D), eval mode
            step_labels = pseudo_labels(feats, labels, p.pseudo_label_fraction)
            pseudo = (step_labels >= 0) & (labels < 0)
            # Monitoring only: how many unlabeled images took a class, and how often it is right.
            n_pseudo = int(pseudo.sum())
            truth = train.labels.to(device)
            pseudo_metrics = {
                "pseudo_labels": n_pseudo,
                "pseudo_label_acc": (
                    100.0 * float((step_labels[pseudo] == truth[pseudo]).float().mean())
                    if n_pseudo
                    else 0.0
                ),
            }
        for step, idx in enumerate(
            batches(len(train), local_bs, epoch=epoch, seed=cfg.seed, rank=rank, world_size=world)
        ):
            if step >= steps_per_epoch:
                break
            if labeled_pool is not None:
                idx = _mix_labeled(idx, labeled_pool, p.labeled_per_batch // world, mix_gen)
            v1, v2 = aug(images[idx])  # 2 x (b, C, S, S) float, on the device
            y = step_labels[idx] if step_labels is not None else None
            value = _step(cfg, net, loss_fn, opt, sched, autocast, v1, v2, y, epoch, step)
            loss_sum += value
            n_steps += 1
            meter.add(2 * len(idx) * world)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(n_steps, 1),
            "lr": opt.param_groups[0]["lr"],
            "views_per_s": meter.rate,
            "images_per_s": meter.rate / 2,
            "epoch_seconds": meter.seconds,
            "resumed_from_epoch": start_epoch,  # > 0: this attempt continued from a checkpoint
            "world_size": world,
            **pseudo_metrics,
        }
        if val is not None and ((epoch + 1) % p.knn_every == 0 or epoch + 1 == p.epochs):
            metrics["val_knn_top1"] = knn_accuracy(
                cfg, model.encoder, train, val, size, int(len(info["classes"]))
            )
        history.append(metrics)
        state = None
        if rank == 0:
            state = training_state(model, opt, sched, epoch, history)
        ctx.report(metrics, checkpoint=state)
        log.info(
            "pretrain epoch %d/%d loss %.4f %.0f views/s%s",
            epoch + 1,
            p.epochs,
            metrics["loss"],
            metrics["views_per_s"],
            f" val kNN {metrics['val_knn_top1']:.2f}%" if "val_knn_top1" in metrics else "",
        )

    return _finish(cfg, out, model, channels, n_params, history, rank, streaming=False)


def _finish(
    cfg: Config,
    out: Path,
    model: torch.nn.Module,
    channels: int,
    n_params: int,
    history: list[dict[str, Any]],
    rank: int,
    streaming: bool,
) -> StageResult:
    outputs = {"model": str(out / "model.pt"), "history": str(out / "history.json")}
    final = dict(history[-1]) if history else {}
    metrics_out = {k: float(v) for k, v in final.items() if isinstance(v, (int, float))}
    metrics_out["params"] = float(n_params)
    metrics_out["data_streaming"] = float(streaming)
    if rank == 0:
        save_model(
            outputs["model"],
            kind="contrastive",
            model_section=cfg.model.model_dump(),
            in_channels=channels,
            num_classes=None,
            state_dict=model.state_dict(),
        )
        write_json(outputs["history"], history)
    return StageResult(outputs=outputs, metrics=metrics_out, history=history)


def knn_accuracy(
    cfg: Config,
    encoder: torch.nn.Module,
    train: SplitData,
    val: SplitData,
    size: int,
    n_classes: int,
) -> float:
    """Online monitor: weighted kNN top-1 (%) of val against (a sample of) train."""
    bank = train.limit(cfg.pretrain.knn_bank, seed=cfg.seed)
    query = val.limit(cfg.pretrain.knn_queries, seed=cfg.seed)
    f_bank = encode(encoder, bank.images, size=size)
    f_q = encode(encoder, query.images, size=size)
    scores = knn_predict(
        f_bank,
        bank.labels,
        f_q,
        n_classes,
        k=cfg.evaluate.knn_k,
        temperature=cfg.evaluate.knn_temperature,
    )
    return accuracy(scores, query.labels)


def _run_streaming(
    cfg: Config, ds: str, out: Path, ctx: TrainContext, info: dict[str, Any]
) -> StageResult:
    """:func:`run` on the streaming path: the same loss, schedule, step count and semantics, with
    the train split read as a stream. Each sample's two random resized crops are made from the
    original image in the loader workers (:class:`pipeline.data.decode.CropViews`), the colour
    half of the augmentation per batch on the device. The labeled subset (semisup) is small and
    held in memory for ``labeled_per_batch``; pseudo-labels are a key -> label map built from the
    streamed features of every train image. An interrupted epoch restarts from its beginning."""
    from pipeline.data.decode import CropViews

    p = cfg.pretrain
    rank, world = ctx.rank, ctx.world_size
    local_bs = p.batch_size // world
    channels, size = int(info["channels"]), view_size(cfg, info)
    train = StreamSplit(cfg, ds, "train", rank, world)
    if train.count < p.batch_size:
        raise ValueError(
            f"pretrain.batch_size {p.batch_size} exceeds the {train.count} train images"
        )
    known: dict[str, int] = {}  # semisup: key -> label of the labeled subset
    pool: SplitData | None = None
    if p.method == "semisup":
        keys, sub_labels = load_subset(ds, cfg.pretrain_label_fraction)
        known = dict(zip(keys, sub_labels.tolist(), strict=True))
        k_mix = p.labeled_per_batch // world
        if k_mix > 0 and keys:
            if k_mix >= local_bs:
                raise ValueError(
                    f"pretrain.labeled_per_batch {p.labeled_per_batch} leaves no unlabeled "
                    f"images in a batch of {p.batch_size}"
                )
            images, labels_l, keys_l = load_split(ds, "train", keys=keys)
            pool = SplitData(images, labels_l, keys_l)
    val = StreamSplit(cfg, ds, "val") if p.knn_every else None

    model = build_contrastive_model(cfg.model, in_channels=channels)
    n_params = count_params(model)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        model = convert_sync_batchnorm(model)
    net = ctx.prepare_model(model)
    device = ctx.device
    steps_per_epoch = train.count // world // local_bs
    if p.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, p.max_steps_per_epoch)
    total_steps = steps_per_epoch * p.epochs
    opt = build_optimizer(
        p.optimizer, model, lr=_lr(cfg), weight_decay=p.weight_decay, momentum=p.momentum
    )
    sched = warmup_cosine(
        opt, warmup_steps=int(p.warmup_epochs * steps_per_epoch), total_steps=total_steps
    )
    loss_fn = SupConLoss(temperature=p.temperature, gather_distributed=world > 1)
    aug = BatchTwoViewAugment(
        size=size,
        channels=channels,
        strength=cfg.augment.strength,
        crop_min_scale=cfg.augment.crop_min_scale,
    )
    crops = CropViews(size, channels, (cfg.augment.crop_min_scale,) * 2)

    history: list[dict[str, Any]] = []
    start_epoch = 0
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        start_epoch, history = restore_training_state(ckpt, model, opt, sched)
        log.info("pretrain: resuming after epoch %d", start_epoch)
    autocast = (
        torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        if p.bf16
        else contextlib.nullcontext()
    )
    n_classes = int(len(info["classes"]))
    for epoch in range(start_epoch, p.epochs):
        net.train()
        meter = Throughput()
        loss_sum, n_steps = 0.0, 0
        mix_gen = torch.Generator().manual_seed((cfg.seed * 7919 + epoch) * 131 + rank)
        step_known, pseudo_metrics = known, {}
        if p.pseudo_label_from_epoch and epoch + 1 >= p.pseudo_label_from_epoch:
            feats, truth, keys_all = train.features(model.encoder, size)
            base = torch.tensor([known.get(k, -1) for k in keys_all], dtype=torch.long)
            assigned = pseudo_labels(feats, base, p.pseudo_label_fraction)
            pseudo = (assigned >= 0) & (base < 0)
            n_pseudo = int(pseudo.sum())
            step_known = {
                k: int(y) for k, y in zip(keys_all, assigned.tolist(), strict=True) if y >= 0
            }
            pseudo_metrics = {
                "pseudo_labels": n_pseudo,
                "pseudo_label_acc": (
                    100.0 * float((assigned[pseudo] == truth[pseudo]).float().mean())
                    if n_pseudo
                    else 0.0
                ),
            }
            del feats
        for step, ((c1, c2), truth_b, keys_b) in enumerate(
            train.batches(crops, local_bs, steps_per_epoch, epoch=epoch)
        ):
            c1, c2 = c1.to(device, non_blocking=True), c2.to(device, non_blocking=True)
            if p.method == "simclr":
                y_b = None
            elif p.method == "supcon":
                y_b = truth_b
            else:
                y_b = torch.tensor([step_known.get(k, -1) for k in keys_b], dtype=torch.long)
            if pool is not None:
                k_mix = p.labeled_per_batch // world
                pick = torch.randperm(len(pool), generator=mix_gen)[:k_mix]
                picked = {pool.keys[i] for i in pick.tolist()}
                rest = [i for i, k in enumerate(keys_b) if k not in picked][: local_bs - len(pick)]
                rest_t = torch.tensor(rest, dtype=torch.long)
                imgs = pool.images[pick].to(device)
                c1 = torch.cat([aug.crop(imgs), _to_unit_views(c1[rest_t.to(device)])])
                c2 = torch.cat([aug.crop(imgs), _to_unit_views(c2[rest_t.to(device)])])
                y_b = torch.cat([pool.labels[pick], y_b[rest_t]])  # type: ignore[index]
            v1, v2 = aug.colour(c1), aug.colour(c2)
            y = y_b.to(device) if y_b is not None else None
            value = _step(cfg, net, loss_fn, opt, sched, autocast, v1, v2, y, epoch, step)
            loss_sum += value
            n_steps += 1
            meter.add(2 * len(v1) * world)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(n_steps, 1),
            "lr": opt.param_groups[0]["lr"],
            "views_per_s": meter.rate,
            "images_per_s": meter.rate / 2,
            "epoch_seconds": meter.seconds,
            "resumed_from_epoch": start_epoch,
            "world_size": world,
            **pseudo_metrics,
        }
        if val is not None and ((epoch + 1) % p.knn_every == 0 or epoch + 1 == p.epochs):
            f_bank, y_bank, _ = train.features(model.encoder, size, limit=p.knn_bank)
            f_q, y_q, _ = val.features(model.encoder, size, limit=p.knn_queries)
            scores = knn_predict(
                f_bank,
                y_bank,
                f_q,
                n_classes,
                k=cfg.evaluate.knn_k,
                temperature=cfg.evaluate.knn_temperature,
            )
            metrics["val_knn_top1"] = accuracy(scores, y_q)
        history.append(metrics)
        state = None
        if rank == 0:
            state = training_state(model, opt, sched, epoch, history)
        ctx.report(metrics, checkpoint=state)
        log.info(
            "pretrain (streaming) epoch %d/%d loss %.4f %.0f views/s%s",
            epoch + 1,
            p.epochs,
            metrics["loss"],
            metrics["views_per_s"],
            f" val kNN {metrics['val_knn_top1']:.2f}%" if "val_knn_top1" in metrics else "",
        )
    return _finish(cfg, out, model, channels, n_params, history, rank, streaming=True)


def _to_unit_views(v: torch.Tensor) -> torch.Tensor:
    return v.float().div_(255.0) if v.dtype == torch.uint8 else v
