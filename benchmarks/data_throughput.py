"""Data-path throughput: sharding, in-memory loading, streaming loader + augmentation.

Each result is one JSON line, ``{"benchmark", "value", "unit": "images/s", "baseline", "ratio",
"machine"}``, beside an in-memory baseline:

* ``shard_write``: the shard stage's shard writes (PNG + tar + hashes) vs encoding the same PNGs
  with PIL in a plain loop;
* ``load_split``: decoding a whole split into a uint8 tensor vs decoding the PNGs with PIL in a loop;
* ``loader_torchvision_two_view``: DataLoader over the shards, each image of its batches through
  the per-sample torchvision two-view transform and the views collated, vs that transform on an
  in-memory tensor;
* ``batched_two_view``: ``BatchTwoViewAugment`` on batches of 256 vs the per-sample torchvision
  transform on the same in-memory images (the speed-up the batched path buys).

``--source digits`` (default, no files), ``synthetic`` (random 28x28) or ``fashion-mnist`` (when
installed). Runs on one thread by default (``--threads``); the default run takes well under a minute.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from pipeline.config import parse_config
from pipeline.data.loader import make_loader
from pipeline.data.memory import load_split
from pipeline.data.shards import build_dataset
from pipeline.data.sources import Record, SourceData, prepare_splits
from pipeline.data.transforms import MEAN, STD, BatchTwoViewAugment


class TorchvisionTwoView:
    """The baseline: the SimCLR distribution per sample with torchvision v2, uint8 ``(C, H, W)`` ->
    two float views (what ``BatchTwoViewAugment`` does for a whole batch)."""

    def __init__(
        self,
        size: int,
        channels: int,
        strength: float = 0.5,
        crop_min_scale: float = 0.2,
        mean: float = MEAN,
        std: float = STD,
    ) -> None:
        from torchvision.transforms import v2

        self.size, self.channels = size, channels
        s = float(strength)
        if channels == 3:
            jitter = v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, min(0.2 * s, 0.5))
        else:  # one channel: no saturation / hue (pipeline.data.transforms)
            jitter = v2.ColorJitter(0.8 * s, 0.8 * s)
        ops: list[torch.nn.Module] = [
            v2.RandomResizedCrop(size, scale=(crop_min_scale, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([jitter], p=0.8),
        ]
        if channels == 3:
            ops.append(v2.RandomGrayscale(p=0.2))
        if size >= 64:
            k = max(3, int(0.1 * size) // 2 * 2 + 1)
            ops.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=0.5))
        ops += [
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([mean] * channels, [std] * channels),
        ]
        self.pipeline = v2.Compose(ops)

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if image.ndim != 3 or image.shape[0] != self.channels:
            raise ValueError(
                f"image: expected ({self.channels}, H, W), got shape {tuple(image.shape)}"
            )
        return self.pipeline(image), self.pipeline(image)


def _machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": "cpu",
    }


def _emit(name: str, value: float, baseline: float, **extra: Any) -> None:
    row = {
        "benchmark": name,
        "value": round(value, 1),
        "unit": "images/s",
        "baseline": round(baseline, 1),
        "ratio": round(value / baseline, 3) if baseline else None,
        **extra,
        "machine": _machine(),
    }
    print(json.dumps(row), flush=True)


def _rate(n: int, fn) -> float:
    t0 = time.perf_counter()
    fn()
    return n / max(time.perf_counter() - t0, 1e-9)


def _synthetic(n: int, seed: int = 0) -> SourceData:
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    recs = [Record(f"s_{i:06d}", imgs[i], int(labels[i])) for i in range(n)]
    return SourceData(
        "synthetic", [str(i) for i in range(10)], {"train": recs, "val": [], "test": []}
    )


def _source(name: str, max_train: int | None) -> SourceData:
    if name == "synthetic":
        return _synthetic(max_train or 10000)
    data = {"source": name, "val_fraction": 0.0, "max_train": max_train}
    return prepare_splits(parse_config({"data": data}).data)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=["digits", "synthetic", "fashion-mnist"], default="digits")
    ap.add_argument("--max-train", type=int, default=None, help="cap on train images")
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--aug-images", type=int, default=2048, help="images for the augmentation runs")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from PIL import Image

    data = _source(args.source, args.max_train)
    train = data.splits["train"]
    n = len(train)
    with tempfile.TemporaryDirectory() as tmp:
        # sharding vs encoding PNGs with PIL in a loop
        def pil_encode() -> None:
            for r in train:
                buf = io.BytesIO()
                Image.fromarray(r.image).save(buf, format="PNG")

        base = _rate(n, pil_encode)
        value = _rate(n, lambda: build_dataset(data, tmp, args.shard_size))
        _emit("shard_write", value, base, source=args.source, images=n)

        # in-memory load vs decoding the PNGs with PIL in a loop
        pngs = []
        for r in train:
            buf = io.BytesIO()
            Image.fromarray(r.image).save(buf, format="PNG")
            pngs.append(buf.getvalue())
        base = _rate(n, lambda: [np.asarray(Image.open(io.BytesIO(p))) for p in pngs])
        value = _rate(n, lambda: load_split(tmp, "train"))
        _emit("load_split", value, base, source=args.source, images=n)

        images, _, _ = load_split(tmp, "train")
        c, size = images.shape[1], images.shape[-1]
        m = min(args.aug_images, n)
        sub = images[:m]
        tv = TorchvisionTwoView(size, c, 0.5, 0.2)

        def tv_memory() -> None:
            for i in range(m):
                tv(sub[i])

        tv_base = _rate(m, tv_memory)
        loader = make_loader(tmp, "train", batch_size=256, num_workers=0)

        def tv_loader() -> None:
            seen = 0
            for x, y in loader:
                default_collate([tv(image) for image in x])  # two (B, C, H, W) view batches
                seen += len(y)
                if seen >= m:
                    break

        value = _rate(m, tv_loader)
        _emit("loader_torchvision_two_view", value, tv_base, source=args.source, images=m)

        aug = BatchTwoViewAugment(size, c, 0.5, 0.2)
        g = torch.Generator().manual_seed(0)

        def batched() -> None:
            for i in range(0, m, 256):
                aug(sub[i : i + 256], g)

        batched()  # warm-up
        value = _rate(m, batched)
        _emit("batched_two_view", value, tv_base, source=args.source, images=m, batch=256)


if __name__ == "__main__":
    main()
