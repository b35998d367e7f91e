"""Reading one shard front to back, verified: :func:`read_shard`, and underneath it
:func:`_iter_raw` (each sample's member bytes), which the streaming path
(:mod:`pipeline.data.loader`) and the in-memory path (:mod:`pipeline.data.memory`) share.

Nothing is copied: each shard is read once, front to back, as a stream (plain ustar headers
parsed here, anything else through ``tarfile``: :func:`_members`; a gzip, bzip2 or xz compressed
shard through its decompressor, as ``tarfile`` and webdataset read them), in webdataset's member
convention (``<key>.<ext>``, consecutive members with one key form a sample; the image is the
first present of ``format.image_keys``, the label ``format.label_key``: ``cls`` or
``json:<field>``).

Verified while reading, against the shard's :class:`~pipeline.data.folder.ShardRef`. A shard is
hashed as its bytes pass and, once read to its end, compared with ``dataset.json``'s
``shard_sha256`` (when recorded); its sample count with ``shard_counts`` (or the manifest); a
missing end-of-archive marker, a corrupt header or a member cut short is a truncated/corrupt
shard; a label outside ``[0, len(classes))`` is an error. Each is one :class:`DataError` naming
the shard (and the sample). Samples the shard stage listed as skipped in ``skipped.json`` (a
corrupt image, a non-integer label in an external shard) are skipped again. A pass that stops
inside a shard (the epoch's step count reached) has not verified that shard's hash.
"""

from __future__ import annotations

import bz2
import functools
import gzip
import hashlib
import json
import lzma
import re
import tarfile
import zlib
from collections.abc import Callable, Generator, Iterator
from typing import Any, NoReturn

import numpy as np

from pipeline.data import store
from pipeline.data.decode import TensorDecoder
from pipeline.data.folder import ShardRef, _as_ref
from pipeline.data.sources import DataError

__all__ = ["read_shard"]

_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_TAIL = 1 << 16
_CHUNK = 1 << 16  # the fast tar reader's read size (at most _TAIL: see _Tap.block_at)
_BLOCK = 512
_ZERO = bytes(_BLOCK)


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
