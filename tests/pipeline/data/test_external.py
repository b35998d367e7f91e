"""pipeline.data.external: external WebDataset shards indexed in place (never copied), junk
skipped and counted, local, piped and S3 URLs, JSON labels and validation shards."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _helpers import jpeg_bytes, png_bytes
from PIL import Image

from pipeline.config import parse_config
from pipeline.data import load_split, make_loader
from pipeline.data.external import IndexSpec, expand_urls, index_shard
from pipeline.data.shards import is_val_key
from pipeline.data.sources import DataError
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage


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
                samples.append(
                    (f"{split}/s{i:05d}", {"jpg": jpeg_bytes(i), "cls": str(i % 3).encode()})
                )
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
    good = [(f"g{i}", {"jpg": jpeg_bytes(i), "cls": str(i % 2).encode()}) for i in range(6)]
    truncated = jpeg_bytes(99)[:300]
    junk = [
        ("bad_jpeg", {"jpg": truncated, "cls": b"1"}),
        ("bad_label", {"jpg": jpeg_bytes(7), "cls": b"cat"}),
        ("no_label", {"jpg": jpeg_bytes(8)}),
        ("far_label", {"jpg": jpeg_bytes(9), "cls": b"5"}),
        ("no_image", {"txt": b"hello", "cls": b"0"}),
    ]
    _tar(tmp_path / "train.tar", good[:3] + junk + good[3:])
    _tar(tmp_path / "test.tar", [(f"t{i}", {"png": png_bytes(i), "cls": b"0"}) for i in range(2)])
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


def test_truncated_or_missing_shard_is_one_line_naming_its_url(tmp_path: Path):
    samples = [(f"k{i}", {"jpg": jpeg_bytes(i), "cls": b"0"}) for i in range(4)]
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


_COMPRESS = {
    "gz": lambda b: gzip.compress(b, mtime=0),
    "bz2": bz2.compress,
    "xz": lzma.compress,
}


@pytest.mark.parametrize("kind", sorted(_COMPRESS))
def test_compressed_shards_are_indexed_read_and_verified(tmp_path: Path, kind: str):
    """A .tar.gz/.bz2/.xz shard (tarfile and webdataset read them) is indexed and read by both
    loader paths with the plain shard's samples, its sha256 is the compressed file's, and a cut
    or changed file is a one-line error naming it."""
    urls = _shards(tmp_path / "src")
    packed: dict[str, list[str]] = {"train": [], "test": []}
    for split, paths in urls.items():
        for p in paths:
            q = Path(f"{p}.{kind}")
            q.write_bytes(_COMPRESS[kind](Path(p).read_bytes()))
            packed[split].append(str(q))
    plain, comp = tmp_path / "plain", tmp_path / "comp"
    a = _run(_cfg(urls["train"], urls["test"]), plain)
    b = _run(_cfg(packed["train"], packed["test"]), comp)
    assert a["counts"] == b["counts"]
    for name, sha in b["shard_sha256"].items():
        assert sha == hashlib.sha256(Path(name).read_bytes()).hexdigest()
    x1, y1, k1 = load_split(str(plain), "train")
    x2, y2, k2 = load_split(str(comp), "train")
    assert k1 == k2 and torch.equal(x1, x2) and torch.equal(y1, y2)
    streamed = [k for _, _, keys in make_loader(str(comp), "train", batch_size=5, with_keys=True)
                for k in keys]  # fmt: skip
    assert sorted(streamed) == sorted(k2)
    first = Path(packed["train"][0])
    data = first.read_bytes()
    mid = len(data) // 2
    for broken in (
        data[:mid],
        data[:-8] + b"\0" * 8,
        data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :],
    ):
        first.write_bytes(broken)
        with pytest.raises(DataError) as ei:
            load_split(str(comp), "train")
        msg = str(ei.value)
        assert msg.startswith(str(first)) and "\n" not in msg, msg
    first.write_bytes(data)


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
