"""Reading one shard: truncated/corrupt shards named, the ustar reader against ``tarfile`` on
every layout, a bad header after the first named by its offset."""

from __future__ import annotations

import json

import pytest
from _helpers import copy_dataset, tar_bytes

from pipeline.data import iter_samples, load_split
from pipeline.data.sources import DataError


def test_truncated_shard_names_the_file(few_shards, tmp_path):
    ds = copy_dataset(few_shards, tmp_path / "ds")
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
    ds = copy_dataset(few_shards, tmp_path / "ds")
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
    data = tar_bytes(members, form[fmt], dirs=("top/",))
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
    data = bytearray(tar_bytes(members, tarfile.USTAR_FORMAT))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tf:
        third = [m.offset for m in tf][4]  # the header of s2.png
    data[third + 148 : third + 156] = b"0000000\0"  # its checksum
    (tmp_path / "bad.tar").write_bytes(bytes(data))
    with pytest.raises(
        DataError, match=rf"bad\.tar: corrupt shard \(bad tar header at byte {third}\)"
    ):
        list(_iter_raw(str(tmp_path / "bad.tar")))
