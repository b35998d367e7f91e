"""A finished stage's outputs are re-checked against the digest its manifest recorded before they
are skipped (resume) or linked (``--reuse``): an output changed since is a one-line error naming
it, and the run fails instead of succeeding on wrong data."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import ray.cloudpickle

from pipeline.config import parse_config
from workflows.dag import Graph, StageNode
from workflows.runner import run_graph
from workflows.state import RunStore

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class _Write:
    """Stage ``data`` writes a folder with labels; ``train`` reads them and reports their sum."""

    def __call__(self, node, inputs, out_dir, tracking_info):
        out = Path(out_dir)
        if node.name == "data":
            (out / "shards").mkdir(parents=True, exist_ok=True)
            (out / "shards" / "labels.json").write_text(json.dumps([1, 2, 3]))
            return {"outputs": {"dataset": "shards"}, "metrics": {"n": 3}}
        labels = json.loads(Path(inputs["dataset"]["dataset"], "labels.json").read_text())
        (out / "model.txt").write_text(str(sum(labels)))
        return {"outputs": {"model": "model.txt"}, "metrics": {"total": float(sum(labels))}}


def _graph() -> Graph:
    return Graph([StageNode("data", "data"), StageNode("train", "train", deps={"dataset": "data"})])


def _tamper(store: RunStore, run_id: str) -> Path:
    f = Path(store.out_dir(run_id, "data")) / "shards" / "labels.json"
    f.write_text(json.dumps([9, 9, 9]))  # labels altered after the stage finished
    return f


def test_reuse_refuses_an_output_changed_since_it_was_written(ray_local, tmp_path: Path) -> None:
    cfg = parse_config({"storage": {"root": str(tmp_path / "store")}})
    store = RunStore(tmp_path / "store")
    first = store.create_run(cfg)
    assert run_graph(_graph(), cfg, store, first, _Write()).status == "succeeded"
    _tamper(store, first)
    second = store.create_run(cfg)
    summary = run_graph(_graph(), cfg, store, second, _Write(), reuse=True)
    assert summary.status == "failed", summary.message()
    err = summary.stages["data"].error
    assert "output 'dataset'" in err and "does not match the digest" in err and "\n" not in err
    assert f"--reuse of run {first}" in err
    assert summary.stages["train"].status == "not_run"
    assert store.read_state(second, "data").state == "failed"
    assert store.load_run(second).status == "failed"
    assert store.read_manifest(second, "train") is None


def test_resume_refuses_to_skip_an_output_changed_since(ray_local, tmp_path: Path) -> None:
    cfg = parse_config({"storage": {"root": str(tmp_path / "store")}})
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    assert run_graph(_graph(), cfg, store, rid, _Write()).status == "succeeded"
    # an untouched run skips both stages on resume (the check passes)
    again = run_graph(_graph(), cfg, store, rid, _Write())
    assert [again.stages[n].status for n in ("data", "train")] == ["skipped", "skipped"]
    _tamper(store, rid)
    summary = run_graph(_graph(), cfg, store, rid, _Write())
    assert summary.status == "failed"
    err = store.read_state(rid, "data").error
    assert "output 'dataset'" in err and "manifest.json to run it again" in err
    assert store.load_run(rid).status == "failed"
    assert "does not match the digest" in store.load_run(rid).error
