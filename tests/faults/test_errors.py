"""Causes in one line: a failed stage's error (CLI, state.json, status) is the root cause with its
message (Ray's wrappers unwrapped, no ANSI codes); bad configs, a read-only or full storage root
and a batch larger than the training set are one line naming the culprit."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import ray.cloudpickle
from click.testing import CliRunner

from pipeline.config import parse_config
from workflows.cli import main
from workflows.dag import Graph, StageNode
from workflows.runner import run_graph
from workflows.runtypes import one_line
from workflows.state import RunStore

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "--set", "pretrain.epochs=1",
    "--set", "finetune.label_fractions=[20]",
    "--set", "finetune.epochs=1",
    "--set", "distill.epochs=1",
    "--set", "evaluate.linear_epochs=2",
    "--set", "evaluate.embedding_samples=50",
]  # fmt: skip


def _cli(*args: str, timeout: float = 300, prefix: list[str] | None = None, cwd=REPO):
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "workflows.cli", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


# -- the root cause, unwrapped ---------------------------------------------------------------


def test_one_line_strips_ansi_codes() -> None:
    err = RuntimeError("\x1b[31mshard train-000003.tar\x1b[0m: truncated\nmore")
    assert one_line(err) == "RuntimeError: shard train-000003.tar: truncated"


@ray.remote(max_retries=0)
def _inner() -> None:
    raise ValueError("\x1b[1mpretrain.batch_size 4096 exceeds the 1294 train images\x1b[0m")


@ray.remote(max_retries=0)
def _outer() -> None:
    ray.get(_inner.remote())  # a training task inside a stage task, as in the pipeline


def test_one_line_unwraps_nested_ray_task_errors(ray_local) -> None:
    with pytest.raises(Exception) as info:  # noqa: PT011 - RayTaskError(ValueError)
        ray.get(_outer.remote())
    assert "ray::_outer()" in str(info.value).splitlines()[0]  # what it read before
    assert one_line(info.value) == (
        "ValueError: pretrain.batch_size 4096 exceeds the 1294 train images"
    )


def test_one_line_unwraps_ray_train_worker_group_errors() -> None:
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    cause = OSError(28, "No space left on device", "/data/runs/x/stages/pretrain/out/model.pt")
    err = WorkerGroupError("worker 1 died", {1: cause, 0: KeyError("k")})
    assert one_line(err) == "KeyError: 'k'"
    assert one_line(ControllerError(cause)).startswith(
        "OSError: [Errno 28] No space left on device: '/data/runs/x/stages/pretrain/out/model.pt'"
    )


class _NestedFail:
    def __call__(self, node, inputs, out_dir, tracking_info):
        ray.get(_inner.remote())


def test_failed_stage_records_the_root_cause(ray_local, tmp_path: Path) -> None:
    cfg = parse_config({"storage": {"root": str(tmp_path / "store")}})
    store = RunStore(tmp_path / "store")
    rid = store.create_run(cfg)
    summary = run_graph(Graph([StageNode("pretrain", "pretrain")]), cfg, store, rid, _NestedFail())
    want = "ValueError: pretrain.batch_size 4096 exceeds the 1294 train images"
    assert summary.stages["pretrain"].error == want
    assert store.read_state(rid, "pretrain").error == want
    assert store.load_run(rid).error == f"stage pretrain failed: {want}"
    assert "ray::" in Path(store.read_state(rid, "pretrain").traceback_file).read_text()


# -- bad configs ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "sets", "expect"),
    [
        (b"name: caf\xe9\n", [], "line 1 is not UTF-8"),
        (
            b"pretrain:\n  epochs: 3\n  lr: 0.1\n  epochs: 50\n",
            [],
            "line 4: duplicate key 'epochs'",
        ),
        (b"name: x\n", ["tracking.uri=htp://127.0.0.1:5000"], "tracking.uri: unknown scheme 'htp'"),
        (b"storage:\n  root: ''\n", [], "storage.root: must not be empty"),
        (b"pretrain:\n  lr: .inf\n", [], "pretrain.lr: must be a finite number"),
        (b"name: x\n", ["pretrain.temperature=nan"], "pretrain.temperature: must be a finite"),
        (b"name: x\n", ["finetune.label_fractions=[1, inf]"], "finetune.label_fractions.1: must"),
    ],
)
def test_bad_config_is_one_line(tmp_path: Path, text: bytes, sets: list[str], expect: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    args = ["config", "show", str(path)] + [a for s in sets for a in ("--set", s)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2, res.output
    assert expect in res.output and len(res.output.strip().splitlines()) == 1, res.output
    assert "Traceback" not in res.output


# -- storage that cannot be written -------------------------------------------------------------


def _private_mount(tmp_path: Path, options: str) -> list[str]:
    """A command prefix that runs the command with a tmpfs (``options``) mounted on
    ``tmp_path/mnt`` in a private mount namespace (no root needed where user namespaces are)."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o {options} tmpfs {mnt}"],
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here")
    script = f'mount -t tmpfs -o {options} tmpfs {mnt} && exec "$@"'
    return ["unshare", "-rm", "sh", "-c", script, "sh"]


def test_read_only_storage_root_is_one_line_naming_it(tmp_path: Path) -> None:
    prefix = _private_mount(tmp_path, "ro,size=1m")
    root = tmp_path / "mnt" / "store"
    res = _cli("run", "smoke", "--set", f"storage.root={root}", prefix=prefix, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(tmp_path / "mnt") in lines[0] and "Read-only file system" in lines[0]
    # without tracking, the run folder is the first write
    res = _cli(
        "run", "smoke", "--set", f"storage.root={root}", "--set", "tracking.enabled=false",
        prefix=prefix, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    (line,) = res.stderr.strip().splitlines()
    assert "Read-only file system" in line and str(root) in line


@pytest.mark.slow
def test_disk_full_mid_run_is_one_line_and_the_run_is_not_left_running(tmp_path: Path) -> None:
    """The shards fit on a 1.5 MB file system, the pretrained model's checkpoint does not."""
    prefix = _private_mount(tmp_path, "size=1536k")
    root = tmp_path / "mnt" / "store"
    res = _cli(
        "run", "smoke", *TINY, "--set", f"storage.root={root}", "--set", "tracking.enabled=false",
        prefix=prefix, timeout=240,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "No space left on device" in out, out
    assert "Traceback" not in res.stderr, res.stderr
    summary = [ln for ln in res.stdout.splitlines() if ln.startswith("run ") and "failed" in ln]
    assert summary and "No space left on device" in summary[0] and str(root) in summary[0], out


# -- a batch larger than the training set ---------------------------------------------------------


@pytest.mark.slow
def test_batch_larger_than_the_training_set_is_one_clear_line(ray_local, tmp_path: Path) -> None:
    root = tmp_path / "store"
    res = CliRunner().invoke(
        main,
        ["run", "smoke", *TINY, "--set", "pretrain.batch_size=4096",
         "--set", f"storage.root={root}", "--set", "tracking.enabled=false"],
    )  # fmt: skip
    assert res.exit_code == 1, res.output
    want = "stage pretrain failed: ValueError: pretrain.batch_size 4096 exceeds the"
    assert want in res.stdout, res.stdout
    assert "ray::" not in res.stdout.split("stage pretrain failed:", 1)[1].splitlines()[0]
    (rid,) = [r.run_id for r in RunStore(str(root)).list_runs()]
    state = json.loads((root / rid / "stages" / "pretrain" / "state.json").read_text())
    assert state["error"].startswith("ValueError: pretrain.batch_size 4096 exceeds the")
    status = CliRunner().invoke(main, ["status", rid, "--storage", str(root)]).stdout
    assert "pretrain failed: ValueError: pretrain.batch_size 4096 exceeds the" in status


def test_ray_that_does_not_start_is_one_line_and_leaves_no_run(tmp_path, monkeypatch) -> None:
    """Ray's own start-up timeout (seen on an overloaded machine) ends the run as one line,
    instead of a traceback; Ray is reached before the run folder is made, so none is left
    behind (and no lease)."""
    from pipeline.config import load_config
    from workflows import orchestrate

    def start_timeout(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen ...\nmore")

    monkeypatch.setattr(orchestrate, "connect_ray", start_timeout)
    cfg = load_config("smoke", [f"storage.root={tmp_path}", "tracking.enabled=false"])
    with pytest.raises(orchestrate.PipelineError) as info:
        orchestrate.run_pipeline(cfg)
    assert str(info.value) == (
        "ray error: cannot start or reach Ray (local): The current node timed out during "
        "startup. This could happen ..."
    )
    assert RunStore(str(tmp_path)).list_runs() == []
