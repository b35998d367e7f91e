"""Run state, outputs and checkpoints on an S3-compatible server (moto's server mode on 127.0.0.1):
the smoke pipeline end to end with ``status`` / ``lineage`` / ``compare`` reading the bucket, and a
driver SIGKILLed during pretraining that ``resume`` continues from its checkpoint on S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from _helpers import kill_at_checkpoint

from pipeline.config import load_config
from workflows import orchestrate, stageio
from workflows.state import RunStore

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    "finetune.label_fractions=[20]",
    "pretrain.max_steps_per_epoch=3",
    "pretrain.knn_every=0",
    "finetune.epochs=1",
    "finetune.min_steps=5",
    "distill.epochs=1",
    "evaluate.linear_epochs=2",
    "evaluate.embedding_samples=50",
]


def _objects(uri: str) -> dict[str, int]:
    fs, path = pafs.FileSystem.from_uri(uri)
    sel = pafs.FileSelector(path, recursive=True, allow_not_found=True)
    return {
        f.path[len(path) + 1 :]: f.mtime_ns or 0
        for f in fs.get_file_info(sel)
        if f.type == pafs.FileType.File
    }


def test_materialize_input_copies_once_per_node_and_names_a_missing_object(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/runs/r/stages/shard/out"
    stageio.write_text(f"{uri}/dataset.json", '{"name": "x"}')
    stageio.write_text(f"{uri}/subsets/label_1.parquet", "p")
    # the dataset folder is read in place (streamed); any other input is copied once per node
    assert stageio.materialize_input("dataset", uri, cache=str(tmp_path)) == uri
    local = stageio.materialize_input("pretrain", uri, cache=str(tmp_path))
    assert Path(local, "dataset.json").read_text() == '{"name": "x"}'
    assert Path(local, "subsets", "label_1.parquet").is_file()
    assert stageio.materialize_input("pretrain", uri, cache=str(tmp_path)) == local  # cached
    assert stageio.materialize_input("dataset", "/a/local/path") == "/a/local/path"
    with pytest.raises(FileNotFoundError, match=r"input 'teacher': s3://.*/nope\.pt does not"):
        stageio.materialize_input("teacher", f"{s3_bucket}/nope.pt", cache=str(tmp_path))
    # a checkpoint round trip through the object store
    stageio.save_torch({"epoch": 3, "w": torch.ones(2)}, f"{s3_bucket}/ck/latest.pt")
    got = stageio.load_torch(f"{s3_bucket}/ck/latest.pt")
    assert got["epoch"] == 3 and torch.equal(got["w"], torch.ones(2))
    assert stageio.load_torch(f"{s3_bucket}/ck/none.pt") is None


def test_uri_query_survives_in_store_uris(s3_server, s3_bucket):
    """A custom endpoint given in the URI itself (pyarrow's ``endpoint_override``) stays on every
    URI the store hands out, so tasks elsewhere reach the same server."""
    host = s3_server["endpoint"].removeprefix("http://")
    root = f"{s3_bucket}/q?endpoint_override={host}&scheme=http"
    store = RunStore(root)
    uri = store.uri(store.out_dir("r1", "shard"))
    assert uri.endswith(f"/q/r1/stages/shard/out?endpoint_override={host}&scheme=http")
    stageio.write_text(stageio.join(uri, "a.txt"), "hi")
    assert stageio.read_text(f"{s3_bucket}/q/r1/stages/shard/out/a.txt") == "hi"


@pytest.mark.slow
def test_smoke_pipeline_on_s3_end_to_end(ray_local, s3_server, s3_bucket, tmp_path):
    """Every stage runs with storage.root on S3; outputs are real objects; status, lineage and
    compare read the bucket. The shared Ray was started without the S3 variables: the stages get
    them from ``resources.env`` (their runtime environment)."""
    root = f"{s3_bucket}/team/contrastive"
    env = [f"resources.env.{k}={v}" for k, v in s3_server["env"].items()]
    cfg = load_config(
        "smoke",
        [*SMALL, "pretrain.epochs=2", f"storage.root={root}",
         f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *env],
    )  # fmt: skip
    assert orchestrate.run_pipeline(cfg, run_id="s3-e2e") == 0
    store = RunStore(root)
    states = store.stage_states("s3-e2e")
    assert sorted(states) == sorted(
        ["shard", "pretrain", "finetune@20", "baseline@20", "distill@20", "evaluate"]
    )
    assert all(s.state == "succeeded" and s.attempts == 1 for s in states.values()), states
    for name in states:
        for out, uri in store.read_manifest("s3-e2e", name)["outputs"].items():
            assert uri.startswith(f"{root}/s3-e2e/stages/{name}/out"), (name, out, uri)
            assert "/./" not in uri and not uri.endswith("/.")
            assert stageio.exists(uri), (name, out, uri)
    assert store.read_manifest("s3-e2e", "shard")["outputs"]["dataset"] == (
        f"{root}/s3-e2e/stages/shard/out"
    )
    ckpts = _objects(f"{root}/s3-e2e/stages/pretrain/checkpoints")
    assert "latest.pt" in ckpts
    assert stageio.load_torch(f"{root}/s3-e2e/stages/pretrain/checkpoints/latest.pt")
    report = json.loads(
        stageio.read_text(store.read_manifest("s3-e2e", "evaluate")["outputs"]["report_json"])
    )
    assert report["knn_top1"] > 20.0
    status = orchestrate.status_text(root, "s3-e2e")
    assert "s3-e2e (smoke): succeeded" in status and status.count("succeeded") == 7
    assert "s3-e2e" in orchestrate.status_text(root)
    lineage = orchestrate.lineage_text(root, "s3-e2e")
    assert f"out model: {root}/s3-e2e/stages/pretrain/out/model.pt" in lineage
    compare = orchestrate.compare_text(root, ["s3-e2e"])
    row = next(ln for ln in compare.splitlines() if ln.startswith("20%"))
    assert f"{report['fractions']['20']['finetune_top1']:.1f}" in row


def _env(s3_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **s3_env)
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.slow
def test_driver_sigkill_on_s3_then_resume_continues_from_the_checkpoint(
    s3_server, s3_bucket, tmp_path
):
    root = f"{s3_bucket}/killed"
    rid = "s3-killed"
    sets = [*SMALL, "pretrain.epochs=6", "finetune.baseline=false", "distill.enabled=false",
            f"storage.root={root}", "tracking.enabled=false"]  # fmt: skip
    args = ["run", "smoke", "--run-id", rid, *[a for s in sets for a in ("--set", s)]]
    driver = subprocess.Popen(
        [sys.executable, "-m", "workflows.cli", *args],
        cwd=REPO, env=_env(s3_server["env"]), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    ckpt = f"{root}/{rid}/stages/pretrain/checkpoints/latest.pt"
    kill_at_checkpoint(driver, lambda: stageio.exists(ckpt))
    store = RunStore(root)
    assert store.read_state(rid, "pretrain").state == "running"  # killed, not recorded as done
    shard_manifest = store.read_manifest(rid, "shard")
    shard_objects = _objects(f"{root}/{rid}/stages/shard/out")
    assert shard_objects

    res = subprocess.run(
        [sys.executable, "-m", "workflows.cli", "resume", rid, "--storage", root],
        cwd=REPO, env=_env(s3_server["env"]), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    states = store.stage_states(rid)
    assert all(s.state == "succeeded" for s in states.values()), states
    assert states["shard"].attempts == 1 and states["pretrain"].attempts == 2
    assert store.read_manifest(rid, "shard") == shard_manifest
    assert _objects(f"{root}/{rid}/stages/shard/out") == shard_objects  # not rewritten
    hist = json.loads(stageio.read_text(store.read_manifest(rid, "pretrain")["outputs"]["history"]))
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5, 6]
    assert max(h["resumed_from_epoch"] for h in hist) >= 1  # continued from the S3 checkpoint
