"""WebDataset tar shards, the Parquet manifest, the dataset digest and the labelled subsets.

Layout of a dataset folder (see docs/ARCHITECTURE.md)::

    train-000000.tar ... val-000000.tar ... test-000000.tar ...   members <key>.png, <key>.cls
    manifest.parquet           key, split, label, shard, bytes, sha256 (of the PNG bytes)
    subsets/label_<p>.parquet  key, label
    skipped.json               {"count": n, "skipped": [{"path", "reason"}, ...]}
    dataset.json               name, digest, classes, channels, height, width, counts, shards, ...

Shards are reproducible byte for byte: PNGs are written with no metadata chunks at a fixed
compression level and filter (:func:`encode_png`), and tar members carry fixed metadata (ustar,
mtime 0, uid/gid 0, empty user/group names, mode 0644; :func:`tar_header`). Writing one shard, :func:`write_shard`, is a pure function of a
picklable :class:`ShardSpec`; :func:`build_dataset` takes the ``map`` to run it with (the builtin
``map`` in one process, Ray tasks in ``workflows.sharding``). Every file goes through a temp file in
its folder and ``os.replace``; ``dataset.json`` is written last and removed first, so a folder with
it is a finished dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.sources import DataError, Record, SourceData

__all__ = [
    "DATASET_JSON",
    "MANIFEST",
    "SKIPPED_JSON",
    "SPLITS",
    "ShardResult",
    "ShardSpec",
    "atomic_write_bytes",
    "build_dataset",
    "dataset_digest",
    "encode_png",
    "format_fraction",
    "label_subset",
    "plan_shards",
    "shard_name",
    "subset_path",
    "tar_header",
    "write_shard",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.parquet"
DATASET_JSON = "dataset.json"
SKIPPED_JSON = "skipped.json"
PNG_COMPRESS_LEVEL = 1  # fast; the output is still deterministic for a given zlib
MAX_KEY_LEN = 90  # <key>.png must fit a 100-byte ustar name
_BLOCK = 512
_RECORD = 10240


def shard_name(split: str, index: int) -> str:
    """``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


def format_fraction(p: float) -> str:
    """A label percentage as used in file names: 1 -> '1', 10.0 -> '10', 0.1 -> '0.1', 12.5 -> '12.5'."""
    p = float(p)
    if not 0.0 < p <= 100.0:
        raise DataError(f"label fraction {p} is outside (0, 100]")
    return f"{p:.6f}".rstrip("0").rstrip(".")


def subset_path(dataset_dir: str | os.PathLike[str], fraction: float) -> Path:
    """``<dataset_dir>/subsets/label_<format_fraction(fraction)>.parquet``."""
    return Path(dataset_dir) / "subsets" / f"label_{format_fraction(fraction)}.parquet"


# --------------------------------------------------------------------------------------------
# atomic writes
# --------------------------------------------------------------------------------------------


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write bytes to ``path`` through a temp file in the same folder and a rename."""
    _atomic(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def _atomic(path: Path, write: Callable[[str], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def _atomic_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    _atomic(path, lambda tmp: pq.write_table(table, tmp))


# --------------------------------------------------------------------------------------------
# one shard
# --------------------------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG_COLOR = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def encode_png(image: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes of a uint8 ``HxW`` / ``HxWxC`` (C in 1..4) array: IHDR, one IDAT, IEND; 8-bit,
    no interlace, filter type 0 on every row, no metadata chunks.

    Written directly (zlib + CRCs) rather than through PIL: the output is a standard PNG that PIL,
    libpng and ``ray.data`` read, it is deterministic for a given zlib, about as small as PIL's
    adaptive filtering at this level for small images, and :func:`pipeline.data.loader.decode_png`
    decodes it with one ``zlib.decompress`` (several times faster than PIL).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise DataError(
            f"image of type {getattr(image, 'dtype', type(image).__name__)}, expected uint8"
        )
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in _PNG_COLOR or 0 in image.shape[:2]:
        raise DataError(f"image shape {tuple(image.shape)}: expected HxW or HxWxC with C in 1..4")
    if not 0 <= compress_level <= 9:
        raise DataError(f"compress_level: must lie in 0..9 (got {compress_level})")
    h, w, c = image.shape
    rows = np.zeros((h, 1 + w * c), dtype=np.uint8)
    rows[:, 1:] = image.reshape(h, w * c)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, _PNG_COLOR[c], 0, 0, 0)
    return b"".join(
        (
            b"\x89PNG\r\n\x1a\n",
            _png_chunk(b"IHDR", ihdr),
            _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)),
            _png_chunk(b"IEND", b""),
        )
    )


def tar_header(name: str, size: int) -> bytes:
    """A POSIX ustar header for a regular file with fixed metadata (mode 0644, uid/gid 0, empty
    user/group names, mtime 0); the same bytes ``tarfile`` writes for such a member."""
    raw = name.encode("utf-8")
    if len(raw) > 100:
        raise DataError(f"tar member name {name!r} longer than 100 bytes")
    hdr = bytearray(_BLOCK)
    hdr[0 : len(raw)] = raw
    hdr[100:108] = b"0000644\0"
    hdr[108:116] = b"0000000\0"
    hdr[116:124] = b"0000000\0"
    hdr[124:136] = b"%011o\0" % size
    hdr[136:148] = b"00000000000\0"
    hdr[148:156] = b"        "
    hdr[156:157] = b"0"
    hdr[257:265] = b"ustar\x0000"
    hdr[148:156] = b"%06o\0 " % sum(hdr)
    return bytes(hdr)


@dataclass(frozen=True)
class ShardSpec:
    """Everything needed to write one shard (picklable: plain values and numpy arrays)."""

    path: str
    split: str
    index: int
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    images: tuple[np.ndarray, ...]
    compress_level: int = PNG_COMPRESS_LEVEL


@dataclass(frozen=True)
class ShardResult:
    """What writing a shard produced: per-sample PNG sizes and hashes, the tar size and hash."""

    path: str
    split: str
    index: int
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    sizes: tuple[int, ...]
    sha256s: tuple[str, ...]
    tar_bytes: int
    tar_sha256: str

    @property
    def name(self) -> str:
        return Path(self.path).name


def _tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar archive of ``(name, data)`` members: ustar headers, zero padding, two zero blocks,
    padded to a multiple of 10240 bytes like ``tarfile``."""
    parts: list[bytes] = []
    total = 0
    for name, data in members:
        pad = -len(data) % _BLOCK
        parts += [tar_header(name, len(data)), data, bytes(pad)]
        total += _BLOCK + len(data) + pad
    end = 2 * _BLOCK
    end += -(total + end) % _RECORD
    parts.append(bytes(end))
    return b"".join(parts)


def write_shard(spec: ShardSpec) -> ShardResult:
    """Encode the spec's images as PNG and write the tar atomically; deterministic bytes."""
    if not (len(spec.keys) == len(spec.labels) == len(spec.images)):
        raise DataError(f"{spec.path}: keys, labels and images differ in length")
    members: list[tuple[str, bytes]] = []
    sizes: list[int] = []
    hashes: list[str] = []
    for key, label, image in zip(spec.keys, spec.labels, spec.images, strict=True):
        try:
            png = encode_png(image, spec.compress_level)
        except DataError as err:
            raise DataError(f"{spec.path}: sample {key}: {err}") from None
        members.append((f"{key}.png", png))
        members.append((f"{key}.cls", str(int(label)).encode("ascii")))
        sizes.append(len(png))
        hashes.append(hashlib.sha256(png).hexdigest())
    data = _tar_bytes(members)
    atomic_write_bytes(spec.path, data)
    return ShardResult(
        spec.path,
        spec.split,
        spec.index,
        tuple(spec.keys),
        tuple(int(x) for x in spec.labels),
        tuple(sizes),
        tuple(hashes),
        len(data),
        hashlib.sha256(data).hexdigest(),
    )


def plan_shards(
    splits: dict[str, Sequence[Record]],
    out_dir: str | os.PathLike[str],
    shard_size: int,
    compress_level: int = PNG_COMPRESS_LEVEL,
) -> list[ShardSpec]:
    """Cut each split (in order) into specs of ``shard_size`` samples, named ``{split}-{i:06d}.tar``."""
    if shard_size < 1:
        raise DataError(f"data.shard_size: must be >= 1 (got {shard_size})")
    out = Path(out_dir)
    specs: list[ShardSpec] = []
    seen: set[str] = set()
    for split, recs in splits.items():
        for rec in recs:
            if rec.key in seen:
                raise DataError(f"split {split}: duplicate sample key {rec.key!r}")
            if not rec.key or "." in rec.key or "/" in rec.key or len(rec.key) > MAX_KEY_LEN:
                raise DataError(
                    f"split {split}: sample key {rec.key!r} must be non-empty, at most "
                    f"{MAX_KEY_LEN} characters, without '.' or '/'"
                )
            seen.add(rec.key)
        for i, start in enumerate(range(0, len(recs), shard_size)):
            chunk = recs[start : start + shard_size]
            specs.append(
                ShardSpec(
                    str(out / shard_name(split, i)),
                    split,
                    i,
                    tuple(r.key for r in chunk),
                    tuple(int(r.label) for r in chunk),
                    tuple(r.image for r in chunk),
                    compress_level,
                )
            )
    return specs


# --------------------------------------------------------------------------------------------
# manifest, digest, subsets
# --------------------------------------------------------------------------------------------


def _manifest_rows(results: Sequence[ShardResult]) -> list[tuple[str, str, int, str, int, str]]:
    rows = []
    for r in results:
        for key, label, size, sha in zip(r.keys, r.labels, r.sizes, r.sha256s, strict=True):
            rows.append((key, r.split, label, r.name, size, sha))
    return rows


def dataset_digest(rows: Iterable[Sequence[Any]]) -> str:
    """SHA-256 over manifest rows (key, split, label, shard, bytes, sha256) in order."""
    h = hashlib.sha256()
    for row in rows:
        h.update(("\t".join(str(v) for v in row) + "\n").encode())
    return h.hexdigest()


def label_subset(
    keys: Sequence[str], labels: Sequence[int], num_classes: int, fraction: float, seed: int
) -> tuple[list[str], list[int]]:
    """A seeded class-balanced subset of ``fraction`` percent: per class
    ``max(1, round(fraction/100 * N / num_classes))`` items (capped by what the class has).

    Each class's items come from one seeded permutation that does not depend on ``fraction``, so
    the subsets are nested (the 1 % subset lies inside the 10 % one). Returned in source order.
    """
    format_fraction(fraction)  # validates the range
    if num_classes < 1:
        raise DataError(f"num_classes must be >= 1 (got {num_classes})")
    y = np.asarray(labels, dtype=np.int64)
    per_class = max(1, round(fraction / 100.0 * len(y) / num_classes))
    picked: list[np.ndarray] = []
    for c in range(num_classes):
        idx = np.flatnonzero(y == c)
        if not len(idx):
            log.warning(
                "label subset %s%%: class %d has no training images", format_fraction(fraction), c
            )
            continue
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, c, 23])
        picked.append(idx[rng.permutation(len(idx))][:per_class])
    sel = np.sort(np.concatenate(picked)) if picked else np.arange(0)
    return [keys[i] for i in sel], [int(y[i]) for i in sel]


# --------------------------------------------------------------------------------------------
# the whole dataset
# --------------------------------------------------------------------------------------------


def _clean_stale(out: Path, specs: Sequence[ShardSpec], fractions: Sequence[float]) -> None:
    """Remove shard and subset files of an earlier run that this run does not produce."""
    planned = {Path(s.path).name for s in specs}
    for split in SPLITS:
        for p in out.glob(f"{split}-*.tar"):
            if p.name not in planned:
                p.unlink()
    sub = out / "subsets"
    if sub.is_dir():
        keep = {subset_path(out, f).name for f in fractions}
        for p in sub.glob("label_*.parquet"):
            if p.name not in keep:
                p.unlink()


def build_dataset(
    data: SourceData,
    out_dir: str | os.PathLike[str],
    shard_size: int,
    label_fractions: Sequence[float] = (),
    seed: int = 0,
    map_fn: Callable[..., Iterable[ShardResult]] = map,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the shards (through ``map_fn(write_shard, specs)``), ``skipped.json``, the subsets,
    ``manifest.parquet`` and, last, ``dataset.json``. Returns the ``dataset.json`` content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_JSON).unlink(missing_ok=True)  # not finished until rewritten
    splits = {s: list(data.splits.get(s, [])) for s in SPLITS}
    if not splits["train"]:
        raise DataError(f"source {data.name}: the train split is empty")
    fractions = list(dict.fromkeys(float(f) for f in label_fractions))
    for f in fractions:
        format_fraction(f)

    t0 = time.perf_counter()
    specs = plan_shards(splits, out, shard_size)
    results = list(map_fn(write_shard, specs))
    if len(results) != len(specs):
        raise DataError(f"{out}: map_fn returned {len(results)} results for {len(specs)} shards")
    for spec, res in zip(specs, results, strict=True):
        if not isinstance(res, ShardResult) or res.path != spec.path:
            raise DataError(f"{spec.path}: map_fn returned a result for another shard")
    log.info("wrote %d shards in %.2fs", len(specs), time.perf_counter() - t0)
    _clean_stale(out, specs, fractions)

    _atomic_json(
        out / SKIPPED_JSON,
        {"count": len(data.skipped), "skipped": [s.to_dict() for s in data.skipped]},
    )

    train = splits["train"]
    train_keys, train_labels = [r.key for r in train], [r.label for r in train]
    subsets: dict[str, dict[str, Any]] = {}
    for f in fractions:
        keys, labels = label_subset(train_keys, train_labels, len(data.classes), f, seed)
        path = subset_path(out, f)
        _atomic_parquet(path, {"key": keys, "label": np.asarray(labels, dtype=np.int64)})
        subsets[format_fraction(f)] = {
            "fraction": f,
            "path": str(path.relative_to(out)),
            "count": len(keys),
        }

    rows = _manifest_rows(results)
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 6
    _atomic_parquet(
        out / MANIFEST,
        {
            "key": list(cols[0]),
            "split": list(cols[1]),
            "label": np.asarray(cols[2], dtype=np.int64),
            "shard": list(cols[3]),
            "bytes": np.asarray(cols[4], dtype=np.int64),
            "sha256": list(cols[5]),
        },
    )
    info = {
        "name": data.name,
        "digest": dataset_digest(rows),
        "classes": list(data.classes),
        "num_classes": len(data.classes),
        "channels": data.channels,
        "height": data.height,
        "width": data.width,
        "counts": {s: len(splits[s]) for s in SPLITS},
        "shards": {s: [Path(r.path).name for r in results if r.split == s] for s in SPLITS},
        "shard_size": int(shard_size),
        "fractions": {
            "val": (extra or {}).get("val_fraction"),
            "labels": [format_fraction(f) for f in fractions],
        },
        "subsets": subsets,
        "skipped": len(data.skipped),
        "seed": int(seed),
        "format": {"image": "png", "label": "cls"},
        "source_info": data.info,
    }
    if extra:
        info.update({k: v for k, v in extra.items() if k != "val_fraction"})
    _atomic_json(out / DATASET_JSON, info)
    return info
