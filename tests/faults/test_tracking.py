"""A tracking outage never stops training: the tracking server goes away while points are being
logged or a pipeline runs; the sink never blocks, the stages finish, the run records the gap (how
many points were lost), and Ctrl-C still stops a run within seconds.

One real ``mlflow server`` on 127.0.0.1 serves the module; each test reaches it through its own
TCP proxy (:class:`Outage`), and cutting the proxy is the outage: its port refuses connections
and open ones are reset, which is what the clients see of a killed server."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import parse_config
from workflows.tracking import MetricsSink, Tracker, TrackingError

REPO = Path(__file__).resolve().parents[2]
MLFLOW = Path(sys.executable).with_name("mlflow")
TINY = [
    "--set", "pretrain.epochs=3",
    "--set", "pretrain.max_steps_per_epoch=3",
    "--set", "finetune.label_fractions=[20]",
    "--set", "finetune.epochs=1",
    "--set", "distill.epochs=1",
    "--set", "evaluate.linear_epochs=2",
    "--set", "evaluate.embedding_samples=50",
]  # fmt: skip


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 and a free port, with its own SQLite store and artifacts."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.db = "sqlite:///" + str(folder / "server.db")
        folder.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", self.db, "--artifacts-destination", str(folder / "art"),
             "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"),  # noqa: SIM115
            start_new_session=True,  # killed as a group: the server and its workers
            # no background job runner (huey consumers): not needed, and slow to start
            env=dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
        )  # fmt: skip
        deadline = time.time() + 240  # about 10 s on an idle machine, a minute on a busy one
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        self.kill()
        pytest.fail("mlflow server did not start within 240 s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class Outage:
    """A TCP proxy on 127.0.0.1 and a free port in front of ``server``: clients use ``uri``;
    :meth:`kill` cuts it for good (the listening socket closes, open connections are reset)."""

    def __init__(self, server: MlflowServer) -> None:
        self.upstream = ("127.0.0.1", server.port)
        self.db = server.db
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._dead = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
                up = socket.create_connection(self.upstream)
            except OSError:
                if self._dead:
                    return
                continue
            with self._lock:
                if self._dead:
                    client.close()
                    up.close()
                    return
                self._open |= {client, up}
            for src, dst in ((client, up), (up, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def kill(self) -> None:
        with self._lock:
            if self._dead:
                return
            self._dead = True
            for sock in (self._listener, *self._open):
                try:
                    if sock is not self._listener:  # a reset, not an orderly close
                        sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                    sock.shutdown(socket.SHUT_RDWR)  # wakes the threads blocked on it
                except OSError:
                    pass
                sock.close()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    yield srv
    srv.kill()


@pytest.fixture
def server(mlflow_server: MlflowServer):
    """The module's MLflow server behind a proxy of this test's own, which it may cut."""
    outage = Outage(mlflow_server)
    yield outage
    outage.kill()


def test_sink_and_tracker_during_an_outage(server: Outage) -> None:
    """One outage: the metrics sink never blocks and counts what it drops; the
    tracker's calls fail fast (MLflow's HTTP retries bounded) and it records the gap."""
    tr = Tracker(server.uri, "outage")
    rid = tr.start_parent("r-outage", parse_config({}))
    fast = tr.start_parent("r-fast", parse_config({}))
    # credentials in the URI (basic auth, as MLflow's client sends them) pass the start check
    Tracker(server.uri.replace("http://", "http://alice:pw@"), "outage").check_reachable()
    sink = MetricsSink(server.uri, rid)
    sink({"loss": 1.0}, 1)
    deadline = time.time() + 20
    while sink.sent < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert sink.sent == 1
    server.kill()

    # the sink
    def epochs() -> None:
        for step in range(2, 42):
            sink({"loss": 1.0 / step, "acc": float(step)}, step)

    t0 = time.time()
    worker = threading.Thread(target=epochs, daemon=True)
    worker.start()
    worker.join(timeout=5)
    assert not worker.is_alive(), "logging a metric blocked on the dead tracking server"
    assert time.time() - t0 < 2.0
    t0 = time.time()
    dropped = sink.close(timeout=5.0)
    assert time.time() - t0 < 8.0
    assert dropped == 40 and sink.sent == 1
    # the point sent before the outage is in the server's store
    hist = Tracker(server.db, "outage").client.get_metric_history(rid, "loss")
    assert [(m.step, m.value) for m in hist] == [(1, 1.0)]

    # the tracker
    t0 = time.time()
    with pytest.raises(Exception):  # noqa: B017,PT011 - MLflow's own connection error
        tr.log_metrics(fast, {"a": 1.0, "b": 2.0}, 0)
    assert time.time() - t0 < 30, "MLflow's HTTP retries are not bounded"
    t0 = time.time()
    for step in range(20):
        with pytest.raises(TrackingError, match="unreachable"):
            tr.log_metrics(fast, {"a": 1.0, "b": 2.0}, step)
        with pytest.raises(TrackingError):
            tr.end(fast, "FAILED")
    assert time.time() - t0 < 1.0
    gap = tr.gap(extra_points=5)
    assert gap is not None and "missed 47 metric point(s)" in gap and server.uri in gap


# The CLI as a terminal starts it: with Python's Ctrl-C handler. A process started from a
# background job of a non-interactive shell (CI launched with `&`) inherits SIGINT ignored, and
# Python then installs no handler, so the CLI would never see the SIGINT these tests send.
_CLI = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'contrastive'; runpy.run_module('workflows.cli', run_name='__main__')"
)


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [sys.executable, "-c", _CLI, *args], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip


def _wait_for_state(root: Path, stage: str, state: str, proc: subprocess.Popen, limit: float):
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        for f in root.glob(f"*/stages/{stage}/state.json"):
            try:
                if json.loads(f.read_text())["state"] == state:
                    return f.parents[2].name
            except (OSError, ValueError, KeyError):
                pass
        time.sleep(0.2)
    raise AssertionError(f"stage {stage} never reached {state!r} (rc {proc.poll()})")


def _reap(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_pipeline_finishes_when_mlflow_dies_mid_run(server: Outage, tmp_path: Path) -> None:
    root = tmp_path / "store"
    proc = _cli("run", "smoke", *TINY, "--set", f"storage.root={root}",
                "--set", f"tracking.uri={server.uri}")  # fmt: skip
    try:
        rid = _wait_for_state(root, "pretrain", "running", proc, 480)
        time.sleep(1.0)
        server.kill()
        out, _ = proc.communicate(timeout=480)
    finally:
        _reap(proc)
    assert proc.returncode == 0, out[-4000:]
    assert "succeeded" in out and "failed" not in out.split("run " + rid, 1)[-1].split("\n")[0]
    info = json.loads((root / rid / "run.json").read_text())
    assert info["status"] == "succeeded"
    gap = info["tracking_gap"]
    assert gap and server.uri in gap and "metric point(s)" in gap
    assert f"tracking: MLflow at {server.uri} missed" in out
    for f in (root / rid / "stages").glob("*/state.json"):
        assert json.loads(f.read_text())["state"] == "succeeded", f


@pytest.mark.slow
def test_ctrl_c_stops_a_run_within_seconds_during_an_outage(server: Outage, tmp_path: Path) -> None:
    root = tmp_path / "store"
    proc = _cli("run", "smoke", *TINY, "--set", "pretrain.epochs=30",
                "--set", f"storage.root={root}", "--set", f"tracking.uri={server.uri}")  # fmt: skip
    try:
        rid = _wait_for_state(root, "pretrain", "running", proc, 480)
        server.kill()
        time.sleep(4.0)  # the driver and the workers now meet the dead server
        t0 = time.time()
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        stopped_in = time.time() - t0
    finally:
        _reap(proc)
    assert proc.returncode != 0
    assert stopped_in < 20, f"SIGINT took {stopped_in:.1f}s to stop the run"
    info = json.loads((root / rid / "run.json").read_text())
    assert info["status"] == "failed", out[-3000:]
    assert not (root / rid / "lease.json").exists()  # the driver let go of the run
