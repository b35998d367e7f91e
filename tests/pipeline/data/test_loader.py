"""Loader: rank x worker split (each sample once), corrupt/truncated shards, in-memory reads."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import struct
import tarfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from pipeline.config import parse_config
from pipeline.data import dataset_info, iter_samples, load_split, make_loader, shard_paths
from pipeline.data.shards import encode_png
from pipeline.data.sources import DataError
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


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("many"), shard_size=30)  # 7 train shards (last short)


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory):
    return _make(tmp_path_factory.mktemp("few"), shard_size=90)  # 3 train shards < 4 consumers


def _epoch_keys(ds_dir, num_workers: int, world: int, mode: str = "auto") -> list[Counter]:
    per_rank = []
    for rank in range(world):
        loader = make_loader(
            ds_dir,
            "train",
            batch_size=16,
            rank=rank,
            world_size=world,
            num_workers=num_workers,
            mode=mode,
            with_keys=True,
        )
        per_rank.append(Counter(k for _, _, keys in loader for k in keys))
    return per_rank


@pytest.mark.parametrize("fixture", ["many_shards", "few_shards"])
def test_each_sample_once_two_ranks_two_workers(fixture, request):
    ds_dir = request.getfixturevalue(fixture)
    all_keys = load_split(ds_dir, "train")[2]
    per_rank = _epoch_keys(ds_dir, num_workers=2, world=2)
    total = sum(per_rank, Counter())
    assert sorted(total) == sorted(all_keys)
    assert set(total.values()) == {1}
    assert all(sum(c.values()) > 0 for c in per_rank)


def test_sample_mode_balances_ranks(many_shards):
    per_rank = _epoch_keys(many_shards, num_workers=0, world=3, mode="sample")
    sizes = [sum(c.values()) for c in per_rank]
    assert sum(sizes) == 200 and max(sizes) - min(sizes) <= 1
    assert set(sum(per_rank, Counter()).values()) == {1}


def test_streamed_samples_equal_load_split(few_shards):
    images, labels, keys = load_split(few_shards, "train")
    got = {k: (x, y) for x, y, k in iter_samples(shard_paths(few_shards, "train"), with_keys=True)}
    assert len(got) == len(keys)
    for i in (0, 57, len(keys) - 1):
        x, y = got[keys[i]]
        assert x.dtype == torch.uint8 and x.shape == (1, 8, 8)
        assert torch.equal(x, images[i]) and y == labels[i].item()


def test_shuffle_is_a_seeded_permutation(many_shards):
    ds = iter_samples(shard_paths(many_shards, "train"), shuffle=True, seed=3, with_keys=True)
    a = [k for _, _, k in ds]
    b = [k for _, _, k in ds]
    ds.set_epoch(1)
    c = [k for _, _, k in ds]
    assert (
        a == b and a != c and sorted(a) == sorted(c) == sorted(load_split(many_shards, "train")[2])
    )


def test_loader_batches_decoded_images(few_shards):
    x, y = next(iter(make_loader(few_shards, "test", batch_size=10)))
    assert x.shape == (10, 1, 8, 8) and x.dtype == torch.uint8 and y.shape == (10,)


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


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_names_the_file(few_shards, tmp_path):
    ds = _copy(few_shards, tmp_path / "ds")
    shard = ds / "train-000001.tar"
    data = shard.read_bytes()
    for cut in (len(data) // 2, 512 * 6):  # mid-member, and exactly at a member boundary
        shard.write_bytes(data[:cut])
        with pytest.raises(DataError, match=r"train-000001\.tar: truncated shard") as ei:
            load_split(ds, "train")
        assert "\n" not in str(ei.value)
        with pytest.raises(DataError, match=r"train-000001\.tar: truncated shard"):
            list(iter_samples([str(shard)]))


def test_corrupt_shard_names_the_file(few_shards, tmp_path):
    ds = _copy(few_shards, tmp_path / "ds")
    shard = ds / "train-000002.tar"
    data = bytearray(shard.read_bytes())
    data[512 * 2 + 300 : 512 * 2 + 310] = b"garbage!!!"  # inside the 2nd header
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"train-000002\.tar: corrupt shard"):
        load_split(ds, "train")
    # a damaged PNG payload: the error names the shard and the sample
    data = bytearray((few_shards / "train-000002.tar").read_bytes())
    data[512 + 45 : 512 + 60] = bytes(15)
    shard.write_bytes(bytes(data))
    # the shard's recorded sha256 catches it first
    with pytest.raises(DataError, match=r"train-000002\.tar: sha256 .* differs from dataset"):
        load_split(ds, "train")
    info = json.loads((ds / "dataset.json").read_text())
    info["shard_sha256"].pop("train-000002.tar")
    (ds / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match=r"train-000002\.tar: sample \w+: cannot decode PNG"):
        load_split(ds, "train")
    with pytest.raises(DataError, match=r"train-000002\.tar: sample \w+: cannot decode PNG"):
        list(iter_samples([str(shard)]))


def _edit_info(ds, edit) -> None:
    info = json.loads((ds / "dataset.json").read_text())
    edit(info)
    (ds / "dataset.json").write_text(json.dumps(info))


def test_load_split_checks_counts_keys_and_labels(few_shards, tmp_path):
    with pytest.raises(DataError, match=r"load_split\(train\): key 'k' requested twice"):
        load_split(few_shards, "train", keys=["k", "k"])
    ds = _copy(few_shards, tmp_path / "ds")
    _edit_info(ds, lambda i: (i["counts"].update(train=199), i.pop("shard_counts")))
    with pytest.raises(DataError, match=r"more samples than dataset.json counts for train \(199\)"):
        load_split(ds, "train")
    _edit_info(ds, lambda i: i["counts"].update(train=201))
    with pytest.raises(DataError, match="200 samples in shards, dataset.json says 201"):
        load_split(ds, "train")
    _edit_info(ds, lambda i: (i["counts"].update(train=200), i.update(classes=i["classes"][:1])))
    with pytest.raises(DataError, match=r"sample \w+: label [1-9] outside \[0, 1\) of dataset"):
        load_split(ds, "train")


def test_missing_shard_and_unfinished_folder(few_shards, tmp_path):
    ds = _copy(few_shards, tmp_path / "ds")
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


def _tar_bytes(members: list[tuple[str, bytes]], fmt: int, dirs: tuple[str, ...] = ()) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tar_reader_reads_every_layout_as_tarfile_does(tmp_path, fmt):
    """The stream's own ustar parser hands over to tarfile at the first header it does not take
    (a long name, a pax header): every layout gives tarfile's members, in order, and the same
    end-of-archive offset."""
    import io
    import random
    import tarfile

    from pipeline.data.tarstream import _iter_raw, _members, _Tap

    rnd = random.Random(0)
    long_dir = "d" * 120  # > 100 characters: a prefix (ustar), an 'L' member (gnu), pax
    members = []
    for i in range(6):
        key = f"{long_dir}/s{i}" if i == 3 else f"s{i}"
        size = 200_000 if i == 1 else rnd.randrange(1, 3000)  # one body spans several reads
        members += [(f"{key}.jpg", rnd.randbytes(size)), (f"{key}.cls", str(i % 3).encode())]
    form = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
    data = _tar_bytes(members, form[fmt], dirs=("top/",))
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        want = [(m.name, tf.extractfile(m).read()) for m in tf if m.isfile()]
        want_end = tf.offset
    assert [n for n, _ in want] == [n for n, _ in members]

    gen, got = _members(_Tap(io.BytesIO(data)), "t.tar"), []
    while True:
        try:
            name, body = next(gen)
        except StopIteration as stop:
            end = stop.value
            break
        got.append((name, body()))
    assert got == want
    assert end == want_end

    path = tmp_path / "t.tar"
    path.write_bytes(data)
    samples = [(k, p) for _, k, p in _iter_raw(str(path))]
    assert [k for k, _ in samples] == [n.rsplit(".", 1)[0] for n, _ in members[::2]]
    assert all(p["jpg"] == dict(members)[f"{k}.jpg"] for k, p in samples)


def test_tar_reader_names_a_bad_header_after_the_first_by_its_offset(tmp_path):
    import io
    import tarfile

    from pipeline.data.tarstream import _iter_raw

    members = [(f"s{i}.{e}", bytes([i]) * 700 if e == "png" else b"1") for i in range(4)
               for e in ("png", "cls")]  # fmt: skip
    data = bytearray(_tar_bytes(members, tarfile.USTAR_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        third = [m.offset for m in tf][4]  # the header of s2.png
    data[third + 148 : third + 156] = b"0000000\0"  # its checksum
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=rf"bad\.tar: corrupt shard \(bad tar header at byte {third}\)"
    ):
        list(_iter_raw(str(tmp_path / "bad.tar")))


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
    (root / "train-000000.tar").write_bytes(_tar_bytes(members, tarfile.USTAR_FORMAT))
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
