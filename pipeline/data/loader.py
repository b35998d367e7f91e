"""Reading a dataset folder: as a stream (``ShardDataset`` / ``make_loader``, the path for data
that does not fit in memory) and in memory (``load_split``), plus the labelled subsets.

The folder may be a local path or a URI (``s3://``, ``gs://``, ``file://``; see
:mod:`pipeline.data.store`); shard refs in ``dataset.json`` are relative to it or absolute URLs
(external WebDataset shards, ``pipe:`` commands included). Nothing is copied: each shard is read
once, front to back, as a stream (plain ustar headers parsed here, anything else through
``tarfile``: :func:`_members`; a gzip, bzip2 or xz compressed shard through its decompressor, as
``tarfile`` and webdataset read them), in webdataset's member convention (``<key>.<ext>``,
consecutive members with one key form a sample; the image is the first present of
``format.image_keys``, the label ``format.label_key``: ``cls`` or ``json:<field>``).

Verified while reading. A shard is hashed as its bytes pass and, once read to its end, compared
with ``dataset.json``'s ``shard_sha256`` (when recorded); its sample count with ``shard_counts``
(or the manifest); a missing end-of-archive marker, a corrupt header or a member cut short is a
truncated/corrupt shard; a label outside ``[0, len(classes))`` is an error. Each is one
:class:`DataError` naming the shard (and the sample). Samples the shard stage listed as skipped
in ``skipped.json`` (a corrupt image, a non-integer label in an external shard) are skipped again.
A pass that stops inside a shard (the epoch's step count reached) has not verified that shard's
hash.

Work split. ``ShardDataset`` spreads samples over ``world_size`` ranks x DataLoader workers
(``C`` consumers; consumer ``c = rank * workers + worker``). ``mode="shard"`` gives consumer ``c``
the shards ``c, c+C, ...`` of the epoch's shard order; ``mode="sample"`` makes every consumer walk
all shards and keep the samples whose running index ``i`` has ``i % C == c`` (skipping the others'
bytes, not decoding them): balanced to +-1 sample, and correct when there are fewer shards than
consumers. ``mode="auto"`` (default) uses ``shard`` when there are at least ``C`` shards and, with
``min_per_rank``, the shard counts give every rank at least that many samples this epoch; else
``sample``. Either way one epoch yields every sample exactly once across all consumers.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import json
import lzma
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, NoReturn, TypedDict, cast

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data import store
from pipeline.data.decode import TensorDecoder
from pipeline.data.shards import DATASET_JSON, MANIFEST, SPLITS, format_fraction, is_val_key
from pipeline.data.sources import DataError

__all__ = [
    "DEFAULT_IMAGE_KEYS",
    "DatasetInfo",
    "ShardDataset",
    "ShardRef",
    "dataset_info",
    "decoded_bytes",
    "iter_samples",
    "load_split",
    "load_subset",
    "make_loader",
    "read_shard",
    "shard_paths",
    "shard_refs",
]

DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_TAIL = 1 << 16
_CHUNK = 1 << 16  # the fast tar reader's read size (at most _TAIL: see _Tap.block_at)
_BLOCK = 512
_ZERO = bytes(_BLOCK)


# --------------------------------------------------------------------------------------------
# dataset folder
# --------------------------------------------------------------------------------------------


class _InfoRequired(TypedDict):
    classes: list[str]
    channels: int
    height: int
    width: int
    counts: dict[str, int]  # samples per split
    shards: dict[str, list[str]]  # shard refs per split


class DatasetInfo(_InfoRequired, total=False):
    """``dataset.json``: what the shard stage records about a dataset folder
    (:func:`pipeline.data.shards.finish_dataset` writes it; :func:`dataset_info` reads it and checks
    that the required fields are there)."""

    name: str
    digest: str
    num_classes: int
    fixed_size: bool  # every image is height x width
    max_side: int | None
    decoded_bytes: dict[str, int]  # per split, what the in-memory path holds
    shard_counts: dict[str, int]  # samples per shard ref
    shard_sha256: dict[str, str]
    shard_size: int | None
    fractions: dict[str, Any]  # val, labels
    val_from_train: dict[str, Any] | None  # fraction: val carved out of train shards
    skipped_keys: dict[str, list[str]]  # per shard ref
    subsets: dict[str, dict[str, Any]]  # label subsets per fraction
    skipped: int
    seed: int
    format: dict[str, Any]  # image_keys, label_key
    source_info: dict[str, Any]
    external: bool


def _where(dataset_dir: Any, name: str) -> str:
    return store.join(str(dataset_dir), name)


@lru_cache(maxsize=16)
def _info_cached(location: str, mtime_key: Any) -> DatasetInfo:
    try:
        raw = store.read_bytes(location)
    except DataError:
        raise DataError(
            f"{location}: missing; the folder is not a finished dataset (run the shard stage)"
        ) from None
    try:
        info = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{location}: unreadable ({err})") from None
    if not isinstance(info, dict):
        raise DataError(f"{location}: not a JSON object")
    for fld in ("classes", "channels", "height", "width", "counts", "shards"):
        if fld not in info:
            raise DataError(f"{location}: no field {fld!r}")
    return cast(DatasetInfo, info)


def dataset_info(dataset_dir: Any) -> DatasetInfo:
    """The content of ``<dataset_dir>/dataset.json`` (written last by the shard stage)."""
    location = _where(dataset_dir, DATASET_JSON)
    stamp: Any = None
    if not store.is_uri(location):
        import os

        try:
            st = os.stat(location)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            raise DataError(
                f"{location}: missing; the folder is not a finished dataset (run the shard stage)"
            ) from None
    # remote: read once per process (a finished dataset folder is not rewritten in place)
    return _info_cached(location, stamp).copy()


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split {split!r}: expected one of {', '.join(SPLITS)}")


def decoded_bytes(info: Mapping[str, Any], split: str | None = None) -> int:
    """Bytes the in-memory path holds for ``split`` (all splits when None): ``dataset.json``'s
    ``decoded_bytes`` when recorded, else ``count x channels x height x width``."""
    splits = [split] if split is not None else list(SPLITS)
    recorded = info.get("decoded_bytes") or {}
    per = int(info["channels"]) * int(info["height"]) * int(info["width"])
    return sum(
        int(recorded[s]) if s in recorded else int(info["counts"].get(s, 0)) * per for s in splits
    )


@dataclass(frozen=True)
class ShardRef:
    """One shard: its ref in ``dataset.json``, the URL it is read from, and what it must hold."""

    ref: str
    url: str
    count: int | None = None
    sha256: str | None = None
    skip: frozenset[str] = field(default_factory=frozenset)
    image_keys: tuple[str, ...] = DEFAULT_IMAGE_KEYS
    label_key: str = "cls"
    #: val carved out of train shards (``val_from_train``): keep the samples whose key is val
    #: (``want_val``) or not; ``count`` then covers both
    val_fraction: float | None = None
    want_val: bool = False

    def takes(self, key: str) -> bool:
        """Whether a usable sample belongs to this split."""
        if key in self.skip:
            return False
        if self.val_fraction is None:
            return True
        return is_val_key(key, self.val_fraction) == self.want_val

    def __str__(self) -> str:
        return self.url


def _manifest_counts(dataset_dir: Any) -> dict[str, int]:
    info = dataset_info(dataset_dir)
    return _manifest_counts_cached(_where(dataset_dir, MANIFEST), str(info.get("digest")))


@lru_cache(maxsize=8)
def _manifest_counts_cached(location: str, digest: str) -> dict[str, int]:
    import pyarrow.parquet as pq

    try:
        fs, path = store.resolve(location)
        table = pq.read_table(path, columns=["shard"], filesystem=fs)
    except Exception:  # noqa: BLE001 - no manifest: counts unknown, the end marker still checked
        return {}
    out: dict[str, int] = {}
    for name in table.column("shard").to_pylist():
        out[str(name)] = out.get(str(name), 0) + 1
    return out


def _skipped(info: DatasetInfo) -> dict[str, set[str]]:
    """``dataset.json``'s ``skipped_keys``: per shard ref, the samples readers leave out."""
    raw = info.get("skipped_keys") or {}
    return {str(k): {str(x) for x in v} for k, v in raw.items()} if isinstance(raw, dict) else {}


def shard_refs(dataset_dir: Any, split: str) -> list[ShardRef]:
    """The shards of ``split`` in order, with what each must hold (from ``dataset.json``)."""
    _check_split(split)
    info = dataset_info(dataset_dir)
    refs = [str(r) for r in info["shards"].get(split, [])]
    counts = info.get("shard_counts") or {}
    shas = info.get("shard_sha256") or {}
    fmt = info.get("format") or {}
    image_keys = tuple(fmt.get("image_keys") or DEFAULT_IMAGE_KEYS)
    label_key = str(fmt.get("label_key") or "cls")
    if refs and not all(r in counts for r in refs):
        manifest = _manifest_counts(dataset_dir)
        counts = {**manifest, **counts}
    skipped = _skipped(info)
    carve = info.get("val_from_train") or None
    val_fraction = None
    if carve and split in ("train", "val"):
        val_fraction = float(carve["fraction"])
    out = []
    for r in refs:
        url = store.join(str(dataset_dir), r)
        skip = frozenset(skipped.get(r, set()) | skipped.get(url, set()))
        out.append(
            ShardRef(
                r,
                url,
                int(counts[r]) if r in counts else None,
                shas.get(r),
                skip,
                image_keys,
                label_key,
                val_fraction,
                split == "val",
            )
        )
    return out


def shard_paths(dataset_dir: Any, split: str) -> list[str]:
    """The shard URLs of ``split``, in order (a listed local shard that is missing is an error)."""
    refs = shard_refs(dataset_dir, split)
    for s in refs:
        if not store.is_uri(s.url) and not store.exists(s.url):
            raise DataError(f"{s.url}: shard listed in dataset.json is missing")
    return [s.url for s in refs]


def _as_ref(s: ShardRef | str) -> ShardRef:
    return s if isinstance(s, ShardRef) else ShardRef(str(s), str(s))


# --------------------------------------------------------------------------------------------
# one shard as a stream
# --------------------------------------------------------------------------------------------


class _Tap:
    """A read-through wrapper that hashes (unless ``hashed`` is false) and counts the bytes and
    keeps the last ones."""

    def __init__(self, f: Any, hashed: bool = True) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.hashed = hashed
        self.pos = 0
        self.tail = b""

    def read(self, n: int = -1) -> bytes:
        b = self.f.read() if n is None or n < 0 else self.f.read(n)
        if b:
            if self.hashed:
                self.sha.update(b)
            self.pos += len(b)
            self.tail = (self.tail + b)[-_TAIL:] if len(b) < _TAIL else b[-_TAIL:]
        return b

    def block_at(self, offset: int, n: int = 512) -> bytes | None:
        start = self.pos - len(self.tail)
        if offset < start:
            return None
        return self.tail[offset - start : offset - start + n]


def _label(ref: ShardRef, key: str, parts: dict[str, bytes]) -> int:
    lk = ref.label_key
    if lk.startswith("json:"):
        fld = lk[5:]
        if "json" not in parts:
            raise DataError(f"{ref.url}: sample {key} has no .json member")
        try:
            value = json.loads(parts["json"]).get(fld)
        except (ValueError, AttributeError):
            raise DataError(f"{ref.url}: sample {key}: .json is not a JSON object") from None
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"{ref.url}: sample {key}: json field {fld!r} is not an integer")
        raw = str(value)
    else:
        if lk not in parts:
            raise DataError(f"{ref.url}: sample {key} has no .{lk} member")
        try:
            raw = parts[lk].decode("ascii")
        except UnicodeDecodeError:
            raise DataError(f"{ref.url}: sample {key}: .{lk} is not an integer") from None
    try:
        return int(raw.strip())
    except ValueError:
        raise DataError(f"{ref.url}: sample {key}: .{lk} is not an integer") from None


def _image(ref: ShardRef, key: str, parts: dict[str, bytes]) -> bytes:
    for ext in ref.image_keys:
        if ext in parts:
            return parts[ext]
    raise DataError(
        f"{ref.url}: sample {key} has no image member ({', '.join('.' + e for e in ref.image_keys)})"
    )


def _read_full(f: Any, n: int) -> bytes:
    """``n`` bytes of ``f`` (fewer only at its end: some streams return short reads)."""
    b = f.read(n)
    if len(b) == n or not b:
        return b
    chunks = [b]
    got = len(b)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        chunks.append(more)
        got += len(more)
    return b"".join(chunks)


def _ustar_header(h: bytes) -> tuple[str, bool, int] | None:
    """``(name, is_file, size)`` of a plain ustar header block: a regular file or a directory, no
    name prefix, a valid checksum. None for any other block: the ``tarfile`` reader takes over
    there (long names, pax headers, links, damage), so every error is named as ``tarfile`` sees it.
    """
    if h[257:262] != b"ustar" or h[345] != 0 or h[156] not in (48, 0, 53):
        return None
    try:
        size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
        chk = int(h[148:156].rstrip(b"\0 "), 8)
        name = h[:100].split(b"\0", 1)[0].decode()
    except (ValueError, UnicodeDecodeError):
        return None
    if sum(h) - sum(h[148:156]) + 256 != chk:
        return None
    return name, h[156] != 53, size


def _slice(data: bytes, a: int, b: int) -> bytes:
    return data[a:b]


class _Pushback:
    """``head``, then the rest of ``f``: where the fast reader stops, ``tarfile`` goes on."""

    def __init__(self, head: bytes, f: Any) -> None:
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n is None or n < 0:
            b, self.head = self.head + self.f.read(), b""
            return b
        b, self.head = self.head[:n], self.head[n:]
        return b + _read_full(self.f, n - len(b)) if len(b) < n else b


_Members = Generator[tuple[str, Callable[[], bytes]], None, int]


def _members(tap: _Tap, path: str) -> _Members:
    """``(name, body)`` per regular file member of the tar read through ``tap`` (``body()``
    returns its bytes; not calling it skips them); returns the end-of-archive marker's offset.

    Plain ustar headers (what webdataset, ``tar`` and the shard stage write) are parsed here, a
    64 KiB read at a time; at the first block that is anything else, a member cut short or the
    end of the stream, ``tarfile`` reads the rest (:func:`_tarfile_members`), so damage gets
    ``tarfile``'s diagnosis. ``benchmarks/stream_loader.py``: ``tarfile``'s per-member Python
    cost is about 15 % of the decode + crop of a small JPEG, which the loader must stay close to.
    """
    buf, i = b"", 0  # buf[0] is the byte at offset tap.pos - len(buf)
    while True:
        if len(buf) - i < _BLOCK:
            buf, i = buf[i:] + _read_full(tap, _CHUNK), 0
            if len(buf) < _BLOCK:
                break
        h = buf[i : i + _BLOCK]
        if h == _ZERO:
            return tap.pos - len(buf) + i
        head = _ustar_header(h)
        if head is None:
            break
        name, is_file, size = head
        body, nxt = i + _BLOCK, i + _BLOCK + (size + _BLOCK - 1) // _BLOCK * _BLOCK
        if nxt > len(buf):
            buf = buf[i:] + _read_full(tap, max(_CHUNK, nxt - len(buf)))
            body, nxt, i = body - i, nxt - i, 0
            if nxt > len(buf):
                break
        if is_file:
            yield name, functools.partial(_slice, buf, body, body + size)
        i = nxt
    base = tap.pos - len(buf) + i
    return (yield from _tarfile_members(_Pushback(buf[i:], tap), tap, path, base))


def _tarfile_members(stream: Any, tap: _Tap, path: str, base: int) -> _Members:
    """:func:`_members` through ``tarfile``, for the tar from offset ``base`` on."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")
    except tarfile.ReadError as err:
        if base:  # a bad or cut header after the first: the end, as tarfile.next() takes it
            return base
        if tap.pos == 0:
            raise DataError(f"{path}: truncated shard (empty file)") from None
        raise DataError(f"{path}: corrupt shard ({err})") from None
    while True:
        m = tar.next()
        tar.members.clear()  # type: ignore[attr-defined]  # a stream: keep no per-member state
        if m is None:
            return base + tar.offset
        if m.isfile():
            fobj = tar.extractfile(m)
            yield m.name, (fobj.read if fobj is not None else bytes)


_Raw = tuple[int, str, dict[str, bytes] | None]


class _Count:
    """The running sample count of one pass over a shard: which samples are usable, which belong
    to the split (their ``index``) and which ``select`` keeps."""

    __slots__ = ("ref", "select", "index", "usable")

    def __init__(self, ref: ShardRef, select: Callable[[int], bool] | None) -> None:
        self.ref, self.select = ref, select
        self.index = -1  # samples of this split
        self.usable = 0  # samples not skipped (all splits: what shard_counts counts)

    def wants(self, key: str) -> bool:
        """Whether the sample that starts now needs its bytes (``select`` sees its index)."""
        return self.ref.takes(key) and (self.select is None or self.select(self.index + 1))

    def finish(self, key: str, parts: dict[str, bytes]) -> _Raw | None:
        """Count the sample ``key`` read to its end; what :func:`_iter_raw` yields for it (None
        when it is skipped or not of the split)."""
        if key in self.ref.skip:
            return None
        self.usable += 1
        if not self.ref.takes(key):
            return None
        self.index += 1
        want = self.select is None or self.select(self.index)
        return self.index, key, (parts if want else None)


#: The compressions ``tarfile``'s ``r|*`` (and webdataset) read, by their magic bytes.
_COMPRESSED: tuple[tuple[bytes, Callable[[Any], Any]], ...] = (
    (b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
#: What a damaged compressed stream raises while it is read.
_DECOMPRESS_ERRORS = (OSError, EOFError, lzma.LZMAError, zlib.error)


def _tar_of(f: Any) -> tuple[_Tap, _Tap]:
    """``(raw, tar)``: a tap over the shard file ``f`` (its sha256 is the file's) and one over
    the tar it holds, which is ``raw`` itself or, for a compressed shard, the decompressed
    bytes (counted, not hashed)."""
    head = _read_full(f, 6)
    raw = _Tap(_Pushback(head, f) if head else f)
    for magic, opener in _COMPRESSED:
        if head.startswith(magic):
            return raw, _Tap(opener(raw), hashed=False)
    return raw, raw


def _iter_raw(shard: ShardRef | str, select: Callable[[int], bool] | None = None) -> Iterator[_Raw]:
    """Yield ``(index, key, {ext: bytes})`` per usable sample of a shard (``index`` counts them);
    ``None`` instead of the dict for samples ``select(index)`` rejects (their bytes are read
    through, not kept). Verifies the shard when read to its end (module docstring)."""
    ref = _as_ref(shard)
    path = ref.url
    with store.open_stream(path, "shard listed in dataset.json is missing") as f:
        raw, tap = _tar_of(f)
        count = _Count(ref, select)
        key: str | None = None
        parts: dict[str, bytes] = {}
        keep = True
        members = _members(tap, path)
        try:
            while True:
                try:
                    name, body = next(members)
                except StopIteration as stop:
                    end: int = stop.value
                    break
                match = _KEY_EXT.match(name)
                if match is None:
                    continue
                k, ext = match.group(1), match.group(2).lower()
                if k != key:
                    if key is not None and (done := count.finish(key, parts)) is not None:
                        yield done
                    key, parts = k, {}
                    keep = count.wants(k)  # whether this sample's bytes are needed
                if keep:
                    parts[ext] = body()
        except tarfile.TarError as err:
            raise DataError(f"{path}: truncated shard (ends inside a member: {err})") from None
        except _DECOMPRESS_ERRORS as err:
            _raise_decompress(raw, tap, path, err)
        _check_end(raw, tap, path, end)
        last = 1 if key is not None and key not in ref.skip else 0  # the sample not yet finished
        _check_whole(ref, raw, count.usable + last)
        # the last sample only now: a shard cut inside it is named as truncated, not as a
        # sample with a missing member
        if key is not None and (done := count.finish(key, parts)) is not None:
            yield done


def _raise_decompress(raw: _Tap, tap: _Tap, path: str, err: BaseException) -> NoReturn:
    """A decompressor's error as a one-line DataError naming the shard (other errors as they
    are: a plain shard's OSError is the store's)."""
    if tap is raw:
        raise err
    raise DataError(f"{path}: corrupt compressed shard ({type(err).__name__}: {err})") from None


def _check_end(raw: _Tap, tap: _Tap, path: str, end: int) -> None:
    """Read the rest of the shard (``raw``, hashed) and of the tar in it (``tap``); DataError
    unless an end-of-archive marker starts at the tar's offset ``end``."""
    marker = tap.block_at(end)
    try:
        while tap.read(1 << 20):
            pass
    except _DECOMPRESS_ERRORS as err:
        _raise_decompress(raw, tap, path, err)
    while raw.read(1 << 20):  # after a compressed stream's end: the file's rest, hashed
        pass
    if tap.pos < end + 512:
        raise DataError(f"{path}: truncated shard (no end-of-archive marker)")
    if marker is not None and any(marker):
        raise DataError(f"{path}: corrupt shard (bad tar header at byte {end})")


def _check_whole(ref: ShardRef, tap: _Tap, got: int) -> None:
    """DataError unless a shard read to its end holds the sample count and the sha256
    ``dataset.json`` records for it (when it does)."""
    path = ref.url
    if ref.count is not None and got != ref.count:
        raise DataError(
            f"{path}: truncated shard ({got} samples, dataset.json says {ref.count})"
            if got < ref.count
            else f"{path}: {got} samples, dataset.json says {ref.count}"
        )
    if ref.sha256 and tap.sha.hexdigest() != ref.sha256:
        raise DataError(
            f"{path}: sha256 {tap.sha.hexdigest()[:16]}... differs from dataset.json's "
            f"{ref.sha256[:16]}... (the shard changed since it was indexed)"
        )


def _decode(
    ref: ShardRef,
    key: str,
    parts: dict[str, bytes],
    decoder: Callable[[bytes, str], Any],
    num_classes: int | None,
) -> tuple[Any, int]:
    label = _checked_label(ref, key, parts, num_classes)
    return decoder(_image(ref, key, parts), f"{ref.url}: sample {key}"), label


def _checked_label(
    ref: ShardRef, key: str, parts: dict[str, bytes], num_classes: int | None
) -> int:
    """The sample's label, in ``[0, num_classes)`` when that is given (else DataError)."""
    label = _label(ref, key, parts)
    if num_classes is not None and not 0 <= label < num_classes:
        raise DataError(
            f"{ref.url}: sample {key}: label {label} outside [0, {num_classes}) of dataset.json"
        )
    return label


def read_shard(path: ShardRef | str) -> list[tuple[str, np.ndarray, int]]:
    """All samples of one shard as ``(key, uint8 image HxW or HxWxC, label)``."""
    ref = _as_ref(path)
    out = []
    for _, key, parts in _iter_raw(ref):
        assert parts is not None
        x, y = _decode(ref, key, parts, TensorDecoder(), None)
        out.append((key, x[0].numpy() if x.shape[0] == 1 else x.permute(1, 2, 0).numpy(), y))
    return out


# --------------------------------------------------------------------------------------------
# streaming
# --------------------------------------------------------------------------------------------


class ShardDataset(IterableDataset):
    """Samples ``(x, label)`` (``(x, label, key)`` with ``with_keys``) from tar shards, split
    over ranks and DataLoader workers (module docstring).

    ``x`` is ``decoder(image_bytes, where)`` (default: the uint8 ``C x H x W`` tensor). With
    ``shuffle`` the shard order is permuted per epoch (``set_epoch``) with the same seed on every
    consumer, and samples pass a shuffle buffer of ``buffer_size`` (still encoded: the buffer
    holds file bytes, not pixels). ``exclude``: keys to leave out (e.g. a labelled subset);
    ``num_classes``: range-check the labels.
    """

    def __init__(
        self,
        shard_paths: Sequence[ShardRef | str],
        rank: int = 0,
        world_size: int = 1,
        mode: Literal["auto", "shard", "sample"] = "auto",
        shuffle: bool = False,
        seed: int = 0,
        buffer_size: int = 1000,
        with_keys: bool = False,
        decoder: Callable[[bytes, str], Any] | None = None,
        exclude: frozenset[str] | set[str] | None = None,
        num_classes: int | None = None,
        min_per_rank: int = 0,
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
        self.shards = [_as_ref(p) for p in shard_paths]
        self.rank, self.world_size = rank, world_size
        self.mode = mode
        self.shuffle, self.seed, self.buffer_size = shuffle, seed, buffer_size
        self.with_keys = with_keys
        self.decoder = decoder or TensorDecoder()
        self.exclude = frozenset(exclude or ())
        self.num_classes = num_classes
        self.min_per_rank = min_per_rank
        self.epoch = 0

    @property
    def shard_paths(self) -> list[str]:
        return [s.url for s in self.shards]

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that seeds the shard order and the shuffle buffer."""
        self.epoch = int(epoch)

    def _workers(self) -> tuple[int, int]:
        wi = get_worker_info()
        return (wi.num_workers, wi.id) if wi is not None else (1, 0)

    def _order(self) -> list[ShardRef]:
        shards = list(self.shards)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(shards))
            shards = [shards[i] for i in order]
        return shards

    def split_mode(self, num_workers: int) -> str:
        """The split this epoch uses for ``num_workers`` loader workers per rank."""
        n = self.world_size * max(1, num_workers)
        shards = self._order()
        if self.mode != "auto":
            return self.mode
        if len(shards) < n:
            return "sample"
        if self.min_per_rank:
            if any(s.count is None for s in shards):
                return "sample"
            nw = max(1, num_workers)
            for r in range(self.world_size):
                total = sum(shards[i].count or 0 for i in range(len(shards)) if i % n // nw == r)
                if total < self.min_per_rank:
                    return "sample"
        return "shard"

    def _samples(self) -> Iterator[tuple[ShardRef, str, dict[str, bytes]]]:
        nw, wid = self._workers()
        c, n = self.rank * nw + wid, self.world_size * nw
        shards = self._order()
        keep = (lambda k: k not in self.exclude) if self.exclude else None
        if self.split_mode(nw) == "shard":
            for ref in shards[c::n]:
                for _, key, parts in _iter_raw(ref):
                    if parts is not None and (keep is None or keep(key)):
                        yield ref, key, parts
        else:
            seen = 0
            for ref in shards:
                base, count = seen, 0
                for i, key, parts in _iter_raw(ref, functools.partial(_mine, base, n, c)):
                    count = i + 1
                    if parts is not None and (keep is None or keep(key)):
                        yield ref, key, parts
                seen = base + count

    def __iter__(self) -> Iterator[Any]:
        it = self._samples()
        if self.shuffle:
            nw, wid = self._workers()
            c = self.rank * nw + wid
            it = _buffer_shuffle(
                it, self.buffer_size, np.random.default_rng([self.seed, self.epoch, c, 1])
            )
        for ref, key, parts in it:
            x, label = _decode(ref, key, parts, self.decoder, self.num_classes)
            yield (x, label, key) if self.with_keys else (x, label)


def _mine(base: int, n: int, c: int, i: int) -> bool:
    """Whether the sample at running index ``base + i`` is consumer ``c``'s of ``n``."""
    return (base + i) % n == c


def _buffer_shuffle(it: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    buf: list[Any] = []
    for item in it:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        buf[j], item = item, buf[j]
        yield item
    order = rng.permutation(len(buf))
    for j in order:
        yield buf[j]


def iter_samples(
    shard_paths: Sequence[ShardRef | str],
    rank: int = 0,
    world_size: int = 1,
    mode: Literal["auto", "shard", "sample"] = "auto",
    shuffle: bool = False,
    seed: int = 0,
    with_keys: bool = False,
    **kwargs: Any,
) -> ShardDataset:
    """A :class:`ShardDataset` of ``(uint8 CxHxW tensor, label)`` from the shards (``(x, label,
    key)`` with ``with_keys``)."""
    return ShardDataset(
        shard_paths, rank, world_size, mode, shuffle, seed, with_keys=with_keys, **kwargs
    )


def split_dataset(dataset_dir: Any, split: str, **kwargs: Any) -> ShardDataset:
    """A :class:`ShardDataset` over ``split`` of a dataset folder: its shards with their counts
    and hashes, labels range-checked, images converted to the dataset's channels."""
    info = dataset_info(dataset_dir)
    kwargs.setdefault("decoder", TensorDecoder(int(info["channels"])))
    kwargs.setdefault("num_classes", len(info["classes"]))
    return ShardDataset(shard_refs(dataset_dir, split), **kwargs)


def make_loader(
    dataset_dir: Any,
    split: str,
    *,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    mode: Literal["auto", "shard", "sample"] = "auto",
    with_keys: bool = False,
    **kwargs: Any,
) -> DataLoader:
    """A DataLoader over ``split`` of a dataset folder, this rank's share of it (``kwargs`` go to
    :class:`ShardDataset`: ``decoder``, ``buffer_size``, ``exclude``, ``min_per_rank``...).

    Batches hold what ``decoder`` (the per-sample hook) returns, by default uint8 ``C x H x W``
    tensors; the loader applies no transform: the caller transforms the batches."""
    if batch_size < 1:
        raise DataError(f"batch_size: must be >= 1 (got {batch_size})")
    if num_workers < 0:
        raise DataError(f"num_workers: must be >= 0 (got {num_workers})")
    shard_paths(dataset_dir, split)  # a missing local shard: named before workers start
    ds = split_dataset(
        dataset_dir,
        split,
        rank=rank,
        world_size=world_size,
        mode=mode,
        shuffle=shuffle,
        seed=seed,
        with_keys=with_keys,
        **kwargs,
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

    Shards are read by the same tar reader as the stream (:func:`_members`). One small PNG
    reader stays here, for speed (``benchmarks/read_formats.py``: on this package's 28 px PNG
    shards PIL's decode takes about 3 times as long, and every stage loads its splits): a grey or
    RGB PNG of the dataset's exact size, 8 bits, not interlaced, its pixels in one IDAT chunk
    (what the shard stage writes for decoded arrays) is inflated with one ``zlib.decompress``
    straight into the batch, and its row filters (None, Sub, Up, Average, Paeth; PIL picks one
    per row) are undone in numpy, one row of all such images at a time (:func:`_unfilter`);
    every other image (JPEG, WebP, other PNGs) goes through PIL.
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
