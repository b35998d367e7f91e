"""Shared fixtures. One local Ray instance serves the whole test session.

The tests mirror the packages (``tests/pipeline/data/test_loader.py`` tests
``pipeline/data/loader.py``; ``tests/cluster``, ``tests/faults`` and ``tests/e2e`` hold what spans
packages). pytest imports them with ``--import-mode=importlib`` (two folders may hold a
``test_tracking.py``); ``tests/`` itself is put on ``sys.path`` here for ``_helpers``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session")
def ray_local():
    """Start (once) a local Ray instance with 2 CPUs; shut it down at the end of the session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # always a fresh instance, even when a `ray start` cluster runs here
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server (moto's server mode) on 127.0.0.1 and a free port, for the whole
    session. Yields ``{"endpoint": "http://127.0.0.1:PORT", "env": {...}}``; the env holds the
    variables that point boto3 and pyarrow's S3 filesystem at it (``AWS_ENDPOINT_URL`` etc.)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    yield {"endpoint": endpoint, "env": env}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh, empty bucket on :func:`s3_server`, with the S3 variables set in this process's
    environment (and so in the Ray workers and subprocesses it starts). Yields ``s3://<bucket>``."""
    import uuid

    import pyarrow.fs as pafs

    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(
        endpoint_override=s3_server["endpoint"],
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        scheme="http",
        allow_bucket_creation=True,
    )
    fs.create_dir(bucket)
    yield f"s3://{bucket}"
