"""MLflow tracking against a SQLite store: nesting, tags, params, metrics, datasets, errors."""

from __future__ import annotations

import json
import pickle
import socket
import sys
import time

import pytest
import ray.cloudpickle
from mlflow import MlflowClient

from pipeline.config import parse_config
from workflows.dag import build_graph, compute_keys, stage_config
from workflows.runner import run_graph
from workflows.state import RunStore
from workflows.tracking import MetricsSink, Tracker, TrackingError, flatten

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    return "sqlite:///" + str(root / "mlflow.db")


@pytest.fixture
def cfg():
    return parse_config(
        {"name": "trk", "finetune": {"label_fractions": [1, 10]}, "distill": {"enabled": False}}
    )


def test_log_dataset_retries_when_a_concurrent_stage_created_the_row(db, cfg):
    """Two stages that finish together both create the experiment's dataset row; the store
    refuses the second insert on its unique key, and the retry finds the row. Other errors are
    not retried."""
    from mlflow.exceptions import MlflowException

    tr = Tracker(db, "exp-dup")
    client = MlflowClient(tracking_uri=db)
    rid = tr.start_parent("20261203-120000-aa11bb", cfg)
    real, calls = tr.client.log_inputs, []

    def racing(run_id, datasets=None, **kw):
        calls.append(run_id)
        if len(calls) == 1:
            raise MlflowException(
                "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                "datasets.name, datasets.digest"
            )
        return real(run_id, datasets=datasets, **kw)

    tr.client.log_inputs = racing
    tr.log_dataset(rid, "digits", "c" * 64, "/data/shard/out")
    assert len(calls) == 2
    assert [i.dataset.name for i in client.get_run(rid).inputs.dataset_inputs] == ["digits"]

    def broken(run_id, datasets=None, **kw):
        calls.append(run_id)
        raise MlflowException("RESOURCE_DOES_NOT_EXIST: run not found")

    tr.client.log_inputs, calls[:] = broken, []
    with pytest.raises(MlflowException, match="not found"):
        tr.log_dataset(rid, "digits", "d" * 64, "/data/shard/out")
    assert len(calls) == 1


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {
        "a.b": 1,
        "a.c.d": [1, 2],
        "e": None,
    }


def test_parent_child_tags_params_metrics_dataset(db, cfg):
    tr = Tracker(db, "exp-a")
    client = MlflowClient(tracking_uri=db)
    parent = tr.start_parent("20261123-101500-ab12cd", cfg)
    g = build_graph(cfg)
    keys = compute_keys(g, cfg)
    shard = tr.start_child(
        parent, g["shard"], keys["shard"], {}, config_slice=stage_config(g["shard"], cfg)
    )
    pre = tr.start_child(
        parent,
        g["pretrain"],
        keys["pretrain"],
        {"dataset": shard},
        config_slice=stage_config(g["pretrain"], cfg),
        pipeline_run_id="20261123-101500-ab12cd",
    )
    ft = tr.start_child(
        parent, g["finetune@10"], keys["finetune@10"], {"dataset": shard, "pretrain": pre}
    )

    p = client.get_run(parent)
    assert p.info.run_name == "trk-20261123-101500-ab12cd"  # <config>-<run_id>
    assert p.data.tags["pipeline_run_id"] == "20261123-101500-ab12cd"
    assert p.data.params["pretrain.temperature"] == "0.2"
    assert json.loads(p.data.params["finetune.label_fractions"]) == [1.0, 10.0]
    assert p.data.params["name"] == "trk"

    c = client.get_run(pre)
    assert c.data.tags["mlflow.parentRunId"] == parent
    assert c.data.tags["stage"] == "pretrain" and c.data.tags["stage_kind"] == "pretrain"
    assert c.data.tags["cache_key"] == keys["pretrain"]
    assert c.data.tags["upstream.dataset"] == shard
    assert c.data.params["pretrain.method"] == "simclr" and "data.source" not in c.data.params
    f = client.get_run(ft)
    assert f.data.tags["upstream.pretrain"] == pre and f.data.params == {"stage.fraction": "10.0"}

    children = client.search_runs(
        [p.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    assert {r.info.run_name for r in children} == {"shard", "pretrain", "finetune@10"}

    tr.log_metrics(
        pre, {"loss": 2.0, "val/knn_top1": 0.5, "note": "text", "nan": float("nan")}, step=0
    )
    tr.log_metrics(pre, {"loss": 1.0}, step=1)
    hist = client.get_metric_history(pre, "loss")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 2.0), (1, 1.0)]
    assert client.get_run(pre).data.metrics["val/knn_top1"] == 0.5

    tr.log_dataset(pre, "digits", "a" * 64, "/data/shard/out", num_rows=1797)
    inputs = client.get_run(pre).inputs.dataset_inputs
    assert len(inputs) == 1
    ds = inputs[0].dataset
    assert (
        ds.name == "digits" and ds.digest == "a" * 36 and json.loads(ds.profile)["num_rows"] == 1797
    )
    assert json.loads(ds.source) == {"uri": "/data/shard/out"}
    assert inputs[0].tags[0].value == "training"

    tr.end(pre, "FINISHED")
    tr.end(parent, "failed")
    assert client.get_run(pre).info.status == "FINISHED"
    assert client.get_run(parent).info.status == "FAILED"
    assert tr.resume_run(parent) and client.get_run(parent).info.status == "RUNNING"
    assert not tr.resume_run("0" * 32)
    with pytest.raises(TrackingError, match="run status 'done'"):
        tr.end(parent, "done")


def test_artifact_and_sink(db, tmp_path):
    tr = Tracker(db, "exp-b")
    rid = tr.start_parent("r-art", parse_config({}))
    f = tmp_path / "report.json"
    f.write_text("{}")
    tr.log_artifact(rid, str(f), "reports")
    assert [a.path for a in tr.client.list_artifacts(rid, "reports")] == ["reports/report.json"]
    with pytest.raises(TrackingError, match="does not exist"):
        tr.log_artifact(rid, str(tmp_path / "nope"))

    sink = pickle.loads(pickle.dumps(MetricsSink(db, rid)))
    sink({"train/loss": 3.0}, 5)
    sink({"train/loss": 2.5}, 6)
    assert sink.close() == 0  # the points are sent by a background thread: flush them
    hist = tr.client.get_metric_history(rid, "train/loss")
    assert sorted((m.step, m.value) for m in hist) == [(5, 3.0), (6, 2.5)]
    assert tr.info(rid).sink().run_id == rid


def test_unreachable_server_fails_fast():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again below: nothing listens there
    tr = Tracker(f"http://127.0.0.1:{port}", "x")
    t0 = time.time()
    with pytest.raises(TrackingError) as e:
        tr.check_reachable(timeout=2.0)
    assert time.time() - t0 < 5
    msg = str(e.value)
    assert f"MLflow server http://127.0.0.1:{port} is not reachable" in msg and "\n" not in msg
    Tracker("sqlite:///" + "/tmp/unused-never-created.db", "x").check_reachable()  # not http: no-op


def fake_execute(node, inputs, out_dir, tracking_info):
    from pathlib import Path

    Path(out_dir, "o.txt").write_text(node.name)
    if tracking_info is not None:
        sink = tracking_info.sink()
        sink({"step_metric": 1.0}, 0)
        sink.close()  # sent by a background thread: flush before the stage returns
    return {
        "outputs": {"o": "o.txt"},
        "metrics": {"acc": 0.9},
        "history": [{"epoch": 0, "loss": 1.0}],
    }


def test_runner_tracks_nested_runs(ray_local, db, tmp_path, cfg):
    cfg = cfg.model_copy(deep=True)
    cfg.finetune.baseline = False
    cfg.finetune.label_fractions = [10.0]
    tr = Tracker(db, "exp-runner")
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    summary = run_graph(build_graph(cfg), cfg, store, rid, fake_execute, tracker=tr)
    assert summary.status == "succeeded", summary.message()
    parent = store.load_run(rid).mlflow_run_id
    assert parent and summary.mlflow_run_id == parent
    client = MlflowClient(tracking_uri=db)
    assert client.get_run(parent).info.status == "FINISHED"
    ids = {
        n: store.read_state(rid, n).mlflow_run_id
        for n in ("shard", "pretrain", "finetune@10", "evaluate")
    }
    ft = client.get_run(ids["finetune@10"])
    assert ft.data.tags["mlflow.parentRunId"] == parent
    assert ft.data.tags["upstream.pretrain"] == ids["pretrain"]
    assert ft.data.tags["upstream.dataset"] == ids["shard"]
    assert ft.data.metrics["acc"] == 0.9 and ft.data.metrics["step_metric"] == 1.0
    assert ft.info.status == "FINISHED"
    # the history reached MLflow through the sink; the runner logs only final metrics that no
    # history row holds, and leaves the dataset input to the stage (tests/workflows/test_progress.py)
    assert set(ft.data.metrics) == {"acc", "step_metric"}
    assert client.get_run(ids["evaluate"]).data.tags["upstream.finetune_10"] == ids["finetune@10"]
    # resume: nothing runs again, the same MLflow runs are kept
    summary = run_graph(build_graph(cfg), cfg, store, rid, fake_execute, tracker=tr)
    assert summary.executed == [] and store.load_run(rid).mlflow_run_id == parent


def test_a_failed_stage_logging_warns_without_the_uri_password(cfg, tmp_path, monkeypatch, caplog):
    import logging

    from pipeline.runtime import StageResult
    from workflows import stages
    from workflows.tracking import TrackingInfo

    def fail(*_a, **_k):
        raise RuntimeError(
            "API request to http://bob:hunter2@mlflow:5000/api/2.0/runs failed\nretries exhausted"
        )

    monkeypatch.setattr(stages, "log_stage_to_mlflow", fail)
    node = next(n for n in build_graph(cfg) if n.kind == "pretrain")
    info = TrackingInfo(uri="http://bob:hunter2@mlflow:5000", run_id="r1")
    with caplog.at_level(logging.WARNING, logger="workflows.stages"):
        stages._log_stage(cfg, node, StageResult(outputs={}), str(tmp_path), info, None)
    assert "hunter2" not in caplog.text
    assert "tracking: logging stage pretrain failed: RuntimeError: API request to " in caplog.text
    assert "http://bob:***@mlflow:5000" in caplog.text
