"""pipeline.data.shards: round trip, byte-identical re-shard (in one process and on Ray), digest,
manifest, subsets, atomic layout; image files kept as their original bytes, resized only beyond
``max_side``."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _helpers import jpeg_bytes, png_bytes
from PIL import Image

from pipeline.config import parse_config
from pipeline.data import format_fraction, load_split, load_subset
from pipeline.data.shards import encode_png, label_subset, tar_info, write_tar
from pipeline.data.sources import DataError, prepare_splits
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage


def _cfg(**data):
    base = {"source": "digits", "shard_size": 128, "val_fraction": 0.1}
    base.update(data)
    return parse_config(
        {
            "data": base,
            "finetune": {"label_fractions": [1, 10]},
            "pretrain": {"label_fraction": 0.5},
        }
    )


@pytest.fixture(scope="module")
def digits_ds(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    res = shard_stage.run(ShardSlice.of(_cfg()), out)
    return out, res


def test_layout_and_dataset_json(digits_ds):
    out, res = digits_ds
    info = json.loads((out / "dataset.json").read_text())
    assert info["name"] == "digits" and info["classes"] == [str(i) for i in range(10)]
    assert (info["channels"], info["height"], info["width"]) == (1, 8, 8)
    assert sum(info["counts"].values()) == 1797
    for split, names in info["shards"].items():
        assert names == [f"{split}-{i:06d}.tar" for i in range(len(names))]
        assert len(names) == -(-info["counts"][split] // 128)
    assert set(info["subsets"]) == {"1", "10", "0.5"}
    assert (out / "subsets" / "label_0.5.parquet").is_file()
    assert not list(out.rglob("*.tmp"))
    assert res.outputs["manifest"] == str(out / "manifest.parquet")
    assert res.metrics["num_images"] == 1797 and res.metrics["images_per_s"] > 0
    # shards are plain tars that the standard library reads, members <key>.png / <key>.cls
    with tarfile.open(out / "train-000000.tar") as tf:
        members = tf.getmembers()
        assert [m.name.split(".")[1] for m in members[:4]] == ["png", "cls", "png", "cls"]
        assert all(
            m.mtime == 0 and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members
        )
        assert tf.extractfile(members[1]).read().decode().isdigit()


def test_round_trip_every_image_and_label(digits_ds):
    out, _ = digits_ds
    src = prepare_splits(_cfg().data)
    for split in ("train", "val", "test"):
        images, labels, keys = load_split(out, split)
        recs = src.splits[split]
        assert keys == [r.key for r in recs]
        assert images.dtype.is_floating_point is False and images.shape == (len(recs), 1, 8, 8)
        assert np.array_equal(images[:, 0].numpy(), np.stack([r.image for r in recs]))
        assert labels.tolist() == [r.label for r in recs]


def test_manifest_matches_shards(digits_ds):
    out, _ = digits_ds
    m = pq.read_table(out / "manifest.parquet").to_pylist()
    assert list(m[0]) == ["key", "split", "label", "shard", "bytes", "sha256"]
    assert len(m) == 1797 and len({r["key"] for r in m}) == 1797
    with tarfile.open(out / m[5]["shard"]) as tf:
        png = tf.extractfile(f"{m[5]['key']}.png").read()
    assert len(png) == m[5]["bytes"] and hashlib.sha256(png).hexdigest() == m[5]["sha256"]
    digest = hashlib.sha256(
        "".join(
            "\t".join(str(r[c]) for c in ("key", "split", "label", "shard", "bytes", "sha256"))
            + "\n"
            for r in m
        ).encode()
    ).hexdigest()
    assert json.loads((out / "dataset.json").read_text())["digest"] == digest


def test_reshard_is_byte_identical(digits_ds, tmp_path):
    out, _ = digits_ds
    shard_stage.run(ShardSlice.of(_cfg()), tmp_path)
    a = json.loads((out / "dataset.json").read_text())
    b = json.loads((tmp_path / "dataset.json").read_text())
    assert a["digest"] == b["digest"]
    for p in sorted(out.glob("*.tar")):
        assert (tmp_path / p.name).read_bytes() == p.read_bytes(), p.name
    assert (tmp_path / "manifest.parquet").read_bytes() == (out / "manifest.parquet").read_bytes()
    # a different seed gives a different split, hence a different digest
    shard_stage.run(ShardSlice.of(_cfg(seed=1)), tmp_path / "s1")
    assert json.loads((tmp_path / "s1" / "dataset.json").read_text())["digest"] != a["digest"]


def test_rerun_removes_stale_shards(tmp_path):
    shard_stage.run(ShardSlice.of(_cfg(shard_size=64)), tmp_path)
    n_small = len(list(tmp_path.glob("train-*.tar")))
    shard_stage.run(ShardSlice.of(_cfg(shard_size=512)), tmp_path)
    assert len(list(tmp_path.glob("train-*.tar"))) == 3 < n_small
    assert (
        load_split(tmp_path, "train")[0].shape[0]
        == json.loads((tmp_path / "dataset.json").read_text())["counts"]["train"]
    )


def test_subsets_balanced_nested_deterministic(digits_ds, tmp_path):
    out, _ = digits_ds
    n_train = json.loads((out / "dataset.json").read_text())["counts"]["train"]
    train_keys = set(load_split(out, "train")[2])
    k1, y1 = load_subset(out, 1)
    k10, y10 = load_subset(out, 10.0)
    k05, y05 = load_subset(out, 0.5)
    assert np.bincount(y05.numpy(), minlength=10).tolist() == [1] * 10  # at least 1 per class
    assert np.bincount(y10.numpy(), minlength=10).tolist() == [round(0.1 * n_train / 10)] * 10
    assert set(k1) <= set(k10) <= train_keys and set(k05) <= set(k1)
    shard_stage.run(ShardSlice.of(_cfg()), tmp_path)
    assert load_subset(tmp_path, 10)[0] == k10
    keys = [f"k{i}" for i in range(200)]
    labels = [i % 4 for i in range(200)]
    assert label_subset(keys, labels, 4, 10, seed=0) == label_subset(keys, labels, 4, 10, seed=0)
    assert (
        label_subset(keys, labels, 4, 10, seed=0)[0] != label_subset(keys, labels, 4, 10, seed=1)[0]
    )
    with pytest.raises(
        DataError, match=r"label_3\.parquet: no such label subset \(available: 0\.5, 1, 10\)"
    ):
        load_subset(out, 3)


def test_format_fraction():
    assert [format_fraction(p) for p in (1, 10.0, 0.1, 12.5, 100)] == [
        "1",
        "10",
        "0.1",
        "12.5",
        "100",
    ]
    with pytest.raises(DataError):
        format_fraction(0)
    with pytest.raises(DataError, match="rounds to 0"):
        format_fraction(1e-7)


def test_png_and_tar_are_standard_and_deterministic(tmp_path: Path):
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (5, 7, 3), (6, 4, 4)]:
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        png = encode_png(x)
        assert png == encode_png(x)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), x)
    with pytest.raises(DataError, match="expected uint8"):
        encode_png(np.zeros((4, 4), np.float32))
    ti = tar_info("abc_001.png", 1234)
    assert (ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname) == (0, 0o644, 0, 0, "", "")
    members = [("a.png", b"x" * 700), ("a.cls", b"3")]
    n, sha = write_tar(tmp_path / "a.tar", members)
    data = (tmp_path / "a.tar").read_bytes()
    assert n == len(data) and n % 10240 == 0 and sha == hashlib.sha256(data).hexdigest()
    with tarfile.open(tmp_path / "a.tar") as tf:
        assert [(m.name, m.size) for m in tf.getmembers()] == [("a.png", 700), ("a.cls", 1)]
    assert write_tar(tmp_path / "b.tar", members) == (n, sha)
    with pytest.raises(DataError, match="longer than 100 bytes"):
        tar_info("k" * 101, 1)


def test_rgb_source_round_trip(tmp_path: Path):
    rng = np.random.default_rng(1)
    for cls in ("x", "y"):
        for i in range(5):
            p = tmp_path / "src" / cls / f"{i}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(p)
    cfg = parse_config(
        {"data": {"source": "image-folder", "root": str(tmp_path / "src"), "val_fraction": 0.0}}
    )
    shard_stage.run(ShardSlice.of(cfg), tmp_path / "out")
    images, labels, keys = load_split(tmp_path / "out", "train")
    assert images.shape == (8, 3, 6, 9)
    k = keys[0]  # e.g. "x_0_png"
    cls, stem = k.split("_")[0], k.split("_")[1]
    src = np.asarray(Image.open(tmp_path / "src" / cls / f"{stem}.png"))
    assert np.array_equal(images[0].permute(1, 2, 0).numpy(), src)


def test_image_folder_keeps_the_original_bytes_and_resizes_only_beyond_max_side(tmp_path: Path):
    src = tmp_path / "src"
    files = {}
    for ci, cls in enumerate(("a", "b")):
        for i in range(4):
            p = src / cls / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            size = (120, 80) if i == 0 else (40, 30)
            p.write_bytes(jpeg_bytes(10 * ci + i, size))
            files[p] = p.read_bytes()
    (src / "b" / "x.png").write_bytes(png_bytes(3))
    cfg = parse_config({"data": {"source": "image-folder", "root": str(src), "val_fraction": 0.0}})
    out = tmp_path / "out"
    shard_stage.run(ShardSlice.of(cfg), out)
    info = json.loads((out / "dataset.json").read_text())
    m = pq.read_table(out / "manifest.parquet").to_pylist()
    by_sha = {hashlib.sha256(b).hexdigest() for b in files.values()}
    by_sha.add(hashlib.sha256((src / "b" / "x.png").read_bytes()).hexdigest())
    assert {r["sha256"] for r in m} <= by_sha and len(m) == 9
    for name in info["shards"]["train"]:
        with tarfile.open(out / name) as tf:
            exts = sorted({n.split(".", 1)[1] for n in tf.getnames()})
            assert exts == ["cls", "jpg", "png"] or exts == ["cls", "jpg"]
            for mem in tf.getmembers():
                if mem.name.endswith(".jpg"):
                    data = tf.extractfile(mem).read()
                    assert hashlib.sha256(data).hexdigest() in by_sha
    assert info["fixed_size"] is False and info["max_side"] is None
    # with max_side, only the images whose longer side exceeds it are resized (re-encoded)
    cfg2 = parse_config(
        {"data": {"source": "image-folder", "root": str(src), "val_fraction": 0.0, "max_side": 60}}
    )
    shard_stage.run(ShardSlice.of(cfg2), tmp_path / "out2")
    info2 = json.loads((tmp_path / "out2" / "dataset.json").read_text())
    m2 = pq.read_table(tmp_path / "out2" / "manifest.parquet").to_pylist()
    changed = [r for r in m2 if r["sha256"] not in by_sha]
    assert len(changed) == 2 and info2["source_info"]["resized"] == 2 and info2["max_side"] == 60
    row = changed[0]
    with tarfile.open(tmp_path / "out2" / row["shard"]) as tf:
        im = Image.open(io.BytesIO(tf.extractfile(f"{row['key']}.jpg").read()))
        assert im.size == (60, 40)


def test_image_folder_shards_are_byte_identical_on_reruns_and_on_ray(tmp_path: Path, ray_local):
    from workflows.sharding import ray_map

    src = tmp_path / "src"
    for ci, cls in enumerate(("a", "b")):
        for i in range(7):
            p = src / cls / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(jpeg_bytes(10 * ci + i))
    cfg = parse_config({"data": {"source": "image-folder", "root": str(src), "shard_size": 3}})
    shard_stage.run(ShardSlice.of(cfg), tmp_path / "a")
    shard_stage.run(ShardSlice.of(cfg), tmp_path / "b", map_fn=ray_map())
    a = json.loads((tmp_path / "a" / "dataset.json").read_text())
    b = json.loads((tmp_path / "b" / "dataset.json").read_text())
    assert a["digest"] == b["digest"] and a["shard_sha256"] == b["shard_sha256"]
    names = sorted(p.name for p in (tmp_path / "a").glob("*.tar"))
    assert len(names) >= 4
    for name in names:
        data = (tmp_path / "a" / name).read_bytes()
        assert (tmp_path / "b" / name).read_bytes() == data
        assert a["shard_sha256"][name] == hashlib.sha256(data).hexdigest()
