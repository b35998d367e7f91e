"""The Ray runner with fake stages: concurrency, failure, resume, reuse across runs."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import pytest
import ray.cloudpickle

from pipeline.config import parse_config
from workflows.dag import Graph, StageNode, build_graph
from workflows.runner import run_graph
from workflows.state import RunStore, code_label

# Ray workers cannot import this test module: ship its functions by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FakeExecute:
    """A stage that sleeps, writes one output file and records each execution in ``log_dir``."""

    def __init__(self, log_dir: Path, sleep: float = 0.05, fail: tuple[str, ...] = ()) -> None:
        self.log_dir = str(log_dir)
        self.sleep = sleep
        self.fail = fail

    def __call__(self, node, inputs, out_dir, tracking_info):
        t0 = time.time()
        if node.name in self.fail:
            raise ValueError(f"boom in {node.name}\nsecond line")
        time.sleep(self.sleep)
        out = Path(out_dir) / "result.json"
        out.write_text(json.dumps({"stage": node.name, "inputs": inputs}))
        record = {"stage": node.name, "start": t0, "end": time.time(), "inputs": inputs}
        os.makedirs(self.log_dir, exist_ok=True)
        Path(self.log_dir, f"{node.name}-{uuid.uuid4().hex}.json").write_text(json.dumps(record))
        return {
            "outputs": {"result": "result.json"},
            "metrics": {"score": 0.5, "loss": 1.25},
            "history": [{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.25}],
        }


def executions(log_dir: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in log_dir.glob("*.json") if log_dir.exists() else []:
        name = json.loads(p.read_text())["stage"]
        counts[name] = counts.get(name, 0) + 1
    return counts


@pytest.fixture
def cfg(tmp_path):
    return parse_config(
        {"finetune": {"label_fractions": [1, 10]}, "storage": {"root": str(tmp_path / "store")}}
    )


def test_independent_stages_run_concurrently(ray_local, tmp_path, cfg):
    store = RunStore(tmp_path / "store")
    graph = Graph([StageNode("x", "x"), StageNode("y", "y")])
    # warm up: the first tasks pay for starting Ray worker processes
    run_graph(graph, cfg, store, store.create_run(cfg), FakeExecute(tmp_path / "warm", 0.1))
    rid = store.create_run(cfg)
    t0 = time.time()
    summary = run_graph(graph, cfg, store, rid, FakeExecute(tmp_path / "log", 1.0))
    elapsed = time.time() - t0
    assert summary.status == "succeeded", summary.message()
    assert elapsed < 1.8, f"two 1 s stages took {elapsed:.2f}s: not concurrent"
    recs = [json.loads(p.read_text()) for p in (tmp_path / "log").glob("*.json")]
    assert len(recs) == 2
    assert max(r["start"] for r in recs) < min(r["end"] for r in recs)  # the intervals overlap


def test_full_graph_succeeds(ray_local, tmp_path, cfg):
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    graph = build_graph(cfg)
    summary = run_graph(graph, cfg, store, rid, FakeExecute(tmp_path / "log"))
    assert summary.status == "succeeded" and summary.failed_stage is None
    assert executions(tmp_path / "log") == {n: 1 for n in graph.names}
    assert store.load_run(rid).status == "succeeded"
    for n in graph:
        st = store.read_state(rid, n.name)
        assert st.state == "succeeded" and st.attempts == 1 and st.duration_s >= 0
        assert st.metrics == {"score": 0.5, "loss": 1.25} and st.key_metric == "score"
        m = store.read_manifest(rid, n.name)
        assert m["cache_key"] == st.cache_key and len(m["digest"]) == 64
        assert m["outputs"]["result"] == str(Path(store.out_dir(rid, n.name)) / "result.json")
    # the teacher's outputs reached distill as its 'teacher' input
    distill_in = json.loads(Path(store.out_dir(rid, "distill@10"), "result.json").read_text())[
        "inputs"
    ]
    assert distill_in["teacher"]["result"].endswith("stages/finetune@10/out/result.json")
    assert distill_in["dataset"]["result"].endswith("stages/shard/out/result.json")


def test_failure_then_resume(ray_local, tmp_path, cfg):
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    graph = build_graph(cfg)
    log_dir = tmp_path / "log"
    summary = run_graph(graph, cfg, store, rid, FakeExecute(log_dir, fail=("finetune@1",)))
    assert summary.status == "failed" and summary.failed_stage == "finetune@1"
    assert "stage finetune@1 failed: ValueError: boom in finetune@1" in summary.message()
    st = store.read_state(rid, "finetune@1")
    assert (
        st.state == "failed" and st.error == "ValueError: boom in finetune@1" and st.attempts == 1
    )
    assert "Traceback" in Path(st.traceback_file).read_text()
    run = store.load_run(rid)
    assert run.status == "failed" and "finetune@1" in run.error
    ran = executions(log_dir)
    assert "distill@1" not in ran and "evaluate" not in ran
    assert summary.stages["distill@1"].status == "not_run"
    assert summary.stages["evaluate"].status == "not_run"
    assert store.read_manifest(rid, "finetune@1") is None
    assert store.read_state(rid, "evaluate").state == "pending"

    # resume: the finished stages are skipped, the failed one runs again with attempts + 1
    summary = run_graph(graph, cfg, store, rid, FakeExecute(log_dir))
    assert summary.status == "succeeded", summary.message()
    again = executions(log_dir)
    assert all(again[n] == 1 for n in ran)  # nothing that finished ran twice
    assert set(again) == set(graph.names)
    assert store.read_state(rid, "finetune@1").attempts == 2
    assert summary.stages["shard"].status == "skipped"
    assert summary.stages["finetune@1"].status == "succeeded"

    # a third call does nothing; a changed evaluate section reruns only evaluate
    summary = run_graph(graph, cfg, store, rid, FakeExecute(log_dir))
    assert summary.executed == [] and executions(log_dir) == again
    cfg2 = cfg.model_copy(deep=True)
    cfg2.evaluate.knn_k = 7
    summary = run_graph(build_graph(cfg2), cfg2, store, rid, FakeExecute(log_dir))
    assert summary.executed == ["evaluate"] and executions(log_dir)["evaluate"] == 2


def test_reuse_across_runs(ray_local, tmp_path, cfg, caplog):
    store = RunStore(tmp_path / "store")
    graph = build_graph(cfg)
    first = store.create_run(cfg)
    assert run_graph(graph, cfg, store, first, FakeExecute(tmp_path / "a")).status == "succeeded"

    cfg2 = cfg.model_copy(deep=True)
    cfg2.distill.temperature = 3.0  # distill and evaluate change; the rest is reusable
    second = store.create_run(cfg2)
    summary = run_graph(
        build_graph(cfg2), cfg2, store, second, FakeExecute(tmp_path / "b"), reuse=True
    )
    assert summary.status == "succeeded"
    assert executions(tmp_path / "b") == {"distill@1": 1, "distill@10": 1, "evaluate": 1}
    assert summary.stages["pretrain"].status == "reused"
    m = store.read_manifest(second, "pretrain")
    code = code_label(store.load_run(first).code)  # both runs: this checkout's code
    assert m["reused_from"] == {"run_id": first, "stage": "pretrain", "code": code}
    assert m["outputs"] == store.read_manifest(first, "pretrain")["outputs"]
    st = store.read_state(second, "pretrain")
    assert st.state == "skipped" and st.reused_from["run_id"] == first
    # distill@1 in the second run read the first run's teacher
    inputs = json.loads(Path(store.out_dir(second, "distill@1"), "result.json").read_text())[
        "inputs"
    ]
    assert f"/{first}/stages/finetune@1/out" in inputs["teacher"]["result"]

    # without reuse, a new run executes everything
    third = store.create_run(cfg)
    run_graph(graph, cfg, store, third, FakeExecute(tmp_path / "c"))
    assert executions(tmp_path / "c") == {n: 1 for n in graph.names}

    # a result made by other code is still linked (the key has no commit), with a warning
    other = RunStore(tmp_path / "other")
    made = other.create_run(cfg)
    run_graph(graph, cfg, other, made, FakeExecute(tmp_path / "e"))
    record = Path(other.load_run(made).path) / "run.json"
    record.write_text(
        json.dumps({**json.loads(record.read_text()), "code": {"commit": "f" * 40, "dirty": False}})
    )
    later = other.create_run(cfg)
    with caplog.at_level(logging.WARNING, logger="workflows.runner"):
        run_graph(graph, cfg, other, later, FakeExecute(tmp_path / "d"), reuse=True)
    assert not executions(tmp_path / "d")
    assert other.read_manifest(later, "pretrain")["reused_from"]["code"] == "fffffff"
    warning = f"reusing the result of run {made}, made with code fffffff (this run: {code})"
    assert warning in caplog.text


def test_bad_stage_result_is_a_failure(ray_local, tmp_path, cfg):
    def bad(node, inputs, out_dir, tracking_info):
        return {"outputs": {"model": "/etc/passwd"}}

    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    summary = run_graph(Graph([StageNode("x", "x")]), cfg, store, rid, bad)
    assert summary.status == "failed"
    assert "output 'model' is outside its out dir" in summary.stages["x"].error


def test_max_concurrency_one_serialises(ray_local, tmp_path, cfg):
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    graph = Graph([StageNode("x", "x"), StageNode("y", "y")])
    assert (
        run_graph(
            graph, cfg, store, rid, FakeExecute(tmp_path / "log", 0.2), max_concurrency=1
        ).status
        == "succeeded"
    )
    recs = sorted(
        (json.loads(p.read_text()) for p in (tmp_path / "log").glob("*.json")),
        key=lambda r: r["start"],
    )
    assert recs[0]["end"] <= recs[1]["start"]


def test_the_critical_path_is_launched_first(ray_local, tmp_path, cfg):
    """With one slot, the head of the long chain goes before a short stage declared earlier;
    equal remaining paths keep declaration order."""
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    graph = Graph(
        [
            StageNode("lone", "x"),
            StageNode("a", "x"),
            StageNode("b", "x", deps={"in": "a"}),
            StageNode("c", "x", deps={"in": "b"}),
        ]
    )
    summary = run_graph(
        graph, cfg, store, rid, FakeExecute(tmp_path / "log", 0.05), max_concurrency=1
    )
    assert summary.status == "succeeded", summary.message()
    recs = sorted(
        (json.loads(p.read_text()) for p in (tmp_path / "log").glob("*.json")),
        key=lambda r: r["start"],
    )
    assert [r["stage"] for r in recs] == ["a", "b", "lone", "c"]
    assert all(x["end"] <= y["start"] for x, y in zip(recs, recs[1:], strict=False))
