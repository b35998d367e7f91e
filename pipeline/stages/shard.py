"""The ``shard`` stage: source -> WebDataset tar shards + manifests + subsets + dataset.json.

``run(ShardSlice.of(cfg), out_dir, map_fn=map)`` runs in one process with the builtin ``map``;
``workflows.sharding.shard_with_ray`` passes a ``map_fn`` that runs one Ray task per shard. For
``data.source: webdataset`` the user's shards are not copied: each task indexes one of them
(:func:`pipeline.data.external.index_webdataset`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.data.shards import DATASET_JSON, MANIFEST, SKIPPED_JSON, build_dataset
from pipeline.data.sources import prepare_splits
from pipeline.runtime import StageResult
from pipeline.slices import ShardSlice

__all__ = ["run"]


def run(
    cfg: ShardSlice,
    out_dir: str | os.PathLike[str],
    map_fn: Callable[..., Iterable[Any]] = map,
    fashion_mnist_dirs: Sequence[str | os.PathLike[str]] | None = None,
) -> StageResult:
    """Shard ``cfg.data.source`` into ``out_dir``, with a class-balanced subset for each of
    ``cfg.fractions`` (percent).

    ``map_fn(fn, specs)`` writes (or, for external shards, indexes) one shard per call (any
    ``map``-like callable, e.g. Ray tasks).
    ``fashion_mnist_dirs`` overrides where Fashion-MNIST is looked for when ``data.root`` is unset.
    Metrics: sample counts per split, shard count, skipped count and images/s.
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    fractions = list(cfg.fractions)
    if cfg.data.source == "webdataset":
        from pipeline.data.external import index_webdataset

        t_load = 0.0
        info = index_webdataset(cfg.data, out, fractions, cfg.data.seed, map_fn)
    else:
        data = prepare_splits(cfg.data, fashion_mnist_dirs)
        t_load = time.perf_counter() - t0
        info = build_dataset(
            data,
            out,
            cfg.data.shard_size,
            fractions,
            cfg.data.seed,
            map_fn,
            extra={"val_fraction": float(cfg.data.val_fraction)},
            max_side=cfg.data.max_side,
        )
        del data
    elapsed = time.perf_counter() - t0
    total = sum(info["counts"].values())
    outputs = {
        "dataset": str(out),
        "dataset_json": str(out / DATASET_JSON),
        "manifest": str(out / MANIFEST),
        "skipped": str(out / SKIPPED_JSON),
    }
    for fmt, sub in info["subsets"].items():
        outputs[f"subset_{fmt}"] = str(out / sub["path"])
    metrics: dict[str, float] = {
        "num_images": float(total),
        **{f"num_{s}": float(n) for s, n in info["counts"].items()},
        "num_shards": float(len({ref for refs in info["shards"].values() for ref in refs})),
        "num_skipped": float(info["skipped"]),
        "load_seconds": round(t_load, 3),
        "seconds": round(elapsed, 3),
        "images_per_s": total / elapsed if elapsed > 0 else 0.0,
    }
    return StageResult(outputs=outputs, metrics=metrics, history=[])
