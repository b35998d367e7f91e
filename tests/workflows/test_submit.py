"""``contrastive submit``: the job spec (pure), address errors, and a real Ray Job on a private head.

The real submission starts its own head (``ray start --head --block``) in a new session with its
own ``--temp-dir`` and explicit free ports, so nothing else (the shared in-process ``ray_local``,
other test processes, ``ray.init()`` auto-detection) can see it; teardown signals only that
process group. ``ray stop`` is never used: it would stop every Ray instance on the machine.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

import pytest
from _helpers import free_ports, ray_head, wait_for_job

from workflows import submit as sub
from workflows.state import check_run_id, new_run_id

ROOT = Path(__file__).resolve().parents[2]


def test_job_spec_ships_packages_and_config(tmp_path: Path) -> None:
    run_id = new_run_id()
    spec = sub.build_job_spec(
        run_id,
        str(tmp_path),
        name="smoke",
        storage_root="s3://bucket/x",
        overrides=["pretrain.epochs=1"],
    )
    argv = shlex.split(spec.entrypoint)
    assert argv == ["python", "-m", "workflows.cli", "run", "config.yaml", "--run-id", run_id] + [
        "--address",
        "auto",
    ]
    assert spec.submission_id == f"contrastive-{run_id}"
    env = spec.runtime_env
    assert env["working_dir"] == str(tmp_path)
    assert [Path(p).name for p in env["py_modules"]] == ["pipeline", "workflows"]
    assert all((Path(p) / "__init__.py").is_file() for p in env["py_modules"])
    assert "__pycache__" in env["excludes"]
    assert env["env_vars"]["CONTRASTIVE_RUN_ID"] == run_id
    assert spec.metadata == {
        "run_id": run_id,
        "name": "smoke",
        "submitted_by": "contrastive submit",
        "storage_root": "s3://bucket/x",
        "overrides": "pretrain.epochs=1",
    }
    assert check_run_id(run_id) == run_id
    # the runtime env is one Ray accepts (validated the way the job server does)
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)


def test_bad_and_unreachable_addresses_are_one_line_errors() -> None:
    for bad in ("ray://head:10001", "ftp://head", "http://head:port", ""):
        with pytest.raises(ValueError, match="submit: ") as err:
            sub.normalize_address(bad)
        assert "\n" not in str(err.value)
    assert sub.normalize_address("127.0.0.1:8265/") == "http://127.0.0.1:8265"
    (port,) = free_ports(1)  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as err:
        sub.submit_job("smoke", [], f"http://127.0.0.1:{port}", storage_root="runs")
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert f"http://127.0.0.1:{port}" in msg and "\n" not in msg


def test_cli_submit_unreachable_exits_1() -> None:
    from click.testing import CliRunner

    from workflows.cli import main

    (port,) = free_ports(1)
    res = CliRunner().invoke(main, ["submit", "smoke", "--address", f"127.0.0.1:{port}"])
    assert res.exit_code == 1
    assert "cannot reach the Ray dashboard" in res.output
    assert len(res.output.strip().splitlines()) == 1


@pytest.fixture
def private_head():
    """A Ray head of 1 CPU in its own session, temp dir and ports; yields the dashboard URL."""
    with ray_head(1, dict(os.environ)) as head:
        yield head["dashboard"]


@pytest.mark.slow
def test_real_submission_carries_packages_and_config(private_head: str, tmp_path: Path) -> None:
    from ray.job_submission import JobStatus

    storage = str(tmp_path / "store")
    probe = (
        "import pathlib, os, pipeline, workflows.submit, yaml; "
        "c = yaml.safe_load(pathlib.Path('config.yaml').read_text()); "
        "print('PROBE', c['name'], c['pretrain']['epochs'], c['storage']['root'], "
        "os.environ['CONTRASTIVE_RUN_ID'], pathlib.Path(pipeline.__file__).parent.parent != "
        f"pathlib.Path({str(ROOT)!r}))"
    )
    job_id, run_id = sub.submit_job(
        "smoke",
        ["pretrain.epochs=1", f"storage.root={storage}"],
        private_head,
        storage_root=storage,
        entrypoint=shlex.join([sys.executable, "-c", probe]),
    )
    assert job_id == f"contrastive-{run_id}"
    client = sub.connect(private_head)
    status = wait_for_job(client, job_id, 90)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-2000:]
    # the resolved config (with the overrides) and this checkout's packages, unpacked on the cluster
    assert f"PROBE smoke 1 {storage} {run_id} True" in logs
    info = client.get_job_info(job_id)
    assert info.metadata["run_id"] == run_id
    assert info.metadata["overrides"] == f"pretrain.epochs=1 storage.root={storage}"


def test_env_values_are_redacted_in_job_metadata_and_errors(tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL": "http://minio:9000",
        "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
        "DB_URI": "postgresql://bob:hunter2@db:5432/x",
    }
    spec = sub.build_job_spec(new_run_id(), str(tmp_path), env=env)
    shown = spec.metadata["env"]
    assert shown == (
        "AWS_ENDPOINT_URL=http://minio:9000 AWS_SECRET_ACCESS_KEY=*** "
        "DB_URI=postgresql://bob:***@db:5432/x"
    )
    assert "s3cr3t" not in json.dumps(spec.metadata) and "hunter2" not in json.dumps(spec.metadata)
    for k, v in env.items():  # the job itself gets the real values
        assert spec.runtime_env["env_vars"][k] == v
    with pytest.raises(ValueError, match="expected KEY=VALUE") as err:
        sub.parse_env(["MY TOKEN=abc123"])
    assert "abc123" not in str(err.value) and "MY TOKEN=***" in str(err.value)
