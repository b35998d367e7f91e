"""Faults: the driver SIGKILLed during pretraining then `contrastive resume`; a stage that raises;
an unreachable tracking server; a 2-node cluster losing its worker node mid-pretrain."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import kill_at_checkpoint
from click.testing import CliRunner

from workflows.cli import main
from workflows.state import RunStore

REPO = Path(__file__).resolve().parents[2]
SMOKE = [
    "--set", "finetune.label_fractions=[20]",
    "--set", "pretrain.max_steps_per_epoch=3",
    "--set", "finetune.epochs=1",
    "--set", "finetune.min_steps=4",
    "--set", "distill.epochs=1",
    "--set", "evaluate.linear_epochs=2",
    "--set", "evaluate.embedding_samples=50",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


def test_driver_sigkill_during_pretrain_then_resume_finishes(ray_local, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    root = tmp_path / "store"
    rid = "killed"
    args = ["run", "smoke", "--run-id", rid, "--set", f"storage.root={root}",
            "--set", "pretrain.epochs=6", "--set", "pretrain.knn_every=0",
            "--set", "finetune.baseline=false", "--set", "distill.enabled=false", *SMOKE]  # fmt: skip
    driver = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", *args],
        cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    ckpt = root / rid / "stages" / "pretrain" / "checkpoints" / "latest.pt"
    kill_at_checkpoint(driver, ckpt.exists)
    store = RunStore(root)
    assert store.read_state(rid, "pretrain").state == "running"  # killed, not recorded as done
    shard_manifest = store.read_manifest(rid, "shard")
    shard_files = {p: p.stat().st_mtime_ns for p in (root / rid / "stages" / "shard"
                                                     / "out").rglob("*") if p.is_file()}  # fmt: skip

    # resumed by another driver: this process, on its own (session) Ray
    res = CliRunner().invoke(main, ["resume", rid, "--storage", str(root)])
    assert res.exit_code == 0, res.output[-4000:]
    assert f"resuming run: {rid}" in res.stdout and "report: " in res.stdout
    states = store.stage_states(rid)
    assert all(s.state == "succeeded" for s in states.values()), states
    assert states["shard"].attempts == 1 and states["pretrain"].attempts == 2
    assert store.read_manifest(rid, "shard") == shard_manifest
    assert {p: p.stat().st_mtime_ns for p in shard_files} == shard_files  # not rewritten
    hist = json.loads(Path(store.read_manifest(rid, "pretrain")["outputs"]["history"]).read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5, 6]
    assert max(h["resumed_from_epoch"] for h in hist) >= 1  # continued from the checkpoint
    info = store.load_run(rid)
    client = MlflowClient(tracking_uri=info.tracking_uri)
    parent = client.get_run(info.mlflow_run_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{info.mlflow_run_id}'"
    )
    stages = [r.data.tags["stage"] for r in children]
    assert stages.count("shard") == 1 and stages.count("pretrain") == 1
    assert parent.info.status == "FINISHED"
    status = CliRunner().invoke(main, ["status", rid, "--storage", str(root)])
    assert status.exit_code == 0 and "pretrain" in status.stdout


def test_stage_that_raises_is_failed_with_its_error_in_status(ray_local, tmp_path: Path) -> None:
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    for i in range(3):
        (images / f"broken{i}.png").write_bytes(b"not a png at all")
    root = tmp_path / "store"
    runner = CliRunner()
    res = runner.invoke(
        main,
        ["run", "smoke", "--run-id", "bad", "--set", f"storage.root={root}",
         "--set", "data.source=image-folder", "--set", f"data.root={tmp_path / 'images'}",
         "--set", "tracking.enabled=false"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    assert "stage shard failed" in res.output and "contrastive resume bad" in res.output
    st = RunStore(root).read_state("bad", "shard")
    assert st.state == "failed" and st.error and "\n" not in st.error
    status = runner.invoke(main, ["status", "bad", "--storage", str(root)])
    assert status.exit_code == 0
    assert f"shard failed: {st.error}" in status.output
    assert "pretrain" in status.output and "pending" in status.output


def test_unreachable_tracking_server_fails_before_any_compute(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once we leave: nothing listens there
    root = tmp_path / "store"
    t0 = time.time()
    res = CliRunner().invoke(
        main,
        ["run", "smoke", "--set", f"storage.root={root}",
         "--set", f"tracking.uri=http://127.0.0.1:{port}"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert f"127.0.0.1:{port}" in res.output and "not reachable" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not root.exists() or not [p for p in root.iterdir() if p.name != "mlflow.db"]
    assert time.time() - t0 < 20


def test_unknown_run_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["status", "nope", "--storage", str(tmp_path)])
    assert res.exit_code == 2 and "no run 'nope'" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.mark.slow
def test_two_node_cluster_survives_losing_the_worker_node(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "tests" / "cluster" / "two_node_cluster.py"), str(tmp_path / "store")],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    assert lines, res.stdout[-2000:] + res.stderr[-3000:]
    out = json.loads(lines[-1])
    assert out["removed"], out
    assert out["rc"] == 0, out
    assert set(out["states"].values()) == {"succeeded"}, out
    assert out["epochs"] == [1, 2, 3, 4, 5]
    assert max(out["resumed_from"]) >= 1  # the retried task continued from the checkpoint
