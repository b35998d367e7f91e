"""Ray: sharding with Ray tasks equals the one-process shards; ray.data reads the shards back."""

from __future__ import annotations

import json

import pytest

from pipeline.config import parse_config
from pipeline.data import load_split
from pipeline.stages import shard as shard_stage

pytestmark = pytest.mark.slow


def _cfg():
    return parse_config(
        {
            "data": {"source": "digits", "shard_size": 100, "max_train": 300, "max_test": 60},
            "finetune": {"label_fractions": [10]},
        }
    )


def test_shard_with_ray_matches_local_and_ray_data_reads_it(ray_local, tmp_path):
    from workflows.sharding import shard_with_ray

    local = tmp_path / "local"
    remote = tmp_path / "ray"
    shard_stage.run(_cfg(), local)
    res = shard_with_ray(_cfg(), remote, max_in_flight=2)
    assert res.metrics["num_images"] == 360
    a = json.loads((local / "dataset.json").read_text())
    b = json.loads((remote / "dataset.json").read_text())
    assert a["digest"] == b["digest"] and a["shards"] == b["shards"]
    for p in sorted(local.glob("*.tar")):
        assert (remote / p.name).read_bytes() == p.read_bytes()

    # interop: ray.data's own WebDataset reader sees the same rows and labels
    images, labels, keys = load_split(remote, "train")
    paths = [str(remote / n) for n in b["shards"]["train"]]
    rows = ray_local.data.read_webdataset(paths).take_all()
    assert len(rows) == len(keys) == b["counts"]["train"]
    by_key = {r["__key__"].rsplit("/", 1)[-1]: r for r in rows}
    assert sorted(by_key) == sorted(keys)
    for i, k in enumerate(keys):
        assert by_key[k]["cls"] == labels[i].item()
    assert (by_key[keys[0]]["png"] == images[0, 0].numpy()).all()
