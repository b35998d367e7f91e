"""One driver per run: a run holds a lease (host, PID, heartbeat) in its storage; ``status`` tells
a live run from an interrupted one; ``resume`` refuses a live driver unless ``--force``; two first
runs at once on a fresh MLflow store both get their tracking."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from click.testing import CliRunner

from pipeline.config import parse_config
from workflows import orchestrate
from workflows.cli import main
from workflows.state import LEASE_TTL_S, RunStore


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path: Path, **tracking) -> tuple[RunStore, str]:
    cfg = parse_config({"storage": {"root": str(tmp_path / "store")}, "tracking": tracking})
    store = RunStore(tmp_path / "store")
    return store, store.create_run(cfg)


def test_status_tells_a_live_driver_from_a_dead_one(tmp_path: Path) -> None:
    store, rid = _run(tmp_path)
    with store.hold_lease(rid):
        store.update_run(rid, status="running")
        text = orchestrate.status_text(store.root, rid)
        assert f"{rid} (run): running (driver pid {os.getpid()} on {socket.gethostname()}" in text
        listing = orchestrate.status_text(store.root)
        assert "running" in listing and "interrupted" not in listing
    # A driver SIGKILLed while running leaves its lease behind, with its PID.
    code = textwrap.dedent(f"""
        import os
        from workflows.state import RunStore
        store = RunStore({str(store.root)!r})
        store.acquire_lease({rid!r}, force=True)
        os._exit(9)
    """)
    subprocess.run([sys.executable, "-c", code], check=False, timeout=60)
    lease = store.read_lease(rid)
    assert lease is not None and lease.pid != os.getpid() and not lease.alive()
    text = orchestrate.status_text(store.root, rid)
    assert f"{rid} (run): interrupted" in text
    assert f"resume with `contrastive resume {rid} --storage {store.root}`" in text
    assert "interrupted" in orchestrate.status_text(store.root)
    assert store.load_run(rid).status == "running"  # the record itself is not rewritten


def test_a_driver_on_another_host_is_alive_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    store, rid = _run(tmp_path)
    store.update_run(rid, status="running")
    lease_file = Path(store.run_dir(rid)) / "lease.json"
    for age, live in ((1.0, "running"), (LEASE_TTL_S + 5, "interrupted")):
        lease = {"host": "node-b.example", "pid": 1, "token": "t", "acquired": "",
                 "heartbeat": time.time() - age}  # fmt: skip
        lease_file.write_text(json.dumps(lease))
        assert store.run_liveness(store.load_run(rid)) == live


def test_resume_refuses_a_live_driver_unless_forced(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens: a forced resume gets as far as the tracking check
    store, rid = _run(tmp_path, uri=f"http://127.0.0.1:{port}")
    store.update_run(rid, status="running")
    with store.hold_lease(rid):
        res = CliRunner().invoke(main, ["resume", rid, "--storage", str(store.root)])
        assert res.exit_code == 2, res.output
        (line,) = res.output.strip().splitlines()
        assert f"run {rid} is being run by driver pid {os.getpid()}" in line
        assert "--force" in line
        assert store.load_run(rid).status == "running"
        res = CliRunner().invoke(main, ["resume", rid, "--storage", str(store.root), "--force"])
        assert res.exit_code == 2, res.output
        assert "taking run" in res.output and "(--force)" in res.output
        assert f"MLflow server http://127.0.0.1:{port} is not reachable" in res.output


def test_two_first_runs_on_a_fresh_mlflow_store_both_succeed(tmp_path: Path) -> None:
    """Three drivers start their MLflow parent run on one new SQLite store at the same moment
    (each creates or migrates the schema); every one of them gets its run."""
    db = "sqlite:///" + str(tmp_path / "mlflow.db")
    start = time.time() + 3
    code = textwrap.dedent(f"""
        import time, sys
        from pipeline.config import parse_config
        from workflows.tracking import Tracker
        while time.time() < {start}:
            time.sleep(0.001)
        tr = Tracker({db!r}, "first")
        print(tr.start_parent(sys.argv[1], parse_config({{}})))
    """)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, f"run-{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(3)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-2000:]
    ids = {o.strip() for o, _ in outs}
    assert len(ids) == 3
