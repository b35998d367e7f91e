"""Reading a sharded dataset: streaming (``iter_samples`` / ``make_loader``) and in memory
(``load_split``, the path training uses), plus the labelled subsets.

The tar reader is a small streaming parser (512-byte headers, GNU long names and PAX paths
understood) instead of ``webdataset``/``tarfile``: it is several times faster on tiny members, it can
skip the bytes of samples another reader owns, and every failure becomes a :class:`DataError`
naming the shard file (a missing end-of-archive marker counts as truncation, so a shard cut at a
member boundary is not read as a shorter dataset).

Work split. ``ShardDataset`` spreads samples over ``world_size`` ranks x DataLoader workers
(``C`` consumers; consumer ``c = rank * workers + worker``). ``mode="shard"`` gives consumer ``c``
the shards ``c, c+C, ...``; ``mode="sample"`` makes every consumer walk all shards and keep the
samples whose running index ``i`` has ``i % C == c`` (skipping the others' bytes, not decoding
them): balanced to +-1 sample, and correct when there are fewer shards than consumers.
``mode="auto"`` (default) uses ``shard`` when there are at least ``C`` shards, else ``sample``.
Either way one epoch yields every sample exactly once across all consumers.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.shards import DATASET_JSON, SPLITS, subset_path
from pipeline.data.sources import DataError

__all__ = [
    "ShardDataset",
    "dataset_info",
    "decode_png",
    "iter_samples",
    "load_split",
    "load_subset",
    "make_loader",
    "read_shard",
    "shard_paths",
]

_BLOCK = 512
_ZERO = bytes(_BLOCK)


# --------------------------------------------------------------------------------------------
# dataset folder
# --------------------------------------------------------------------------------------------


def dataset_info(dataset_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The content of ``<dataset_dir>/dataset.json`` (written last by the shard stage)."""
    path = Path(dataset_dir) / DATASET_JSON
    if not path.is_file():
        raise DataError(
            f"{path}: missing; the folder is not a finished dataset (run the shard stage)"
        )
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    for field in ("classes", "channels", "height", "width", "counts", "shards"):
        if field not in info:
            raise DataError(f"{path}: no field {field!r}")
    return info


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def shard_paths(dataset_dir: str | os.PathLike[str], split: str) -> list[str]:
    """The shard files of ``split``, in order (from ``dataset.json``; each must exist)."""
    _check_split(split)
    info = dataset_info(dataset_dir)
    paths = [str(Path(dataset_dir) / name) for name in info["shards"].get(split, [])]
    for p in paths:
        if not os.path.isfile(p):
            raise DataError(f"{p}: shard listed in dataset.json is missing")
    return paths


# --------------------------------------------------------------------------------------------
# tar parsing
# --------------------------------------------------------------------------------------------


def _octal(field: bytes, path: str, offset: int) -> int:
    s = field.rstrip(b"\0 ").lstrip(b" ")
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise DataError(f"{path}: corrupt shard (bad tar header at byte {offset})") from None


def _read_exact(f: io.BufferedReader, n: int, path: str, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise DataError(f"{path}: truncated shard (ends inside {what})")
    return data


def _iter_raw(
    path: str, select: Callable[[int], bool] | None = None
) -> Iterator[tuple[int, str, dict[str, bytes] | None]]:
    """Yield ``(index, key, {ext: bytes})`` per sample of a shard; ``None`` instead of the dict for
    samples ``select(index)`` rejects (their bytes are skipped, not read)."""
    try:
        f = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed in finally
    except OSError as err:
        raise DataError(f"{path}: cannot open shard ({err.strerror or err})") from None
    try:
        index = -1
        key: str | None = None
        parts: dict[str, bytes] | None = None
        long_name: str | None = None
        offset = 0
        while True:
            hdr = f.read(_BLOCK)
            if len(hdr) == 0:
                raise DataError(f"{path}: truncated shard (no end-of-archive marker)")
            if len(hdr) < _BLOCK:
                raise DataError(f"{path}: truncated shard (ends inside a tar header)")
            if hdr == _ZERO:
                break
            if hdr[257:262] != b"ustar":
                raise DataError(f"{path}: corrupt shard (bad tar header at byte {offset})")
            if _octal(hdr[148:156], path, offset) != sum(hdr) - sum(hdr[148:156]) + 256:
                raise DataError(f"{path}: corrupt shard (tar header checksum at byte {offset})")
            size = _octal(hdr[124:136], path, offset)
            typ = hdr[156:157]
            padded = (size + _BLOCK - 1) // _BLOCK * _BLOCK
            offset += _BLOCK + padded
            if typ in (b"L", b"x"):
                meta = _read_exact(f, padded, path, "a tar header")[:size]
                if typ == b"L":
                    long_name = meta.rstrip(b"\0").decode("utf-8", "replace")
                else:
                    for line in meta.decode("utf-8", "replace").splitlines():
                        _, _, kv = line.partition(" ")
                        if kv.startswith("path="):
                            long_name = kv[5:]
                continue
            if typ not in (b"0", b"\0"):
                if padded:
                    f.seek(padded, 1)
                long_name = None
                continue
            if long_name is not None:
                name, long_name = long_name, None
            else:
                name = hdr[:100].rstrip(b"\0").decode("utf-8", "replace")
                prefix = hdr[345:500].rstrip(b"\0")
                if prefix and hdr[257:263] == b"ustar\0":
                    name = prefix.decode("utf-8", "replace") + "/" + name
            base = name.rsplit("/", 1)[-1]
            k, dot, ext = base.partition(".")
            if not dot:
                raise DataError(f"{path}: member {name!r} has no extension")
            if k != key:
                if key is not None:
                    yield index, key, parts
                index += 1
                key = k
                parts = {} if select is None or select(index) else None
            if parts is None:
                if padded:
                    f.seek(padded, 1)
            else:
                parts[ext] = _read_exact(f, padded, path, f"member {name!r}")[:size]
        if key is not None:
            yield index, key, parts
    finally:
        f.close()


_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}


def _fast_png(data: bytes) -> np.ndarray | None:
    """Decode the PNGs :func:`pipeline.data.shards.encode_png` writes (8-bit, no interlace, filter
    0 on every row) with one ``zlib.decompress``; ``None`` for anything else (PIL then decodes)."""
    if data[:8] != _PNG_SIG or data[12:16] != b"IHDR" or len(data) < 33:
        return None
    w, h, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    c = _PNG_CHANNELS.get(ctype)
    if depth != 8 or c is None or interlace:
        return None
    pos, end, idat = 33, len(data), []
    while True:
        if pos + 12 > end:
            return None
        n = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat.append(data[pos + 8 : pos + 8 + n])
        elif kind == b"IEND":
            break
        pos += 12 + n
    try:
        raw = zlib.decompress(idat[0] if len(idat) == 1 else b"".join(idat))
    except zlib.error:
        return None
    stride = 1 + w * c
    if len(raw) != h * stride:
        return None
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(h, stride)
    if rows[:, 0].any():
        return None
    img = rows[:, 1:].reshape(h, w, c)
    return img[..., 0] if c == 1 else img


def decode_png(data: bytes, where: str = "") -> np.ndarray:
    """PNG bytes -> uint8 array ``HxW`` or ``HxWxC`` (maybe read-only); failures name ``where``."""
    img = _fast_png(data)
    if img is not None:
        return img
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode not in ("L", "LA", "RGB", "RGBA"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            return np.asarray(im)
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad sample
        raise DataError(f"{where}: cannot decode PNG ({type(err).__name__}: {err})") from None


def _decode_sample(path: str, key: str, parts: dict[str, bytes]) -> tuple[np.ndarray, int]:
    if "png" not in parts or "cls" not in parts:
        missing = "png" if "png" not in parts else "cls"
        raise DataError(f"{path}: sample {key} has no .{missing} member")
    img = decode_png(parts["png"], f"{path}: sample {key}")
    try:
        label = int(parts["cls"].decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise DataError(f"{path}: sample {key}: .cls is not an integer") from None
    return img, label


def _to_chw(img: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def read_shard(path: str) -> list[tuple[str, np.ndarray, int]]:
    """All samples of one shard as ``(key, uint8 image HxW or HxWxC, label)``."""
    return [
        (key, *_decode_sample(path, key, parts))
        for _, key, parts in _iter_raw(path)
        if parts is not None
    ]


# --------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """Samples ``(image, label)`` from tar shards, split over ranks and DataLoader workers.

    ``image`` is a uint8 tensor ``CxHxW`` (after ``transform``, if given). See the module
    docstring for ``mode``. With ``shuffle`` the shard order is permuted per epoch
    (``set_epoch``) with the same seed on every consumer, and samples pass a shuffle buffer.
    """

    def __init__(
        self,
        shard_paths: Sequence[str | os.PathLike[str]],
        rank: int = 0,
        world_size: int = 1,
        transform: Callable[[torch.Tensor], Any] | None = None,
        mode: Literal["auto", "shard", "sample"] = "auto",
        shuffle: bool = False,
        seed: int = 0,
        buffer_size: int = 1000,
        with_keys: bool = False,
    ) -> None:
        super().__init__()
        if world_size < 1:
            raise DataError(f"world_size: must be >= 1 (got {world_size})")
        if not 0 <= rank < world_size:
            raise DataError(f"rank: must lie in [0, {world_size}) (got {rank})")
        if mode not in ("auto", "shard", "sample"):
            raise DataError(f"mode: expected auto, shard or sample (got {mode!r})")
        if buffer_size < 1:
            raise DataError(f"buffer_size: must be >= 1 (got {buffer_size})")
        self.shard_paths = [str(p) for p in shard_paths]
        self.rank, self.world_size = rank, world_size
        self.transform = transform
        self.mode = mode
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.with_keys = with_keys
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shard order and the shuffle buffer."""
        self.epoch = int(epoch)

    def _consumer(self) -> tuple[int, int]:
        wi = get_worker_info()
        nw, wid = (wi.num_workers, wi.id) if wi is not None else (1, 0)
        return self.rank * nw + wid, self.world_size * nw

    def _samples(self) -> Iterator[tuple[str, np.ndarray, int]]:
        c, n = self._consumer()
        shards = list(self.shard_paths)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        mode = self.mode if self.mode != "auto" else ("shard" if len(shards) >= n else "sample")
        if mode == "shard":
            for path in shards[c::n]:
                for _, key, parts in _iter_raw(path):
                    assert parts is not None
                    yield key, *_decode_sample(path, key, parts)
        else:
            seen = 0
            for path in shards:
                base = seen
                count = 0
                for i, key, parts in _iter_raw(path, lambda i, b=base: (b + i) % n == c):
                    count = i + 1
                    if parts is not None:
                        yield key, *_decode_sample(path, key, parts)
                seen = base + count

    def __iter__(self) -> Iterator[Any]:
        it = self._samples()
        if self.shuffle:
            c, _ = self._consumer()
            it = _buffer_shuffle(
                it, self.buffer_size, np.random.default_rng([self.seed, self.epoch, c, 1])
            )
        for key, img, label in it:
            x = _to_chw(img)
            if self.transform is not None:
                x = self.transform(x)
            yield (x, label, key) if self.with_keys else (x, label)


def _buffer_shuffle(it: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buf: list[Any] = []
    for item in it:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)  # type: ignore[arg-type]
    yield from buf


def iter_samples(
    shard_paths: Sequence[str | os.PathLike[str]],
    rank: int = 0,
    world_size: int = 1,
    transform: Callable[[torch.Tensor], Any] | None = None,
    mode: Literal["auto", "shard", "sample"] = "auto",
    shuffle: bool = False,
    seed: int = 0,
    with_keys: bool = False,
) -> ShardDataset:
    """An :class:`~torch.utils.data.IterableDataset` of ``(uint8 CxHxW tensor, label)`` from the
    shards (``(x, label, key)`` with ``with_keys``); see :class:`ShardDataset`."""
    return ShardDataset(
        shard_paths, rank, world_size, transform, mode, shuffle, seed, with_keys=with_keys
    )


def make_loader(
    dataset_dir: str | os.PathLike[str],
    split: str,
    transform: Callable[[torch.Tensor], Any] | None,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    mode: Literal["auto", "shard", "sample"] = "auto",
    with_keys: bool = False,
) -> DataLoader:
    """A DataLoader over ``split`` of a dataset folder, this rank's share of it."""
    if batch_size < 1:
        raise DataError(f"batch_size: must be >= 1 (got {batch_size})")
    if num_workers < 0:
        raise DataError(f"num_workers: must be >= 0 (got {num_workers})")
    ds = iter_samples(
        shard_paths(dataset_dir, split), rank, world_size, transform, mode, shuffle, seed, with_keys
    )
    return DataLoader(
        ds,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=drop_last,
        persistent_workers=False,
    )


# --------------------------------------------------------------------------------------------
# in memory
# --------------------------------------------------------------------------------------------


class _Unusual(Exception):
    """A member layout the fast scanner does not handle (the streaming parser then reads it)."""


def _scan_fast(path: str) -> list[tuple[str, dict[str, bytes]]]:
    data = Path(path).read_bytes()
    end = len(data)
    pos = 0
    out: list[tuple[str, dict[str, bytes]]] = []
    last_key: str | None = None
    parts: dict[str, bytes] = {}
    headers: list[int] = []
    sums: list[int] = []
    while True:
        if pos + _BLOCK > end:
            raise _Unusual  # truncated: the streaming parser names it precisely
        if data[pos] == 0 and data[pos : pos + _BLOCK] == _ZERO:
            break
        if data[pos + 257 : pos + 262] != b"ustar" or data[pos + 156] not in (48, 0):
            raise _Unusual
        if data[pos + 345] != 0:  # ustar prefix field in use
            raise _Unusual
        size = int(data[pos + 124 : pos + 136].rstrip(b"\0 "), 8)
        headers.append(pos)
        sums.append(int(data[pos + 148 : pos + 156].rstrip(b"\0 "), 8))
        name = data[pos : pos + 100].split(b"\0", 1)[0].decode()
        body = pos + _BLOCK
        pos = body + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if pos > end:
            raise _Unusual
        k, dot, ext = name.rpartition("/")[2].partition(".")
        if not dot:
            raise _Unusual
        if k != last_key:
            if last_key is not None:
                out.append((last_key, parts))
            last_key, parts = k, {}
        parts[ext] = data[body : body + size]
    if last_key is not None:
        out.append((last_key, parts))
    if headers:  # header checksums, all at once
        whole = np.frombuffer(data, dtype=np.uint8, count=end // _BLOCK * _BLOCK)
        blocks = whole.reshape(-1, _BLOCK)[np.asarray(headers, dtype=np.int64) // _BLOCK]
        got = (
            blocks.sum(axis=1, dtype=np.int64)
            - blocks[:, 148:156].sum(axis=1, dtype=np.int64)
            + 256
        )
        if not np.array_equal(got, np.asarray(sums, dtype=np.int64)):
            raise _Unusual
    return out


def _scan_shard(path: str) -> list[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` for every sample of a shard, via a whole-file fast path for plain
    ustar shards and the streaming parser (exact error messages) otherwise."""
    try:
        return _scan_fast(path)
    except (_Unusual, ValueError, UnicodeDecodeError):
        return [(key, parts) for _, key, parts in _iter_raw(path) if parts is not None]
    except OSError as err:
        raise DataError(f"{path}: cannot read shard ({err.strerror or err})") from None


def load_split(
    dataset_dir: str | os.PathLike[str], split: str, keys: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All of ``split`` decoded into memory: ``(uint8 N x C x H x W, int64 N, keys)`` in shard order.

    With ``keys``, only those samples, in the order given (an unknown key is an error). The sample
    count is checked against ``dataset.json``. PNGs written by this package are inflated straight
    into one buffer (one ``zlib.decompress`` each, the filter bytes checked in one vector op); any
    other PNG goes through PIL.
    """
    info = dataset_info(dataset_dir)
    paths = shard_paths(dataset_dir, split)
    c, h, w = int(info["channels"]), int(info["height"]), int(info["width"])
    ctype = {v: k for k, v in _PNG_CHANNELS.items()}.get(c)
    if ctype is None:
        raise DataError(f"{Path(dataset_dir) / DATASET_JSON}: channels {c} not in 1..4")
    ihdr = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, ctype, 0, 0, 0)
    stride = 1 + w * c
    raw_len = h * stride
    want: dict[str, int] | None = None
    if keys is not None:
        want = {}
        for i, k in enumerate(keys):
            if k in want:
                raise DataError(f"load_split({split}): key {k!r} requested twice")
            want[k] = i
    n = int(info["counts"].get(split, 0)) if want is None else len(want)
    raws: list[bytes | None] = [None] * n
    labels = np.empty(n, dtype=np.int64)
    out_keys: list[str] = [""] * n
    where: list[tuple[str, bytes]] = [("", b"")] * n  # (shard, png) to re-decode the odd one out
    filled = total = 0
    decompress = zlib.decompress
    for path in paths:
        for key, parts in _scan_shard(path):
            total += 1
            if want is None:
                slot = filled
                if slot >= n:
                    raise DataError(
                        f"{path}: more samples than dataset.json counts for {split} ({n})"
                    )
            else:
                got = want.get(key)
                if got is None:
                    continue
                slot = got
            png, cls = parts.get("png"), parts.get("cls")
            if png is None or cls is None:
                missing = "png" if png is None else "cls"
                raise DataError(f"{path}: sample {key} has no .{missing} member")
            raw = None
            if png[12:29] == ihdr and png[37:41] == b"IDAT":
                m = int.from_bytes(png[33:37], "big")
                if png[49 + m : 53 + m] == b"IEND":
                    try:
                        raw = decompress(png[41 : 41 + m])
                    except zlib.error:
                        raw = None
            if raw is None or len(raw) != raw_len:
                raw = _as_raw(decode_png(png, f"{path}: sample {key}"), (h, w, c), path, key)
            raws[slot] = raw
            where[slot] = (path, png)
            try:
                labels[slot] = int(cls)
            except ValueError:
                raise DataError(f"{path}: sample {key}: .cls is not an integer") from None
            out_keys[slot] = key
            filled += 1
    if want is None and total != n:
        raise DataError(
            f"split {split} of {dataset_dir}: {total} samples in shards, dataset.json says {n}"
        )
    if want is not None and filled != n:
        missing = next(k for k in want if not out_keys[want[k]])
        raise DataError(
            f"load_split({split}): key {missing!r} is not in {dataset_dir} ({n - filled} missing)"
        )
    rows = np.frombuffer(b"".join(raws), dtype=np.uint8).reshape(n, h, stride)  # type: ignore[arg-type]
    odd = np.flatnonzero(rows[:, :, 0].any(axis=1)) if n else []
    if len(odd):  # rows with PNG filters other than 0: not written here, decode them fully
        rows = rows.copy()
        for i in odd:
            path, png = where[i]
            key = out_keys[i]
            raw = _as_raw(decode_png(png, f"{path}: sample {key}"), (h, w, c), path, key)
            rows[i] = np.frombuffer(raw, dtype=np.uint8).reshape(h, stride)
    images = rows[:, :, 1:].reshape(n, h, w, c)
    t = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return t, torch.from_numpy(labels), out_keys


def _as_raw(img: np.ndarray, hwc: tuple[int, int, int], path: str, key: str) -> bytes:
    """An image as unfiltered PNG scanlines (a zero filter byte per row), shape-checked."""
    h, w, c = hwc
    if img.ndim == 2:
        img = img[..., None]
    if img.shape != (h, w, c):
        raise DataError(
            f"{path}: sample {key}: image shape {tuple(img.shape)} differs from the dataset's "
            f"{(h, w, c)}"
        )
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)
    rows[:, 1:] = img.reshape(h, w * c)
    return rows.tobytes()


def load_subset(
    dataset_dir: str | os.PathLike[str], fraction: float
) -> tuple[list[str], torch.Tensor]:
    """The labelled subset of ``fraction`` percent: ``(keys, int64 labels)`` (train-split keys)."""
    import pyarrow.parquet as pq

    path = subset_path(dataset_dir, fraction)
    if not path.is_file():
        avail = sorted(p.stem.removeprefix("label_") for p in path.parent.glob("label_*.parquet"))
        raise DataError(f"{path}: no such label subset (available: {', '.join(avail) or 'none'})")
    try:
        table = pq.read_table(path, columns=["key", "label"])
    except Exception as err:  # noqa: BLE001 - any parquet failure is a bad file
        raise DataError(f"{path}: unreadable subset ({type(err).__name__}: {err})") from None
    keys = [str(k) for k in table.column("key").to_pylist()]
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.int64)
    return keys, labels
