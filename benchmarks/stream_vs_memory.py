"""Streaming costs nothing: pretraining views/s of the demo config (Fashion-MNIST, 28 px) on the
streaming path (``data.in_memory: false``: shards read by ``data.loader_workers`` DataLoader
workers, crops made there, colour batched) next to the in-memory path, in one process on one
machine, interleaved (memory, stream, memory, stream, ...), each a short epoch of the real
``pretrain`` stage.

    python benchmarks/stream_vs_memory.py [--data DATASET_DIR] [--steps 40] [--rounds 2]

``--data``: a finished demo dataset folder (default: the shard stage writes one in a temporary
folder, about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch
from _common import REPO, emit

from pipeline.config import load_config
from pipeline.slices import PretrainSlice, ShardSlice
from pipeline.stages import pretrain
from pipeline.stages import shard as shard_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="stream-vs-memory-")
    base = load_config(str(REPO / "workflows/configs/demo.yaml"))
    ds = args.data
    if ds is None:
        ds = Path(tmp.name) / "ds"
        shard_stage.run(ShardSlice.of(base), ds)
    torch.set_num_threads(base.resources.torch_threads or 2)
    rates: dict[bool, list[float]] = {True: [], False: []}
    for r in range(args.rounds):
        for in_memory in (True, False):
            cfg = load_config(
                str(REPO / "workflows/configs/demo.yaml"),
                [
                    f"data.in_memory={str(in_memory).lower()}",
                    "pretrain.epochs=1",
                    f"pretrain.max_steps_per_epoch={args.steps}",
                    "pretrain.knn_every=0",
                    "pretrain.pseudo_label_from_epoch=0",
                ],
            )
            res = pretrain.run(
                PretrainSlice.of(cfg),
                {"dataset": str(ds)},
                str(Path(tmp.name) / f"r{r}{in_memory}"),
            )
            assert res.metrics["data_streaming"] == float(not in_memory)
            rates[in_memory].append(res.metrics["views_per_s"])
    stream, memory = statistics.median(rates[False]), statistics.median(rates[True])
    emit(
        "stream_vs_memory_pretrain_views_per_s",
        stream,
        "views/s",
        memory,
        digits=1,
        goal=">= 0.9 x the in-memory path",
        streaming_runs=[round(v, 1) for v in rates[False]],
        in_memory_runs=[round(v, 1) for v in rates[True]],
        steps=args.steps,
        loader_workers=base.data.loader_workers,
        threads=torch.get_num_threads(),
    )


if __name__ == "__main__":
    main()
