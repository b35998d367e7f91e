"""WebDataset tar shards, the Parquet manifests, the dataset digest and the labelled subsets.

Layout of a dataset folder (see docs/ARCHITECTURE.md)::

    train-000000.tar ... val-000000.tar ... test-000000.tar ...
                               members <key>.jpg|png|webp (the image), <key>.cls (ASCII label)
    manifest.parquet           key, split, label, shard, bytes, sha256 (of the image member)
    shards.parquet             split, shard, url, count, bytes, sha256 (of the whole tar)
    subsets/label_<p>.parquet  key, label
    skipped.json               {"count": n, "skipped": [{"path"|"shard", "key"?, "reason"}, ...]}
    dataset.json               name, digest, classes, channels, height, width, counts, shards, ...

Images from files (image folders) are stored as their original bytes (``.jpg``, ``.png``,
``.webp`` by the format the bytes really hold), after a decode check: a file that does not decode
is a counted skip. Only with ``max_side`` is an image whose longer side exceeds it resized and
re-encoded. Decoded arrays (idx, CIFAR, digits) are written as PNG through PIL (no metadata, fixed
compression level: deterministic for a given PIL and zlib).

Shards are reproducible byte for byte: ``tarfile`` writes them with fixed member metadata (ustar,
mtime 0, uid/gid 0, empty user/group names, mode 0644). Writing one shard, :func:`write_shard`, is
a pure function of a picklable :class:`ShardSpec` that reads its files one at a time (memory does
not grow with the shard); :func:`build_dataset` takes the ``map`` to run it with (the builtin
``map`` in one process, Ray tasks in ``workflows.sharding``). Every file goes through a temp file in
its folder and ``os.replace``; ``dataset.json`` is written last and removed first, so a folder with
it is a finished dataset.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write, atomic_write_json
from pipeline.config import format_fraction as _format_fraction
from pipeline.data.sources import DataError, Record, SourceData

__all__ = [
    "DATASET_JSON",
    "IMAGE_KEYS",
    "MANIFEST",
    "SHARDS_PARQUET",
    "SKIPPED_JSON",
    "SPLITS",
    "ShardResult",
    "ShardSpec",
    "build_dataset",
    "dataset_digest",
    "encode_png",
    "finish_dataset",
    "format_fraction",
    "is_val_key",
    "label_subset",
    "plan_shards",
    "probe_image",
    "shard_name",
    "subset_path",
    "tar_info",
    "write_shard",
    "write_tar",
]

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.parquet"
SHARDS_PARQUET = "shards.parquet"
DATASET_JSON = "dataset.json"
SKIPPED_JSON = "skipped.json"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # member extensions readers look for, in order
PNG_COMPRESS_LEVEL = 1  # fast; the output is still deterministic for a given zlib
JPEG_QUALITY = 95  # re-encoding of JPEGs resized for max_side
MAX_KEY_LEN = 90  # <key>.webp must fit a 100-byte ustar name
_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def shard_name(split: str, index: int) -> str:
    """``{split}-{index:06d}.tar``."""
    return f"{split}-{index:06d}.tar"


def format_fraction(p: float) -> str:
    """A label percentage as used in file names: 1 -> '1', 10.0 -> '10', 0.1 -> '0.1', 12.5 -> '12.5'
    (:func:`pipeline.config.format_fraction`, the one formatting; bad values are a DataError)."""
    try:
        return _format_fraction(p)
    except ValueError as err:
        raise DataError(str(err)) from None


def subset_path(dataset_dir: str | os.PathLike[str], fraction: float) -> Path:
    """``<dataset_dir>/subsets/label_<format_fraction(fraction)>.parquet``."""
    return Path(dataset_dir) / "subsets" / f"label_{format_fraction(fraction)}.parquet"


def is_val_key(key: str, fraction: float) -> bool:
    """Whether a sample of a train shard belongs to the carved-out val split: a pure function of
    its key (the first 8 bytes of SHA-1 of the UTF-8 key, big-endian, below ``fraction * 2**64``).

    The shard stage uses it to index external shards without ``val_urls``, and records it in
    ``dataset.json`` as ``val_from_train: {"fraction": f, "hash": "sha1"}``; readers of such a
    split keep the train shards' samples for which it is true (val) or false (train).
    """
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")
    return h < float(fraction) * 2.0**64


def _atomic_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


# --------------------------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------------------------


def encode_png(image: np.ndarray, compress_level: int = PNG_COMPRESS_LEVEL) -> bytes:
    """PNG bytes of a uint8 ``HxW`` / ``HxWxC`` (C in 1, 3, 4) array, through PIL: 8-bit, no
    metadata chunks, a fixed compression level (the same bytes for the same array)."""
    from PIL import Image

    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise DataError(
            f"image of type {getattr(image, 'dtype', type(image).__name__)}, expected uint8"
        )
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if (image.ndim == 3 and image.shape[2] not in (3, 4)) or image.ndim not in (2, 3):
        raise DataError(
            f"image shape {tuple(image.shape)}: expected HxW or HxWxC with C in 1, 3, 4"
        )
    if 0 in image.shape[:2]:
        raise DataError(f"image shape {tuple(image.shape)}: empty")
    if not 0 <= compress_level <= 9:
        raise DataError(f"compress_level: must lie in 0..9 (got {compress_level})")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def _exif_swaps(im: Any) -> bool:
    """Whether the EXIF orientation turns the image by 90 degrees (readers apply it on decode)."""
    try:
        return im.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - unreadable EXIF: PIL's exif_transpose ignores it too
        return False


def probe_image(data: bytes, where: str) -> tuple[str, int, int, int]:
    """Decode-check image bytes: ``(ext, height, width, channels)`` with ``ext`` the member
    extension of the format the bytes hold (jpg, png, webp), height/width after the EXIF
    orientation, channels 1 for greyscale modes else 3. JPEGs decode at 1/8 scale (``draft``),
    which still reads every byte, so a truncated or corrupt file is caught. Raises a one-line
    :class:`DataError` naming ``where``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = _FORMAT_EXT.get(im.format or "")
            if ext is None:
                raise DataError(f"{where}: not a JPEG, PNG or WebP image (format {im.format})")
            w, h = im.size
            if _exif_swaps(im):
                w, h = h, w
            channels = 1 if im.mode in _GREY_MODES else 3
            if im.format in ("JPEG", "MPO"):
                im.draft(None, (1, 1))
            im.load()
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - every decoder failure is a bad image
        msg = " ".join(str(err).split()) or type(err).__name__
        raise DataError(f"{where}: unreadable image ({type(err).__name__}: {msg})") from None
    if h < 1 or w < 1:
        raise DataError(f"{where}: empty image")
    return ext, h, w, channels


def _shrink(data: bytes, ext: str, max_side: int, where: str) -> tuple[bytes, str]:
    """Resize (EXIF orientation applied, longer side to ``max_side``, bicubic) and re-encode:
    JPEG as JPEG (quality 95), anything else as PNG. Deterministic for a given PIL."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as src:
            grey = src.mode in _GREY_MODES
            w, h = src.size
            if src.format in ("JPEG", "MPO"):
                src.draft("L" if grey else "RGB", (max(1, w * max_side // max(w, h)),) * 2)
            im = ImageOps.exif_transpose(src)
            im = im.convert("L" if grey else "RGB")
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{where}: unreadable image ({type(err).__name__}: {err})") from None
    w, h = im.size
    scale = max_side / max(w, h)
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if ext == "jpg":
        im.save(buf, "JPEG", quality=JPEG_QUALITY)
    else:
        im.save(buf, "PNG", compress_level=PNG_COMPRESS_LEVEL)
        ext = "png"
    return buf.getvalue(), ext


# --------------------------------------------------------------------------------------------
# tar
# --------------------------------------------------------------------------------------------


def tar_info(name: str, size: int) -> tarfile.TarInfo:
    """A regular-file member with fixed metadata (mode 0644, uid/gid 0, empty user/group names,
    mtime 0): the same header bytes on every run."""
    if len(name.encode("utf-8")) > 100:
        raise DataError(f"tar member name {name!r} longer than 100 bytes")
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    ti.type = tarfile.REGTYPE
    return ti


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes and counts what goes through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        b = bytes(b)
        self.sha.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)

    def tell(self) -> int:
        return self.n


def write_tar(
    path: str | os.PathLike[str], members: Iterable[tuple[str, bytes]]
) -> tuple[int, str]:
    """Write ``(name, data)`` members as a ustar archive through ``tarfile`` (fixed metadata,
    padded to 10240 bytes like ``tar``), atomically; members are consumed one at a time. Returns
    ``(size in bytes, sha256 hex)`` of the archive."""

    def write(tmp: str) -> tuple[int, str]:
        with open(tmp, "wb") as raw:
            out = _HashingWriter(raw)
            with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tf:
                for name, data in members:
                    tf.addfile(tar_info(name, len(data)), io.BytesIO(data))
            return out.n, out.sha.hexdigest()

    return atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# one shard
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """Everything needed to write one shard (picklable: plain values and numpy arrays). Sample
    ``i`` is ``images[i]`` (a decoded array, written as PNG) or, when that is None, the file
    ``files[i]`` (its bytes, decode-checked; resized only beyond ``max_side``)."""

    path: str
    split: str
    index: int
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    images: tuple[np.ndarray | None, ...]
    compress_level: int = PNG_COMPRESS_LEVEL
    files: tuple[str | None, ...] = ()
    max_side: int | None = None


@dataclass(frozen=True)
class ShardResult:
    """What writing a shard produced, per written sample (key, label, member extension, image
    member size and sha256, height, width, channels), the skipped files ``(path, reason)`` and
    the tar's size and sha256."""

    path: str
    split: str
    index: int
    keys: tuple[str, ...]
    labels: tuple[int, ...]
    sizes: tuple[int, ...]
    sha256s: tuple[str, ...]
    tar_bytes: int
    tar_sha256: str
    exts: tuple[str, ...] = ()
    heights: tuple[int, ...] = ()
    widths: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    skipped: tuple[tuple[str, str], ...] = ()
    resized: int = 0

    @property
    def name(self) -> str:
        return Path(self.path).name


def _array_channels(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 or img.shape[2] == 1 else 3


def write_shard(spec: ShardSpec) -> ShardResult:
    """Write one shard: arrays as PNG, files as their verified original bytes; deterministic."""
    n = len(spec.keys)
    files = spec.files or (None,) * n
    if not (len(spec.labels) == len(spec.images) == len(files) == n):
        raise DataError(f"{spec.path}: keys, labels, images and files differ in length")
    out: dict[str, list[Any]] = {
        k: [] for k in ("keys", "labels", "exts", "sizes", "sha", "h", "w", "c")
    }
    skipped: list[tuple[str, str]] = []
    resized = 0

    def members() -> Iterable[tuple[str, bytes]]:
        nonlocal resized
        for key, label, image, file in zip(spec.keys, spec.labels, spec.images, files, strict=True):
            if image is not None:
                try:
                    data = encode_png(image, spec.compress_level)
                except DataError as err:
                    raise DataError(f"{spec.path}: sample {key}: {err}") from None
                ext, (h, w), c = "png", image.shape[:2], _array_channels(image)
            else:
                if file is None:
                    raise DataError(f"{spec.path}: sample {key} has neither an image nor a file")
                try:
                    data = Path(file).read_bytes()
                    ext, h, w, c = probe_image(data, file)
                    if spec.max_side is not None and max(h, w) > spec.max_side:
                        data, ext = _shrink(data, ext, spec.max_side, file)
                        ext, h, w, c = probe_image(data, file)
                        resized += 1
                except OSError as err:
                    skipped.append((file, f"unreadable file ({err.strerror or err})"))
                    continue
                except DataError as err:
                    skipped.append((file, str(err).removeprefix(f"{file}: ")))
                    continue
            out["keys"].append(key)
            out["labels"].append(int(label))
            out["exts"].append(ext)
            out["sizes"].append(len(data))
            out["sha"].append(hashlib.sha256(data).hexdigest())
            out["h"].append(int(h))
            out["w"].append(int(w))
            out["c"].append(int(c))
            yield f"{key}.{ext}", data
            yield f"{key}.cls", str(int(label)).encode("ascii")

    size, sha = write_tar(spec.path, members())
    return ShardResult(
        spec.path,
        spec.split,
        spec.index,
        tuple(out["keys"]),
        tuple(out["labels"]),
        tuple(out["sizes"]),
        tuple(out["sha"]),
        size,
        sha,
        tuple(out["exts"]),
        tuple(out["h"]),
        tuple(out["w"]),
        tuple(out["c"]),
        tuple(skipped),
        resized,
    )


def plan_shards(
    splits: Mapping[str, Sequence[Record]],
    out_dir: str | os.PathLike[str],
    shard_size: int,
    compress_level: int = PNG_COMPRESS_LEVEL,
    max_side: int | None = None,
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
            files = tuple(r.path for r in chunk)
            specs.append(
                ShardSpec(
                    str(out / shard_name(split, i)),
                    split,
                    i,
                    tuple(r.key for r in chunk),
                    tuple(int(r.label) for r in chunk),
                    tuple(r.image for r in chunk),
                    compress_level,
                    files if any(f is not None for f in files) else (),
                    max_side,
                )
            )
    return specs


# --------------------------------------------------------------------------------------------
# manifest, digest, subsets
# --------------------------------------------------------------------------------------------


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
    return [keys[int(i)] for i in sel], [int(y[i]) for i in sel]


# --------------------------------------------------------------------------------------------
# the whole dataset
# --------------------------------------------------------------------------------------------


@dataclass
class SampleTable:
    """Per-sample facts the shard stage collects (one entry per usable sample, in shard order)."""

    key: list[str] = field(default_factory=list)
    split: list[str] = field(default_factory=list)
    label: list[int] = field(default_factory=list)
    shard: list[str] = field(default_factory=list)
    nbytes: list[int] = field(default_factory=list)
    sha256: list[str] = field(default_factory=list)
    height: list[int] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)

    def add(self, key: str, split: str, label: int, shard: str, nbytes: int, sha: str,
            h: int, w: int, c: int) -> None:  # fmt: skip
        self.key.append(key)
        self.split.append(split)
        self.label.append(int(label))
        self.shard.append(shard)
        self.nbytes.append(int(nbytes))
        self.sha256.append(sha)
        self.height.append(int(h))
        self.width.append(int(w))
        self.channels.append(int(c))

    def __len__(self) -> int:
        return len(self.key)

    def rows(self) -> Iterable[tuple[str, str, int, str, int, str]]:
        return zip(
            self.key, self.split, self.label, self.shard, self.nbytes, self.sha256, strict=True
        )


@dataclass(frozen=True)
class ShardRow:
    """One row of ``shards.parquet``: a shard (its ref) as read for one split."""

    split: str
    ref: str
    count: int
    nbytes: int
    sha256: str


def _nominal_size(t: SampleTable) -> tuple[int, int, bool]:
    sizes = set(zip(t.height, t.width, strict=True))
    if len(sizes) == 1:
        ((h, w),) = sizes
        return h, w, True
    return int(np.median(t.height)), int(np.median(t.width)), False


def finish_dataset(
    out_dir: str | os.PathLike[str],
    *,
    name: str,
    classes: Sequence[str],
    samples: SampleTable,
    shard_rows: Sequence[ShardRow],
    skipped: Sequence[dict[str, Any]],
    label_fractions: Sequence[float],
    seed: int,
    shard_size: int | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``skipped.json``, the label subsets, ``manifest.parquet``, ``shards.parquet`` and,
    last, ``dataset.json`` for shards already written or indexed. Labels are range-checked
    against ``classes`` (a label outside is an error: the callers skip such samples first)."""
    out = Path(out_dir)
    counts = _split_counts(name, classes, samples, skipped)
    fractions = list(dict.fromkeys(float(f) for f in label_fractions))
    atomic_write_json(out / SKIPPED_JSON, {"count": len(skipped), "skipped": list(skipped)})
    subsets = _write_subsets(out, samples, len(classes), fractions, seed)
    _write_manifests(out, samples, shard_rows)
    extra = dict(extra or {})
    channels = 1 if all(c == 1 for c in samples.channels) else 3
    height, width, fixed = _nominal_size(samples)
    image_keys = list(extra.pop("image_keys", IMAGE_KEYS))
    label_key = extra.pop("label_key", "cls")
    info = {
        "name": name,
        "digest": dataset_digest(samples.rows()),
        "classes": list(classes),
        "num_classes": len(classes),
        "channels": channels,
        "height": height,
        "width": width,
        "fixed_size": fixed,
        "max_side": extra.pop("max_side", None),
        "counts": counts,
        "decoded_bytes": {s: counts[s] * channels * height * width for s in SPLITS},
        **_shard_facts(shard_rows),
        "shard_size": shard_size,
        "fractions": {
            "val": extra.pop("val_fraction", None),
            "labels": [format_fraction(f) for f in fractions],
        },
        "val_from_train": extra.pop("val_from_train", None),
        "skipped_keys": extra.pop("skipped_keys", {}),
        "subsets": subsets,
        "skipped": len(skipped),
        "seed": int(seed),
        "format": {"image_keys": image_keys, "label_key": label_key},
        "source_info": extra.pop("source_info", {}),
        "external": bool(extra.pop("external", False)),
    }
    info.update(extra)
    atomic_write_json(out / DATASET_JSON, info)
    return info


def _split_counts(
    name: str, classes: Sequence[str], samples: SampleTable, skipped: Sequence[dict[str, Any]]
) -> dict[str, int]:
    """Samples per split, after checking the classes, every label and that train is not empty
    (an error then names a skipped input as an example)."""
    k = len(classes)
    if k < 2:
        raise DataError(f"source {name}: needs at least two classes (got {list(classes)})")
    for key, label in zip(samples.key, samples.label, strict=True):
        if not 0 <= label < k:
            raise DataError(f"source {name}: sample {key}: label {label} outside 0..{k - 1}")
    counts = {s: 0 for s in SPLITS}
    for sp in samples.split:
        counts[sp] += 1
    if not counts["train"]:
        example = ""
        if skipped:
            first = skipped[0]
            where = first.get("path") or f"{first.get('shard')}: sample {first.get('key')}"
            example = f"; e.g. {where}: {first['reason']}"
        raise DataError(
            f"source {name}: no usable training images ({len(skipped)} skipped{example})"
        )
    return counts


def _write_subsets(
    out: Path, samples: SampleTable, num_classes: int, fractions: list[float], seed: int
) -> dict[str, dict[str, Any]]:
    """One label subset of the train split per fraction; returns their ``dataset.json`` entries."""
    train = [i for i, sp in enumerate(samples.split) if sp == "train"]
    train_keys = [samples.key[i] for i in train]
    train_labels = [samples.label[i] for i in train]
    subsets: dict[str, dict[str, Any]] = {}
    for f in fractions:
        keys, labels = label_subset(train_keys, train_labels, num_classes, f, seed)
        path = subset_path(out, f)
        _atomic_parquet(path, {"key": keys, "label": np.asarray(labels, dtype=np.int64)})
        subsets[format_fraction(f)] = {
            "fraction": f,
            "path": str(path.relative_to(out)),
            "count": len(keys),
        }
    return subsets


def _write_manifests(out: Path, samples: SampleTable, shard_rows: Sequence[ShardRow]) -> None:
    """``manifest.parquet`` (one row per sample) and ``shards.parquet`` (one per shard row)."""
    _atomic_parquet(
        out / MANIFEST,
        {
            "key": samples.key,
            "split": samples.split,
            "label": np.asarray(samples.label, dtype=np.int64),
            "shard": samples.shard,
            "bytes": np.asarray(samples.nbytes, dtype=np.int64),
            "sha256": samples.sha256,
        },
    )
    _atomic_parquet(
        out / SHARDS_PARQUET,
        {
            "split": [r.split for r in shard_rows],
            "shard": [r.ref for r in shard_rows],
            "url": [r.ref for r in shard_rows],
            "count": np.asarray([r.count for r in shard_rows], dtype=np.int64),
            "bytes": np.asarray([r.nbytes for r in shard_rows], dtype=np.int64),
            "sha256": [r.sha256 for r in shard_rows],
        },
    )


def _shard_facts(shard_rows: Sequence[ShardRow]) -> dict[str, Any]:
    """``dataset.json``'s ``shards`` per split, ``shard_sha256`` and ``shard_counts``."""
    shard_counts: dict[str, int] = {}
    shard_sha: dict[str, str] = {}
    for r in shard_rows:
        shard_counts[r.ref] = shard_counts.get(r.ref, 0) + r.count
        shard_sha[r.ref] = r.sha256
    return {
        "shards": {s: [r.ref for r in shard_rows if r.split == s] for s in SPLITS},
        "shard_sha256": shard_sha,
        "shard_counts": shard_counts,
    }


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
    max_side: int | None = None,
) -> dict[str, Any]:
    """Write the shards (through ``map_fn(write_shard, specs)``), ``skipped.json``, the subsets,
    the manifests and, last, ``dataset.json``. Returns the ``dataset.json`` content.

    ``extra`` entries go into ``dataset.json`` (``val_fraction`` as ``fractions.val``)."""
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
    specs = plan_shards(splits, out, shard_size, max_side=max_side)
    del splits
    results = list(map_fn(write_shard, specs))
    if len(results) != len(specs):
        raise DataError(f"{out}: map_fn returned {len(results)} results for {len(specs)} shards")
    for spec, res in zip(specs, results, strict=True):
        if not isinstance(res, ShardResult) or res.path != spec.path:
            raise DataError(f"{spec.path}: map_fn returned a result for another shard")
    log.info("wrote %d shards in %.2fs", len(specs), time.perf_counter() - t0)
    _clean_stale(out, specs, fractions)

    samples = SampleTable()
    rows: list[ShardRow] = []
    skipped = [s.to_dict() for s in data.skipped]
    resized = 0
    for r in results:
        for i, key in enumerate(r.keys):
            samples.add(key, r.split, r.labels[i], r.name, r.sizes[i], r.sha256s[i],
                        r.heights[i], r.widths[i], r.channels[i])  # fmt: skip
        rows.append(ShardRow(r.split, r.name, len(r.keys), r.tar_bytes, r.tar_sha256))
        skipped += [{"path": p, "reason": why} for p, why in r.skipped]
        resized += r.resized
    if len(skipped) > len(data.skipped):
        log.warning("%s: %d inputs skipped (see skipped.json)", data.name, len(skipped))
    source_info = dict(data.info)
    if max_side is not None or resized:
        source_info["resized"] = resized
    return finish_dataset(
        out,
        name=data.name,
        classes=data.classes,
        samples=samples,
        shard_rows=rows,
        skipped=skipped,
        label_fractions=fractions,
        seed=seed,
        shard_size=int(shard_size),
        extra={**(extra or {}), "max_side": max_side, "source_info": source_info},
    )
