"""The cluster path's plumbing without a cluster: Ray addresses, ``resources.env``, ``--env``, the
job spec's code version, a submitted run's record, and output URIs on an object store."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.config import ConfigError, load_config
from workflows import orchestrate
from workflows import submit as sub
from workflows.stagetask import _output_uri
from workflows.state import CODE_ENV, RunStore, StateError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_is_one_line_naming_it() -> None:
    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(orchestrate.PipelineError) as err:
        orchestrate.connect_ray(f"127.0.0.1:{port}")
    msg = str(err.value)
    assert msg.startswith(f"cannot connect to Ray at 127.0.0.1:{port} (") and "\n" not in msg
    assert "GCS address" in msg and time.monotonic() - t0 < 10


def test_auto_without_a_cluster_is_one_line(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))  # no ray_current_cluster there
    with pytest.raises(orchestrate.PipelineError, match=r"^cannot connect to Ray at auto: no "):
        orchestrate.connect_ray("auto")


def test_resources_env_is_strings_and_rejects_bad_names() -> None:
    cfg = load_config(
        "smoke", ["resources.env.AWS_ENDPOINT_URL=http://127.0.0.1:9000", "resources.env.N=3"]
    )
    assert cfg.resources.env == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "N": "3"}
    with pytest.raises(ConfigError, match="resources.env"):
        load_config("smoke", ["resources.env={'A=B': x}"])
    with pytest.raises(ConfigError, match="resources.env"):
        load_config("smoke", ["resources.env.A=[1, 2]"])


def test_submit_env_and_code_version_go_into_the_job_env(tmp_path: Path) -> None:
    assert sub.parse_env(["A=1", "B=x=y", "C="]) == {"A": "1", "B": "x=y", "C": ""}
    for bad in ("NOEQUALS", "=v", "A B=1", "A-B=1"):
        with pytest.raises(ValueError, match=r"^submit: --env "):
            sub.parse_env([bad])
    code = {"version": "0.1.0", "commit": "a" * 40, "dirty": False}
    spec = sub.build_job_spec(
        "r1",
        str(tmp_path),
        env={"AWS_ENDPOINT_URL": "http://minio:9000"},
        address="http://127.0.0.1:8265",
        code=code,
    )
    env = spec.runtime_env["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000"
    assert env[sub.JOB_ID_ENV] == "contrastive-r1"
    assert env[sub.JOB_ADDRESS_ENV] == "http://127.0.0.1:8265"
    import json

    assert json.loads(env[CODE_ENV]) == code
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**spec.runtime_env)  # a runtime env Ray accepts


def test_the_jobs_driver_takes_over_the_record_submit_made(tmp_path: Path) -> None:
    cfg = load_config("smoke", [])
    store = RunStore(tmp_path)
    job = {"submission_id": "contrastive-r1", "address": "http://127.0.0.1:1"}
    store.create_run(cfg, "r1", address="auto", job=job)
    created = store.load_run("r1").created
    assert store.create_run(cfg, "r1", address="auto", job=job) == "r1"  # the driver, later
    info = store.load_run("r1")
    assert info.created == created and info.job == job and info.status == "created"
    with pytest.raises(StateError, match="already exists"):
        store.create_run(cfg, "r1")  # not the job's driver
    with pytest.raises(StateError, match="already exists"):
        store.create_run(cfg, "r1", job={"submission_id": "contrastive-other"})
    store.update_run("r1", status="running")
    with pytest.raises(StateError, match="already exists"):
        store.create_run(cfg, "r1", job=job)  # a driver already started it
    # the Jobs API cannot be reached: status says so and keeps the recorded state
    store.update_run("r1", status="created")
    text = orchestrate.status_text(str(tmp_path))
    assert "created" in text and "job contrastive-r1: not known" in text


def test_output_uris_name_real_objects_never_out_dot(tmp_path: Path) -> None:
    store = RunStore("bucket/p", filesystem=pafs._MockFileSystem())
    store.root = "s3://bucket/p"  # as a URI root would be
    local = tmp_path / "out"
    (local / "sub").mkdir(parents=True)
    out_dir = store.out_dir("r", "shard")
    assert _output_uri(store, out_dir, str(local), str(local)) == "s3://bucket/p/r/stages/shard/out"
    assert _output_uri(store, out_dir, str(local), str(local / "sub" / "a.parquet")) == (
        "s3://bucket/p/r/stages/shard/out/sub/a.parquet"
    )
