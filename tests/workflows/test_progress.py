"""What a user sees of a run: its output off a terminal, its stage logs, and its MLflow runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from workflows.progress import StageLog, stage_epochs
from workflows.summary import label_table

# a short smoke run: every stage, fewer epochs
SHORT = [
    "--set", "pretrain.epochs=2", "--set", "pretrain.max_steps_per_epoch=4",
    "--set", "pretrain.knn_every=1", "--set", "finetune.epochs=1", "--set", "finetune.min_steps=5",
    "--set", "distill.epochs=1", "--set", "evaluate.linear_epochs=5",
    "--set", "evaluate.embedding_samples=50",
]  # fmt: skip
STAGES = [
    "shard", "pretrain", "finetune@5", "finetune@20", "baseline@5", "baseline@20",
    "distill@5", "distill@20", "evaluate",
]  # fmt: skip
CLI = [sys.executable, "-m", "workflows.cli"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    env = dict(os.environ, TQDM_DISABLE="1")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_MODE", None)  # Ray's default, which prints the token notice
    proc = subprocess.run(
        [*CLI, "run", "smoke", "--set", f"storage.root={root}", *SHORT],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    run_id = re.search(r"^run: (\S+)$", proc.stdout, re.M).group(1)
    return root, run_id, out, env


def test_output_off_a_terminal_is_one_line_per_stage_event_and_the_table(smoke_run):
    root, run_id, out, _ = smoke_run
    for stage in STAGES:
        assert len(re.findall(rf"stage {re.escape(stage)} started", out)) == 1, stage
        assert len(re.findall(rf"stage {re.escape(stage)} finished in", out)) == 1, stage
    assert "] epoch=" not in out  # the workers' per-epoch lines went to the stage logs
    assert "Token authentication is enabled" not in out
    assert "Pickle" not in out and "pickle" not in out
    table = re.search(r"^\s*labels\s+images\s+baseline\s+fine-tuned.*$", out, re.M)
    assert table, out[-2000:]
    assert re.search(r"^\s+5 %\s+60\s", out, re.M) and re.search(r"^\s+20 %\s+260\s", out, re.M)
    assert f"report: {root}/{run_id}/stages/evaluate/out/report.html" in out
    assert re.search(rf"^mlflow: run smoke-{run_id} \([0-9a-f]{{32}}\)", out, re.M)
    assert (root / run_id / "run.json").is_file() and not (root / "runs").exists()
    assert len(out.strip().splitlines()) < 45  # short


def test_contrastive_logs_shows_a_stage_log(smoke_run):
    root, run_id, _, env = smoke_run
    res = subprocess.run(
        [*CLI, "logs", run_id, "pretrain", "--storage", str(root)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert re.search(r"^\[pretrain\] epoch=1, loss=", res.stdout, re.M), res.stdout
    assert re.search(r"^\[pretrain\] epoch=2, ", res.stdout, re.M)
    bad = subprocess.run(
        [*CLI, "logs", run_id, "nosuch", "--storage", str(root)],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "no stage 'nosuch'" in bad.stderr
    every = subprocess.run(
        [*CLI, "logs", run_id, "--storage", str(root), "--tail", "1"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert "==> pretrain <==" in every.stdout and "==> distill@5 <==" in every.stdout


def test_mlflow_runs_names_parent_artifacts_and_registry(smoke_run):
    from mlflow import MlflowClient

    root, run_id, _, _ = smoke_run
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("contrastive")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == [f"smoke-{run_id}"]
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert sorted(children) == sorted(STAGES)
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent.info.run_id}
    # the parent: report, plot and lineage
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"lineage.md", "report"} <= arts
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/report.md", "report/label_efficiency.png"} <= report
    lineage = Path(
        client.download_artifacts(parent.info.run_id, "lineage.md", str(root / "dl"))
    ).read_text()
    pre = children["pretrain"].info.run_id
    assert f"[pretrain](#/experiments/{exp.experiment_id}/runs/{pre})" in lineage
    assert "| finetune@5 | finetune | succeeded | dataset: [shard](" in lineage
    assert "Label efficiency" in parent.data.tags["mlflow.note.content"]
    # a stage run: curves once per epoch, counts as params, its dataset, inputs as links
    child = children["finetune@5"]
    assert "epoch" not in child.data.metrics and "params" not in child.data.metrics
    assert child.data.params["result.labeled_images"] == "60"
    steps = [m.step for m in client.get_metric_history(pre, "loss")]
    assert steps == [1, 2]
    assert (
        f"(#/experiments/{exp.experiment_id}/runs/{pre})" in child.data.tags["mlflow.note.content"]
    )
    assert [d.dataset.name for d in client.get_run(child.info.run_id).inputs.dataset_inputs] == [
        "digits"
    ]
    # registered teachers and students, a version per run, tagged with run and data
    names = {m.name for m in client.search_registered_models()}
    assert {"smoke-teacher-5pct", "smoke-teacher-20pct", "smoke-student-5pct",
            "smoke-student-20pct"} <= names  # fmt: skip
    (version,) = client.search_model_versions("name='smoke-student-5pct'")
    assert version.tags["pipeline_run_id"] == run_id and len(version.tags["data_digest"]) == 64
    models = client.search_logged_models([exp.experiment_id])
    assert all(m.tags.get("mlflow.source.name", "").startswith("contrastive run") for m in models)
    student = next(m for m in models if m.source_run_id == children["distill@5"].info.run_id)
    assert [(m.key, m.dataset_name) for m in student.metrics] == [("final_val_top1", "digits")]


def test_stage_log_captures_python_and_native_output(tmp_path):
    log = tmp_path / "s" / "stage.log"
    with StageLog(log):
        print("from python", flush=True)
        os.write(2, b"from fd 2\n")
        subprocess.run(["echo", "from a child"], check=True)
    print("after")  # back on the real stdout
    assert log.read_text().splitlines() == ["from python", "from fd 2", "from a child"]


def test_label_table_and_epoch_totals():
    from pipeline.config import load_config

    report = {
        "fractions": {"1": {"labeled_images": 570, "baseline_top1": 78.5, "finetune_top1": 81.4,
                            "student_top1": 81.8, "linear_top1": 76.0}},
        "knn_top1": 80.3, "linear_full_top1": 80.9, "test_images": 10000,
    }  # fmt: skip
    text = label_table(report)
    assert re.search(r"1 %\s+570\s+78.5\s+81.4\s+\+2.9\s+81.8\s+76.0", text), text
    cfg = load_config("demo", [])
    assert stage_epochs(cfg, "pretrain") == cfg.pretrain.epochs
    extra = cfg.finetune.consistency.epochs
    assert stage_epochs(cfg, "finetune") == cfg.finetune.epochs + extra
    assert stage_epochs(cfg, "baseline") == cfg.finetune.epochs
    assert stage_epochs(cfg, "shard") is None


def test_progress_display_draws_one_bar_per_reporting_stage(monkeypatch, capsys):
    import logging

    from pipeline.config import load_config
    from workflows.progress import ProgressDisplay

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    cfg = load_config("smoke", [])
    shown = ProgressDisplay(
        object(), cfg, {"pretrain": "pretrain", "baseline@5": "baseline"}, enabled=True
    )
    shown.render({"pretrain": {"epoch": 2, "metrics": {"images_per_s": 5600.0, "loss": 5.2}}})
    shown.render({"pretrain": {"epoch": 3, "metrics": {"images_per_s": 5612.0, "val_knn_top1": 77.9}},
                  "baseline@5": {"epoch": 1, "metrics": {"images_per_s": 1530.0, "loss": 0.8}}})  # fmt: skip
    assert sorted(shown._bars) == ["baseline@5", "pretrain"]
    done = logging.LogRecord("workflows.runner", 20, "", 0, "stage %s finished in %.1fs%s",
                             ("pretrain", 1.0, ""), None)  # fmt: skip
    shown._watch(done)
    shown.render({"pretrain": {"epoch": 3, "metrics": {}}})  # a finished stage gets no new bar
    assert sorted(shown._bars) == ["baseline@5"]
    err = capsys.readouterr().err
    assert (
        f"pretrain     3/{cfg.pretrain.epochs} ep [" in err
        and "5,612 img/s, val_knn_top1=77.9" in err
    )
    assert f"baseline@5   1/{cfg.finetune.epochs} ep [" in err
