"""Loader near the decode limit: the streaming loader's images/s (tar read + JPEG decode + two
random resized crops at 64 px, ``data.loader_workers`` = 2 DataLoader workers) on variable-size
JPEG WebDataset shards, next to a bare loop of PIL decode + the same crops over the same bytes
held in memory (in 2 processes: the limit of this approach), and next to what the train step
consumes at 64 px (the demo's model, forward + backward on both views, this machine's threads).

    python benchmarks/stream_loader.py [--data DIR] [--n-train 2000]

``--data``: a folder made by ``make_wds_jpegs.py`` (default: made in a temporary folder).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO, emit

from pipeline.config import load_config, parse_config
from pipeline.data.decode import CropViews
from pipeline.stages import shard as shard_stage
from pipeline.stages.common import StreamSplit

SIZE = 64


def _bare(datas: list[bytes]) -> int:
    crops = CropViews(SIZE, 3, (0.2, 0.2))
    for d in datas:
        crops(d, "bench")
    return len(datas)


def make_data(n_train: int, out: Path) -> Path:
    if not (out / "wds").is_dir():
        subprocess.run(
            [sys.executable, str(REPO / "benchmarks/make_wds_jpegs.py"), "--out", str(out),
             "--n-train", str(n_train), "--shard-size", "500"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
    return out


def dataset(out: Path) -> tuple[str, list[str]]:
    """Index the JPEG shards as an external WebDataset (no copy); returns (dataset dir, shards)."""
    train = sorted(str(p) for p in (out / "wds").glob("train-*.tar"))
    test = sorted(str(p) for p in (out / "wds").glob("test-*.tar"))
    ds = out / "ds"
    if not (ds / "dataset.json").is_file():
        cfg = parse_config(
            {"data": {"source": "webdataset", "train_urls": train, "test_urls": test,
                      "val_fraction": 0.0}, "finetune": {"label_fractions": [1]}}
        )  # fmt: skip
        shard_stage.run(cfg, ds)
    return str(ds), train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--n-train", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="stream-loader-")
    out = make_data(args.n_train, args.data or Path(tmp.name))
    ds, train_shards = dataset(out)
    cfg = parse_config({"data": {"loader_workers": args.workers}, "augment": {"image_size": SIZE}})

    # the loader: one pass over train (shuffled shards + buffer, as training reads it)
    split = StreamSplit(cfg, ds, "train")
    crops = CropViews(SIZE, 3, (0.2, 0.2))
    split.count  # noqa: B018
    t = time.perf_counter()
    n = 0
    for (v1, _v2), _y, _k in split.loader(crops, 256, epoch=0):
        n += len(v1)
    loader_rate = n / (time.perf_counter() - t)

    # the bare loop: the same bytes, in memory, split over as many processes
    datas = []
    for path in train_shards:
        with tarfile.open(path) as tf:
            datas += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    parts = [datas[i :: args.workers] for i in range(args.workers)]
    with mp.get_context("fork").Pool(args.workers) as pool:
        pool.map(_bare, [p[:20] for p in parts])  # warm up
        t = time.perf_counter()
        m = sum(pool.map(_bare, parts))
        bare_rate = m / (time.perf_counter() - t)

    # what a train step consumes at 64 px (the demo's model, 3 channels, batch 256)
    demo = load_config(str(REPO / "workflows/configs/demo.yaml"))
    from pipeline.data.transforms import BatchTwoViewAugment
    from pipeline.losses import SupConLoss
    from pipeline.models import build_contrastive_model

    model = build_contrastive_model(demo.model, in_channels=3).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    aug = BatchTwoViewAugment(SIZE, 3, 0.5, 0.3)
    loss_fn = SupConLoss(0.2)
    x8 = torch.randint(0, 256, (256, 3, SIZE, SIZE), dtype=torch.uint8)

    def step() -> None:
        v1, v2 = aug.colour(x8), aug.colour(x8)
        _, z = model(torch.cat([v1, v2]).contiguous(memory_format=torch.channels_last))
        loss = loss_fn(z.view(2, -1, z.shape[-1]).transpose(0, 1), None)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(3):
        step()
    step_rate = 3 * 256 / (time.perf_counter() - t)
    emit(
        "stream_loader_images_per_s",
        loader_rate,
        "images/s",
        bare_rate,
        digits=1,
        goal=">= 0.9 x the bare PIL decode + crop loop",
        workers=args.workers,
        images=n,
        size=SIZE,
        train_step_images_per_s=round(step_rate, 1),
        loader_over_step=round(loader_rate / step_rate, 3),
    )


if __name__ == "__main__":
    main()
