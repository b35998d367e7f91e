"""The dataset folder's description: a listed shard that is missing, a folder that is not a
finished dataset."""

from __future__ import annotations

import json

import pytest
from _helpers import copy_dataset

from pipeline.data import dataset_info, load_split
from pipeline.data.sources import DataError


def test_missing_shard_and_unfinished_folder(few_shards, tmp_path):
    ds = copy_dataset(few_shards, tmp_path / "ds")
    (ds / "test-000000.tar").unlink()
    with pytest.raises(
        DataError, match=r"test-000000\.tar: shard listed in dataset.json is missing"
    ):
        load_split(ds, "test")
    info = json.loads((ds / "dataset.json").read_text())
    (ds / "dataset.json").unlink()
    with pytest.raises(DataError, match="dataset.json: missing"):
        dataset_info(ds)
    assert info["counts"]["test"] == 50
