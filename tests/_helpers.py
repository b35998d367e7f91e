"""Helpers shared by several test modules (imported as ``_helpers``: tests/conftest.py puts tests/ on
``sys.path``): free ports, a private ``ray start --head`` in its own session, killing a process
with everything it started, waiting for a condition, seeded JPEG/PNG bytes, tar bytes and copies
of dataset folders."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from PIL import Image

RAY = str(Path(sys.executable).with_name("ray"))
_PORT_FLAGS = ["port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
               "dashboard-agent-grpc-port", "metrics-export-port", "runtime-env-agent-port",
               "node-manager-port", "object-manager-port"]  # fmt: skip


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports on 127.0.0.1 that nothing listens on right now."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_for(
    condition: Callable[[], object], timeout: float, what: str, every: float = 0.1
) -> object:
    """Poll ``condition`` until it returns something truthy (returned); AssertionError naming
    ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(every)


@contextlib.contextmanager
def ray_head(num_cpus: int, env: dict[str, str], timeout: float = 180) -> Iterator[dict[str, str]]:
    """``ray start --head --block`` with ``num_cpus`` CPUs, the dashboard on 127.0.0.1, its own
    session, ``--temp-dir`` and free ports, and the environment ``env``. Yields ``{"gcs":
    HOST:PORT, "dashboard": URL, "temp_dir": PATH}`` once the GCS address is published and the
    dashboard answers. Teardown signals only that process group; ``ray stop`` is never used (it
    would stop every Ray instance on the machine)."""
    from workflows import submit as sub

    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: unix socket paths are limited
    ports = free_ports(len(_PORT_FLAGS))
    cmd = [RAY, "start", "--head", "--block", f"--num-cpus={num_cpus}",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={tmp}",
           "--disable-usage-stats"]  # fmt: skip
    cmd += [f"--{n}={p}" for n, p in zip(_PORT_FLAGS, ports, strict=True)]
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    log = open(Path(tmp) / "start.log", "w")  # noqa: SIM115 - closed in the finally below
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{ports[1]}"
    current = Path(tmp, "ray_current_cluster")

    def up() -> bool:
        assert proc.poll() is None, Path(tmp, "start.log").read_text()[-2000:]
        try:
            if current.is_file() and current.read_text().strip():
                sub.check_reachable(url, 1)
                return True
        except ConnectionError:
            pass
        return False

    try:
        wait_for(up, timeout, "the Ray head coming up", every=0.25)
        yield {"gcs": current.read_text().strip(), "dashboard": url, "temp_dir": tmp}
    finally:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` stops what it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # this session's group only
        except ProcessLookupError:
            pass
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def kill_with_descendants(pid: int) -> None:
    """SIGKILL ``pid`` and every process it started, all at once (as if their machine died).
    Ray's worker processes put themselves in their own process groups, so killing the driver's
    group alone would leave them running for a while."""
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass

    def dead(p: psutil.Process) -> bool:  # gone, or a zombie nobody has reaped yet
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: all(dead(p) for p in procs), 30, f"the processes of {pid} dying", 0.05)


def kill_at_checkpoint(driver: subprocess.Popen[Any], exists: Callable[[], bool]) -> None:
    """Wait (up to 240 s) until ``exists()`` (the stage's first checkpoint), then SIGKILL the
    driver with its local Ray and its workers at once: a worker left running would go on training
    (and checkpointing) to the end of the stage."""
    try:
        wait_for(lambda: exists() or driver.poll() is not None, 240, "a checkpoint")
        assert exists() and driver.poll() is None, "pretraining never checkpointed"
    finally:
        kill_with_descendants(driver.pid)
        driver.wait()


def wait_for_job(client: Any, job_id: str, timeout: float) -> object:
    """The status of Ray job ``job_id`` once it has ended (succeeded, failed or stopped)."""
    from ray.job_submission import JobStatus

    ended = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}

    def status() -> object:
        s = client.get_job_status(job_id)
        return s if s in ended else None

    return wait_for(status, timeout, f"job {job_id} ending", every=0.25)


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    """A JPEG (quality 90) of random RGB noise, ``size`` = (width, height), the same for a seed."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_bytes(seed: int) -> bytes:
    """A 40 x 30 greyscale PNG filled with the value ``seed``."""
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 40), seed, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], fmt: int, dirs: tuple[str, ...] = ()) -> bytes:
    """An uncompressed tar in ``tarfile`` format ``fmt`` of ``members`` (name, bytes), after the
    directory entries ``dirs``."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def copy_dataset(src: Path, dst: Path) -> Path:
    """A copy of the dataset folder ``src`` at ``dst`` (for tests that alter it)."""
    shutil.copytree(src, dst)
    return dst
