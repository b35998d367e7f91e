"""The dataset folder's description: ``dataset.json`` (:class:`DatasetInfo`, read by
:func:`dataset_info`), the bytes a split takes in memory (:func:`decoded_bytes`) and each split's
shards with what each must hold (:class:`ShardRef`, :func:`shard_refs`, :func:`shard_paths`).

The folder may be a local path or a URI (``s3://``, ``gs://``, ``file://``; see
:mod:`pipeline.data.store`); shard refs in ``dataset.json`` are relative to it or absolute URLs
(external WebDataset shards, ``pipe:`` commands included). A shard's :class:`ShardRef` carries
its sample count (``shard_counts``, else the Parquet manifest), its ``shard_sha256``, the samples
the shard stage listed as skipped in ``skipped.json`` (a corrupt image, a non-integer label in an
external shard; ``dataset.json``'s ``skipped_keys``), the member convention (``format``:
``image_keys``, ``label_key``) and, with ``val_from_train``, which of its samples belong to the
split. :mod:`pipeline.data.tarstream` reads each shard and verifies it against its ref.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, TypedDict, cast

from pipeline.data import store
from pipeline.data.shards import DATASET_JSON, MANIFEST, SPLITS, is_val_key
from pipeline.data.sources import DataError

__all__ = [
    "DEFAULT_IMAGE_KEYS",
    "DatasetInfo",
    "ShardRef",
    "dataset_info",
    "decoded_bytes",
    "shard_paths",
    "shard_refs",
]

DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


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
