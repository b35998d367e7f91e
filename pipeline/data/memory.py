"""Reading a dataset folder in memory: :func:`load_split` (a split decoded into one uint8
batch, through the stream's tar reader, verified as on the stream, with one small PNG reader for
this package's PNG shards) and the labelled subsets (:func:`load_subset`).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from pipeline.data import store
from pipeline.data.decode import TensorDecoder
from pipeline.data.folder import ShardRef, _where, dataset_info, shard_refs
from pipeline.data.shards import DATASET_JSON, format_fraction
from pipeline.data.sources import DataError
from pipeline.data.tarstream import _checked_label, _image, _iter_raw

__all__ = ["load_split", "load_subset"]


def _memory_samples(ref: ShardRef) -> Iterator[tuple[str, dict[str, bytes]]]:
    """The usable samples of one shard for the in-memory path (verified as on the stream)."""
    for _, key, parts in _iter_raw(ref):
        assert parts is not None
        yield key, parts


_PNG_CHANNELS = {1: 0, 3: 2}  # channels -> PNG colour type (grey, RGB)
_PNG_FILTERS = bytes(range(5))  # None, Sub, Up, Average, Paeth (PNG spec, section 9)


def _unfilter_sub(cur: np.ndarray, up: np.ndarray, bpp: int) -> np.ndarray:
    """Sub: each byte plus the reconstructed byte ``bpp`` to its left, i.e. a running sum
    (mod 256) along the row per byte of the pixel."""
    k, length = cur.shape
    return np.cumsum(cur.reshape(k, length // bpp, bpp), axis=1, dtype=np.uint8).reshape(k, -1)


def _unfilter_up(cur: np.ndarray, up: np.ndarray, bpp: int) -> np.ndarray:
    """Up: each byte plus the byte above it (mod 256)."""
    return cur + up


def _unfilter_average(cur: np.ndarray, up: np.ndarray, bpp: int) -> np.ndarray:
    """Average: each byte plus the floor of the mean of the reconstructed byte to its left and
    the byte above; sequential along the row, one pixel (``bpp`` bytes) of every row at a time.
    The rows are handled transposed (``length x k``) so that one pixel is contiguous."""
    x = np.ascontiguousarray(cur.T, dtype=np.int16)
    b = np.ascontiguousarray(up.T, dtype=np.int16)
    out = np.empty(x.shape, dtype=np.uint8)
    a = np.zeros((bpp, x.shape[1]), dtype=np.int16)
    for i in range(0, x.shape[0], bpp):
        s = slice(i, i + bpp)
        a = (x[s] + ((a + b[s]) >> 1)) & 255
        out[s] = a
    return out.T


def _unfilter_paeth(cur: np.ndarray, up: np.ndarray, bpp: int) -> np.ndarray:
    """Paeth: each byte plus whichever of left (a), above (b), upper left (c) is nearest to
    ``a + b - c`` (ties: a, then b); sequential along the row like Average. ``|p - a|`` is
    ``|b - c|``, known for the whole row before the loop."""
    x = np.ascontiguousarray(cur.T, dtype=np.int16)
    b = np.ascontiguousarray(up.T, dtype=np.int16)
    c = np.zeros_like(b)
    c[bpp:] = b[:-bpp]
    bc = b - c
    pa = np.abs(bc)
    out = np.empty(x.shape, dtype=np.uint8)
    a = np.zeros((bpp, x.shape[1]), dtype=np.int16)
    for i in range(0, x.shape[0], bpp):
        s = slice(i, i + bpp)
        ac = a - c[s]
        pb, pc = np.abs(ac), np.abs(ac + bc[s])
        pred = np.where((pa[s] <= pb) & (pa[s] <= pc), a, np.where(pb <= pc, b[s], c[s]))
        a = (x[s] + pred) & 255
        out[s] = a
    return out.T


_UNFILTER = {1: _unfilter_sub, 2: _unfilter_up, 3: _unfilter_average, 4: _unfilter_paeth}


def _unfilter(rows: np.ndarray, bpp: int) -> None:
    """Undo the PNG row filters of ``rows`` in place: ``H x N x (1 + W * bpp)`` uint8 (row ``r``
    of image ``i`` at ``rows[r, i]``: a filter type 0..4, then its filtered bytes). Row ``r`` is
    reconstructed for all N images at once: per filter type present at that row, for the images
    using it, from row ``r - 1`` (already reconstructed; zeros above row 0). The filter bytes
    are left as they are."""
    h, n, _ = rows.shape
    for r in range(h):
        row = rows[r]
        types = row[:, 0]
        present = np.bincount(types, minlength=5)
        for f in np.flatnonzero(present[1:]) + 1:
            sel: slice | np.ndarray = slice(None) if present[f] == n else np.flatnonzero(types == f)
            cur = row[sel, 1:]
            up = rows[r - 1][sel, 1:] if r else np.zeros_like(cur)
            row[sel, 1:] = _UNFILTER[int(f)](cur, up, bpp)


class _MemorySplit:
    """A split being read into memory, per slot: the image as filtered PNG rows (a filter type,
    then ``W x C`` bytes each; row ``r`` of slot ``i`` at ``rows[r, i]``, so that one row of all
    images is one block), its label and key; images the PNG fast path does not take wait in
    ``pending`` for PIL."""

    def __init__(self, n: int, c: int, h: int, w: int) -> None:
        self.c, self.h, self.w = c, h, w
        self.stride = 1 + w * c
        self.rows = np.zeros((h, n, self.stride), dtype=np.uint8)
        self.labels = np.empty(n, dtype=np.int64)
        self.keys: list[str] = [""] * n
        self.pending: dict[int, tuple[ShardRef, str, bytes]] = {}  # slot -> PIL decodes it
        self.ihdr = b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, _PNG_CHANNELS[c], 0, 0, 0)

    def images(self) -> torch.Tensor:
        """The uint8 ``N x C x H x W`` batch: the rows with their filters undone
        (:func:`_unfilter`, in place) and without their filter bytes, then PIL's decodes
        (resized to ``H x W``) of the pending images (whose rows are zeros, filter type 0)."""
        n, c, h, w = len(self.keys), self.c, self.h, self.w
        _unfilter(self.rows, c)
        images = torch.from_numpy(
            np.ascontiguousarray(self.rows[:, :, 1:].reshape(h, n, w, c).transpose(1, 3, 0, 2))
        )
        decoder = TensorDecoder(c, size=(h, w))
        for slot, (ref, key, img) in self.pending.items():
            images[slot] = decoder(img, f"{ref.url}: sample {key}")
        return images


def _png_rows(img: bytes, ihdr: bytes, raw_len: int, stride: int) -> bytes | None:
    """The inflated, still filtered rows of ``img`` when it is a PNG with the IHDR ``ihdr``
    (size, 8 bits, colour type, no interlace), one IDAT chunk right after it and a PNG filter
    type (0..4) at the start of every row; else None."""
    if img[12:29] != ihdr or img[37:41] != b"IDAT":
        return None
    m = int.from_bytes(img[33:37], "big")
    if img[49 + m : 53 + m] != b"IEND":
        return None
    try:
        raw = zlib.decompress(img[41 : 41 + m])
    except zlib.error:
        return None
    if len(raw) != raw_len or raw[::stride].translate(None, _PNG_FILTERS):
        return None
    return raw


def _key_slots(split: str, keys: Sequence[str] | None) -> dict[str, int] | None:
    """Each requested key's slot (its place in ``keys``); None without ``keys``."""
    if keys is None:
        return None
    want: dict[str, int] = {}
    for i, k in enumerate(keys):
        if k in want:
            raise DataError(f"load_split({split}): key {k!r} requested twice")
        want[k] = i
    return want


def _fill(
    out: _MemorySplit,
    refs: Sequence[ShardRef],
    split: str,
    want: dict[str, int] | None,
    n_classes: int,
) -> tuple[int, int]:
    """Read the samples of ``refs`` into ``out``: in shard order, or (``want``) into their key's
    slot, passing the others over. Returns ``(slots filled, samples read)``."""
    n, h, stride, ihdr = len(out.keys), out.h, out.stride, out.ihdr
    rows, labels, out_keys, pending = out.rows, out.labels, out.keys, out.pending
    raw_len = h * stride
    filled = total = 0
    for ref in refs:
        for key, parts in _memory_samples(ref):
            total += 1
            if want is None:
                slot = filled
                if slot >= n:
                    raise DataError(
                        f"{ref.url}: more samples than dataset.json counts for {split} ({n})"
                    )
            else:
                got = want.get(key)
                if got is None:
                    continue
                slot = got
            label = _checked_label(ref, key, parts, n_classes)
            img = _image(ref, key, parts)
            raw = _png_rows(img, ihdr, raw_len, stride)
            if raw is not None:
                rows[:, slot] = np.frombuffer(raw, dtype=np.uint8).reshape(h, stride)
            else:
                pending[slot] = (ref, key, img)
            labels[slot] = label
            out_keys[slot] = key
            filled += 1
    return filled, total


def _check_complete(
    dataset_dir: Any,
    split: str,
    want: dict[str, int] | None,
    out: _MemorySplit,
    read: tuple[int, int],
) -> None:
    """DataError unless the split held ``dataset.json``'s count of samples (or every requested
    key), ``read`` being :func:`_fill`'s ``(filled, total)``."""
    filled, total = read
    n = len(out.keys)
    if want is None and total != n:
        raise DataError(
            f"split {split} of {dataset_dir}: {total} samples in shards, dataset.json says {n}"
        )
    if want is not None and filled != n:
        missing = next(k for k in want if not out.keys[want[k]])
        raise DataError(
            f"load_split({split}): key {missing!r} is not in {dataset_dir} ({n - filled} missing)"
        )


def load_split(
    dataset_dir: Any, split: str, keys: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All of ``split`` decoded into memory: ``(uint8 N x C x H x W, int64 N, keys)`` in shard order.

    With ``keys``, only those samples, in the order given (an unknown key is an error). Images
    whose size differs from the dataset's nominal ``height`` x ``width`` are resized to it
    (bilinear). Shards are verified as on the streaming path.

    Shards are read by the same tar reader as the stream (:mod:`pipeline.data.tarstream`). One
    small PNG reader stays here, for speed (``benchmarks/read_formats.py``: on this package's
    28 px PNG shards PIL's decode takes about 3 times as long, and every stage loads its splits):
    a grey or RGB PNG of the dataset's exact size, 8 bits, not interlaced, its pixels in one IDAT
    chunk (what the shard stage writes for decoded arrays) is inflated with one
    ``zlib.decompress`` straight into the batch, and its row filters (None, Sub, Up, Average,
    Paeth; PIL picks one per row) are undone in numpy, one row of all such images at a time
    (:func:`_unfilter`); every other image (JPEG, WebP, other PNGs) goes through PIL.
    """
    info = dataset_info(dataset_dir)
    refs = shard_refs(dataset_dir, split)
    c, h, w = int(info["channels"]), int(info["height"]), int(info["width"])
    if c not in (1, 3):
        raise DataError(f"{_where(dataset_dir, DATASET_JSON)}: channels {c} not in (1, 3)")
    want = _key_slots(split, keys)
    n = int(info["counts"].get(split, 0)) if want is None else len(want)
    out = _MemorySplit(n, c, h, w)
    read = _fill(out, refs, split, want, len(info["classes"]))
    _check_complete(dataset_dir, split, want, out, read)
    return out.images(), torch.from_numpy(out.labels), out.keys


def load_subset(dataset_dir: Any, fraction: float) -> tuple[list[str], torch.Tensor]:
    """The labelled subset of ``fraction`` percent: ``(keys, int64 labels)`` (train-split keys)."""
    import pyarrow.parquet as pq

    location = _where(dataset_dir, f"subsets/label_{format_fraction(fraction)}.parquet")
    fs, path = store.resolve(location)
    if not store.exists(location):
        try:
            folder = _where(dataset_dir, "subsets")
            import pyarrow.fs as pafs

            sfs, spath = store.resolve(folder)
            names = [
                i.base_name
                for i in sfs.get_file_info(pafs.FileSelector(spath, allow_not_found=True))
            ]
        except Exception:  # noqa: BLE001 - only for the message
            names = []
        avail = sorted(
            n.removeprefix("label_").removesuffix(".parquet")
            for n in names
            if n.startswith("label_") and n.endswith(".parquet")
        )
        raise DataError(
            f"{location}: no such label subset (available: {', '.join(avail) or 'none'})"
        )
    try:
        table = pq.read_table(path, columns=["key", "label"], filesystem=fs)
    except Exception as err:  # noqa: BLE001 - any parquet failure is a bad file
        raise DataError(f"{location}: unreadable subset ({type(err).__name__}: {err})") from None
    keys = [str(k) for k in table.column("key").to_pylist()]
    labels = torch.tensor(table.column("label").to_pylist(), dtype=torch.int64)
    return keys, labels
