"""External WebDataset shards (``data.source: webdataset``): URL lists, opening a shard URL as a
byte stream, and indexing the shards in place (the shard stage does not copy them).

URLs are brace patterns (``s3://bucket/train-{000000..000099}.tar``) or lists of them; each is a
local path, ``file://...``, an object-store URI that ``pyarrow.fs`` opens (``s3://``, ``gs://``;
S3-compatible stores through ``AWS_ENDPOINT_URL``), or ``pipe:<command>`` (the command's standard
output is the tar; a non-zero exit status is an error).

Indexing one shard (:func:`index_shard`, a pure function of a picklable :class:`IndexSpec`, so the
caller's ``map`` can run one Ray task per shard) reads the tar once as a stream with ``tarfile``,
hashing every byte. Members are grouped into samples by WebDataset's rule (the key is the member
name up to the first dot of its last path component). A sample's image is the first of
``image_keys`` present, its label the ``label_key`` member (an ASCII integer) or, for
``json:<field>``, that field of the ``.json`` member. A sample whose image does not decode, whose
label is missing, not an integer or out of range, or whose key repeats within the shard is a
counted skip (``(key, reason)``); a shard that cannot be opened, is truncated, or is not a tar is
a one-line :class:`DataError` naming its URL.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NamedTuple
from urllib.parse import unquote, urlparse

from pipeline.data.shards import (
    IMAGE_KEYS,
    SPLITS,
    SampleTable,
    ShardRow,
    finish_dataset,
    is_val_key,
    probe_image,
)
from pipeline.data.sources import DataError

if TYPE_CHECKING:
    from pipeline.config import DataConfig

__all__ = [
    "IndexResult",
    "IndexSpec",
    "expand_urls",
    "index_shard",
    "index_webdataset",
    "normalise_url",
    "open_url",
]

_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def expand_urls(urls: str | Sequence[str] | None) -> list[str]:
    """A brace pattern or a list of them -> the list of shard URLs, in order."""
    import braceexpand

    if urls is None:
        return []
    items = [urls] if isinstance(urls, str) else list(urls)
    out: list[str] = []
    for u in items:
        u = u.strip()
        out += [u] if u.startswith("pipe:") else list(braceexpand.braceexpand(u))
    return out


class _PipeStream(io.RawIOBase):
    """The standard output of a ``pipe:`` command; closing it waits for the command."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.proc = subprocess.Popen(  # noqa: S602 - the user's own shard command
            url[5:], shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        self.out = self.proc.stdout

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.out.read(n)

    def readinto(self, b: Any) -> int:
        data = self.out.read(len(b))
        b[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        """Wait for the command; a non-zero exit status is a DataError naming the URL."""
        self.out.close()
        err = self.proc.stderr.read() if self.proc.stderr else b""
        rc = self.proc.wait()
        if rc != 0:
            last = (err.decode("utf-8", "replace").strip().splitlines() or [""])[-1]
            raise DataError(f"{self.url}: command exited with status {rc}: {last}".rstrip(": "))


@contextmanager
def open_url(url: str) -> Iterator[IO[bytes]]:
    """Open a shard URL for reading as a binary stream (see the module docstring)."""
    if url.startswith("pipe:"):
        try:
            stream = _PipeStream(url)
        except OSError as err:
            raise DataError(f"{url}: cannot start command ({err})") from None
        try:
            yield stream  # type: ignore[misc]
        except BaseException:
            try:  # a command that failed is the cause of what went wrong reading it
                stream.proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                stream.proc.kill()
                stream.proc.wait()
                raise
            if stream.proc.returncode:
                stream.finish()
            raise
        stream.finish()
        return
    parsed = urlparse(url)
    try:
        if parsed.scheme in ("", "file") or len(parsed.scheme) == 1:  # path, file://, C:\
            path = unquote(parsed.path) if parsed.scheme == "file" else url
            f: Any = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed below
        else:
            import pyarrow.fs as pafs

            fs, path = pafs.FileSystem.from_uri(url)
            # the raw bytes (no decompression by file name: the tar's sha256 is of the file)
            f = fs.open_input_stream(path, compression=None, buffer_size=1 << 20)
    except FileNotFoundError:
        raise DataError(f"{url}: shard not found") from None
    except (OSError, ValueError) as err:
        msg = " ".join(str(err).split())
        raise DataError(f"{url}: cannot open shard ({msg})") from None
    try:
        yield f
    finally:
        f.close()


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, f: Any) -> None:
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n) if n is not None and n >= 0 else self.f.read()
        data = bytes(data)
        self.sha.update(data)
        self.n += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


@dataclass(frozen=True)
class IndexSpec:
    """One external shard to index (picklable).

    ``val_fraction``: for a train shard without separate val shards, the samples with
    :func:`~pipeline.data.shards.is_val_key` true go to ``val``. ``num_classes``: labels at or above
    it are skipped (None: only negative labels are)."""

    url: str
    split: str
    image_keys: tuple[str, ...] = IMAGE_KEYS
    label_key: str = "cls"
    num_classes: int | None = None
    val_fraction: float | None = None


@dataclass(frozen=True)
class IndexResult:
    """Per usable sample: key, split, label, member extension, image bytes and sha256, height,
    width, channels; the skipped samples ``(key, reason)``; samples seen; tar size and sha256."""

    url: str
    split: str
    keys: tuple[str, ...]
    splits: tuple[str, ...]
    labels: tuple[int, ...]
    exts: tuple[str, ...]
    sizes: tuple[int, ...]
    sha256s: tuple[str, ...]
    heights: tuple[int, ...]
    widths: tuple[int, ...]
    channels: tuple[int, ...]
    skipped: tuple[tuple[str, str], ...]
    samples_seen: int
    tar_bytes: int
    tar_sha256: str


def _label(parts: dict[str, bytes], label_key: str) -> int:
    """The sample's integer label; a ValueError says why there is none."""
    if label_key.startswith("json:"):
        field = label_key[5:]
        raw = parts.get("json")
        if raw is None:
            raise ValueError("no .json member")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(".json member is not valid JSON") from None
        if not isinstance(obj, dict) or field not in obj:
            raise ValueError(f".json member has no field {field!r}")
        v = obj[field]
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise ValueError(f"label {v!r} (json field {field}) is not an integer")
        text = str(v)
    else:
        raw = parts.get(label_key)
        if raw is None:
            raise ValueError(f"no .{label_key} member")
        try:
            text = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError(f".{label_key} member is not ASCII text") from None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"label {text[:40]!r} is not an integer") from None


def _samples(tf: tarfile.TarFile, url: str) -> Iterator[tuple[str, dict[str, bytes], int]]:
    """``(key, {ext: bytes}, end offset of the sample's last member)`` per sample."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    end = 0
    for m in tf:
        if not m.isfile():
            continue
        match = _KEY_EXT.match(m.name)
        f = tf.extractfile(m)
        data = f.read() if f is not None else b""
        if len(data) != m.size:
            raise DataError(f"{url}: truncated shard (ends inside member {m.name!r})")
        m_end = m.offset_data + (m.size + 511) // 512 * 512
        if match is None:
            continue  # a member without an extension belongs to no sample
        k, ext = match.group(1), match.group(2).lower()
        if k != key:
            if key is not None:
                yield key, parts, end
            key, parts = k, {}
        parts[ext] = data
        end = m_end
    if key is not None:
        yield key, parts, end


class _Row(NamedTuple):
    """One usable sample of an external shard."""

    key: str
    split: str
    label: int
    ext: str
    size: int
    sha256: str
    height: int
    width: int
    channels: int


def _check_sample(spec: IndexSpec, key: str, parts: dict[str, bytes]) -> _Row | str:
    """The sample's row, or why it is skipped."""
    url = spec.url
    img = next((parts[k] for k in spec.image_keys if k in parts), None)
    if img is None:
        return f"no image member (looked for {', '.join(spec.image_keys)})"
    try:
        label = _label(parts, spec.label_key)
    except ValueError as err:
        return str(err)
    if label < 0 or (spec.num_classes is not None and label >= spec.num_classes):
        top = "" if spec.num_classes is None else f"..{spec.num_classes - 1}"
        return f"label {label} outside 0{top}"
    try:
        ext, h, w, c = probe_image(img, f"{url}: sample {key}")
    except DataError as err:
        return str(err).removeprefix(f"{url}: sample {key}: ")
    split = spec.split
    if spec.val_fraction and is_val_key(key, spec.val_fraction):
        split = "val"
    return _Row(key, split, label, ext, len(img), hashlib.sha256(img).hexdigest(), h, w, c)


def index_shard(spec: IndexSpec) -> IndexResult:
    """Read one external shard once, hashing it, and check every sample (see the module
    docstring). Memory holds one sample at a time."""
    url = spec.url
    rows: list[_Row] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[str, int] = {}
    last_end = 0
    plain = True
    with open_url(url) as f:
        reader = _HashingReader(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|*") as tf:
                plain = getattr(tf.fileobj, "comptype", "tar") == "tar"
                for key, parts, end in _samples(tf, url):
                    last_end = end
                    seen[key] = seen.get(key, 0) + 1
                    if seen[key] == 1:
                        row = _check_sample(spec, key, parts)
                        if isinstance(row, str):
                            skipped.append((key, row))
                        else:
                            rows.append(row)
            while reader.read(1 << 20):  # the rest (end-of-archive padding) enters the hash
                pass
        except tarfile.ReadError as err:
            msg = str(err)
            if "unexpected end" in msg or "empty" in msg:
                raise DataError(f"{url}: truncated shard ({msg})") from None
            raise DataError(f"{url}: not a readable tar shard ({msg})") from None
        except (tarfile.TarError, EOFError, OSError) as err:
            raise DataError(f"{url}: cannot read shard ({type(err).__name__}: {err})") from None
    if plain and reader.n - last_end < 512:
        raise DataError(f"{url}: truncated shard (no end-of-archive marker)")
    dups = {k for k, n in seen.items() if n > 1}
    if dups:
        rows = [r for r in rows if r.key not in dups]
        skipped = [s for s in skipped if s[0] not in dups]
        skipped += [(k, f"key repeats within the shard ({seen[k]} samples)") for k in sorted(dups)]
    return IndexResult(
        url,
        spec.split,
        keys=tuple(r.key for r in rows),
        splits=tuple(r.split for r in rows),
        labels=tuple(r.label for r in rows),
        exts=tuple(r.ext for r in rows),
        sizes=tuple(r.size for r in rows),
        sha256s=tuple(r.sha256 for r in rows),
        heights=tuple(r.height for r in rows),
        widths=tuple(r.width for r in rows),
        channels=tuple(r.channels for r in rows),
        skipped=tuple(skipped),
        samples_seen=sum(seen.values()),
        tar_bytes=reader.n,
        tar_sha256=reader.sha.hexdigest(),
    )


def shard_is_local(url: str) -> bool:
    """Whether a shard URL is a path on this machine (no scheme, or ``file://``)."""
    scheme = urlparse(url).scheme
    return not url.startswith("pipe:") and (scheme in ("", "file") or len(scheme) == 1)


def normalise_url(url: str) -> str:
    """A local shard path made absolute (refs in ``dataset.json`` must not depend on the cwd);
    other URLs unchanged."""
    if url.startswith("pipe:") or "://" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


def _shard_urls(data_cfg: DataConfig) -> dict[str, list[str]]:
    """The shard URLs of each split (expanded, local paths absolute); a shard listed twice is an
    error."""
    urls = {
        "train": expand_urls(data_cfg.train_urls),
        "val": expand_urls(data_cfg.val_urls),
        "test": expand_urls(data_cfg.test_urls),
    }
    urls = {s: [normalise_url(u) for u in v] for s, v in urls.items()}
    owner: dict[str, str] = {}
    for split in SPLITS:
        for u in urls[split]:
            if owner.setdefault(u, split) != split or urls[split].count(u) > 1:
                raise DataError(f"{u}: shard listed twice (in {owner[u]} and {split})")
    return urls


def _merge_results(
    results: list[IndexResult], carve: float | None
) -> tuple[SampleTable, list[ShardRow], list[dict[str, Any]], dict[str, list[str]]]:
    """The shards' samples in one table (a key seen in an earlier shard is skipped), their
    ``shards.parquet`` rows, the skipped samples and, per shard, the skipped keys."""
    samples = SampleTable()
    rows: list[ShardRow] = []
    skipped: list[dict[str, Any]] = []
    skipped_keys: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for r in results:
        per_split = {r.split: 0, **({"val": 0} if carve and r.split == "train" else {})}
        for i, key in enumerate(r.keys):
            where = first.setdefault(key, r.url)
            if where != r.url:
                skipped.append({"shard": r.url, "key": key, "reason": f"key also in {where}"})
                skipped_keys.setdefault(r.url, []).append(key)
                continue
            samples.add(key, r.splits[i], r.labels[i], r.url, r.sizes[i], r.sha256s[i],
                        r.heights[i], r.widths[i], r.channels[i])  # fmt: skip
            per_split[r.splits[i]] += 1
        for key, why in r.skipped:
            skipped.append({"shard": r.url, "key": key, "reason": why})
            skipped_keys.setdefault(r.url, []).append(key)
        for split, n in per_split.items():
            rows.append(ShardRow(split, r.url, n, r.tar_bytes, r.tar_sha256))
    return samples, rows, skipped, skipped_keys


def index_webdataset(
    data_cfg: DataConfig,
    out_dir: str | os.PathLike[str],
    label_fractions: Sequence[float] = (),
    seed: int = 0,
    map_fn: Callable[..., Iterable[IndexResult]] = map,
) -> dict[str, Any]:
    """Index ``data_cfg``'s external shards (``map_fn(index_shard, specs)``, one call per shard)
    into ``out_dir``: manifests, ``skipped.json``, label subsets and, last, ``dataset.json``,
    whose ``shards`` are the absolute URLs. Returns the ``dataset.json`` content.

    Without ``val_urls``, val is the train shards' samples with ``is_val_key(key,
    data.val_fraction)``: the train shards are listed for both splits and ``dataset.json`` says
    ``val_from_train: {"fraction": f, "hash": "sha1"}``. A key seen in an earlier shard is a
    counted skip; a sample skipped in a shard is listed under ``skipped_keys[url]``, so a reader
    of that shard leaves it out."""
    from pipeline.data.shards import DATASET_JSON, _clean_stale

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / DATASET_JSON).unlink(missing_ok=True)
    urls = _shard_urls(data_cfg)
    carve = float(data_cfg.val_fraction) if not urls["val"] and data_cfg.val_fraction else None
    classes = list(data_cfg.classes) if data_cfg.classes else None
    specs = [
        IndexSpec(u, split, tuple(data_cfg.image_keys), data_cfg.label_key,
                  len(classes) if classes else None, carve if split == "train" else None)
        for split in SPLITS
        for u in urls[split]
    ]  # fmt: skip
    results = list(map_fn(index_shard, specs))
    if len(results) != len(specs) or any(
        not isinstance(r, IndexResult) or r.url != s.url
        for r, s in zip(results, specs, strict=False)
    ):
        raise DataError(f"{out}: map_fn did not return one result per shard, in order")
    _clean_stale(out, [], label_fractions)
    samples, rows, skipped, skipped_keys = _merge_results(results, carve)
    if classes is None:
        top = max(samples.label, default=-1)
        classes = [str(i) for i in range(top + 1)]
    return finish_dataset(
        out,
        name="webdataset",
        classes=classes,
        samples=samples,
        shard_rows=rows,
        skipped=skipped,
        label_fractions=label_fractions,
        seed=seed,
        shard_size=None,
        extra={
            "val_fraction": float(data_cfg.val_fraction),
            "val_from_train": {"fraction": carve, "hash": "sha1"} if carve else None,
            "skipped_keys": skipped_keys,
            "image_keys": list(data_cfg.image_keys),
            "label_key": data_cfg.label_key,
            "external": True,
            "source_info": {"urls": {s: len(v) for s, v in urls.items()}},
        },
    )
