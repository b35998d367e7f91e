"""External WebDataset input (indexed in place, never copied) and original image bytes kept."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import parse_config
from pipeline.data.external import IndexSpec, expand_urls, index_shard
from pipeline.data.shards import is_val_key
from pipeline.data.sources import DataError
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage


def _jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for key, parts in samples:
            for ext, data in parts.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return path.read_bytes()


def _shards(root: Path, n_train: int = 3, per: int = 8) -> dict[str, list[str]]:
    """train-{0..n_train-1}.tar and test-0.tar: JPEG + cls, labels cycling over 3 classes."""
    out: dict[str, list[str]] = {"train": [], "test": []}
    i = 0
    for split, n in (("train", n_train), ("test", 1)):
        for s in range(n):
            samples = []
            for _ in range(per):
                samples.append((f"{split}/s{i:05d}", {"jpg": _jpeg(i), "cls": str(i % 3).encode()}))
                i += 1
            p = root / f"{split}-{s:06d}.tar"
            _tar(p, samples)
            out[split].append(str(p))
    return out


def _cfg(train, test, **data):
    return parse_config(
        {
            "data": {
                "source": "webdataset",
                "train_urls": train,
                "test_urls": test,
                "val_fraction": 0.25,
                **data,
            },
            "finetune": {"label_fractions": [10, 50]},
        }
    )


def _run(cfg, out: Path) -> dict:
    shard_stage.run(ShardSlice.of(cfg), out)
    return json.loads((out / "dataset.json").read_text())


def test_external_shards_are_indexed_in_place_with_val_by_key_hash(tmp_path: Path):
    urls = _shards(tmp_path / "wds")
    pattern = str(tmp_path / "wds" / "train-{000000..000002}.tar")
    assert expand_urls(pattern) == urls["train"]
    info = _run(_cfg(pattern, urls["test"]), tmp_path / "out")
    assert not list((tmp_path / "out").glob("*.tar"))  # nothing copied
    assert info["shards"]["train"] == urls["train"] == info["shards"]["val"]
    assert info["shards"]["test"] == urls["test"]
    assert info["val_from_train"] == {"fraction": 0.25, "hash": "sha1"}
    m = pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()
    train_keys = [f"train/s{i:05d}" for i in range(24)]
    val = {k for k in train_keys if is_val_key(k, 0.25)}
    assert 0 < len(val) < 24
    assert {r["key"] for r in m if r["split"] == "val"} == val
    assert info["counts"] == {"train": 24 - len(val), "val": len(val), "test": 8}
    assert info["classes"] == ["0", "1", "2"] and info["skipped"] == 0
    assert (info["channels"], info["height"], info["width"], info["fixed_size"]) == (
        3,
        30,
        40,
        True,
    )
    for url in urls["train"] + urls["test"]:
        data = Path(url).read_bytes()
        assert info["shard_sha256"][url] == hashlib.sha256(data).hexdigest()
    assert sum(info["shard_counts"].values()) == 32
    row = m[3]
    with tarfile.open(row["shard"]) as tf:
        img = tf.extractfile(f"{row['key']}.jpg").read()
    assert row["sha256"] == hashlib.sha256(img).hexdigest() and row["bytes"] == len(img)
    shards = pq.read_table(tmp_path / "out" / "shards.parquet").to_pylist()
    assert [(r["split"], r["shard"]) for r in shards[:2]] == [
        ("train", urls["train"][0]),
        ("val", urls["train"][0]),
    ]
    assert sum(r["count"] for r in shards) == 32
    sub = pq.read_table(tmp_path / "out" / "subsets" / "label_50.parquet").to_pylist()
    assert sub and {r["key"] for r in sub} <= set(train_keys) - val


def test_external_junk_is_skipped_and_counted(tmp_path: Path):
    good = [(f"g{i}", {"jpg": _jpeg(i), "cls": str(i % 2).encode()}) for i in range(6)]
    truncated = _jpeg(99)[:300]
    junk = [
        ("bad_jpeg", {"jpg": truncated, "cls": b"1"}),
        ("bad_label", {"jpg": _jpeg(7), "cls": b"cat"}),
        ("no_label", {"jpg": _jpeg(8)}),
        ("far_label", {"jpg": _jpeg(9), "cls": b"5"}),
        ("no_image", {"txt": b"hello", "cls": b"0"}),
    ]
    _tar(tmp_path / "train.tar", good[:3] + junk + good[3:])
    _tar(tmp_path / "test.tar", [(f"t{i}", {"png": _png(i), "cls": b"0"}) for i in range(2)])
    cfg = _cfg(str(tmp_path / "train.tar"), str(tmp_path / "test.tar"), classes=["a", "b"])
    info = _run(cfg, tmp_path / "out")
    assert info["skipped"] == 5 and info["counts"]["train"] + info["counts"]["val"] == 6
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    reasons = {s["key"]: s["reason"] for s in skipped["skipped"]}
    assert skipped["count"] == 5 and set(reasons) == {k for k, _ in junk}
    assert all(s["shard"] == str(tmp_path / "train.tar") for s in skipped["skipped"])
    assert "unreadable image" in reasons["bad_jpeg"] and "truncated" in reasons["bad_jpeg"].lower()
    assert reasons["bad_label"] == "label 'cat' is not an integer"
    assert reasons["far_label"] == "label 5 outside 0..1"
    assert "no image member" in reasons["no_image"] and "no .cls" in reasons["no_label"]
    assert info["skipped_keys"] == {str(tmp_path / "train.tar"): [k for k, _ in junk]}


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40), seed, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_truncated_or_missing_shard_is_one_line_naming_its_url(tmp_path: Path):
    samples = [(f"k{i}", {"jpg": _jpeg(i), "cls": b"0"}) for i in range(4)]
    data = _tar(tmp_path / "a.tar", samples)
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    boundary = tmp_path / "boundary.tar"  # cut exactly after a member: no end-of-archive marker
    with tarfile.open(tmp_path / "a.tar") as tf:
        m = tf.getmembers()[3]
        boundary.write_bytes(data[: m.offset_data + (m.size + 511) // 512 * 512])
    for bad in (cut, boundary, tmp_path / "missing.tar"):
        with pytest.raises(DataError) as ei:
            index_shard(IndexSpec(str(bad), "train"))
        msg = str(ei.value)
        assert msg.startswith(str(bad)) and "\n" not in msg
        assert ("truncated" in msg) if bad.exists() else ("not found" in msg)
    with pytest.raises(DataError, match=r"pipe:exit 3: command exited with status 3"):
        index_shard(IndexSpec("pipe:exit 3", "train"))


def test_pipe_urls_json_labels_and_val_shards(tmp_path: Path):
    def sample(i):
        return (f"k{i}", {"webp": _webp(i), "json": json.dumps({"y": i % 2}).encode()})

    _tar(tmp_path / "tr.tar", [sample(i) for i in range(6)])
    _tar(tmp_path / "va.tar", [sample(i) for i in range(6, 8)])
    _tar(tmp_path / "te.tar", [sample(i) for i in range(8, 10)])
    cfg = _cfg(
        [f"pipe:cat {tmp_path / 'tr.tar'}"],
        f"file://{tmp_path / 'te.tar'}",
        val_urls=str(tmp_path / "va.tar"),
        label_key="json:y",
        image_keys=["webp"],
    )
    info = _run(cfg, tmp_path / "out")
    assert info["counts"] == {"train": 6, "val": 2, "test": 2} and info["val_from_train"] is None
    assert info["shards"]["train"] == [f"pipe:cat {tmp_path / 'tr.tar'}"]
    sha = hashlib.sha256((tmp_path / "tr.tar").read_bytes()).hexdigest()
    assert info["shard_sha256"][f"pipe:cat {tmp_path / 'tr.tar'}"] == sha
    assert info["format"] == {"image_keys": ["webp"], "label_key": "json:y"}


def _webp(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), seed * 20, np.uint8)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def test_external_shards_on_the_s3_test_server_are_indexed(tmp_path: Path, s3_bucket):
    import pyarrow.fs as pafs

    urls = _shards(tmp_path / "wds", n_train=2, per=5)
    remote: dict[str, list[str]] = {}
    for split, paths in urls.items():
        for p in paths:
            uri = f"{s3_bucket}/data/{Path(p).name}"
            fs, path = pafs.FileSystem.from_uri(uri)
            with fs.open_output_stream(path) as f:
                f.write(Path(p).read_bytes())
            remote.setdefault(split, []).append(uri)
    pattern = f"{s3_bucket}/data/train-{{000000..000001}}.tar"
    info = _run(_cfg(pattern, remote["test"]), tmp_path / "out")
    assert info["shards"]["train"] == remote["train"]
    assert info["counts"]["train"] + info["counts"]["val"] == 10 and info["counts"]["test"] == 5
    for split, paths in urls.items():
        for p, uri in zip(paths, remote[split], strict=True):
            assert info["shard_sha256"][uri] == hashlib.sha256(Path(p).read_bytes()).hexdigest()
    with pytest.raises(DataError, match=rf"{s3_bucket}/data/nope\.tar: shard not found"):
        index_shard(IndexSpec(f"{s3_bucket}/data/nope.tar", "train"))


def test_image_folder_keeps_the_original_bytes_and_resizes_only_beyond_max_side(tmp_path: Path):
    src = tmp_path / "src"
    files = {}
    for ci, cls in enumerate(("a", "b")):
        for i in range(4):
            p = src / cls / f"{i}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            size = (120, 80) if i == 0 else (40, 30)
            p.write_bytes(_jpeg(10 * ci + i, size))
            files[p] = p.read_bytes()
    (src / "b" / "x.png").write_bytes(_png(3))
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
            p.write_bytes(_jpeg(10 * ci + i))
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


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Fashion-MNIST not installed"
)
def test_benchmark_jpeg_generator_output_is_indexed(tmp_path: Path):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))
    import make_wds_jpegs

    res = make_wds_jpegs.main(
        ["--out", str(tmp_path / "d"), "--n-train", "30", "--n-test", "10", "--shard-size", "16",
         "--format", "both"]
    )  # fmt: skip
    info = _run(_cfg(res["train_urls"], res["test_urls"]), tmp_path / "out")
    assert info["counts"]["train"] + info["counts"]["val"] == 30 and info["skipped"] == 0
    assert info["channels"] == 3 and info["fixed_size"] is False
    assert len(info["shards"]["train"]) == 2
    files = sorted((tmp_path / "d" / "folder" / "train").rglob("*.jpg"))
    assert len(files) == 30


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"source": "webdataset", "test_urls": "t.tar"}, "data.train_urls: required"),
        ({"source": "webdataset", "train_urls": "a.tar"}, "data.test_urls: required"),
        ({"source": "webdataset", "train_urls": [], "test_urls": "t"}, "at least one shard URL"),
        ({"train_urls": "a.tar"}, "data.train_urls: only for source webdataset"),
        ({"label_key": "json:"}, "data.label_key: json: needs a field name"),
        ({"image_keys": ["a.b"]}, "data.image_keys: 'a.b' is not a member extension"),
        ({"max_side": 64}, "data.max_side: only for source image-folder"),
        (
            {"source": "webdataset", "train_urls": "a", "test_urls": "b", "max_train": 9},
            "data.max_train: not supported for source webdataset",
        ),
    ],
)
def test_webdataset_config_errors_are_one_line(data, message):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match=message) as ei:
        parse_config({"data": data})
    assert "\n" not in str(ei.value)
