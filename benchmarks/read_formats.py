"""Why ``load_split`` keeps one small reader: the in-memory load of this package's PNG shards
(28 px Fashion-MNIST-sized) through its PNG reader (one ``zlib.decompress`` per PNG, the row
filters undone in numpy for all images at once) next to PIL's decode of the same PNGs, both
behind the stream's tar reader, on the same shards, same process. Every training stage loads
its splits, so this is on the demo's path.

    python benchmarks/read_formats.py [--data DATASET_DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import emit

from pipeline.config import parse_config
from pipeline.data.decode import TensorDecoder
from pipeline.data.folder import dataset_info, shard_refs
from pipeline.data.tarstream import _iter_raw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="read-formats-")
    ds = args.data
    if ds is None:
        from pipeline.slices import ShardSlice
        from pipeline.stages import shard as shard_stage

        ds = Path(tmp.name) / "ds"
        cfg = parse_config({"data": {"source": "fashion-mnist", "max_train": 10000,
                                     "max_test": 1000, "shard_size": 5000}})  # fmt: skip
        shard_stage.run(ShardSlice.of(cfg), ds)
    info = dataset_info(ds)
    refs = shard_refs(ds, "train")
    from pipeline.data.memory import load_split

    load_split(ds, "val")  # warm the imports and caches
    t = time.perf_counter()
    images, _, _ = load_split(ds, "train")
    fast = len(images) / (time.perf_counter() - t)
    dec = TensorDecoder(int(info["channels"]))
    t = time.perf_counter()
    n = 0
    for r in refs:
        for _, _k, parts in _iter_raw(r):
            dec(parts["png"], "bench")
            n += 1
    lib = n / (time.perf_counter() - t)
    assert n == len(images)
    emit(
        "read_formats_in_memory_png_images_per_s",
        fast,
        "images/s",
        lib,
        digits=1,
        baseline_is="the same tar reader + PIL decode of the same shards",
        images=n,
    )


if __name__ == "__main__":
    main()
