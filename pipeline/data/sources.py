"""Image sources: where the pixels come from, before sharding.

Four sources, selected by ``cfg.data.source``:

``fashion-mnist``
    The idx files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-*``, plain or
    ``.gz``). Looked up in ``data.root`` when it is set (and only there), else in
    ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``), else in
    ``~/.cache/contrastive/fashion-mnist``. ``data.download=true`` fetches the files from the
    official mirror into ``data.root`` (or the cache folder) when they are absent.
``cifar10``
    The CIFAR-10 python pickle folder (``data_batch_1..5``, ``test_batch``, ``batches.meta``), in
    ``data.root`` (the folder itself or its parent holding ``cifar-10-batches-py``), else in
    ``~/.cache/contrastive/cifar10``; ``data.download=true`` fetches and unpacks the official archive.
``image-folder``
    ``root/<class>/**/*.{jpg,jpeg,png,webp}``; with ``root/train`` and ``root/test`` sub-folders those
    are the splits, else a seeded, class-stratified 20 % test split is drawn. The folder is only
    *listed* here (records carry the file path, no pixels): the shard stage reads, decode-checks
    and writes each file's original bytes, one shard per task. The folder is contained: hidden
    files and folders are ignored; class folders, sub-folders and files that resolve outside
    ``data.root`` (or to it), symlink loops, broken links, a second link to a folder or file
    already listed, and files of other types are skipped, counted and listed (path, reason); a
    class folder without images is reported the same way and is not a class; fewer than two
    classes is an error. Unreadable or corrupt images are skipped the same way when sharded.
``digits``
    scikit-learn's ``load_digits`` (8x8, values 0..16 scaled to uint8 0..255), seeded class-stratified
    80/20 train/test split. Needs no files: the smoke-test source.

Every source gives class names and, per split (``train``, ``test``), a deterministic list of
:class:`Record` with stable keys (no dots or slashes, so they are valid WebDataset keys).
:func:`prepare_splits` then applies the ``max_train`` / ``max_test`` caps (class-stratified, seeded;
``max_train`` caps the train pool *before* validation is carved out) and carves ``val`` from train.

Problems are :class:`DataError` with a one-line message naming the file or folder.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import logging
import os
import pickle
import re
import tarfile
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.atomic import atomic_write
from pipeline.errors import UserError

__all__ = [
    "CIFAR10_URL",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_URL",
    "IMAGE_EXTENSIONS",
    "DataError",
    "Record",
    "Skip",
    "SourceData",
    "default_fashion_mnist_dirs",
    "load_cifar10",
    "load_digits_source",
    "load_fashion_mnist",
    "load_image_folder",
    "load_source",
    "prepare_splits",
    "read_idx",
    "stratified_indices",
    "stratified_split",
]

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A data problem; ``str(err)`` is one line naming the culprit (file, shard, folder or field)."""


@dataclass(frozen=True)
class Record:
    """One labelled image: ``image`` uint8, ``HxW`` (one channel) or ``HxWxC``; or, for sources
    read from files, ``image`` None and ``path`` the file whose bytes the shard stage keeps."""

    key: str
    image: np.ndarray | None
    label: int
    path: str | None = None


@dataclass(frozen=True)
class Skip:
    """An input that was left out, and why."""

    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass
class SourceData:
    """A loaded source: class names, records per split, and what was skipped.

    ``info`` holds source-specific facts worth recording (e.g. the folder read, resized count).
    """

    name: str
    classes: list[str]
    splits: dict[str, list[Record]]
    skipped: list[Skip] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def channels(self) -> int:
        img = self._first_image()
        return 1 if img.ndim == 2 else int(img.shape[2])

    @property
    def height(self) -> int:
        return int(self._first_image().shape[0])

    @property
    def width(self) -> int:
        return int(self._first_image().shape[1])

    def _first_image(self) -> np.ndarray:
        for recs in self.splits.values():
            if recs and recs[0].image is not None:
                return recs[0].image
        raise DataError(f"source {self.name}: no decoded images in any split")


# --------------------------------------------------------------------------------------------
# stratified selection
# --------------------------------------------------------------------------------------------


def _allocate(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` among classes proportionally to ``counts`` (largest remainder), capped."""
    n = int(counts.sum())
    total = max(0, min(int(total), n))
    if n == 0 or total == 0:
        return np.zeros_like(counts)
    exact = counts * (total / n)
    alloc = np.floor(exact).astype(np.int64)
    rem = total - int(alloc.sum())
    if rem > 0:
        # Largest fractional part first; ties broken by class index (deterministic).
        order = np.lexsort((np.arange(len(counts)), -(exact - alloc)))
        for c in order:
            if rem == 0:
                break
            if alloc[c] < counts[c]:
                alloc[c] += 1
                rem -= 1
    return np.minimum(alloc, counts)


def _class_perm(idx: np.ndarray, seed: int, cls: int, salt: int) -> np.ndarray:
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(cls), int(salt)])
    return idx[rng.permutation(len(idx))]


def stratified_indices(
    labels: Sequence[int] | np.ndarray, n: int, seed: int, salt: int = 0
) -> np.ndarray:
    """Indices (sorted, i.e. in source order) of a seeded class-stratified sample of size ``n``."""
    y = np.asarray(labels, dtype=np.int64)
    if n >= len(y):
        return np.arange(len(y))
    classes = np.unique(y)
    counts = np.array([(y == c).sum() for c in classes], dtype=np.int64)
    alloc = _allocate(counts, n)
    picked = [
        _class_perm(np.flatnonzero(y == c), seed, int(c), salt)[:k]
        for c, k in zip(classes, alloc, strict=True)
    ]
    return np.sort(np.concatenate(picked)) if picked else np.arange(0)


def stratified_split(
    labels: Sequence[int] | np.ndarray, fraction: float, seed: int, salt: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded class-stratified split: ``(keep, carved)`` index arrays (each in source order), where
    ``carved`` holds about ``fraction`` of the items of every class."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"split fraction must lie in [0, 1) (got {fraction})")
    y = np.asarray(labels, dtype=np.int64)
    carved: Sequence[int] | np.ndarray = (
        stratified_indices(y, round(fraction * len(y)), seed, salt) if fraction > 0 else []
    )
    mask = np.zeros(len(y), dtype=bool)
    mask[np.asarray(carved, dtype=np.int64)] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


# --------------------------------------------------------------------------------------------
# atomic download helper
# --------------------------------------------------------------------------------------------


def _download(url: str, dest: Path) -> None:
    """Fetch ``url`` into ``dest`` atomically (a temp file in the same folder and a rename)."""

    def fetch(tmp: str) -> None:
        with open(tmp, "wb") as f, urllib.request.urlopen(url, timeout=120) as r:  # noqa: S310
            while chunk := r.read(1 << 20):
                f.write(chunk)

    log.info("downloading %s -> %s", url, dest)
    try:
        atomic_write(dest, fetch)
    except OSError as err:
        raise DataError(f"download of {url} failed: {err}") from None


# --------------------------------------------------------------------------------------------
# fashion-mnist
# --------------------------------------------------------------------------------------------

FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def default_fashion_mnist_dirs() -> list[Path]:
    """Where Fashion-MNIST is looked for when ``data.root`` is not set, in order."""
    return [
        Path("/usr/share/datasets/fashion-mnist"),
        Path("~/.cache/contrastive/fashion-mnist").expanduser(),
    ]


def read_idx(path: str | os.PathLike[str], expect_dims: int) -> np.ndarray:
    """Read an idx file (plain or ``.gz``) of unsigned bytes with ``expect_dims`` dimensions,
    checking the magic number and the size; a wrong file is a one-line :class:`DataError`."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot read idx file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an idx file (bad magic number)")
    dtype_code, ndim = raw[2], raw[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: idx data type 0x{dtype_code:02x}, expected unsigned bytes (0x08)")
    if ndim != expect_dims:
        raise DataError(f"{path}: idx file has {ndim} dimensions, expected {expect_dims}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(f"{path}: idx size {len(raw)} bytes, expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fm_complete(folder: Path) -> bool:
    return all(
        _find_idx(folder, s) is not None for pair in FASHION_MNIST_FILES.values() for s in pair
    )


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    download: bool = False,
    search_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> SourceData:
    """Fashion-MNIST from idx files.

    ``root`` set: only that folder is consulted (and downloaded into). ``root`` None: the folders
    ``search_dirs`` (default :func:`default_fashion_mnist_dirs`) in order; a download goes to the last.
    """
    if root is not None:
        dirs = [Path(root).expanduser()]
    else:
        dirs = [Path(d).expanduser() for d in (search_dirs or default_fashion_mnist_dirs())]
    if not dirs:
        raise DataError("fashion-mnist: no folder to look in")
    folder = next((d for d in dirs if _fm_complete(d)), None)
    if folder is None and download:
        folder = dirs[-1]
        for pair in FASHION_MNIST_FILES.values():
            for stem in pair:
                if _find_idx(folder, stem) is None:
                    _download(FASHION_MNIST_URL + stem + ".gz", folder / (stem + ".gz"))
    if folder is None:
        where = ", ".join(str(d) for d in dirs)
        raise DataError(
            f"fashion-mnist: idx files not found in {where}; get them with "
            "`apt-get install dataset-fashion-mnist`, or set data.download=true (needs the internet), "
            "or point data.root at a folder holding train-images-idx3-ubyte[.gz] etc."
        )
    splits: dict[str, list[Record]] = {}
    for split, (img_stem, lbl_stem) in FASHION_MNIST_FILES.items():
        img_path = _find_idx(folder, img_stem)
        lbl_path = _find_idx(folder, lbl_stem)
        assert img_path is not None and lbl_path is not None
        images = read_idx(img_path, 3)
        labels = read_idx(lbl_path, 1)
        if images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images in {img_path.name}"
            )
        if labels.size and int(labels.max()) >= len(FASHION_MNIST_CLASSES):
            raise DataError(f"{lbl_path}: label {int(labels.max())} outside 0..9")
        splits[split] = [
            Record(f"{split}_{i:06d}", images[i], int(labels[i])) for i in range(images.shape[0])
        ]
    return SourceData(
        "fashion-mnist", list(FASHION_MNIST_CLASSES), splits, info={"root": str(folder)}
    )


# --------------------------------------------------------------------------------------------
# cifar10
# --------------------------------------------------------------------------------------------

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def _cifar_folder(root: Path) -> Path | None:
    for cand in (root, root / _CIFAR_DIR):
        if (cand / "batches.meta").is_file():
            return cand
    return None


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with path.open("rb") as f:
            obj = pickle.load(f, encoding="bytes")  # noqa: S301 - the official CIFAR format
    except FileNotFoundError:
        raise DataError(f"{path}: missing CIFAR-10 batch file") from None
    except Exception as err:  # noqa: BLE001 - any unpickling failure is a bad file
        raise DataError(f"{path}: not a CIFAR-10 pickle ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR-10 pickle (top level is {type(obj).__name__})")
    return obj


def load_cifar10(root: str | os.PathLike[str] | None = None, download: bool = False) -> SourceData:
    """CIFAR-10 from its python pickle folder (HxWx3 uint8 images)."""
    base = Path(root).expanduser() if root else Path("~/.cache/contrastive/cifar10").expanduser()
    folder = _cifar_folder(base)
    if folder is None and download:
        archive = base / "cifar-10-python.tar.gz"
        if not archive.is_file():
            _download(CIFAR10_URL, archive)
        try:
            with tarfile.open(archive, "r:gz") as tf:
                tf.extractall(base, filter="data")
        except (tarfile.TarError, OSError, EOFError) as err:
            raise DataError(f"{archive}: cannot unpack ({err})") from None
        folder = _cifar_folder(base)
    if folder is None:
        raise DataError(
            f"cifar10: no batches.meta in {base} or {base / _CIFAR_DIR}; download and unpack "
            f"{CIFAR10_URL} there, or set data.download=true (needs the internet), or point data.root "
            "at the cifar-10-batches-py folder"
        )
    meta = _unpickle(folder / "batches.meta")
    names = meta.get(b"label_names")
    if not isinstance(names, list) or not names:
        raise DataError(f"{folder / 'batches.meta'}: no label_names")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    splits: dict[str, list[Record]] = {}
    for split, files in _CIFAR_FILES.items():
        recs: list[Record] = []
        for fname in files:
            batch = _unpickle(folder / fname)
            data, labels = batch.get(b"data"), batch.get(b"labels")
            if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3072:
                raise DataError(f"{folder / fname}: 'data' is not an N x 3072 array")
            if labels is None or len(labels) != data.shape[0]:
                raise DataError(f"{folder / fname}: 'labels' missing or of the wrong length")
            imgs = np.ascontiguousarray(
                data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            )
            for i in range(imgs.shape[0]):
                lab = int(labels[i])
                if not 0 <= lab < len(classes):
                    raise DataError(
                        f"{folder / fname}: label {lab} at row {i} outside 0..{len(classes) - 1}"
                    )
                recs.append(Record(f"{split}_{len(recs):05d}", imgs[i], lab))
        splits[split] = recs
    return SourceData("cifar10", classes, splits, info={"root": str(folder)})


# --------------------------------------------------------------------------------------------
# image folder
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
_KEY_BAD = re.compile(r"[^A-Za-z0-9_-]+")


def _make_key(rel: str, used: set[str]) -> str:
    key = _KEY_BAD.sub("_", rel).strip("_") or "img"
    if len(key) > 80:
        key = key[:60] + "_" + hashlib.sha1(rel.encode()).hexdigest()[:12]
    base, n = key, 1
    while key in used:
        n += 1
        key = f"{base}-{n}"
    used.add(key)
    return key


class _Walker:
    """Lists image folders inside one root: every entry is resolved, and what lies outside the
    root, loops, broken links and second links to an already listed folder or file are skips."""

    def __init__(self, root: Path, skipped: list[Skip]) -> None:
        self.root = root.resolve()
        self.skipped = skipped
        self.dirs: set[Path] = {self.root}
        self.files: dict[Path, str] = {}

    def _resolve(self, p: Path) -> Path | None:
        try:
            real = p.resolve(strict=True)
        except RuntimeError:  # Python < 3.13 reports a loop this way
            self.skipped.append(Skip(str(p), "symlink loop"))
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                self.skipped.append(Skip(str(p), "symlink loop"))
            elif p.is_symlink():
                self.skipped.append(Skip(str(p), "broken symlink"))
            else:
                self.skipped.append(Skip(str(p), f"unreadable ({err.strerror or err})"))
            return None
        if real == self.root:
            self.skipped.append(Skip(str(p), "resolves to data.root itself"))
            return None
        if not real.is_relative_to(self.root):
            self.skipped.append(Skip(str(p), f"resolves outside data.root (to {real})"))
            return None
        return real

    def entries(self, folder: Path) -> list[Path]:
        try:
            names = sorted(os.listdir(folder))
        except OSError as err:
            self.skipped.append(Skip(str(folder), f"unreadable folder ({err.strerror or err})"))
            return []
        return [folder / n for n in names if not n.startswith(".")]  # hidden: ignored

    def enter(self, p: Path, ancestors: frozenset[Path]) -> Path | None:
        """The real path of folder ``p`` if it is to be listed, else None (skip recorded)."""
        real = self._resolve(p)
        if real is None:
            return None
        if real in ancestors:
            self.skipped.append(Skip(str(p), "symlink loop (links to an enclosing folder)"))
            return None
        if real in self.dirs:
            self.skipped.append(Skip(str(p), "links to a folder listed already"))
            return None
        self.dirs.add(real)
        return real

    def files_under(self, folder: Path, real: Path, ancestors: frozenset[Path]) -> list[Path]:
        """Image files under ``folder`` (recursively, in sorted order); other entries skipped."""
        out: list[Path] = []
        ancestors = ancestors | {real}
        for p in self.entries(folder):
            if p.is_dir():
                sub = self.enter(p, ancestors)
                if sub is not None:
                    out += self.files_under(p, sub, ancestors)
                continue
            target = self._resolve(p)
            if target is None:
                continue
            if not target.is_file():
                self.skipped.append(Skip(str(p), "not a regular file"))
                continue
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                self.skipped.append(
                    Skip(str(p), f"not an image (extension {p.suffix or 'none'!r})")
                )
                continue
            first = self.files.setdefault(target, str(p))
            if first != str(p):
                self.skipped.append(Skip(str(p), f"same file as {first}"))
                continue
            out.append(p)
        return out


def _scan_classes(folder: Path, walker: _Walker) -> dict[str, list[Path]]:
    """class name -> sorted image paths under ``folder/<class>/`` (recursively)."""
    out: dict[str, list[Path]] = {}
    top = walker.root if folder.resolve() == walker.root else folder.resolve()
    for entry in walker.entries(folder):
        if entry.is_dir():
            real = walker.enter(entry, frozenset({walker.root, top}))
            if real is None:
                continue
            files = walker.files_under(entry, real, frozenset({walker.root, top}))
            if not files:
                walker.skipped.append(Skip(str(entry), "empty class folder (no images)"))
                continue
            out[entry.name] = files
        elif entry.exists() or entry.is_symlink():
            walker.skipped.append(Skip(str(entry), "file outside a class folder"))
    return out


def load_image_folder(
    root: str | os.PathLike[str] | None, seed: int = 0, test_fraction: float = 0.2
) -> SourceData:
    """The files in ``root/<class>/`` (or ``root/{train,test}/<class>/``) as records with a path
    and no pixels; see the module docstring."""
    if root is None:
        raise DataError("data.root: must name the image folder for source image-folder")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root: image folder {base} does not exist")
    skipped: list[Skip] = []
    walker = _Walker(base, skipped)
    presplit = (base / "train").is_dir() and (base / "test").is_dir()
    if presplit:
        scans = {}
        for s in ("train", "test"):
            real = walker.enter(base / s, frozenset({walker.root}))
            scans[s] = _scan_classes(base / s, walker) if real is not None else {}
        # Anything else at the top level is not part of the dataset.
        for entry in walker.entries(base):
            if entry.name not in ("train", "test"):
                skipped.append(Skip(str(entry), "outside the train/test folders"))
    else:
        scans = {"all": _scan_classes(base, walker)}
    classes = sorted({c for scan in scans.values() for c in scan})
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        example = f"; e.g. {skipped[0].path}: {skipped[0].reason}" if skipped else ""
        raise DataError(
            f"image folder {base}: needs at least two class folders with images, found {found} "
            f"(expected root/<class>/*.jpg ...; {len(skipped)} skipped{example})"
        )
    class_idx = {c: i for i, c in enumerate(classes)}

    used: set[str] = set()
    records: dict[str, list[Record]] = {}
    for split, scan in scans.items():
        recs: list[Record] = []
        for cls in sorted(scan):
            for path in scan[cls]:
                key = _make_key(path.relative_to(base).as_posix(), used)
                recs.append(Record(key, None, class_idx[cls], str(path)))
        records[split] = recs
    if not presplit:
        recs = records.pop("all")
        keep, test = stratified_split([r.label for r in recs], test_fraction, seed, salt=7)
        records = {"train": [recs[i] for i in keep], "test": [recs[i] for i in test]}
    if skipped:
        log.warning("image folder %s: %d inputs skipped (see skipped.json)", base, len(skipped))
    info = {"root": str(base), "presplit": presplit}
    return SourceData("image-folder", classes, records, skipped, info)


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


def load_digits_source(seed: int = 0, test_fraction: float = 0.2) -> SourceData:
    """scikit-learn's 8x8 digits, scaled 0..16 -> 0..255, seeded stratified train/test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = d.target.astype(np.int64)
    recs = [Record(f"digits_{i:04d}", images[i], int(labels[i])) for i in range(len(labels))]
    keep, test = stratified_split(labels, test_fraction, seed, salt=7)
    splits = {"train": [recs[i] for i in keep], "test": [recs[i] for i in test]}
    return SourceData("digits", [str(i) for i in range(10)], splits)


# --------------------------------------------------------------------------------------------
# selection by config
# --------------------------------------------------------------------------------------------


def load_source(
    data_cfg: Any, fashion_mnist_dirs: Sequence[str | os.PathLike[str]] | None = None
) -> SourceData:
    """The raw ``train``/``test`` splits of ``data_cfg.source`` (a :class:`DataConfig`).

    ``fashion_mnist_dirs`` replaces the default search folders (used when ``data.root`` is unset).
    """
    source = data_cfg.source
    if source == "fashion-mnist":
        return load_fashion_mnist(data_cfg.root, data_cfg.download, fashion_mnist_dirs)
    if source == "cifar10":
        return load_cifar10(data_cfg.root, data_cfg.download)
    if source == "image-folder":
        return load_image_folder(data_cfg.root, data_cfg.seed)
    if source == "digits":
        return load_digits_source(data_cfg.seed)
    raise DataError(f"data.source: unknown source {source!r}")


def prepare_splits(
    data_cfg: Any, fashion_mnist_dirs: Sequence[str | os.PathLike[str]] | None = None
) -> SourceData:
    """Load the source, cap ``train``/``test`` (class-stratified, seeded) and carve ``val`` from train.

    The result has the splits ``train``, ``val`` (possibly empty) and ``test``, each in source order.
    """
    data = load_source(data_cfg, fashion_mnist_dirs)
    seed = int(data_cfg.seed)
    train, test = data.splits.get("train", []), data.splits.get("test", [])
    if data_cfg.max_train is not None and len(train) > data_cfg.max_train:
        idx = stratified_indices([r.label for r in train], data_cfg.max_train, seed, salt=11)
        train = [train[i] for i in idx]
    if data_cfg.max_test is not None and len(test) > data_cfg.max_test:
        idx = stratified_indices([r.label for r in test], data_cfg.max_test, seed, salt=13)
        test = [test[i] for i in idx]
    keep, val = stratified_split(
        [r.label for r in train], float(data_cfg.val_fraction), seed, salt=17
    )
    if not len(keep):
        raise DataError(f"data.val_fraction: leaves no training images ({len(train)} in train)")
    data.splits = {"train": [train[i] for i in keep], "val": [train[i] for i in val], "test": test}
    return data
