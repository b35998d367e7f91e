"""Shared fixtures. One local Ray instance serves the whole test session."""

from __future__ import annotations

import os

import pytest

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
