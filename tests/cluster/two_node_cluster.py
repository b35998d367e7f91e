"""Run the smoke pipeline on a 2-node Ray cluster on this machine and lose the worker node in the
middle of pretraining (run by tests/faults/test_kills.py in its own process: one process can hold only
one Ray connection).

    python tests/cluster/two_node_cluster.py STORAGE_ROOT  -> prints one JSON line with the outcome

The head node has no CPUs (it holds only the driver and the CPU-free stage coordinators); all
training runs on the worker node. When pretraining has written its first checkpoint the worker node
is removed (its raylet and workers die) and a fresh worker node joins, as an autoscaler would
replace it. The pretrain task is retried on the new node and continues from the checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main(root: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from pipeline.config import load_config
    from workflows import orchestrate
    from workflows.state import RunStore

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "include_dashboard": False},
    )
    worker = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    cfg = load_config(
        "smoke",
        [
            f"storage.root={root}",
            "finetune.label_fractions=[20]",
            "finetune.baseline=false",
            "distill.enabled=false",
            "pretrain.epochs=5",
            "pretrain.max_steps_per_epoch=3",
            "pretrain.knn_every=0",
            "finetune.epochs=1",
            "finetune.min_steps=4",
            "evaluate.linear_epochs=2",
            "evaluate.embedding_samples=50",
            "tracking.enabled=false",
        ],
    )
    rid = "two-node"
    ckpt = Path(root) / rid / "stages" / "pretrain" / "checkpoints" / "latest.pt"
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(rc=orchestrate.run_pipeline(cfg, run_id=rid)))
    th.start()
    deadline = time.time() + 240
    while not ckpt.exists() and time.time() < deadline and th.is_alive():
        time.sleep(0.1)
    removed = False
    if ckpt.exists():
        cluster.remove_node(worker)  # SIGKILLs the node's raylet and its workers
        removed = True
        time.sleep(1.0)
        cluster.add_node(num_cpus=2)
    th.join(timeout=400)
    store = RunStore(root)
    states = {n: s.state for n, s in store.stage_states(rid).items()}
    hist = []
    m = store.read_manifest(rid, "pretrain")
    if m:
        hist = json.loads(Path(m["outputs"]["history"]).read_text())
    print(
        json.dumps(
            {
                "rc": box.get("rc"),
                "removed": removed,
                "nodes": len(ray.nodes()),
                "states": states,
                "epochs": [h["epoch"] for h in hist],
                "resumed_from": [h["resumed_from_epoch"] for h in hist],
            }
        ),
        flush=True,
    )
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
