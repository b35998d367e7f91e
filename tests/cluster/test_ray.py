"""A real ``ray start --head`` cluster with Ray 2.60's default token authentication.

The head runs in its own session with its own ``--temp-dir``, free ports and its own token file
(``RAY_AUTH_TOKEN_PATH``; ``RAY_AUTH_MODE`` unset, so Ray turns token auth on by default) and
without the S3 variables. Teardown signals only that process group; ``ray stop`` is never used.

* ``run --address auto`` joins it; a plain ``run`` starts a private Ray even with ``RAY_ADDRESS``
  pointing at the cluster;
* a wrong address, or a missing token, is a one-line error and leaves no run folder;
* ``submit --env`` reaches the stages (the storage is on S3 and only the job's env names the
  endpoint), and the submitted run records this checkout's commit;
* a job that fails before its driver starts shows as failed in ``status``.
"""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from _helpers import free_ports, ray_head, wait_for_job

from workflows import orchestrate
from workflows import submit as sub
from workflows.state import RunStore, code_label, code_version

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = ["finetune.label_fractions=[20]", "pretrain.epochs=1", "pretrain.knn_every=0",
        "finetune.epochs=1", "finetune.min_steps=5", "finetune.baseline=false",
        "distill.enabled=false", "evaluate.linear_epochs=5", "evaluate.embedding_samples=50",
        "tracking.enabled=false"]  # fmt: skip


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("AWS_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", **extra)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def head():
    """``ray start --head`` (2 CPUs, dashboard on 127.0.0.1) with default auth and its own token.
    Yields ``{"gcs": HOST:PORT, "dashboard": URL, "token_path": PATH}``."""
    with tempfile.TemporaryDirectory(prefix="rtok") as tok:
        token_path = Path(tok, "auth_token")
        token_path.write_text(secrets.token_hex(32))
        with ray_head(2, _clean_env(RAY_AUTH_TOKEN_PATH=str(token_path))) as h:
            yield {"gcs": h["gcs"], "dashboard": h["dashboard"], "token_path": str(token_path)}


@pytest.fixture
def token_env(head, monkeypatch):
    """This process (the submitting workstation) holds the cluster's token file."""
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", head["token_path"])
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    return head


def _cli(args: list[str], env: dict[str, str], timeout: float = 400):
    return subprocess.run(
        [sys.executable, "-m", "workflows.cli", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _sets(*items: str) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _drivers(head) -> int:
    """How many drivers have ever connected to the cluster (the Jobs API lists them)."""
    client = sub.connect(head["dashboard"])
    return sum(1 for j in client.list_jobs() if str(j.type).endswith("DRIVER"))


def test_run_address_auto_joins_the_cluster_and_a_plain_run_does_not(token_env, tmp_path):
    head = token_env
    env = _clean_env(RAY_ADDRESS=head["gcs"], RAY_AUTH_TOKEN_PATH=head["token_path"])
    before = _drivers(head)
    root = tmp_path / "store"
    res = _cli(["run", "smoke", "--run-id", "on-cluster", "--address", "auto",
                *_sets(*TINY, f"storage.root={root}")], env)  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    store = RunStore(root)
    assert store.load_run("on-cluster").status == "succeeded"
    assert store.load_run("on-cluster").address == "auto"
    assert _drivers(head) == before + 1  # the run's driver joined the cluster

    # A plain run starts its own Ray, even with RAY_ADDRESS naming the cluster: its stage fails
    # (unreadable images) after Ray started, and the cluster saw no new driver.
    images = tmp_path / "images" / "cat"
    images.mkdir(parents=True)
    for i in range(2):
        (images / f"broken{i}.png").write_bytes(b"not a png")
    res = _cli(["run", "smoke", "--run-id", "local-one",
                *_sets(f"storage.root={root}", "data.source=image-folder",
                       f"data.root={tmp_path / 'images'}", "tracking.enabled=false")],
               env)  # fmt: skip
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert store.read_state("local-one", "shard").state == "failed"
    assert _drivers(head) == before + 1


def test_wrong_address_and_missing_token_are_one_line_errors_without_a_run_folder(
    token_env, tmp_path
):
    head = token_env
    root = tmp_path / "store"
    (port,) = free_ports(1)
    env = _clean_env(RAY_AUTH_TOKEN_PATH=head["token_path"])
    t0 = time.monotonic()
    res = _cli(["run", "smoke", "--address", f"127.0.0.1:{port}",
                *_sets(*TINY, f"storage.root={root}")], env)  # fmt: skip
    assert res.returncode == 2, res.stdout + res.stderr
    assert time.monotonic() - t0 < 60
    lines = res.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith(
        f"error: cannot connect to Ray at 127.0.0.1:{port}"
    )
    assert not root.exists() or not [p for p in root.iterdir() if p.name != "mlflow.db"]  # no run

    # No token anywhere (HOME without ~/.ray/auth_token): the cluster refuses; one error line
    # that names the fix, no traceback, no run folder.
    home = tmp_path / "home"
    home.mkdir()
    env = _clean_env(RAY_ADDRESS=head["gcs"], HOME=str(home))
    res = _cli(["run", "smoke", "--address", "auto", *_sets(*TINY, f"storage.root={root}")], env)
    assert res.returncode == 2, res.stdout + res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and f"cannot connect to Ray at {head['gcs']}" in errors[0]
    assert "RAY_AUTH_MODE=token" in errors[0] and "Traceback" not in res.stderr
    assert not root.exists() or not [p for p in root.iterdir() if p.name != "mlflow.db"]  # no run


def test_submit_env_reaches_the_stages_and_the_run_records_the_commit(
    token_env, s3_server, s3_bucket
):
    """The head was started without the S3 variables: the stages reach the bucket only through
    the job's runtime environment (``--env``)."""
    from click.testing import CliRunner
    from ray.job_submission import JobStatus

    from workflows.cli import main

    head = token_env
    root = f"{s3_bucket}/submitted"
    envs = [a for k, v in s3_server["env"].items() for a in ("--env", f"{k}={v}")]
    res = CliRunner().invoke(
        main,
        ["submit", "smoke", "--address", head["dashboard"], *envs,
         *_sets(*TINY, f"storage.root={root}")],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    run_id = res.output.split("run: ", 1)[1].split()[0]
    job_id = f"contrastive-{run_id}"
    assert run_id in orchestrate.status_text(root)  # listed before its driver started
    client = sub.connect(head["dashboard"])
    assert (
        client.get_job_info(job_id).runtime_env["env_vars"]["AWS_ENDPOINT_URL"]
        == (s3_server["endpoint"])
    )
    status = wait_for_job(client, job_id, 400)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    store = RunStore(root)
    info = store.load_run(run_id)
    assert info.status == "succeeded" and info.job["submission_id"] == job_id
    assert all(s.state == "succeeded" for s in store.stage_states(run_id).values())
    here = code_version()
    if here["commit"]:
        assert code_label(info.code) == code_label(here)  # not "unknown"
    assert "succeeded" in orchestrate.status_text(root, run_id).splitlines()[0]


def test_a_job_that_fails_before_its_driver_starts_is_failed_in_status(token_env, s3_bucket):
    head = token_env
    root = f"{s3_bucket}/never-started"
    boom = shlex.join(
        [sys.executable, "-c", "import sys; print('libmkl failed to load'); sys.exit(3)"]
    )
    job_id, run_id = sub.submit_job(
        "smoke", [f"storage.root={root}"], head["dashboard"], storage_root=root, entrypoint=boom
    )
    client = sub.connect(head["dashboard"])
    assert str(wait_for_job(client, job_id, 120)).split(".")[-1] in ("FAILED", "STOPPED")
    assert RunStore(root).load_run(run_id).status == "created"  # nothing else wrote it
    listing = orchestrate.status_text(root)
    row = next(ln for ln in listing.splitlines() if ln.startswith(run_id))
    assert " failed " in row and f"job {job_id} FAILED before the driver started" in row
    text = orchestrate.status_text(root, run_id)
    assert text.splitlines()[0].endswith(": failed")
    assert f"job {job_id} FAILED before the driver started" in text
