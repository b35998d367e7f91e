"""Loader near the decode limit: the streaming loader's images/s (tar read + JPEG decode + two
random resized crops at 64 px, ``data.loader_workers`` = 2 DataLoader workers) on variable-size
JPEG WebDataset shards, next to a bare loop of PIL decode + the same crops over the same bytes
held in memory (in 2 processes: the limit of this approach), and next to what the train step
consumes at 64 px (the demo's model, forward + backward on both views, this machine's threads).

    python benchmarks/stream_loader.py [--data DIR] [--n-train 5000] [--rounds 3]

Loader and bare loop alternate ``--rounds`` times; the medians are reported.

``--data``: a folder made by ``make_wds_jpegs.py`` (default: made in a temporary folder).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from _common import REPO, emit, wds_jpegs

from pipeline.config import load_config, parse_config
from pipeline.data.decode import CropViews
from pipeline.slices import DataRead, ShardSlice
from pipeline.stages import shard as shard_stage
from pipeline.stages.common import StreamSplit

SIZE = 64


def _bare(datas: list[bytes]) -> int:
    crops = CropViews(SIZE, 3, (0.2, 0.2))
    for d in datas:
        crops(d, "bench")
    return len(datas)


def dataset(n_train: int, out: Path) -> tuple[str, list[str]]:
    """Index the JPEG shards as an external WebDataset (no copy); returns (dataset dir, shards)."""
    train, test = wds_jpegs(n_train, out)
    ds = out / "ds"
    if not (ds / "dataset.json").is_file():
        cfg = parse_config(
            {"data": {"source": "webdataset", "train_urls": train, "test_urls": test,
                      "val_fraction": 0.0}, "finetune": {"label_fractions": [1]}}
        )  # fmt: skip
        shard_stage.run(ShardSlice.of(cfg), ds)
    return str(ds), train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="stream-loader-")
    ds, train_shards = dataset(args.n_train, args.data or Path(tmp.name))
    cfg = parse_config({"data": {"loader_workers": args.workers}, "augment": {"image_size": SIZE}})
    split = StreamSplit(DataRead.pick(cfg.data), cfg.seed, ds, "train")
    crops = CropViews(SIZE, 3, (0.2, 0.2))

    def loader_pass(epoch: int) -> float:
        """One epoch over train as training reads it (shuffled shards + buffer, fresh workers)."""
        t = time.perf_counter()
        n = 0
        for (v1, _v2), _y, _k in split.loader(crops, 256, epoch=epoch):
            n += len(v1)
        return n / (time.perf_counter() - t)

    # the bare loop: the same bytes, in memory, split over as many processes (the pool's start
    # is not timed; the loader's worker start and buffer fill are: an epoch pays them)
    datas = []
    for path in train_shards:
        with tarfile.open(path) as tf:
            datas += [tf.extractfile(m).read() for m in tf.getmembers() if m.name.endswith(".jpg")]
    parts = [datas[i :: args.workers] for i in range(args.workers)]
    loader_rates, bare_rates = [], []
    with mp.get_context("fork").Pool(args.workers) as pool:
        pool.map(_bare, [p[:20] for p in parts])  # warm up
        for r in range(args.rounds):  # interleaved: a load change hits both sides
            loader_rates.append(loader_pass(r))
            t = time.perf_counter()
            m = sum(pool.map(_bare, parts))
            bare_rates.append(m / (time.perf_counter() - t))
    loader_rate, bare_rate = statistics.median(loader_rates), statistics.median(bare_rates)

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
        images=len(datas),
        rounds={
            "loader": [round(x, 1) for x in loader_rates],
            "bare": [round(x, 1) for x in bare_rates],
        },
        size=SIZE,
        train_step_images_per_s=round(step_rate, 1),
        loader_over_step=round(loader_rate / step_rate, 3),
    )


if __name__ == "__main__":
    main()
