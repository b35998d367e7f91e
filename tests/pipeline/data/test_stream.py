"""The streaming read path: JPEG members, rank x worker split, in_memory auto, verification,
URIs (S3-compatible server, pipe:), and the stages on a dataset held in object storage."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import parse_config
from pipeline.data import DataError, dataset_info, load_split
from pipeline.data.decode import CropViews, ResizeView, TensorDecoder
from pipeline.data.loader import make_loader, split_dataset
from pipeline.slices import DataRead
from pipeline.stages.common import StreamSplit, use_memory

CLASSES = ["a", "b", "c"]


def _jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def make_jpeg_dataset(
    out: Path, n_train: int = 60, per_shard: int = 12, fixed: bool = False, seed: int = 0
) -> Path:
    """A dataset folder of the shard contract with JPEG members of varying size (``fixed``:
    all 24 x 32), its shard counts and hashes recorded."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    shards: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    counts = {"train": n_train, "val": 6, "test": 9}
    shard_counts, shard_sha = {}, {}
    for split, n in counts.items():
        for s in range(0, n, per_shard):
            members = []
            for i in range(s, min(n, s + per_shard)):
                h, w = (24, 32) if fixed else (int(rng.integers(20, 60)), int(rng.integers(20, 60)))
                key = f"{split}_{i:05d}"
                members += [(f"{key}.jpg", _jpeg(rng, h, w)), (f"{key}.cls", str(i % 3).encode())]
            name = f"{split}-{s // per_shard:06d}.tar"
            data = _tar(members)
            (out / name).write_bytes(data)
            shards[split].append(name)
            shard_counts[name] = len(members) // 2
            shard_sha[name] = hashlib.sha256(data).hexdigest()
    info = {
        "name": "jpegs",
        "classes": CLASSES,
        "num_classes": 3,
        "channels": 3,
        "height": 24,
        "width": 32,
        "fixed_size": fixed,
        "counts": counts,
        "shards": shards,
        "shard_counts": shard_counts,
        "shard_sha256": shard_sha,
        "format": {"image_keys": ["jpg", "jpeg", "png", "webp"], "label_key": "cls"},
        "skipped": 0,
    }
    (out / "dataset.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    return make_jpeg_dataset(tmp_path_factory.mktemp("jpegs"))


@pytest.mark.parametrize("per_shard", [12, 40])  # 5 shards >= 4 consumers; 2 shards < 4
def test_jpeg_each_sample_once_two_ranks_two_workers(tmp_path, per_shard):
    ds = make_jpeg_dataset(tmp_path / "ds", per_shard=per_shard)
    crops = CropViews(16, 3, (0.2, 0.2))
    per_rank = []
    for rank in range(2):
        loader = make_loader(
            ds,
            "train",
            batch_size=7,
            rank=rank,
            world_size=2,
            num_workers=2,
            shuffle=True,
            seed=5,
            with_keys=True,
            decoder=crops,
            buffer_size=8,
        )
        keys: Counter = Counter()
        for (v1, v2), y, k in loader:
            assert v1.dtype == torch.uint8 and v1.shape[1:] == (3, 16, 16) == v2.shape[1:]
            assert y.max() < 3
            keys.update(k)
        per_rank.append(keys)
    total = sum(per_rank, Counter())
    assert sorted(total) == [f"train_{i:05d}" for i in range(60)]
    assert set(total.values()) == {1}
    assert all(sum(c.values()) > 0 for c in per_rank)


def test_stream_batches_fixed_steps_and_disjoint_ranks(jpegs):
    cfg = parse_config({"data": {"loader_workers": 2, "shuffle_buffer": 5}})
    crops = CropViews(8, 3, (1.0,))
    steps, b = 60 // 2 // 8, 8  # as the in-memory path: count // world // batch
    seen = []
    for rank in range(2):
        s = StreamSplit(DataRead.pick(cfg.data), cfg.seed, str(jpegs), "train", rank, 2)
        got = list(s.batches(crops, b, steps, epoch=3))
        assert len(got) == steps and all(len(k) == b and len(x[0]) == b for x, _, k in got)
        seen.append({k for _, _, keys in got for k in keys})
        again = [k for _, _, keys in s.batches(crops, b, steps, epoch=3) for k in keys]
        other = [k for _, _, keys in s.batches(crops, b, steps, epoch=4) for k in keys]
        assert again == [k for _, _, keys in got for k in keys] and again != other
    assert not seen[0] & seen[1] and len(seen[0]) == len(seen[1]) == steps * b
    # more steps than a rank's share: the share is read again, never a short epoch
    long = list(
        StreamSplit(DataRead.pick(cfg.data), cfg.seed, str(jpegs), "train", 0, 2).batches(
            crops, b, 6, epoch=0
        )
    )
    assert len(long) == 6


def test_streamed_and_in_memory_paths_agree(tmp_path):
    ds = make_jpeg_dataset(tmp_path / "ds", fixed=True)
    images, labels, keys = load_split(ds, "train")
    assert images.shape == (60, 3, 24, 32)
    got = {
        k: (x, y)
        for x, y, k in split_dataset(ds, "train", decoder=TensorDecoder(3), with_keys=True)
    }
    assert sorted(got) == sorted(keys)
    for i in (0, 31, 59):
        assert torch.equal(got[keys[i]][0], images[i]) and got[keys[i]][1] == labels[i]
    # the evaluation view equals the in-memory path's normalised resize
    from pipeline.data.transforms import normalize_batch

    view = next(iter(split_dataset(ds, "train", decoder=ResizeView(16, 3))))[0]
    ref = normalize_batch(images[:1], size=16)[0]
    assert torch.allclose(normalize_batch(view[None])[0], ref, atol=1e-5)
    # a subset by key, as the labeled pool is loaded
    imgs, lab, sub = load_split(ds, "train", keys=[keys[7], keys[2]])
    assert sub == [keys[7], keys[2]] and torch.equal(imgs[0], images[7])


def test_variable_size_in_memory_resizes_to_nominal(jpegs):
    images, labels, keys = load_split(jpegs, "train")
    assert images.shape == (60, 3, 24, 32) and len(set(keys)) == 60


def _data(raw: dict) -> DataRead:
    """How a stage of the config ``raw`` reads the shards."""
    return DataRead.pick(parse_config(raw).data)


def test_in_memory_auto_picks_each_path(jpegs):
    info = dataset_info(jpegs)
    need = 75 * 3 * 24 * 32  # all splits, decoded at the nominal size
    mb = need / 2**20
    assert use_memory(_data({"data": {"memory_budget_mb": mb * 1.01}}), info)
    assert not use_memory(_data({"data": {"memory_budget_mb": mb * 0.99}}), info)
    assert use_memory(_data({"data": {"in_memory": "true", "memory_budget_mb": 1e-6}}), info)
    assert not use_memory(_data({"data": {"in_memory": False}}), info)


def test_altered_and_short_shards_are_named(jpegs, tmp_path):
    ds = Path(shutil.copytree(jpegs, tmp_path / "ds"))
    shard = ds / "train-000001.tar"
    orig = shard.read_bytes()
    data = bytearray(orig)
    data[512 + 700] ^= 0xFF  # a byte inside the first JPEG member
    shard.write_bytes(bytes(data))
    for read in (lambda: load_split(ds, "train"), lambda: list(split_dataset(ds, "train"))):
        with pytest.raises(DataError, match=r"train-000001\.tar: sha256 .* differs") as ei:
            read()
        assert "\n" not in str(ei.value)
    # one sample fewer, with a valid end-of-archive marker
    with tarfile.open(fileobj=io.BytesIO(orig)) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()][:-2]
    shard.write_bytes(_tar(members))
    info = json.loads((ds / "dataset.json").read_text())
    info["shard_sha256"].pop("train-000001.tar")
    (ds / "dataset.json").write_text(json.dumps(info))
    for read in (lambda: load_split(ds, "train"), lambda: list(split_dataset(ds, "train"))):
        with pytest.raises(DataError, match=r"train-000001\.tar: truncated shard \(11 samples, "):
            read()
    # a label outside the classes
    members = [
        (n, b"7" if n.endswith(".cls") and i == 1 else d)
        for i, (n, d) in enumerate([(m[0], m[1]) for m in members])
    ]
    members += [("train_00023.jpg", members[0][1]), ("train_00023.cls", b"1")]
    shard.write_bytes(_tar(members))
    with pytest.raises(DataError, match=r"train-000001\.tar: sample train_00012: label 7 outside"):
        list(split_dataset(ds, "train"))


def test_pipe_and_file_urls(jpegs, tmp_path):
    ds = Path(shutil.copytree(jpegs, tmp_path / "ds"))
    info = json.loads((ds / "dataset.json").read_text())
    a, b = info["shards"]["train"][:2]
    (ds / a).rename(tmp_path / a)  # an external shard, read through a command
    refs = [f"pipe:cat {tmp_path / a}", f"file://{ds / b}"]
    info["shards"]["train"][:2] = refs
    for old, new in zip((a, b), refs, strict=True):
        info["shard_counts"][new] = info["shard_counts"].pop(old)
        info["shard_sha256"][new] = info["shard_sha256"].pop(old)
    (ds / "dataset.json").write_text(json.dumps(info))
    keys = [k for _, _, k in split_dataset(ds, "train", with_keys=True)]
    assert sorted(keys) == [f"train_{i:05d}" for i in range(60)]
    assert load_split(ds, "train")[2] == keys
    info["shards"]["train"][0] = "pipe:false"
    (ds / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"pipe:false: "):
        list(split_dataset(ds, "train"))


# --------------------------------------------------------------------------------------------
# the stages on a dataset in object storage
# --------------------------------------------------------------------------------------------


def _upload(local: Path, uri: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(uri)
    pafs.copy_files(
        str(local), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs
    )


def _tiny_cfg(in_memory):
    return parse_config(
        {
            "data": {
                "source": "digits",
                "max_train": 300,
                "max_test": 60,
                "shard_size": 100,
                "in_memory": in_memory,
                "loader_workers": 0,  # workers: tested above; here the URI path
                "shuffle_buffer": 50,
            },
            "model": {"arch": "resnet18", "width": 0.0625, "head_out": 16},
            "pretrain": {
                "method": "semisup",
                "epochs": 2,
                "batch_size": 32,
                "max_steps_per_epoch": 2,
                "optimizer": "adamw",
                "lr": 0.001,
                "labeled_per_batch": 4,
                "pseudo_label_from_epoch": 2,
                "knn_bank": 50,
                "knn_queries": 20,
            },
            "finetune": {
                "label_fractions": [10],
                "epochs": 1,
                "batch_size": 16,
                "min_steps": 2,
                "consistency": {"epochs": 1, "batch_size": 64, "labeled_batch_size": 8},
            },
            "distill": {"epochs": 1, "batch_size": 64, "label_weight": 0.5},
            "evaluate": {"knn_k": 5, "linear_epochs": 2, "embedding_samples": 10},
            "resources": {"torch_threads": 1},
        }
    )


def test_smoke_stages_stream_from_s3(s3_bucket, tmp_path):
    from pipeline.slices import (
        DistillSlice,
        EvaluateSlice,
        PretrainSlice,
        ShardSlice,
        SupervisedSlice,
    )
    from pipeline.stages import distill, evaluate, finetune, pretrain
    from pipeline.stages import shard as shard_stage

    cfg = _tiny_cfg(False)
    local = tmp_path / "ds"
    shard_stage.run(ShardSlice.of(cfg), local)
    uri = f"{s3_bucket}/runs/x/stages/shard/out"
    _upload(local, uri)
    torch.set_num_threads(1)
    inputs = {"dataset": uri}
    pre = pretrain.run(PretrainSlice.of(cfg), inputs, str(tmp_path / "pre"))
    assert pre.metrics["data_streaming"] == 1.0 and "val_knn_top1" in pre.metrics
    assert pre.history[-1]["pseudo_labels"] >= 0
    ft = finetune.run(
        SupervisedSlice.of(cfg),
        {**inputs, "pretrain": pre.outputs["model"]},
        str(tmp_path / "ft"),
        fraction=10,
    )
    assert ft.metrics["data_streaming"] == 1.0 and "val_top1" in ft.metrics
    assert "pseudo_label_acc" in ft.history[-1]
    st = distill.run(
        DistillSlice.of(cfg),
        {**inputs, "teacher": ft.outputs["model"]},
        str(tmp_path / "st"),
        fraction=10,
    )
    assert st.metrics["data_streaming"] == 1.0 and "val_top1" in st.metrics
    ev = evaluate.run(
        EvaluateSlice.of(cfg),
        {**inputs, "pretrain": pre.outputs["model"], "finetune@10": ft.outputs["model"]},
        str(tmp_path / "ev"),
    )
    report = json.loads(Path(ev.outputs["report_json"]).read_text())
    assert ev.metrics["data_streaming"] == 1.0 and report["test_images"] == 60
    assert report["train_images"] == dataset_info(uri)["counts"]["train"]
    assert 0.0 <= report["fractions"]["10"]["finetune_top1"] <= 100.0
    # the in-memory path reads the same folder from the URI too
    remote, local_split = load_split(uri, "test"), load_split(local, "test")
    assert torch.equal(remote[0], local_split[0]) and remote[2] == local_split[2]
