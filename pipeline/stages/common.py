"""Pieces every training stage shares: data in memory, batching per rank, evaluation helpers."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.atomic import atomic_write_text
from pipeline.data import dataset_info, load_split, load_subset, make_loader
from pipeline.data.folder import DatasetInfo, decoded_bytes
from pipeline.data.loader import ShardDataset
from pipeline.data.transforms import BatchTwoViewAugment, normalize_batch
from pipeline.models import ContrastiveModel, load_model
from pipeline.runtime import HistoryRow
from pipeline.slices import DataRead

log = logging.getLogger(__name__)

__all__ = [
    "SplitData",
    "StreamSplit",
    "accuracy",
    "batches",
    "encode",
    "knn_predict",
    "load_contrastive",
    "load_data",
    "rng_state",
    "seed_everything",
    "set_rng_state",
    "single_view_augment",
    "use_memory",
    "view_size",
    "write_json",
]


def load_contrastive(path: str, map_location: str | torch.device = "cpu") -> ContrastiveModel:
    """The encoder + projection head saved at ``path`` (a model file of kind 'contrastive')."""
    model = load_model(path, map_location=map_location)
    if not isinstance(model, ContrastiveModel):
        raise TypeError(f"{path}: expected a contrastive model, got {type(model).__name__}")
    return model


def view_size(image_size: int | None, info: DatasetInfo) -> int:
    """The side of the views the networks see: ``image_size`` (``augment.image_size``), else the
    images' height."""
    return int(image_size or info["height"])


@dataclass
class SplitData:
    """A split decoded into memory: uint8 images (N, C, H, W), int64 labels (N,), keys."""

    images: torch.Tensor
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, keys: list[str]) -> SplitData:
        """The rows whose keys are given, in that order; a missing key is a one-line error."""
        pos = {k: i for i, k in enumerate(self.keys)}
        missing = [k for k in keys if k not in pos]
        if missing:
            raise KeyError(f"{len(missing)} subset keys are not in the split (first: {missing[0]})")
        idx = torch.tensor([pos[k] for k in keys], dtype=torch.long)
        return SplitData(self.images[idx], self.labels[idx], list(keys))

    def drop(self, keys: list[str]) -> SplitData:
        """The rows whose keys are not given, in split order (e.g. the unlabeled rest of a
        labeled subset)."""
        gone = set(keys)
        idx = torch.tensor([i for i, k in enumerate(self.keys) if k not in gone], dtype=torch.long)
        return SplitData(self.images[idx], self.labels[idx], [self.keys[i] for i in idx.tolist()])

    def limit(self, n: int | None, seed: int = 0) -> SplitData:
        """At most n rows, drawn at random with a fixed seed (for cheap monitors)."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(len(self), generator=g)[:n].sort().values
        return SplitData(self.images[idx], self.labels[idx], [self.keys[i] for i in idx.tolist()])


def load_data(dataset_dir: str, split: str) -> SplitData:
    images, labels, keys = load_split(dataset_dir, split)
    return SplitData(images, labels.long(), list(keys))


def subset_keys(dataset_dir: str, fraction: float) -> list[str]:
    keys, _labels = load_subset(dataset_dir, fraction)
    return list(keys)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """The Python, NumPy and torch RNG states as tensors and plain types, so that a checkpoint
    holding them loads with ``torch.load(weights_only=True)`` (no unpickling of NumPy objects)."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    version, internal, gauss = random.getstate()
    return {
        "python": {"version": int(version), "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    py, nps = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(py["state"]), py["gauss"])
    random.setstate(py)
    if isinstance(nps, dict):
        keys = np.asarray(nps["keys"].numpy(), dtype=np.uint32)
        nps = (nps["name"], keys, nps["pos"], nps["has_gauss"], nps["cached_gaussian"])
    np.random.set_state(nps)
    torch.set_rng_state(state["torch"])


def training_state(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    history: list[HistoryRow],
    **extra: Any,
) -> dict[str, Any]:
    """The checkpoint of a training loop after ``epoch``: model, optimiser, scheduler, RNG state
    and history (plus ``extra`` entries)."""
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "rng": rng_state(),
        "history": history,
        **extra,
    }


def restore_training_state(
    ckpt: dict[str, Any],
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, list[HistoryRow]]:
    """Load a :func:`training_state` checkpoint; returns (first epoch to run, history so far)."""
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]) + 1, list(ckpt.get("history", []))


def batches(
    n: int,
    batch_size: int,
    *,
    epoch: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = True,
) -> Iterator[torch.Tensor]:
    """Index batches of one epoch for this rank.

    Every rank draws the same seeded permutation of ``range(n)`` and takes the strided slice
    ``perm[rank::world_size]``, so the ranks see disjoint samples and together the whole epoch.
    ``batch_size`` is the per-rank batch.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    perm = torch.randperm(n, generator=g)[rank::world_size]
    steps = len(perm) // batch_size if drop_last else math.ceil(len(perm) / batch_size)
    for s in range(steps):
        yield perm[s * batch_size : (s + 1) * batch_size]


def single_view_augment(
    channels: int, size: int, crop_min_scale: float = 0.5
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Crop + flip only (no colour jitter), the supervised recipe shared by fine-tuning, the
    baseline and the student, so the comparison is between initialisations, not recipes."""
    aug = BatchTwoViewAugment(
        size=size, channels=channels, strength=0.0, crop_min_scale=crop_min_scale
    )
    return aug.single


@torch.no_grad()
def encode(
    module: nn.Module, images: torch.Tensor, size: int | None = None, batch_size: int = 1024
) -> torch.Tensor:
    """Run ``module`` in eval mode over uint8 images in chunks; returns (N, D) float32."""
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    # Feed channels-last input to a channels-last network (no per-layer layout conversions).
    fmt = torch.contiguous_format
    conv = next((p for p in module.parameters() if p.ndim == 4), None)
    if (
        conv is not None
        and not conv.is_contiguous()
        and conv.is_contiguous(memory_format=torch.channels_last)
    ):
        fmt = torch.channels_last
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = normalize_batch(images[i : i + batch_size], size=size).to(device)
        x = x.contiguous(memory_format=fmt)
        y = module(x)
        if isinstance(y, tuple):
            y = y[0]
        out.append(y.float().cpu())
    module.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: int = 1) -> float:
    """Top-k accuracy in percent."""
    if labels.numel() == 0:
        return float("nan")
    k = min(topk, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean() * 100.0)


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
    bank_chunk: int = 16384,
) -> torch.Tensor:
    """Weighted kNN class scores (Wu et al. 2018, "Unsupervised Feature Learning via
    Non-Parametric Instance Discrimination"): cosine similarity, top-k neighbours, each voting for
    its class with weight exp(sim / temperature). Returns scores (Q, num_classes).

    Memory stays bounded whatever the bank's size: ``chunk`` queries at a time meet ``bank_chunk``
    bank rows at a time (a similarity block of at most ``chunk x bank_chunk``), and each block's
    top k is merged into the running top k."""
    bank = F.normalize(train_feats.float(), dim=1)  # (N, D)
    n = bank.shape[0]
    k = min(k, n)
    scores = []
    for i in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[i : i + chunk].float(), dim=1)  # (q, D)
        top_sim = torch.empty(q.shape[0], 0)
        top_idx = torch.empty(q.shape[0], 0, dtype=torch.long)
        for j in range(0, n, bank_chunk):
            sim = q @ bank[j : j + bank_chunk].T  # (q, b)
            s, idx = sim.topk(min(k, sim.shape[1]), dim=1)
            if j:  # merge with the running top k
                both = torch.cat([top_sim, s], 1)
                s, pick = both.topk(min(k, both.shape[1]), dim=1)
                idx = torch.cat([top_idx, idx + j], 1).gather(1, pick)
            top_sim, top_idx = s, idx
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        scores.append(votes)
    return torch.cat(scores) if scores else torch.empty(0, num_classes)


def fit_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    batch_size: int = 1024,
    seed: int = 0,
) -> LinearProbe:
    """A linear classifier on frozen, standardised features (SGD + cosine schedule)."""
    g = torch.Generator().manual_seed(seed)
    mean = train_feats.mean(0, keepdim=True)
    std = train_feats.std(0, keepdim=True).clamp_min(1e-6) if len(train_feats) > 1 else 1.0
    x = (train_feats - mean) / std
    lin = nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(len(x) / batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            loss = F.cross_entropy(lin(x[idx]), train_labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

    return LinearProbe(lin, mean, std if isinstance(std, torch.Tensor) else torch.ones(1)).eval()


class LinearProbe(nn.Module):
    """A linear classifier on standardised features: ``linear((f - mean) / std)``."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = linear

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.linear((f - self.mean) / self.std)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


class Throughput:
    """Counts samples and seconds of an epoch."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.samples = 0

    def add(self, n: int) -> None:
        self.samples += n

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def out_path(out_dir: str | os.PathLike[str], name: str) -> str:
    p = Path(out_dir) / name
    p.parent.mkdir(parents=True, exist_ok=True)
    return str(p)


# --------------------------------------------------------------------------------------------
# the streaming path
# --------------------------------------------------------------------------------------------


def use_memory(data: DataRead, info: DatasetInfo) -> bool:
    """Whether the stages hold the decoded splits in memory (``data.in_memory``; ``auto``: when
    all splits' decoded bytes fit in ``data.memory_budget_mb``) or stream the shards."""
    mode = data.in_memory
    if isinstance(mode, bool):
        return mode
    return decoded_bytes(info) <= data.memory_budget_mb * 2**20


#: A batch of views: one tensor, or several (a decoder's tuple of views, collated as a list).
Views = torch.Tensor | Sequence[torch.Tensor]
#: What a stream batch holds: ``(views, labels, keys)``.
StreamBatch = tuple[Views, torch.Tensor, list[str]]
#: Decodes one sample's image bytes (``where`` names it in errors) into its views.
Decoder = Callable[[bytes, str], torch.Tensor | tuple[torch.Tensor, ...]]


def _cat_views(parts: list[Views]) -> Views:
    tensors = [p for p in parts if isinstance(p, torch.Tensor)]
    if len(tensors) == len(parts):
        return torch.cat(tensors)
    seqs = [p for p in parts if not isinstance(p, torch.Tensor)]
    return [torch.cat([p[i] for p in seqs]) for i in range(len(seqs[0]))]


def _take_views(v: Views, a: int, b: int) -> Views:
    return v[a:b] if isinstance(v, torch.Tensor) else [t[a:b] for t in v]


def _join(buf: list[StreamBatch]) -> StreamBatch:
    if len(buf) == 1:
        return buf[0]
    views = _cat_views([x for x, _, _ in buf])
    return views, torch.cat([y for _, y, _ in buf]), [k for _, _, keys in buf for k in keys]


def _slice(batch: StreamBatch, a: int, b: int) -> StreamBatch:
    x, y, keys = batch
    return _take_views(x, a, b), y[a:b], keys[a:b]


class StreamSplit:
    """One split read as a stream by this rank: batches of decoded views made in
    ``data.loader_workers`` DataLoader processes.

    Epochs and DDP. Each rank takes exactly the number of steps the caller asks for
    (:meth:`batches`), the same on every rank; the caller derives it from the split's count in
    ``dataset.json`` as the in-memory path does (e.g. ``count // world // batch``). The shard order
    and the shuffle buffer are re-seeded per epoch; samples are split over ranks x workers by
    shards when the shard counts give every rank its steps' worth, else by sample index
    (:class:`pipeline.data.loader.ShardDataset`). What a rank's share holds beyond its steps is
    not seen that epoch (as the in-memory path leaves ``count % (world * batch)`` samples out);
    a share that runs out first (uneven shards) is read again from its start. A stage resumed in
    the middle of an epoch restarts that epoch.
    """

    def __init__(
        self,
        data: DataRead,
        seed: int,
        dataset_dir: str,
        split: str,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.data, self.seed, self.dataset_dir, self.split = data, seed, dataset_dir, split
        self.rank, self.world = rank, world
        self.info = dataset_info(dataset_dir)
        self.count = int(self.info["counts"].get(split, 0))
        self.channels = int(self.info["channels"])

    def loader(
        self,
        decoder: Decoder,
        batch: int,
        *,
        epoch: int = 0,
        shuffle: bool = True,
        exclude: Collection[str] = (),
        min_per_rank: int = 0,
        rank: int | None = None,
        world: int | None = None,
    ) -> torch.utils.data.DataLoader[StreamBatch]:
        d = self.data
        loader = make_loader(
            self.dataset_dir,
            self.split,
            batch_size=batch,
            rank=self.rank if rank is None else rank,
            world_size=self.world if world is None else world,
            num_workers=d.loader_workers,
            shuffle=shuffle,
            seed=self.seed * 1_000_003 + 17,
            with_keys=True,
            decoder=decoder,
            buffer_size=d.shuffle_buffer,
            exclude=frozenset(exclude),
            min_per_rank=min_per_rank,
        )
        dataset: ShardDataset = loader.dataset  # type: ignore[assignment]
        dataset.set_epoch(epoch)
        return loader

    def batches(
        self,
        decoder: Decoder,
        batch: int,
        steps: int,
        *,
        epoch: int,
        exclude: Collection[str] = (),
    ) -> Iterator[StreamBatch]:
        """Exactly ``steps`` batches ``(views, labels, keys)`` of ``batch`` samples each."""
        passes = 0
        buf: list[StreamBatch] = []
        have = 0
        made = 0
        while made < steps:
            loader = self.loader(
                decoder,
                batch,
                epoch=epoch * 1000 + passes,
                exclude=exclude,
                min_per_rank=steps * batch,
            )
            got_any = False
            for x, y, keys in loader:
                got_any = True
                buf.append((x, y, list(keys)))
                have += len(keys)
                while have >= batch and made < steps:
                    joined = _join(buf)
                    yield _slice(joined, 0, batch)
                    made += 1
                    have -= batch
                    buf = [_slice(joined, batch, batch + have)] if have else []
                if made >= steps:
                    break
            del loader
            if not got_any:
                raise ValueError(
                    f"{self.split} split of {self.dataset_dir}: this rank's share is empty"
                )
            passes += 1

    @torch.no_grad()
    def features(
        self,
        module: nn.Module,
        size: int,
        limit: int | None = None,
        batch: int = 256,
    ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """``module``'s outputs (eval mode) on the whole split (or its first ``limit`` samples)
        in shard order, batch by batch: ``(features (N, D) float32, labels, keys)``. Only the
        outputs are kept, never the images."""
        from pipeline.data.decode import ResizeView

        loader = self.loader(ResizeView(size, self.channels), batch, shuffle=False, rank=0, world=1)
        feats, labels, keys = [], [], []
        n = 0
        for x, y, k in loader:
            if limit is not None and n >= limit:
                break
            if limit is not None and n + len(k) > limit:
                x, y, k = x[: limit - n], y[: limit - n], list(k)[: limit - n]
            feats.append(encode(module, x, batch_size=batch))
            labels.append(y)
            keys.extend(k)
            n += len(k)
        del loader
        if not feats:
            return torch.empty(0), torch.empty(0, dtype=torch.long), []
        return torch.cat(feats), torch.cat(labels).long(), keys
