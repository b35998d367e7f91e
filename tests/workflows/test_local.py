"""``contrastive local`` / :func:`workflows.local.run_local`: the whole graph in one process.

That it computes what the Ray run computes is tested beside the Ray run, in test_pipeline_e2e.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from pipeline.config import load_config
from workflows.cli import main
from workflows.local import LocalRunError, resolve_device, run_local

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "finetune.label_fractions=[20]",
    "pretrain.epochs=1",
    "finetune.epochs=1",
    "finetune.min_steps=5",
    "distill.epochs=1",
    "evaluate.linear_epochs=2",
    "evaluate.embedding_samples=60",
]
STAGES = ["shard", "pretrain", "finetune@20", "baseline@20", "distill@20", "evaluate"]


def test_cli_runs_every_stage_without_importing_ray_or_mlflow(tmp_path) -> None:
    # A fresh interpreter in which importing ray or mlflow fails: `contrastive local` must not
    # need them (a GPU machine without Ray is what it is for).
    script = textwrap.dedent(
        f"""
        import sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("ray", "mlflow"):
                    raise ImportError("blocked: " + name)
                return None

        sys.meta_path.insert(0, Block())
        from workflows.cli import main

        args = ["local", "smoke", "--device", "cpu", "--out", {str(tmp_path / "out")!r}]
        for override in {TINY!r}:
            args += ["--set", override]
        main(args, standalone_mode=False)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    done = [ln.split()[1] for ln in proc.stdout.splitlines() if ln.startswith("stage ")]
    assert done == STAGES
    assert "| 20% | 260 |" in proc.stdout  # the report's table is printed

    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["device"] == "cpu" and list(summary["stages"]) == STAGES
    for name in STAGES:
        stage = summary["stages"][name]
        assert stage["seconds"] > 0
        for path in stage["outputs"].values():
            assert Path(path).exists(), (name, path)
    assert not list(out.glob("*/checkpoints")), "checkpoint folders are removed after each stage"
    report = json.loads((out / "evaluate" / "report.json").read_text())
    row = report["fractions"]["20"]
    for key in ("baseline_top1", "finetune_top1", "student_top1", "linear_top1"):
        assert 0.0 <= row[key] <= 100.0, key
    assert row["student_params"] < row["teacher_params"]
    assert report["knn_top1"] > 20.0  # chance is 10 %
    assert load_config(str(out / "config.yaml")).pretrain.epochs == 1


def test_device_names() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(LocalRunError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(LocalRunError, match="only cpu and cuda"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(LocalRunError, match="CUDA is not available"):
            resolve_device("cuda")


def test_a_tune_stage_is_refused_before_anything_runs(tmp_path) -> None:
    cfg = load_config("smoke", ["tune.enabled=true"])
    with pytest.raises(LocalRunError, match="tune.enabled"):
        run_local(cfg, tmp_path / "out", "cpu")
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line(tmp_path) -> None:
    runner = CliRunner()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    res = runner.invoke(main, ["local", "smoke", "--out", str(busy)])
    assert res.exit_code == 2
    assert res.output.strip() == f"error: --out {busy}: exists and is not an empty folder"
    missing = tmp_path / "nowhere"
    res = runner.invoke(
        main, ["local", "demo", "--set", f"data.root={missing}", "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 2
    last = res.output.strip().splitlines()[-1]
    assert last.startswith(f"error: stage shard: fashion-mnist: idx files not found in {missing}")
    res = runner.invoke(main, ["local", "smoke", "--set", "pretrain.epochs=0"])
    assert res.exit_code == 2 and "pretrain.epochs" in res.output
    assert len(res.output.strip().splitlines()) == 1
    if not torch.cuda.is_available():
        res = runner.invoke(
            main, ["local", "smoke", "--device", "cuda", "--out", str(tmp_path / "o")]
        )
        assert res.exit_code == 2
        assert res.output.strip() == "error: --device cuda: CUDA is not available on this machine"


def test_gpu_demo_script_on_the_cpu(tmp_path) -> None:
    """benchmarks/gpu_demo.sh (what made BENCHMARKS.md's GPU table), with a short smoke config
    (CONFIG=<its file>) and DEVICE=cpu:
    bad variants are refused before anything runs; a run prints its table and views/s and packs
    summary, reports and histories, without model files."""
    import tarfile

    script = REPO / "benchmarks" / "gpu_demo.sh"
    # the smoke config, shortened to TINY, as a file (the script hands CONFIG to `local`)
    config = tmp_path / "smoke.yaml"
    config.write_text(yaml.safe_dump(load_config("smoke", TINY).to_dict()))
    env = {**os.environ, "CONFIG": str(config), "DEVICE": "cpu", "PYTHON": sys.executable}
    bad = subprocess.run(
        ["bash", str(script), str(tmp_path / "bad"), "60", "full", "bogus"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown variant bogus" in bad.stderr
    assert not (tmp_path / "bad").exists()
    proc = subprocess.run(
        ["bash", str(script), str(tmp_path / "out"), "200", "demo"],
        capture_output=True,
        text=True,
        env={**env, "SET": "finetune.baseline_lr={5: 0.01, 20: 0.003}"},  # spaces survive
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "demo: rc 0" in proc.stdout and "views/s per epoch: [" in proc.stdout
    assert "| 20% | 260 |" in proc.stdout
    with tarfile.open(tmp_path / "out" / "gpu_demo.tgz") as tar:
        names = tar.getnames()
    assert "./demo/summary.json" in names and "./demo/evaluate/report.json" in names
    assert "./demo/pretrain/history.json" in names and "./machine.txt" in names
    assert not [n for n in names if n.endswith((".pt", ".tar"))]
    with tarfile.open(tmp_path / "out" / "gpu_demo.tgz") as tar:
        used = yaml.safe_load(tar.extractfile("./demo/config.yaml"))
    assert used["finetune"]["baseline_lr"] == {"5.0": 0.01, "20.0": 0.003}
