"""Fixtures shared by the dataset-folder readers' tests: two finished digits dataset folders
(built once per test run by the shard stage; tests that alter one alter a copy)."""

from __future__ import annotations

import pytest

from pipeline.config import parse_config
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage


def _make(out, shard_size: int, max_train: int = 200):
    cfg = parse_config(
        {
            "data": {
                "source": "digits",
                "shard_size": shard_size,
                "max_train": max_train,
                "max_test": 50,
                "val_fraction": 0.0,
            },
            "finetune": {"label_fractions": [10]},
        }
    )
    shard_stage.run(ShardSlice.of(cfg), out)
    return out


@pytest.fixture(scope="session")
def many_shards(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("many"), shard_size=30)  # 7 train shards (last short)


@pytest.fixture(scope="session")
def few_shards(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("few"), shard_size=90)  # 3 train shards < 4 consumers
