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

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import PretrainConfig
from pipeline.data import DatasetInfo, dataset_info, load_split, load_subset
from pipeline.data.transforms import BatchTwoViewAugment
from pipeline.distributed import convert_sync_batchnorm
from pipeline.losses import SupConLoss
from pipeline.models import ContrastiveModel, build_contrastive_model, count_params, save_model
from pipeline.optim import build_optimizer, scale_lr, warmup_cosine
from pipeline.runtime import HistoryRow, LocalContext, StageResult, TrainContext
from pipeline.slices import PretrainSlice
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
    view_size,
    write_json,
)
from pipeline.stages.supervised import History, autocast_for, step

if TYPE_CHECKING:
    from pipeline.data.decode import CropViews

log = logging.getLogger(__name__)

__all__ = ["pretrain_labels", "pseudo_labels", "run", "view_size"]

#: Two views of a batch, float ``(b, C, S, S)`` on the device, and the labels the loss sees.
ViewBatch = tuple[Tensor, Tensor, Tensor | None]


def pretrain_labels(cfg: PretrainSlice, dataset_dir: str, train: SplitData) -> torch.Tensor | None:
    """The labels the loss sees: None (SimCLR), all (SupCon), or the labeled subset with -1
    elsewhere (semi-supervised; the subset is ``pretrain.label_fraction``, by default the smallest
    fine-tuning fraction, so no evaluated fraction sees more labels than it is credited with)."""
    method = cfg.pretrain.method
    if method == "simclr":
        return None
    if method == "supcon":
        return train.labels.clone()
    keep = set(subset_keys(dataset_dir, _subset_fraction(cfg)))
    mask = torch.tensor([k in keep for k in train.keys], dtype=torch.bool)
    labels = torch.full_like(train.labels, -1)
    labels[mask] = train.labels[mask]
    return labels


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


def _subset_fraction(cfg: PretrainSlice) -> float:
    """The labeled subset (percent) of semi-supervised pretraining."""
    if cfg.label_fraction is None:
        raise ValueError(f"pretrain.method {cfg.pretrain.method} reads no labeled subset")
    return cfg.label_fraction


def _lr(cfg: PretrainSlice) -> float:
    p = cfg.pretrain
    if p.lr is not None:
        return p.lr
    return scale_lr(p.base_lr, p.batch_size, p.lr_scaling)


def _pseudo_epoch(p: PretrainConfig, epoch: int) -> bool:
    return bool(p.pseudo_label_from_epoch) and epoch + 1 >= p.pseudo_label_from_epoch


def _pseudo_metrics(assigned: Tensor, base: Tensor, truth: Tensor) -> dict[str, float]:
    """Monitoring only: how many unlabeled images took a class, and how often it is right."""
    pseudo = (assigned >= 0) & (base < 0)
    n_pseudo = int(pseudo.sum())
    acc = 100.0 * float((assigned[pseudo] == truth[pseudo]).float().mean()) if n_pseudo else 0.0
    return {"pseudo_labels": n_pseudo, "pseudo_label_acc": acc}


def _check_batch(p: PretrainConfig, count: int) -> None:
    if count < p.batch_size:
        raise ValueError(f"pretrain.batch_size {p.batch_size} exceeds the {count} train images")


def _mix_count(cfg: PretrainSlice, world: int) -> int:
    """Labeled images drawn into every batch of a rank (``pretrain.labeled_per_batch``, semisup
    only; with 60 labels among 57k images a batch of 256 holds 0.3 of them on average, too few
    for the class positives to matter)."""
    p = cfg.pretrain
    return max(0, p.labeled_per_batch // world) if p.method == "semisup" else 0


def _check_mix(cfg: PretrainSlice, world: int) -> None:
    p = cfg.pretrain
    if _mix_count(cfg, world) >= p.batch_size // world:
        raise ValueError(
            f"pretrain.labeled_per_batch {p.labeled_per_batch} leaves no unlabeled "
            f"images in a batch of {p.batch_size}"
        )


@dataclass
class _Setting:
    """What both data paths need: the config, this rank, the view size and the augmentation."""

    cfg: PretrainSlice
    dataset: str
    rank: int
    world: int
    size: int
    n_classes: int
    aug: BatchTwoViewAugment

    @property
    def local_batch(self) -> int:
        return self.cfg.pretrain.batch_size // self.world


@dataclass
class _InMemory:
    """The decoded train split (on the training device) and, for the kNN monitor, val."""

    s: _Setting
    train: SplitData
    images: Tensor
    labels: Tensor | None  # (N,) what the loss sees; -1: unlabeled (semisup)
    pool: Tensor | None  # rows of the labeled subset drawn into every batch
    val: SplitData | None
    step_labels: Tensor | None = None

    @classmethod
    def load(cls, s: _Setting) -> _InMemory:
        cfg = s.cfg
        train = load_data(s.dataset, "train")
        _check_batch(cfg.pretrain, len(train))
        labels = pretrain_labels(cfg, s.dataset, train)
        pool = None
        if _mix_count(cfg, s.world) and labels is not None:
            rows = (labels >= 0).nonzero().flatten()
            if len(rows):
                _check_mix(cfg, s.world)
                pool = rows
        val = load_data(s.dataset, "val") if cfg.pretrain.knn_every else None
        return cls(s, train, train.images, labels, pool, val)

    @property
    def count(self) -> int:
        return len(self.train)

    def to(self, device: torch.device) -> None:
        # The decoded split goes to the training device once (uint8; a no-op on the CPU), so the
        # batched augmentation runs where the model does.
        self.images = self.images.to(device)
        self.labels = self.labels.to(device) if self.labels is not None else None

    def relabel(self, encoder: nn.Module, epoch: int) -> dict[str, float]:
        """This epoch's labels: pseudo-labels from their epoch on (semisup; config validation
        allows them with semisup only, so ``labels`` is set), else the subset's."""
        p = self.s.cfg.pretrain
        self.step_labels = self.labels
        if not _pseudo_epoch(p, epoch) or self.labels is None:
            return {}
        feats = encode(encoder, self.images, size=self.s.size).to(self.images.device)  # (N, D)
        self.step_labels = pseudo_labels(feats, self.labels, p.pseudo_label_fraction)
        truth = self.train.labels.to(self.images.device)
        return _pseudo_metrics(self.step_labels, self.labels, truth)

    def batches(self, epoch: int, steps: int, mix_gen: torch.Generator) -> Iterator[ViewBatch]:
        s, k = self.s, _mix_count(self.s.cfg, self.s.world)
        order = batches(
            self.count, s.local_batch, epoch=epoch, seed=s.cfg.seed, rank=s.rank, world_size=s.world
        )
        for i, idx in enumerate(order):
            if i >= steps:
                break
            if self.pool is not None:
                idx = _mix_labeled(idx, self.pool, k, mix_gen)
            v1, v2 = s.aug(self.images[idx])  # 2 x (b, C, S, S) float, on the device
            yield v1, v2, self.step_labels[idx] if self.step_labels is not None else None

    def knn(self, encoder: nn.Module) -> float | None:
        if self.val is None:
            return None
        return knn_accuracy(
            self.s.cfg, encoder, self.train, self.val, self.s.size, self.s.n_classes
        )


@dataclass
class _Streamed:
    """The train split read as a stream: each sample's two random resized crops are made from the
    original image in the loader workers (:class:`pipeline.data.decode.CropViews`), the colour
    half of the augmentation per batch on the device. The labeled subset (semisup) is small and
    held in memory for ``labeled_per_batch``; pseudo-labels are a key -> label map built from the
    streamed features of every train image. An interrupted epoch restarts from its beginning."""

    s: _Setting
    train: StreamSplit
    crops: CropViews
    known: dict[str, int]  # semisup: key -> label of the labeled subset
    pool: SplitData | None
    val: StreamSplit | None
    device: torch.device = torch.device("cpu")
    step_known: dict[str, int] = field(default_factory=dict)

    @classmethod
    def load(cls, s: _Setting) -> _Streamed:
        from pipeline.data.decode import CropViews

        cfg, p = s.cfg, s.cfg.pretrain
        train = StreamSplit(cfg.data, cfg.seed, s.dataset, "train", s.rank, s.world)
        _check_batch(p, train.count)
        known: dict[str, int] = {}
        pool: SplitData | None = None
        if p.method == "semisup":
            keys, sub_labels = load_subset(s.dataset, _subset_fraction(cfg))
            known = dict(zip(keys, sub_labels.tolist(), strict=True))
            if _mix_count(cfg, s.world) and keys:
                _check_mix(cfg, s.world)
                images, labels_l, keys_l = load_split(s.dataset, "train", keys=keys)
                pool = SplitData(images, labels_l, keys_l)
        val = StreamSplit(cfg.data, cfg.seed, s.dataset, "val") if p.knn_every else None
        crops = CropViews(s.size, s.aug.channels, (cfg.augment.crop_min_scale,) * 2)
        return cls(s, train, crops, known, pool, val)

    @property
    def count(self) -> int:
        return self.train.count

    def to(self, device: torch.device) -> None:
        self.device = device

    def relabel(self, encoder: nn.Module, epoch: int) -> dict[str, float]:
        p = self.s.cfg.pretrain
        self.step_known = self.known
        if not _pseudo_epoch(p, epoch):
            return {}
        feats, truth, keys_all = self.train.features(encoder, self.s.size)
        base = torch.tensor([self.known.get(k, -1) for k in keys_all], dtype=torch.long)
        assigned = pseudo_labels(feats, base, p.pseudo_label_fraction)
        self.step_known = {
            k: int(y) for k, y in zip(keys_all, assigned.tolist(), strict=True) if y >= 0
        }
        return _pseudo_metrics(assigned, base, truth)

    def _labels(self, truth: Tensor, keys: list[str]) -> Tensor | None:
        method = self.s.cfg.pretrain.method
        if method == "simclr":
            return None
        if method == "supcon":
            return truth
        return torch.tensor([self.step_known.get(k, -1) for k in keys], dtype=torch.long)

    def _mix(
        self, c1: Tensor, c2: Tensor, y: Tensor, keys: list[str], gen: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The batch with labeled images of the pool in front (drawn without replacement, none
        twice), the rest of the streamed batch after them."""
        assert self.pool is not None
        pool, aug, device = self.pool, self.s.aug, self.device
        pick = torch.randperm(len(pool), generator=gen)[: _mix_count(self.s.cfg, self.s.world)]
        picked = {pool.keys[i] for i in pick.tolist()}
        rest = [i for i, k in enumerate(keys) if k not in picked][: self.s.local_batch - len(pick)]
        rest_t = torch.tensor(rest, dtype=torch.long)
        imgs = pool.images[pick].to(device)
        c1 = torch.cat([aug.crop(imgs), _to_unit_views(c1[rest_t.to(device)])])
        c2 = torch.cat([aug.crop(imgs), _to_unit_views(c2[rest_t.to(device)])])
        return c1, c2, torch.cat([pool.labels[pick], y[rest_t]])

    def batches(self, epoch: int, steps: int, mix_gen: torch.Generator) -> Iterator[ViewBatch]:
        s, device = self.s, self.device
        batches = self.train.batches(self.crops, s.local_batch, steps, epoch=epoch)
        for (c1, c2), truth, keys in batches:
            c1, c2 = c1.to(device, non_blocking=True), c2.to(device, non_blocking=True)
            y = self._labels(truth, keys)
            if self.pool is not None and y is not None:
                c1, c2, y = self._mix(c1, c2, y, keys, mix_gen)
            yield s.aug.colour(c1), s.aug.colour(c2), y.to(device) if y is not None else None

    def knn(self, encoder: nn.Module) -> float | None:
        if self.val is None:
            return None
        p, e = self.s.cfg.pretrain, self.s.cfg.knn
        f_bank, y_bank, _ = self.train.features(encoder, self.s.size, limit=p.knn_bank)
        f_q, y_q, _ = self.val.features(encoder, self.s.size, limit=p.knn_queries)
        scores = knn_predict(
            f_bank, y_bank, f_q, self.s.n_classes, k=e.knn_k, temperature=e.knn_temperature
        )
        return accuracy(scores, y_q)


@dataclass
class _Loop:
    """The model, its optimiser and schedule, and the loss: what every epoch steps."""

    cfg: PretrainSlice
    model: ContrastiveModel
    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loss_fn: SupConLoss
    device: torch.device
    steps: int

    def train_step(self, v1: Tensor, v2: Tensor, y: Tensor | None, where: str) -> float:
        """One optimisation step on two views ``(b, C, S, S)`` of a batch (labels ``y`` or None).
        Returns the loss."""
        x = torch.cat([v1, v2])
        if self.cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_for(self.device, self.cfg.pretrain.bf16):
            _, z = self.net(x)  # (2b, D)
        z = z.float().view(2, -1, z.shape[-1]).transpose(0, 1)  # (b, 2, D)
        return step(self.loss_fn(z, y), self.opt, self.sched, "pretrain", where)

    def epoch(
        self, data: _InMemory | _Streamed, epoch: int, rank: int, world: int, resumed_from: int
    ) -> HistoryRow:
        """Train one epoch; returns its history row (without the kNN monitor)."""
        self.net.train()
        meter = Throughput()
        loss_sum, n_steps = 0.0, 0
        mix_gen = torch.Generator().manual_seed((self.cfg.seed * 7919 + epoch) * 131 + rank)
        pseudo_metrics = data.relabel(self.model.encoder, epoch)
        for i, (v1, v2, y) in enumerate(data.batches(epoch, self.steps, mix_gen)):
            loss_sum += self.train_step(v1, v2, y, f" at epoch {epoch} step {i}")
            n_steps += 1
            meter.add(2 * len(v1) * world)
        return {
            "epoch": epoch + 1,
            "loss": loss_sum / max(n_steps, 1),
            "lr": self.opt.param_groups[0]["lr"],
            "views_per_s": meter.rate,
            "images_per_s": meter.rate / 2,
            "epoch_seconds": meter.seconds,
            "resumed_from_epoch": resumed_from,  # > 0: this attempt continued from a checkpoint
            "world_size": world,
            **pseudo_metrics,
        }


def _build(cfg: PretrainSlice, channels: int, world: int) -> ContrastiveModel:
    model = build_contrastive_model(cfg.model, in_channels=channels)
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if world > 1:
        model = convert_sync_batchnorm(model)  # type: ignore[assignment]
    return model


def _loop(cfg: PretrainSlice, model: ContrastiveModel, ctx: TrainContext, count: int) -> _Loop:
    p, world = cfg.pretrain, ctx.world_size
    steps = count // world // (p.batch_size // world)
    if p.max_steps_per_epoch:
        steps = min(steps, p.max_steps_per_epoch)
    net = ctx.prepare_model(model)
    opt = build_optimizer(
        p.optimizer, model, lr=_lr(cfg), weight_decay=p.weight_decay, momentum=p.momentum
    )
    sched = warmup_cosine(
        opt, warmup_steps=int(p.warmup_epochs * steps), total_steps=steps * p.epochs
    )
    loss_fn = SupConLoss(temperature=p.temperature, gather_distributed=world > 1)
    return _Loop(cfg, model, net, opt, sched, loss_fn, ctx.device, steps)


def _setting(cfg: PretrainSlice, dataset: str, ctx: TrainContext, info: DatasetInfo) -> _Setting:
    size, channels = view_size(cfg.augment.image_size, info), int(info["channels"])
    aug = BatchTwoViewAugment(
        size=size,
        channels=channels,
        strength=cfg.augment.strength,
        crop_min_scale=cfg.augment.crop_min_scale,
    )
    return _Setting(cfg, dataset, ctx.rank, ctx.world_size, size, len(info["classes"]), aug)


def run(
    cfg: PretrainSlice,
    inputs: dict[str, str],
    out_dir: str,
    ctx: TrainContext | None = None,
) -> StageResult:
    """Pretrain the encoder + projection head on the train split of ``inputs['dataset']``, held
    in memory or streamed (:func:`pipeline.stages.common.use_memory`): the same loss, schedule,
    step count and semantics either way.

    Writes ``model.pt`` (kind 'contrastive') and ``history.json`` into ``out_dir`` (rank 0).
    """
    out = Path(out_dir)
    ctx = ctx or LocalContext(out / "checkpoints")
    p, world = cfg.pretrain, ctx.world_size
    if p.batch_size % world:
        raise ValueError(f"pretrain.batch_size {p.batch_size} is not divisible by {world} workers")
    seed_everything(cfg.seed * 100 + ctx.rank)
    info = dataset_info(inputs["dataset"])
    s = _setting(cfg, inputs["dataset"], ctx, info)
    streaming = not use_memory(cfg.data, info)
    data = _Streamed.load(s) if streaming else _InMemory.load(s)
    model = _build(cfg, int(info["channels"]), world)
    n_params = count_params(model)
    loop = _loop(cfg, model, ctx, data.count)
    data.to(ctx.device)
    history: History = []
    start_epoch = 0
    ckpt = ctx.load_checkpoint()
    if ckpt is not None:
        start_epoch, history = restore_training_state(ckpt, model, loop.opt, loop.sched)
        log.info("pretrain: resuming after epoch %d", start_epoch)
    for epoch in range(start_epoch, p.epochs):
        metrics = loop.epoch(data, epoch, ctx.rank, world, start_epoch)
        if (epoch + 1) % max(p.knn_every, 1) == 0 or epoch + 1 == p.epochs:
            knn = data.knn(model.encoder)
            if knn is not None:
                metrics["val_knn_top1"] = knn
        history.append(metrics)
        state = (
            training_state(model, loop.opt, loop.sched, epoch, history) if ctx.rank == 0 else None
        )
        ctx.report(metrics, checkpoint=state)
        _log_epoch(metrics, p.epochs, streaming)
    return _finish(cfg, out, model, int(info["channels"]), n_params, history, ctx.rank, streaming)


def _log_epoch(metrics: HistoryRow, epochs: int, streaming: bool) -> None:
    log.info(
        "pretrain%s epoch %d/%d loss %.4f %.0f views/s%s",
        " (streaming)" if streaming else "",
        metrics["epoch"],
        epochs,
        metrics["loss"],
        metrics["views_per_s"],
        f" val kNN {metrics['val_knn_top1']:.2f}%" if "val_knn_top1" in metrics else "",
    )


def _finish(
    cfg: PretrainSlice,
    out: Path,
    model: nn.Module,
    channels: int,
    n_params: int,
    history: History,
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
    cfg: PretrainSlice,
    encoder: nn.Module,
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
        k=cfg.knn.knn_k,
        temperature=cfg.knn.knn_temperature,
    )
    return accuracy(scores, query.labels)


def _to_unit_views(v: Tensor) -> Tensor:
    return v.float().div_(255.0) if v.dtype == torch.uint8 else v
