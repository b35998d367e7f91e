"""Streaming loader: rank x worker split (each sample once), shuffle, batches."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.data import iter_samples, load_split, make_loader, shard_paths


def _epoch_keys(ds_dir, num_workers: int, world: int, mode: str = "auto") -> list[Counter]:
    per_rank = []
    for rank in range(world):
        loader = make_loader(
            ds_dir,
            "train",
            batch_size=16,
            rank=rank,
            world_size=world,
            num_workers=num_workers,
            mode=mode,
            with_keys=True,
        )
        per_rank.append(Counter(k for _, _, keys in loader for k in keys))
    return per_rank


@pytest.mark.parametrize("fixture", ["many_shards", "few_shards"])
def test_each_sample_once_two_ranks_two_workers(fixture, request):
    ds_dir = request.getfixturevalue(fixture)
    all_keys = load_split(ds_dir, "train")[2]
    per_rank = _epoch_keys(ds_dir, num_workers=2, world=2)
    total = sum(per_rank, Counter())
    assert sorted(total) == sorted(all_keys)
    assert set(total.values()) == {1}
    assert all(sum(c.values()) > 0 for c in per_rank)


def test_sample_mode_balances_ranks(many_shards):
    per_rank = _epoch_keys(many_shards, num_workers=0, world=3, mode="sample")
    sizes = [sum(c.values()) for c in per_rank]
    assert sum(sizes) == 200 and max(sizes) - min(sizes) <= 1
    assert set(sum(per_rank, Counter()).values()) == {1}


def test_streamed_samples_equal_load_split(few_shards):
    images, labels, keys = load_split(few_shards, "train")
    got = {k: (x, y) for x, y, k in iter_samples(shard_paths(few_shards, "train"), with_keys=True)}
    assert len(got) == len(keys)
    for i in (0, 57, len(keys) - 1):
        x, y = got[keys[i]]
        assert x.dtype == torch.uint8 and x.shape == (1, 8, 8)
        assert torch.equal(x, images[i]) and y == labels[i].item()


def test_shuffle_is_a_seeded_permutation(many_shards):
    ds = iter_samples(shard_paths(many_shards, "train"), shuffle=True, seed=3, with_keys=True)
    a = [k for _, _, k in ds]
    b = [k for _, _, k in ds]
    ds.set_epoch(1)
    c = [k for _, _, k in ds]
    assert (
        a == b and a != c and sorted(a) == sorted(c) == sorted(load_split(many_shards, "train")[2])
    )


def test_loader_batches_decoded_images(few_shards):
    x, y = next(iter(make_loader(few_shards, "test", batch_size=10)))
    assert x.shape == (10, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (10,)
