"""The whole pipeline on Ray: the smoke config end to end with 1 and 2 workers, what MLflow holds
afterwards, status / lineage / resume / reuse, and a Ray Train worker SIGKILLed mid-epoch."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import wait_for

from pipeline.config import Config, load_config
from workflows import orchestrate
from workflows.state import RunStore

# A small but complete graph: shard, pretrain, finetune@20, baseline@20, distill@20, evaluate.
TINY = [
    "finetune.label_fractions=[20]",
    "pretrain.epochs=2",
    "pretrain.max_steps_per_epoch=4",
    "pretrain.knn_every=1",
    "finetune.epochs=2",
    "finetune.min_steps=10",
    "distill.epochs=1",
    "evaluate.linear_epochs=10",
    "evaluate.embedding_samples=100",
]
STAGES = ["shard", "pretrain", "finetune@20", "baseline@20", "distill@20", "evaluate"]


def tiny_config(root: Path, *extra: str) -> Config:
    return load_config("smoke", [*TINY, f"storage.root={root}", *extra])


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = tiny_config(root)
    rc = orchestrate.run_pipeline(cfg, run_id="e2e-1")
    return cfg, RunStore(cfg.storage.root), "e2e-1", rc


def test_run_succeeds_and_report_has_every_number(finished_run, capsys) -> None:
    cfg, store, rid, rc = finished_run
    assert rc == 0
    states = store.stage_states(rid)
    assert sorted(states) == sorted(STAGES)
    assert all(s.state == "succeeded" and s.attempts == 1 for s in states.values())
    report_path = store.read_manifest(rid, "evaluate")["outputs"]["report_json"]
    report = json.loads(Path(report_path).read_text())
    row = report["fractions"]["20"]
    for key in ("baseline_top1", "finetune_top1", "student_top1", "linear_top1"):
        assert 0.0 <= row[key] <= 100.0, key
    assert row["student_params"] < row["teacher_params"]
    assert report["knn_top1"] > 20.0 and report["linear_full_top1"] > 20.0  # chance is 10%
    assert report["wall_seconds"] > 0 and report["dataset"] == "digits"
    md = Path(report_path).with_name("report.md").read_text()
    assert "| 20% |" in md


def test_mlflow_holds_parent_children_params_metrics_artifacts(finished_run) -> None:
    from mlflow import MlflowClient

    cfg, store, rid, _ = finished_run
    info = store.load_run(rid)
    client = MlflowClient(tracking_uri=info.tracking_uri)
    parent = client.get_run(info.mlflow_run_id)
    assert parent.info.run_name == f"{cfg.name}-{rid}" and parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.temperature"] == str(cfg.pretrain.temperature)
    from workflows.state import code_label

    assert parent.data.tags["code_commit"] == code_label(info.code)  # also in the run record
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_stage = {r.data.tags["stage"]: r for r in children}
    assert sorted(by_stage) == sorted(STAGES)
    for name, run in by_stage.items():
        assert run.info.status == "FINISHED", name
        assert run.info.run_id == store.read_state(rid, name).mlflow_run_id
    pre = by_stage["pretrain"]
    assert pre.data.params["pretrain.method"] == "simclr"
    assert pre.data.tags["upstream.dataset"] == by_stage["shard"].info.run_id
    assert [m.step for m in client.get_metric_history(pre.info.run_id, "loss")][:2] == [1, 2]
    assert pre.inputs.dataset_inputs[0].dataset.name == "digits"
    ft = by_stage["finetune@20"]
    assert ft.data.tags["upstream.pretrain"] == pre.info.run_id
    assert ft.data.params["stage.fraction"] == "20.0"
    arts = {a.path for a in client.list_artifacts(pre.info.run_id)}
    assert {"config.yaml", "history.json", "checkpoint"} <= arts
    ev = by_stage["evaluate"]
    reports = {a.path for a in client.list_artifacts(ev.info.run_id, "report")}
    assert {"report/report.json", "report/report.md", "report/label_efficiency.png"} <= reports
    assert ev.data.metrics["knn_top1"] > 20.0


def test_logged_models_load_and_predict(finished_run) -> None:
    import mlflow.pytorch

    from pipeline.models import load_model

    _, store, rid, _ = finished_run
    mlflow.set_tracking_uri(store.load_run(rid).tracking_uri)
    x = torch.randn(4, 1, 8, 8)
    for stage, name, width in (
        ("pretrain", "encoder", None),
        ("finetune@20", "teacher", 10),
        ("distill@20", "student", 10),
    ):
        child = store.read_state(rid, stage).mlflow_run_id
        model = mlflow.pytorch.load_model(f"runs:/{child}/{name}")
        model.eval()
        with torch.no_grad():
            got = model(x)
            local = load_model(store.read_manifest(rid, stage)["outputs"]["model"])
            want = local.encoder(x) if stage == "pretrain" else local(x)
        assert got.shape[0] == 4 and (width is None or got.shape[1] == width)
        torch.testing.assert_close(got, want)
    # the pyfunc flavour predicts on numpy too (what a serving user calls)
    child = store.read_state(rid, "distill@20").mlflow_run_id
    pyfunc = mlflow.pyfunc.load_model(f"runs:/{child}/student")
    assert np.asarray(pyfunc.predict(x.numpy())).shape == (4, 10)


def test_status_lineage_resume_and_reuse(finished_run, capsys) -> None:
    cfg, store, rid, _ = finished_run
    text = orchestrate.status_text(store.root, rid)
    for name in STAGES:
        line = next(ln for ln in text.splitlines() if ln.startswith(name + " "))
        assert "succeeded" in line and store.read_state(rid, name).mlflow_run_id in line
    assert rid in orchestrate.status_text(store.root)
    lineage = orchestrate.lineage_text(store.root, rid)
    assert "in  dataset <- shard" in lineage and "in  teacher <- finetune@20" in lineage
    assert orchestrate.resume_pipeline(store.root, rid) == 0
    assert "already succeeded" in capsys.readouterr().out
    # an unchanged config with --reuse links every stage of the earlier run, computes nothing
    t0 = time.time()
    assert orchestrate.run_pipeline(cfg, run_id="e2e-reuse", reuse=True) == 0
    assert time.time() - t0 < 30
    states = store.stage_states("e2e-reuse")
    assert all(s.reused_from and s.reused_from["run_id"] == rid for s in states.values())
    from workflows.state import code_label

    code = code_label(store.load_run(rid).code)
    assert f"reused from: run {rid} stage pretrain (code {code})" in orchestrate.lineage_text(
        store.root, "e2e-reuse"
    )
    # compare reads the (reused) evaluation of both runs: same numbers, no spread
    text = orchestrate.compare_text(store.root, [rid, "e2e-reuse"])
    ft = store.read_manifest(rid, "evaluate")["metrics"]["finetune_top1@20"]
    assert "identical configs" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("20%"))
    assert row.split()[:2] == ["20%", "2"] and f"{ft:.1f} ± 0.0" in row


def test_finetune_seed_with_reuse_reruns_only_the_supervised_stages(finished_run) -> None:
    """A cheap repeat at few labels: the same config with another finetune.seed and --reuse links
    the data and the encoder and trains the fine-tuned, baseline and student networks anew."""
    cfg, store, rid, _ = finished_run
    c = tiny_config(cfg.storage.root, "finetune.seed=1")
    assert orchestrate.run_pipeline(c, run_id="e2e-ftseed", reuse=True) == 0
    states = store.stage_states("e2e-ftseed")
    assert {n for n, s in states.items() if s.reused_from} == {"shard", "pretrain"}
    for name in ("finetune@20", "baseline@20", "distill@20"):  # new weights
        assert (
            store.read_manifest("e2e-ftseed", name)["digest"]
            != store.read_manifest(rid, name)["digest"]
        )
    before, after = (store.read_manifest(r, "evaluate")["metrics"] for r in (rid, "e2e-ftseed"))
    assert after["knn_top1"] == before["knn_top1"]  # the same encoder
    assert "differing in finetune.seed = None, 1" in orchestrate.compare_text(
        store.root, [rid, "e2e-ftseed"]
    )


def test_local_run_computes_what_the_ray_run_computed(finished_run, tmp_path) -> None:
    """`contrastive local` (one process, no Ray) on the same config: every number of the report
    equal to the Ray run's — same graph, stage functions, inputs, seeds and thread counts."""
    from workflows.local import run_local

    cfg, store, rid, _ = finished_run
    summary = run_local(cfg, tmp_path / "local", "cpu")
    assert list(summary["stages"]) == STAGES
    ray_report = json.loads(
        Path(store.read_manifest(rid, "evaluate")["outputs"]["report_json"]).read_text()
    )
    local_report = json.loads((tmp_path / "local" / "evaluate" / "report.json").read_text())
    for key in ("knn_top1", "linear_full_top1", "train_images", "test_images", "digest"):
        assert local_report[key] == ray_report[key], key
    assert local_report["fractions"] == ray_report["fractions"]
    ray_pre = json.loads(
        Path(store.read_manifest(rid, "pretrain")["outputs"]["history"]).read_text()
    )
    local_pre = json.loads((tmp_path / "local" / "pretrain" / "history.json").read_text())
    assert [e["loss"] for e in local_pre] == [e["loss"] for e in ray_pre]


def _ray_train_worker_pids() -> list[int]:
    """The Ray Train workers of this process's Ray (not those of other Ray instances here)."""
    import psutil

    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def test_two_workers_end_to_end_survive_a_worker_sigkill(ray_local, tmp_path) -> None:
    """The smoke graph with 2 Ray Train workers per training stage; one worker process is
    SIGKILLed in the middle of pretraining: the stage restarts from its last checkpoint (no epoch
    is trained twice) and the run succeeds."""
    cfg = tiny_config(
        tmp_path,
        "resources.num_workers=2",
        "pretrain.epochs=5",
        "pretrain.knn_every=0",
        "finetune.epochs=1",
        "finetune.min_steps=4",
        "finetune.baseline=false",
        "distill.enabled=false",
        "evaluate.linear_epochs=2",
        "evaluate.embedding_samples=50",
    )
    rid = "e2e-2w"
    ckpt = tmp_path / rid / "stages" / "pretrain" / "checkpoints" / "latest.pt"
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(rc=orchestrate.run_pipeline(cfg, run_id=rid)))
    th.start()
    wait_for(lambda: ckpt.exists() or not th.is_alive(), 240, "a pretrain checkpoint")
    assert ckpt.exists(), "no pretrain checkpoint appeared"
    workers = _ray_train_worker_pids()
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    th.join(timeout=400)
    assert not th.is_alive() and box["rc"] == 0
    store = RunStore(cfg.storage.root)
    assert all(s.state == "succeeded" for s in store.stage_states(rid).values())
    out = store.read_manifest(rid, "pretrain")["outputs"]
    hist = json.loads(Path(out["history"]).read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5]  # every epoch once, none redone
    assert {h["world_size"] for h in hist} == {2}
    assert max(h["resumed_from_epoch"] for h in hist) >= 1  # a later attempt continued
    assert (tmp_path / rid / "stages" / "pretrain" / "ray" / "train").is_dir()


def test_tune_as_the_first_node_feeds_its_best_values_to_every_stage(ray_local, tmp_path) -> None:
    from pipeline.models import load_model

    cfg = tiny_config(
        tmp_path,
        "tune.enabled=true",
        "tune.num_trials=2",
        "tune.epochs=1",
        "tune.head_depth=[3, 4]",
        "model.head_depth=1",
        "pretrain.epochs=1",
        "finetune.baseline=false",
        "distill.enabled=false",
        "tracking.enabled=false",
    )
    assert orchestrate.run_pipeline(cfg, run_id="e2e-tune") == 0
    store = RunStore(cfg.storage.root)
    assert sorted(store.stage_states("e2e-tune")) == ["evaluate", "finetune@20", "pretrain",
                                                       "shard", "tune"]  # fmt: skip
    tune_out = store.read_manifest("e2e-tune", "tune")["outputs"]
    best = json.loads(Path(tune_out["best_params"]).read_text())
    assert best["model.head_depth"] in (3, 4)  # the config's own depth (1) is outside the space
    pre = load_model(store.read_manifest("e2e-tune", "pretrain")["outputs"]["model"])
    assert pre.head.depth == best["model.head_depth"]
    assert load_config(tune_out["best_config"]).model.head_depth == best["model.head_depth"]
