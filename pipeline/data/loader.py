"""Streaming a dataset folder: ``ShardDataset`` / ``make_loader``, the path for data that does
not fit in memory (:mod:`pipeline.data.memory` holds a split in memory instead).

The shards of a split and what each must hold come from :mod:`pipeline.data.folder`; each shard
is read front to back and verified by :mod:`pipeline.data.tarstream`.

Work split. ``ShardDataset`` spreads samples over ``world_size`` ranks x DataLoader workers
(``C`` consumers; consumer ``c = rank * workers + worker``). ``mode="shard"`` gives consumer ``c``
the shards ``c, c+C, ...`` of the epoch's shard order; ``mode="sample"`` makes every consumer walk
all shards and keep the samples whose running index ``i`` has ``i % C == c`` (skipping the others'
bytes, not decoding them): balanced to +-1 sample, and correct when there are fewer shards than
consumers. ``mode="auto"`` (default) uses ``shard`` when there are at least ``C`` shards and, with
``min_per_rank``, the shard counts give every rank at least that many samples this epoch; else
``sample``. Either way one epoch yields every sample exactly once across all consumers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.decode import TensorDecoder
from pipeline.data.folder import ShardRef, _as_ref, dataset_info, shard_paths, shard_refs
from pipeline.data.sources import DataError
from pipeline.data.tarstream import _decode, _iter_raw

__all__ = [
    "ShardDataset",
    "iter_samples",
    "make_loader",
]


class ShardDataset(IterableDataset):
    """Samples ``(x, label)`` (``(x, label, key)`` with ``with_keys``) from tar shards, split
    over ranks and DataLoader workers (module docstring).

    ``x`` is ``decoder(image_bytes, where)`` (default: the uint8 ``C x H x W`` tensor). With
    ``shuffle`` the shard order is permuted per epoch (``set_epoch``) with the same seed on every
    consumer, and samples pass a shuffle buffer of ``buffer_size`` (still encoded: the buffer
    holds file bytes, not pixels). ``exclude``: keys to leave out (e.g. a labelled subset);
    ``num_classes``: range-check the labels.
    """

    def __init__(
        self,
        shard_paths: Sequence[ShardRef | str],
        rank: int = 0,
        world_size: int = 1,
        mode: Literal["auto", "shard", "sample"] = "auto",
        shuffle: bool = False,
        seed: int = 0,
        buffer_size: int = 1000,
        with_keys: bool = False,
        decoder: Callable[[bytes, str], Any] | None = None,
        exclude: frozenset[str] | set[str] | None = None,
        num_classes: int | None = None,
        min_per_rank: int = 0,
    ) -> None:
        super().__init__()
        if world_size < 1:
            raise DataError(f"world_size: must be >= 1 (got {world_size})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank: must lie in [0, {world_size}) (got {rank})")
        if mode not in ("auto", "shard", "sample"):
            raise DataError(f"mode: expected auto, shard or sample (got {mode!r})")
        if buffer_size < 1:
            raise DataError(f"buffer_size: must be >= 1 (got {buffer_size})")
        self.shards = [_as_ref(p) for p in shard_paths]
        self.rank, self.world_size = rank, world_size
        self.mode = mode
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.with_keys = with_keys
        self.decoder = decoder or TensorDecoder()
        self.exclude = frozenset(exclude or ())
        self.num_classes = num_classes
        self.min_per_rank = min_per_rank
        self.epoch = 0

    @property
    def shard_paths(self) -> list[str]:
        return [s.url for s in self.shards]

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shard order and the shuffle buffer."""
        self.epoch = int(epoch)

    def _workers(self) -> tuple[int, int]:
        wi = get_worker_info()
        return (wi.num_workers, wi.id) if wi is not None else (1, 0)

    def _order(self) -> list[ShardRef]:
        shards = list(self.shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        return shards

    def split_mode(self, num_workers: int) -> str:
        """The split this epoch uses for ``num_workers`` loader workers per rank."""
        n = self.world_size * max(1, num_workers)
        shards = self._order()
        if self.mode != "auto":
            return self.mode
        if len(shards) < n:
            return "sample"
        if self.min_per_rank:
            if any(s.count is None for s in shards):
                return "sample"
            nw = max(1, num_workers)
            for r in range(self.world_size):
                total = sum(shards[i].count or 0 for i in range(len(shards)) if i % n // nw == r)
                if total < self.min_per_rank:
                    return "sample"
        return "shard"

    def _samples(self) -> Iterator[tuple[ShardRef, str, dict[str, bytes]]]:
        nw, wid = self._workers()
        c, n = self.rank * nw + wid, self.world_size * nw
        shards = self._order()
        keep = (lambda k: k not in self.exclude) if self.exclude else None
        if self.split_mode(nw) == "shard":
            for ref in shards[c::n]:
                for _, key, parts in _iter_raw(ref):
                    if parts is not None and (keep is None or keep(key)):
                        yield ref, key, parts
        else:
            seen = 0
            for ref in shards:
                base, count = seen, 0
                for i, key, parts in _iter_raw(ref, functools.partial(_mine, base, n, c)):
                    count = i + 1
                    if parts is not None and (keep is None or keep(key)):
                        yield ref, key, parts
                seen = base + count

    def __iter__(self) -> Iterator[Any]:
        it = self._samples()
        if self.shuffle:
            nw, wid = self._workers()
            c = self.rank * nw + wid
            it = _buffer_shuffle(
                it, self.buffer_size, np.random.default_rng([self.seed, self.epoch, c, 1])
            )
        for ref, key, parts in it:
            x, label = _decode(ref, key, parts, self.decoder, self.num_classes)
            yield (x, label, key) if self.with_keys else (x, label)


def _mine(base: int, n: int, c: int, i: int) -> bool:
    """Whether the sample at running index ``base + i`` is consumer ``c``'s of ``n``."""
    return (base + i) % n == c


def _buffer_shuffle(it: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buf: list[Any] = []
    for item in it:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


def iter_samples(
    shard_paths: Sequence[ShardRef | str],
    rank: int = 0,
    world_size: int = 1,
    mode: Literal["auto", "shard", "sample"] = "auto",
    shuffle: bool = False,
    seed: int = 0,
    with_keys: bool = False,
    **kwargs: Any,
) -> ShardDataset:
    """A :class:`ShardDataset` of ``(uint8 CxHxW tensor, label)`` from the shards (``(x, label,
    key)`` with ``with_keys``)."""
    return ShardDataset(
        shard_paths, rank, world_size, mode, shuffle, seed, with_keys=with_keys, **kwargs
    )


def split_dataset(dataset_dir: Any, split: str, **kwargs: Any) -> ShardDataset:
    """A :class:`ShardDataset` over ``split`` of a dataset folder: its shards with their counts
    and hashes, labels range-checked, images converted to the dataset's channels."""
    info = dataset_info(dataset_dir)
    kwargs.setdefault("decoder", TensorDecoder(int(info["channels"])))
    kwargs.setdefault("num_classes", len(info["classes"]))
    return ShardDataset(shard_refs(dataset_dir, split), **kwargs)


def make_loader(
    dataset_dir: Any,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    mode: Literal["auto", "shard", "sample"] = "auto",
    with_keys: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader over ``split`` of a dataset folder, this rank's share of it (``kwargs`` go to
    :class:`ShardDataset`: ``decoder``, ``buffer_size``, ``exclude``, ``min_per_rank``...).

    Batches hold what ``decoder`` (the per-sample hook) returns, by default uint8 ``C x H x W``
    tensors; the loader applies no transform: the caller transforms the batches."""
    if batch_size < 1:
        raise DataError(f"batch_size: must be >= 1 (got {batch_size})")
    if num_workers < 0:
        raise DataError(f"num_workers: must be >= 0 (got {num_workers})")
    shard_paths(dataset_dir, split)  # a missing local shard: named before workers start
    ds = split_dataset(
        dataset_dir,
        split,
        rank=rank,
        world_size=world_size,
        mode=mode,
        shuffle=shuffle,
        seed=seed,
        with_keys=with_keys,
        **kwargs,
    )
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
    )
