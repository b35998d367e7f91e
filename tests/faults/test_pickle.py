"""No unpickling of what others can write: checkpoints load with ``weights_only=True`` (a
checkpoint that would run code is refused), training state round-trips that way, and values that
look like credentials never reach MLflow params or Ray job metadata."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.config import parse_config
from pipeline.optim import warmup_cosine
from pipeline.runtime import LocalContext
from pipeline.stages.common import restore_training_state, training_state


class _Payload:
    """Unpickling this creates ``marker``: what a hostile checkpoint in a shared bucket does."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _hostile_checkpoint(folder: Path, marker: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "model": _Payload(str(marker))}, folder / "latest.pt")


def test_local_context_refuses_a_checkpoint_that_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _hostile_checkpoint(tmp_path / "ckpt", marker)
    with pytest.raises(RuntimeError, match=r"checkpoint .*latest.pt holds objects other than"):
        LocalContext(tmp_path / "ckpt").load_checkpoint()
    assert not marker.exists()


def test_ray_task_context_refuses_a_checkpoint_that_runs_code(tmp_path: Path) -> None:
    from workflows.train import TaskContext

    marker = tmp_path / "pwned"
    _hostile_checkpoint(tmp_path / "ckpt", marker)
    with pytest.raises(RuntimeError, match=r"checkpoint .*latest.pt holds objects other than"):
        TaskContext(str(tmp_path / "ckpt")).load_checkpoint()
    assert not marker.exists()


def test_training_state_loads_with_weights_only_and_restores_every_rng() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = warmup_cosine(opt, warmup_steps=2, total_steps=10)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    sched.step()
    random.seed(1)
    np.random.seed(2)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state too
    torch.manual_seed(3)
    state = training_state(model, opt, sched, 4, [{"epoch": 5, "loss": 0.25}], phase="x")
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, map_location="cpu", weights_only=True)
    expected = (random.random(), np.random.standard_normal(), torch.rand(2).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    m2 = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    o2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    s2 = warmup_cosine(o2, warmup_steps=2, total_steps=10)
    start, history = restore_training_state(loaded, m2, o2, s2)
    assert start == 5 and history == [{"epoch": 5, "loss": 0.25}]
    assert (random.random(), np.random.standard_normal(), torch.rand(2).tolist()) == expected
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    assert s2.get_last_lr() == sched.get_last_lr()


SECRET = "hunter2-s3cr3t"


def test_credentials_are_redacted_in_mlflow_params(tmp_path: Path) -> None:
    from workflows.tracking import Tracker

    cfg = parse_config(
        {
            "storage": {"root": f"s3://AKIDEXAMPLE:{SECRET}@bucket/prefix"},
            "tracking": {"uri": f"https://alice:{SECRET}@mlflow.example.org/"},
        }
    )
    tr = Tracker("sqlite:///" + str(tmp_path / "mlflow.db"), "redact")
    parent = tr.start_parent("r1", cfg)
    tr._log_params(parent, {"resources.env.API_TOKEN": SECRET, "db_password": SECRET, "n": 3})
    params = tr.client.get_run(parent).data.params
    assert params, "no params logged"
    assert not [k for k, v in params.items() if SECRET in v]
    assert params["tracking.uri"] == "https://alice:***@mlflow.example.org/"
    assert params["storage.root"] == "s3://AKIDEXAMPLE:***@bucket/prefix"
    assert params["resources.env.API_TOKEN"] == "***" and params["db_password"] == "***"
    assert params["n"] == "3"


def test_credentials_are_redacted_in_ray_job_metadata(tmp_path: Path) -> None:
    from workflows.submit import build_job_spec

    spec = build_job_spec(
        "r1",
        str(tmp_path),
        py_modules=[],
        storage_root=f"s3://AK:{SECRET}@bucket/x",
        overrides=[
            f"tracking.uri=http://bob:{SECRET}@mlflow:5000",
            f"resources.env.AWS_SECRET_ACCESS_KEY={SECRET}",
            "pretrain.epochs=3",
        ],
    )
    assert SECRET not in str(spec.metadata)
    assert "pretrain.epochs=3" in spec.metadata["overrides"]
    assert "http://bob:***@mlflow:5000" in spec.metadata["overrides"]


def test_credentials_in_error_messages_are_redacted() -> None:
    """MLflow's connection errors quote the request URL, password included."""
    from workflows.runtypes import one_line

    err = ConnectionError(f"API request to http://alice:{SECRET}@mlflow:5000/api/2.0/runs failed")
    assert one_line(err) == (
        "ConnectionError: API request to http://alice:***@mlflow:5000/api/2.0/runs failed"
    )
