"""Make a benchmark dataset of variable-size colour JPEGs from Fashion-MNIST.

Each image is a Fashion-MNIST item, scaled up and tinted, pasted at a random place on a larger
canvas of random size and colour (a two-colour gradient with some noise), saved as JPEG. The
label is the item's class. Written as WebDataset shards (``<out>/wds/{train,test}-NNNNNN.tar``,
members ``<key>.jpg`` and ``<key>.cls``, fixed tar metadata) and/or as an image folder
(``<out>/folder/{train,test}/<class>/<key>.jpg``). The same arguments give the same bytes.

    python benchmarks/make_wds_jpegs.py --out /tmp/wds5k --n-train 5000 --n-test 1000

The last line printed is one JSON object with the counts, the bytes written and the
``data.train_urls`` / ``data.test_urls`` brace patterns (or the folder) to put in a config, e.g.
``--set data.source=webdataset --set data.train_urls=<train_urls> --set data.test_urls=...``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pipeline.data.sources import FASHION_MNIST_CLASSES, FASHION_MNIST_FILES, read_idx  # noqa: E402

FM_DIR = Path("/usr/share/datasets/fashion-mnist")


def _idx_path(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise SystemExit(f"{folder}: no {stem}[.gz] (apt-get install dataset-fashion-mnist)")


def load_items(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` ("train" or "test"): uint8 images N x 28 x 28 and labels."""
    img_stem, lbl_stem = FASHION_MNIST_FILES[split]
    return read_idx(_idx_path(folder, img_stem), 3), read_idx(_idx_path(folder, lbl_stem), 1)


def compose(
    item: np.ndarray, rng: np.random.Generator, min_side: int, max_side: int
) -> Image.Image:
    """One canvas of random size and colours with the item pasted on it."""
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    c0, c1 = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    t = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    canvas = c0 * (1 - t) + c1 * t + rng.normal(0, 6, size=(h, w, 3)).astype(np.float32)
    side = min(w, h)
    scale = rng.uniform(0.45, 0.95) * side / 28.0
    size = max(8, int(round(28 * scale)))
    glyph = np.asarray(Image.fromarray(item).resize((size, size), Image.Resampling.BILINEAR))
    alpha = glyph.astype(np.float32)[..., None] / 255.0
    # the item stands out: its tint is about opposite the canvas's mean colour
    tint = (0.5 * (c0 + c1) + 128 + rng.integers(-40, 41, size=3)) % 256
    y = int(rng.integers(0, h - size + 1))
    x = int(rng.integers(0, w - size + 1))
    region = canvas[y : y + size, x : x + size]
    canvas[y : y + size, x : x + size] = region * (1 - alpha) + tint * alpha
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = (
        len(data), 0, 0o644, 0, 0, "", ""
    )  # fmt: skip
    tf.addfile(ti, io.BytesIO(data))


def make_split(
    split: str,
    n: int,
    items: np.ndarray,
    labels: np.ndarray,
    out: Path,
    args: argparse.Namespace,
) -> dict[str, int]:
    """Write ``n`` images of ``split``; returns counts and bytes."""
    rng = np.random.default_rng([args.seed, 0 if split == "train" else 1])
    order = rng.permutation(len(items))
    wds = args.format in ("wds", "both")
    folder = args.format in ("folder", "both")
    tf: tarfile.TarFile | None = None
    shard = -1
    total = 0
    for i in range(n):
        j = int(order[i % len(order)])
        key = f"{split}_{i:07d}"
        img = compose(items[j], rng, args.min_side, args.max_side)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=args.quality)
        data = buf.getvalue()
        total += len(data)
        label = int(labels[j])
        if wds:
            if i % args.shard_size == 0:
                if tf is not None:
                    tf.close()
                shard += 1
                path = out / "wds" / f"{split}-{shard:06d}.tar"
                path.parent.mkdir(parents=True, exist_ok=True)
                tf = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)
            assert tf is not None
            _member(tf, f"{key}.jpg", data)
            _member(tf, f"{key}.cls", str(label).encode("ascii"))
        if folder:
            cls = FASHION_MNIST_CLASSES[label].replace("/", "-").replace(" ", "_")
            p = out / "folder" / split / cls / f"{key}.jpg"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
    if tf is not None:
        tf.close()
    return {"images": n, "shards": shard + 1, "jpeg_bytes": total}


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=None, help="default: n-train / 5")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--min-side", type=int, default=48)
    ap.add_argument("--max-side", type=int, default=160)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--format", choices=("wds", "folder", "both"), default="wds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fashion-mnist", type=Path, default=FM_DIR)
    args = ap.parse_args(argv)
    if not 28 <= args.min_side <= args.max_side:
        ap.error("needs 28 <= --min-side <= --max-side")
    n_test = args.n_test if args.n_test is not None else max(1, args.n_train // 5)
    t0 = time.perf_counter()
    out: Path = args.out
    res: dict[str, object] = {"out": str(out)}
    for split, n in (("train", args.n_train), ("test", n_test)):
        items, labels = load_items(args.fashion_mnist, split)
        res[split] = make_split(split, n, items, labels, out, args)
    if args.format in ("wds", "both"):
        for split in ("train", "test"):
            k = res[split]["shards"]  # type: ignore[index]
            res[f"{split}_urls"] = str(out / "wds" / f"{split}-{{000000..{k - 1:06d}}}.tar")
    if args.format in ("folder", "both"):
        res["folder"] = str(out / "folder")
    res["seconds"] = round(time.perf_counter() - t0, 2)
    res["cores"] = os.cpu_count()
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
