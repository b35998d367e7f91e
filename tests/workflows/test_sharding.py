"""Ray: sharding with Ray tasks equals the one-process shards; ray.data reads the shards back."""

from __future__ import annotations

import json

import pytest

from pipeline.config import parse_config
from pipeline.data import load_split
from pipeline.slices import ShardSlice
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
    shard_stage.run(ShardSlice.of(_cfg()), local)
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


def test_external_shards_indexed_by_ray_tasks_and_a_bad_one_named(ray_local, tmp_path):
    import io
    import tarfile

    from PIL import Image

    from workflows.sharding import shard_with_ray

    def tar(path, n, first):
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(first, first + n):
                buf = io.BytesIO()
                Image.new("RGB", (9, 7), (i, 2 * i, 3)).save(buf, "JPEG")
                for ext, data in (("jpg", buf.getvalue()), ("cls", str(i % 2).encode())):
                    ti = tarfile.TarInfo(f"k{i:04d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))

    for s in range(3):
        tar(tmp_path / f"train-{s}.tar", 10, 10 * s)
    tar(tmp_path / "test-0.tar", 6, 100)
    raw = {
        "data": {
            "source": "webdataset",
            "train_urls": str(tmp_path / "train-{0..2}.tar"),
            "test_urls": [str(tmp_path / "test-0.tar")],
        },
        "finetune": {"label_fractions": [50]},
    }
    res = shard_with_ray(parse_config(raw), tmp_path / "a", max_in_flight=2)
    shard_stage.run(ShardSlice.of(parse_config(raw)), tmp_path / "b")
    a = json.loads((tmp_path / "a" / "dataset.json").read_text())
    b = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert res.metrics["num_images"] == 36 and a["digest"] == b["digest"]
    data = (tmp_path / "train-1.tar").read_bytes()
    (tmp_path / "train-1.tar").write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError) as ei:
        shard_with_ray(parse_config(raw), tmp_path / "c")
    msg = str(ei.value)
    assert msg.startswith(f"{tmp_path / 'train-1.tar'}: truncated shard") and "\n" not in msg
