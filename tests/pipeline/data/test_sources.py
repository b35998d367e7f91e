"""Sources: digits, image folders (with bad files), Fashion-MNIST idx validation, caps and splits."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import parse_config
from pipeline.data.sources import (
    DataError,
    load_digits_source,
    load_fashion_mnist,
    load_image_folder,
    prepare_splits,
    read_idx,
    stratified_indices,
    stratified_split,
)
from pipeline.slices import ShardSlice
from pipeline.stages import shard as shard_stage

FM_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def _png(path: Path, value: int, size: tuple[int, int] = (12, 12), mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]) if mode == "L" else (size[1], size[0], 3), value, np.uint8)
    Image.fromarray(arr).save(path)


def test_digits_split_is_stratified_seeded_and_uint8():
    a = load_digits_source(seed=0)
    b = load_digits_source(seed=0)
    c = load_digits_source(seed=1)
    assert [r.key for r in a.splits["test"]] == [r.key for r in b.splits["test"]]
    assert [r.key for r in a.splits["test"]] != [r.key for r in c.splits["test"]]
    tr, te = a.splits["train"], a.splits["test"]
    assert len(tr) + len(te) == 1797 and abs(len(te) - 0.2 * 1797) <= 1
    img = tr[0].image
    assert img.dtype == np.uint8 and img.shape == (8, 8)
    assert max(int(r.image.max()) for r in tr) == 255  # 16 -> 255
    counts = np.bincount([r.label for r in te], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # ~20% of ~180 per class
    assert not {r.key for r in tr} & {r.key for r in te}


def test_stratified_helpers():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    idx = stratified_indices(y, 50, seed=3)
    assert len(idx) == 50 and list(idx) == sorted(idx)
    assert np.bincount(y[idx]).tolist() == [5, 10, 15, 20]
    keep, carved = stratified_split(y, 0.1, seed=3)
    assert np.bincount(y[carved]).tolist() == [1, 2, 3, 4]
    assert len(keep) + len(carved) == 100 and not set(keep) & set(carved)


def test_prepare_splits_caps_and_val():
    cfg = parse_config(
        {"data": {"source": "digits", "max_train": 500, "max_test": 100, "val_fraction": 0.2}}
    )
    d = prepare_splits(cfg.data)
    assert len(d.splits["train"]) + len(d.splits["val"]) == 500
    assert len(d.splits["val"]) == 100 and len(d.splits["test"]) == 100
    assert np.bincount([r.label for r in d.splits["val"]], minlength=10).min() >= 9


def _shard_folder(root: Path, out: Path, **data) -> dict:
    cfg = parse_config(
        {
            "data": {"source": "image-folder", "root": str(root), "val_fraction": 0.0, **data},
            "finetune": {"label_fractions": [50]},
        }
    )
    shard_stage.run(ShardSlice.of(cfg), out)
    return json.loads((out / "dataset.json").read_text())


def test_image_folder_presplit_and_bad_files(tmp_path: Path):
    root = tmp_path / "imgs"
    for split in ("train", "test"):
        for ci, cls in enumerate(["cat", "dog"]):
            for i in range(3):
                _png(root / split / cls / f"img {i}.png", 40 * ci + i)
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "train" / "dog" / "notes.txt").write_text("hello")
    _png(root / "train" / "dog" / "big.png", 9, size=(24, 24))  # another size: kept as it is
    d = load_image_folder(root)
    assert d.classes == ["cat", "dog"]
    assert len(d.splits["train"]) == 8 and len(d.splits["test"]) == 6  # listed, not decoded
    assert all(r.image is None and Path(r.path).is_file() for r in d.splits["train"])
    assert [Path(s.path).name for s in d.skipped] == ["notes.txt"]
    info = _shard_folder(root, tmp_path / "out")
    assert info["counts"] == {"train": 7, "val": 0, "test": 6}
    assert (info["height"], info["width"], info["channels"]) == (12, 12, 1)
    assert info["fixed_size"] is False and info["max_side"] is None
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    reasons = {Path(s["path"]).name: s["reason"] for s in skipped["skipped"]}
    assert set(reasons) == {"broken.png", "notes.txt"} and skipped["count"] == 2
    assert "unreadable image" in reasons["broken.png"] and "not an image" in reasons["notes.txt"]
    keys = [r.key for r in d.splits["train"]]
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert keys == [r.key for r in load_image_folder(root).splits["train"]]


def test_image_folder_mixed_modes_give_rgb_and_seeded_split(tmp_path: Path):
    for i in range(10):
        _png(tmp_path / "src" / "a" / f"{i}.png", i, mode="L")
        _png(tmp_path / "src" / "b" / f"{i}.jpg", 200, mode="RGB")
    d = load_image_folder(tmp_path / "src", seed=0)
    assert len(d.splits["test"]) == 4
    assert np.bincount([r.label for r in d.splits["test"]]).tolist() == [2, 2]
    info = _shard_folder(tmp_path / "src", tmp_path / "out")
    assert info["channels"] == 3 and info["fixed_size"] is True


def test_image_folder_corrupt_counted_in_skipped_json(tmp_path: Path):
    root = tmp_path / "imgs"
    for cls in ("a", "b"):
        for i in range(6):
            _png(root / cls / f"{i}.png", 10 * i)
    (root / "a" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 garbage")
    cfg = parse_config(
        {
            "data": {
                "source": "image-folder",
                "root": str(root),
                "shard_size": 4,
                "val_fraction": 0.0,
            },
            "finetune": {"label_fractions": [50]},
        }
    )
    res = shard_stage.run(ShardSlice.of(cfg), tmp_path / "out")
    skipped = json.loads((tmp_path / "out" / "skipped.json").read_text())
    assert skipped["count"] == 1 and skipped["skipped"][0]["path"].endswith("corrupt.jpg")
    assert res.metrics["num_skipped"] == 1 and res.metrics["num_images"] == 12


def test_image_folder_all_bad_is_a_clear_error(tmp_path: Path):
    for cls in ("a", "b"):
        (tmp_path / "src" / cls).mkdir(parents=True)
        (tmp_path / "src" / cls / "x.png").write_bytes(b"nope")
        (tmp_path / "src" / cls / "y.jpg").write_bytes(b"")
    with pytest.raises(
        DataError, match=r"no usable training images \(\d skipped; e\.g\. .*\.(png|jpg): unreadable"
    ) as ei:
        _shard_folder(tmp_path / "src", tmp_path / "out")
    assert "\n" not in str(ei.value)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "missing")


def _idx(path: Path, arr: np.ndarray, magic_type: int = 0x08) -> None:
    head = struct.pack(">BBBB", 0, 0, magic_type, arr.ndim) + b"".join(
        struct.pack(">I", d) for d in arr.shape
    )
    data = head + arr.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)


def _fake_fm(root: Path, n: int = 20, gz: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    for stem, count in (("train", n), ("t10k", n // 2)):
        _idx(root / f"{stem}-images-idx3-ubyte{ext}", rng.integers(0, 256, (count, 28, 28)))
        _idx(root / f"{stem}-labels-idx1-ubyte{ext}", np.arange(count) % 10)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path: Path):
    with pytest.raises(DataError) as ei:
        load_fashion_mnist(root=tmp_path)
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data.download=true" in msg
    assert "data.root" in msg and "/usr/share" not in msg
    # Without a root, only the given search folders are consulted.
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(search_dirs=[tmp_path / "x", tmp_path / "y"])


def test_fashion_mnist_from_fake_idx(tmp_path: Path):
    _fake_fm(tmp_path, gz=False)
    d = load_fashion_mnist(root=tmp_path)
    assert len(d.splits["train"]) == 20 and len(d.splits["test"]) == 10
    assert d.splits["train"][3].label == 3 and d.splits["train"][3].image.shape == (28, 28)
    assert d.classes[0] == "T-shirt/top"


def test_fashion_mnist_wrong_file_named(tmp_path: Path):
    _fake_fm(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    _idx(bad, np.zeros((20, 2)))  # 2-D "labels": wrong dimensions
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: idx file has 2 dimensions"):
        load_fashion_mnist(root=tmp_path)
    (tmp_path / "x").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(DataError, match=r"x: idx size 11 bytes, expected 13"):
        read_idx(tmp_path / "x", 1)
    (tmp_path / "y").write_bytes(b"PK\x03\x04 zip file")
    with pytest.raises(DataError, match=r"y: not an idx file"):
        read_idx(tmp_path / "y", 1)


@pytest.mark.skipif(
    not FM_SYSTEM.is_dir(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_if_installed():
    d = load_fashion_mnist(search_dirs=[FM_SYSTEM])
    assert len(d.splits["train"]) == 60000 and len(d.splits["test"]) == 10000
    assert np.bincount([r.label for r in d.splits["test"]]).tolist() == [1000] * 10
