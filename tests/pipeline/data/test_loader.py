"""Loader: rank x worker split (each sample once), corrupt/truncated shards, in-memory reads."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch

from pipeline.config import parse_config
from pipeline.data import dataset_info, iter_samples, load_split, make_loader, shard_paths
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

    from pipeline.data.loader import _iter_raw, _members, _Tap

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

    from pipeline.data.loader import _iter_raw

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
