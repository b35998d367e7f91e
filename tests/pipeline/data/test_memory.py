"""In-memory reads: ``load_split`` by keys and its checks (counts, keys, labels), and its PNG
reader."""

from __future__ import annotations

import io
import itertools
import json
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from _helpers import copy_dataset, tar_bytes

from pipeline.data import dataset_info, load_split, shard_paths
from pipeline.data.shards import encode_png
from pipeline.data.sources import DataError


def test_load_split_keys_and_info(few_shards):
    _, labels, keys = load_split(few_shards, "train")
    pick = [keys[5], keys[0], keys[150]]
    imgs, lab, got = load_split(few_shards, "train", keys=pick)
    assert got == pick and lab.tolist() == [labels[5].item(), labels[0].item(), labels[150].item()]
    with pytest.raises(DataError, match="key 'nope' is not in"):
        load_split(few_shards, "train", keys=["nope"])
    assert dataset_info(few_shards)["counts"]["train"] == 200
    with pytest.raises(DataError, match="split 'dev'"):
        shard_paths(few_shards, "dev")


def _edit_info(ds, edit) -> None:
    info = json.loads((ds / "dataset.json").read_text())
    edit(info)
    (ds / "dataset.json").write_text(json.dumps(info))


def test_load_split_checks_counts_keys_and_labels(few_shards, tmp_path):
    with pytest.raises(DataError, match=r"load_split\(train\): key 'k' requested twice"):
        load_split(few_shards, "train", keys=["k", "k"])
    ds = copy_dataset(few_shards, tmp_path / "ds")
    _edit_info(ds, lambda i: (i["counts"].update(train=199), i.pop("shard_counts")))
    with pytest.raises(DataError, match=r"more samples than dataset.json counts for train \(199\)"):
        load_split(ds, "train")
    _edit_info(ds, lambda i: i["counts"].update(train=201))
    with pytest.raises(DataError, match="200 samples in shards, dataset.json says 201"):
        load_split(ds, "train")
    _edit_info(ds, lambda i: (i["counts"].update(train=200), i.update(classes=i["classes"][:1])))
    with pytest.raises(DataError, match=r"sample \w+: label [1-9] outside \[0, 1\) of dataset"):
        load_split(ds, "train")


# --------------------------------------------------------------------------------------------
# load_split's PNG reader: filtered rows undone in numpy, everything else through PIL
# --------------------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _filter_row(f: int, row: list[int], above: list[int], bpp: int) -> list[int]:
    """The bytes of ``row`` under PNG filter type ``f`` (PNG spec, section 9), byte by byte."""
    out = []
    for i, x in enumerate(row):
        a, b = (row[i - bpp] if i >= bpp else 0), above[i]
        c = above[i - bpp] if i >= bpp else 0
        p = a + b - c
        paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - c) else (
            b if abs(p - b) <= abs(p - c) else c)  # fmt: skip
        out.append((x - (0, a, b, (a + b) // 2, paeth)[f]) % 256)
    return out


def _handmade_png(img: np.ndarray, filters: list[int], idats: int = 1) -> bytes:
    """PNG bytes of the uint8 ``H x W x C`` ``img`` built here (not by PIL): row ``r`` filtered
    with ``filters[r]`` (a byte > 4 is written as it is), the zlib stream in ``idats`` chunks."""
    h, w, c = img.shape
    raw, above = bytearray(), [0] * (w * c)
    for f, row in zip(filters, img.reshape(h, w * c).astype(int).tolist(), strict=True):
        raw += bytes([f, *_filter_row(min(f, 4), row, above, c)])
        above = row
    z = zlib.compress(bytes(raw))
    cuts = [len(z) * i // idats for i in range(idats + 1)]
    ihdr = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2}[c], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + b"".join(_chunk(b"IDAT", z[a:b]) for a, b in itertools.pairwise(cuts))
        + _chunk(b"IEND", b"")
    )


def _filter_types(png: bytes) -> set[int]:
    """The filter types on the rows of an 8-bit grey or RGB PNG (its chunks parsed here)."""
    pos, idat, ihdr = 8, b"", b""
    while pos < len(png):
        (n,), kind = struct.unpack(">I", png[pos : pos + 4]), png[pos + 4 : pos + 8]
        ihdr = png[pos + 8 : pos + 8 + n] if kind == b"IHDR" else ihdr
        idat += png[pos + 8 : pos + 8 + n] if kind == b"IDAT" else b""
        pos += 12 + n
    w, _, depth, colour = struct.unpack(">IIBB", ihdr[:10])
    assert depth == 8 and colour in (0, 2)
    return set(zlib.decompress(idat)[:: 1 + w * (3 if colour == 2 else 1)])


def _filter_bait(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    """A uint8 ``H x W x C`` image whose rows are made for each filter Pillow picks (None, Sub,
    Up, Average (with ``optimize``), Paeth), in a random order, and noise."""
    x = np.zeros((h, w, c), dtype=np.int64)
    for r in range(h):
        above = x[r - 1] if r else np.zeros((w, c), dtype=np.int64)
        kind = rng.integers(0, 6)
        if kind == 0:  # sparse small values: None
            x[r] = (rng.random((w, c)) < 0.3) * rng.integers(1, 4, (w, c))
        elif kind == 1:  # a ramp along the row: Sub
            x[r] = rng.integers(0, 256, c) + np.arange(w)[:, None] * rng.integers(1, 9, c)
        elif kind == 2:  # the row above, plus 0 or 1: Up
            x[r] = above + rng.integers(0, 2, (w, c))
        elif kind == 3:  # the mean of the left and the upper neighbours: Average
            x[r, 0] = above[0] // 2
            for i in range(1, w):
                x[r, i] = (x[r, i - 1] + above[i]) // 2
        elif kind == 4:  # the row above plus a constant: Paeth where the row above falls
            x[r] = above + rng.integers(5, 20)
        else:
            x[r] = rng.integers(0, 256, (w, c))
    return (x % 256).astype(np.uint8)


def _pillow_png(img: np.ndarray, optimize: bool) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buf, "PNG", optimize=optimize)
    return buf.getvalue()


def _pil(png: bytes, c: int) -> torch.Tensor:
    """PIL's decode of ``png`` as uint8 ``C x H x W``."""
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png)).convert("L" if c == 1 else "RGB"))
    return torch.from_numpy(np.array(a.reshape(*a.shape[:2], c).transpose(2, 0, 1)))


def _png_dataset(root, pngs: list[bytes], c: int, h: int, w: int):
    """A one-shard dataset folder holding ``pngs`` (keys ``s0000``...) as its train split."""
    members = []
    for i, png in enumerate(pngs):
        members += [(f"s{i:04d}.png", png), (f"s{i:04d}.cls", str(i % 2).encode())]
    root.mkdir()
    (root / "train-000000.tar").write_bytes(tar_bytes(members, tarfile.USTAR_FORMAT))
    info = {"classes": ["a", "b"], "channels": c, "height": h, "width": w,
            "counts": {"train": len(pngs)}, "shards": {"train": ["train-000000.tar"]}}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(info))
    return root


@pytest.fixture
def pil_decodes(monkeypatch):
    """The images ``load_split`` hands to PIL (its fallback), as a list filled while it runs."""
    from pipeline.data import memory
    from pipeline.data.decode import TensorDecoder

    seen: list[str] = []

    class Counting(TensorDecoder):
        def __call__(self, data: bytes, where: str) -> torch.Tensor:
            seen.append(where.rsplit(" ", 1)[-1])
            return super().__call__(data, where)

    monkeypatch.setattr(memory, "TensorDecoder", Counting)
    return seen


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("hw", [(5, 7), (12, 9), (28, 28)])
def test_png_fast_path_equals_pil_on_pillows_filters(tmp_path, pil_decodes, c, hw):
    h, w = hw
    rng = np.random.default_rng(100 * c + h)
    arrays = [_filter_bait(rng, h, w, c) for _ in range(24)]
    # the shard stage's encoder (no Average), and Pillow's optimize (all five filters)
    pngs = [encode_png(a) if i % 2 else _pillow_png(a, optimize=True) for i, a in enumerate(arrays)]
    assert set().union(*map(_filter_types, pngs)) == {0, 1, 2, 3, 4}
    assert all(len(_filter_types(p)) > 1 for p in pngs[::2])
    ds = _png_dataset(tmp_path / "ds", pngs, c, h, w)
    images, labels, keys = load_split(ds, "train")
    assert pil_decodes == [] and images.shape == (len(pngs), c, h, w)
    assert keys == [f"s{i:04d}" for i in range(len(pngs))] and labels.tolist() == [0, 1] * 12
    for i, png in enumerate(pngs):
        assert torch.equal(images[i], _pil(png, c)), i
        assert torch.equal(images[i], torch.from_numpy(arrays[i]).permute(2, 0, 1)), i
    pick = keys[::-3]
    sub, _, got = load_split(ds, "train", keys=pick)
    assert got == pick and torch.equal(sub, images[[keys.index(k) for k in pick]])


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("f", [0, 1, 2, 3, 4, "mixed"])
def test_png_fast_path_undoes_each_filter(tmp_path, pil_decodes, c, f):
    """Hand-built PNGs with one filter type on every row (or a random one per row and image):
    the extremes (0, 255, both in turn) and noise, so every sum wraps around somewhere."""
    h, w = 6, 5
    rng = np.random.default_rng(7)
    arrays = [np.zeros((h, w, c), np.uint8), np.full((h, w, c), 255, np.uint8)]
    arrays.append((np.indices((h, w, c)).sum(0) % 2 * 255).astype(np.uint8))
    arrays += [rng.integers(0, 256, (h, w, c), dtype=np.uint8) for _ in range(9)]
    filters = [[int(x) for x in rng.integers(0, 5, h)] if f == "mixed" else [f] * h for _ in arrays]
    pngs = [_handmade_png(a, fs) for a, fs in zip(arrays, filters, strict=True)]
    assert [_filter_types(p) for p in pngs] == [set(fs) for fs in filters]
    ds = _png_dataset(tmp_path / "ds", pngs, c, h, w)
    images = load_split(ds, "train")[0]
    assert pil_decodes == []
    for i, (png, a) in enumerate(zip(pngs, arrays, strict=True)):
        want = torch.from_numpy(a).permute(2, 0, 1)
        assert torch.equal(_pil(png, c), want), i  # the hand-built bytes are valid PNG
        assert torch.equal(images[i], want), i


@pytest.mark.parametrize("c", [1, 3])
def test_pngs_the_fast_path_leaves_to_pil_load_as_before(tmp_path, pil_decodes, c):
    from PIL import Image

    from pipeline.data.decode import TensorDecoder

    h, w = 8, 8
    rng = np.random.default_rng(3)
    arr = [_filter_bait(rng, h, w, c) for _ in range(4)]
    palette = io.BytesIO()
    Image.fromarray(arr[1][..., 0]).convert("P").save(palette, "PNG")
    other = {"palette": palette.getvalue(), "size": encode_png(_filter_bait(rng, 6, 10, c)),
             "idats": _handmade_png(arr[2], [4] * h, idats=2),
             "mode": encode_png(_filter_bait(rng, h, w, 4 - c)[..., : 4 - c])}  # fmt: skip
    pngs = [encode_png(arr[0]), *other.values(), encode_png(arr[3])]
    ds = _png_dataset(tmp_path / "ds", pngs, c, h, w)
    images = load_split(ds, "train")[0]
    assert pil_decodes == [f"s{i:04d}" for i in range(1, len(other) + 1)]
    decoder = TensorDecoder(c, size=(h, w))
    for i, png in enumerate(pngs):
        assert torch.equal(images[i], decoder(png, "x")), i


def test_png_with_an_unknown_filter_type_is_a_pil_decode_error(tmp_path, pil_decodes):
    rng = np.random.default_rng(5)
    arrays = [rng.integers(0, 256, (4, 4, 1), dtype=np.uint8) for _ in range(3)]
    pngs = [_handmade_png(a, [1, 2, 5 if i == 1 else 3, 4]) for i, a in enumerate(arrays)]
    ds = _png_dataset(tmp_path / "ds", pngs, 1, 4, 4)
    with pytest.raises(DataError, match=r"train-000000\.tar: sample s0001: cannot decode PNG"):
        load_split(ds, "train")
    assert pil_decodes == ["s0001"]
