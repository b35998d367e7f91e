"""Durable run records under ``<storage.root>/<run_id>/``, through ``pyarrow.fs``.

Layout of one run (``storage.root`` defaults to ``runs``, so a run lives in ``runs/<run_id>/``)::

    <run_id>/config.yaml                 the resolved config
    <run_id>/run.json                    run id, created, status, MLflow parent run, address, code (commit)
    <run_id>/stages/<name>/state.json    pending|running|succeeded|failed|skipped, attempts, ...
    <run_id>/stages/<name>/error.txt     the traceback of the last failure
    <run_id>/stages/<name>/stage.log     the stage's worker output (``contrastive logs``)
    <run_id>/stages/<name>/out/          the stage's outputs
    <run_id>/stages/<name>/manifest.json written LAST: a stage with a manifest is finished
    <run_id>/lease.json                  the driver holding the run: host, PID, heartbeat

Next to the runs the root holds ``mlflow.db`` and ``mlartifacts/`` (the default MLflow store) and
``tune/`` (Tune searches). Runs that an older layout put under ``<storage.root>/runs/<run_id>/``
are still found and read.

``storage.root`` is a local path or a URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``)
that :func:`pyarrow.fs.FileSystem.from_uri` understands. Every write is atomic: on a local file
system through a temp file and a rename; on an object store the final object is written in one put
(an object appears only once its upload completes).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import yaml

from pipeline.atomic import atomic_put
from pipeline.config import Config, parse_config
from pipeline.errors import UserError

__all__ = [
    "RUN_STATES",
    "STAGE_STATES",
    "Lease",
    "LeaseHeld",
    "RunInfo",
    "RunStatus",
    "RunStore",
    "StageState",
    "StageStatus",
    "StateError",
    "new_run_id",
    "now_iso",
]

#: ``contrastive submit`` ships :func:`code_version` of its checkout in this variable of the job's
#: runtime environment: the packages arrive without their ``.git``.
CODE_ENV = "CONTRASTIVE_CODE_VERSION"


class TextEnum(str, Enum):
    """An enum whose members are their string values: they compare, hash, format and serialise
    (JSON) as those strings, so records on disk and string comparisons read the same."""

    def __str__(self) -> str:
        return str.__str__(self)


class StageStatus(TextEnum):
    """The durable state of a stage (``state.json``'s ``state``); ``skipped`` covers a stage
    finished earlier and one linked from an earlier run (``reused_from`` set)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"


class RunStatus(TextEnum):
    """The recorded status of a run (``run.json``'s ``status``)."""

    CREATED = "created"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


STAGE_STATES: tuple[str, ...] = tuple(s.value for s in StageStatus)
#: A driver renews its lease every LEASE_RENEW_S; a lease not renewed for LEASE_TTL_S is dead.
LEASE_RENEW_S = 5.0
LEASE_TTL_S = 30.0
RUN_STATES: tuple[str, ...] = tuple(s.value for s in RunStatus)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: Folder of the older layout (``<root>/runs/<run_id>``), still read.
LEGACY_RUNS = "runs"
#: Names next to the runs under the storage root, never run ids.
RESERVED_NAMES = frozenset({LEGACY_RUNS, "tune", "mlartifacts", "mlruns", "mlflow.db"})


class StateError(UserError, RuntimeError):
    """A problem with the run records; ``str(err)`` is one line."""


def now_iso() -> str:
    """The current UTC time, ISO 8601 with seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def code_version() -> dict[str, Any]:
    """The code a run is made with: the package version and, in a git checkout, the commit,
    whether tracked files differ from it (``dirty``) and, if so, a short hash of that difference
    (``changes``: two runs with different uncommitted edits get different hashes). ``commit`` is
    None outside a checkout (an installed wheel), unless ``$CONTRASTIVE_CODE_VERSION`` carries the
    checkout's (a Ray Job sent by ``contrastive submit``)."""
    import hashlib
    import subprocess

    import pipeline

    out: dict[str, Any] = {"version": pipeline.__version__, "commit": None, "dirty": None}
    repo = Path(pipeline.__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        shipped = os.environ.get(CODE_ENV)  # set by `contrastive submit` from its checkout
        if shipped:
            try:
                got = json.loads(shipped)
            except json.JSONDecodeError:
                got = None
            if isinstance(got, dict) and got.get("commit"):
                out.update({k: got[k] for k in ("commit", "dirty", "changes") if k in got})
        return out
    try:
        git = ["git", "-C", str(repo)]
        commit = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        diff = subprocess.run(
            [*git, "diff", "HEAD", "--no-ext-diff", "--no-color"],
            capture_output=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):  # no git binary, not a repository, ...
        return out
    out.update(commit=commit or None, dirty=bool(diff))
    if diff:
        out["changes"] = hashlib.sha256(diff).hexdigest()[:8]
    return out


def code_label(code: dict[str, Any] | None) -> str:
    """``abc1234``; ``abc1234+changes-1a2b3c4d`` with uncommitted changes (their hash;
    ``+changes`` alone for records without one); ``unknown`` without a commit."""
    if not code or not code.get("commit"):
        return "unknown"
    if not code.get("dirty"):
        return code["commit"][:7]
    return code["commit"][:7] + "+changes" + (f"-{code['changes']}" if code.get("changes") else "")


def new_run_id() -> str:
    """A fresh run id, unique and sortable by creation time: ``20261123-101500-ab12cd``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def check_run_id(run_id: str) -> str:
    """Return ``run_id`` if it is a safe folder name, else raise a one-line :class:`StateError`."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or ".." in run_id:
        raise StateError(
            f"state error: run id {run_id!r} is not valid (letters, digits, '.', '_', '-'; up to 128)"
        )
    if run_id in RESERVED_NAMES:
        raise StateError(f"state error: run id {run_id!r} is reserved (a folder of the store)")
    return run_id


class LeaseHeld(StateError):
    """Another live driver holds the run's lease; one line naming it."""


@dataclass
class Lease:
    """Who drives a run (``lease.json``): host, PID, a random token, and the last heartbeat."""

    host: str
    pid: int
    token: str
    acquired: str
    heartbeat: float  # time.time() of the last renewal

    def age(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.heartbeat)

    def alive(self, now: float | None = None) -> bool:
        """Renewed within :data:`LEASE_TTL_S`, and, on this host, its process still exists."""
        if self.age(now) > LEASE_TTL_S:
            return False
        if self.host == socket.gethostname():
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # another user's live process
                return True
        return True

    def describe(self, now: float | None = None) -> str:
        return f"driver pid {self.pid} on {self.host}, heartbeat {self.age(now):.0f}s ago"


@dataclass
class StageState:
    """The durable state of one stage (``state.json``)."""

    name: str
    state: StageStatus = StageStatus.PENDING
    attempts: int = 0
    started: str | None = None
    ended: str | None = None
    duration_s: float | None = None
    error: str | None = None
    traceback_file: str | None = None
    cache_key: str | None = None
    mlflow_run_id: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    key_metric: str | None = None
    reused_from: dict[str, str] | None = None

    def __post_init__(self) -> None:
        # a plain string (a record on disk, a caller) becomes the member; a value that is no
        # stage state is kept as given, for write_state to name it
        try:
            self.state = StageStatus(self.state)
        except ValueError:
            pass

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StageState:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class RunInfo:
    """What ``run.json`` holds, plus the run's folder."""

    run_id: str
    created: str
    status: RunStatus = RunStatus.CREATED
    name: str = "run"
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    address: str | None = None
    updated: str | None = None
    error: str | None = None
    code: dict[str, Any] | None = None  # code_version() at creation: version, commit, dirty
    job: dict[str, str] | None = None  # a submitted run's Ray Job: submission_id, address
    tracking_gap: str | None = None  # what MLflow missed while it was unreachable (one line)
    path: str = ""

    def __post_init__(self) -> None:
        try:  # as StageState.state: a value from disk becomes the member when it is one
            self.status = RunStatus(self.status)
        except ValueError:
            pass

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        return d


class RunStore:
    """Run records under ``<root>/<run_id>/``; ``root`` is a local path or a pyarrow.fs URI.

    ``filesystem`` (optional) replaces the file system derived from ``root`` (``root`` is then a
    path inside it); tests use it to exercise the object-store code paths.
    """

    def __init__(
        self, root: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
    ) -> None:
        root = os.fspath(root)
        if not root:
            raise StateError("state error: storage.root is empty")
        self.root = root
        if filesystem is not None:
            self.fs, base = filesystem, root
        elif "://" in root:
            try:
                self.fs, base = pafs.FileSystem.from_uri(root)
            except (OSError, ValueError) as err:
                first = str(err).splitlines()[0] if str(err) else type(err).__name__
                raise StateError(f"state error: storage.root {root!r}: {first}") from None
        else:
            self.fs, base = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(root))
        self.base = base.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self._run_dirs: dict[str, str] = {}

    # -- paths -----------------------------------------------------------------------------
    def _join(self, *parts: str) -> str:
        return "/".join([self.base.rstrip("/"), *parts])

    @property
    def runs_dir(self) -> str:
        """The folder holding the runs: the storage root itself."""
        return self.base

    def run_dir(self, run_id: str) -> str:
        """``<root>/<run_id>``, or ``<root>/runs/<run_id>`` for a run of the older layout."""
        check_run_id(run_id)
        known = self._run_dirs.get(run_id)
        if known is not None:
            return known
        new, old = self._join(run_id), self._join(LEGACY_RUNS, run_id)
        if self._exists(new):
            self._run_dirs[run_id] = new
        elif self._exists(old + "/run.json"):
            self._run_dirs[run_id] = old
        else:
            return new  # not created yet: decided once it exists
        return self._run_dirs[run_id]

    def stage_dir(self, run_id: str, stage: str) -> str:
        if not stage or "/" in stage or stage in (".", ".."):
            raise StateError(f"state error: stage name {stage!r} is not valid")
        return f"{self.run_dir(run_id)}/stages/{stage}"

    def out_dir(self, run_id: str, stage: str) -> str:
        """The stage's output folder, as a path inside :attr:`fs`."""
        return self.stage_dir(run_id, stage) + "/out"

    def uri(self, path: str) -> str:
        """A path inside :attr:`fs` as something other processes can open (local path or URI)."""
        if self.is_local:
            return path
        if "://" in self.root:
            scheme = self.root.split("://", 1)[0]
            query = self.root.partition("?")[2]  # e.g. endpoint_override=HOST:PORT&scheme=http
            return f"{scheme}://{path.lstrip('/')}" + (f"?{query}" if query else "")
        return path

    # -- low-level I/O ---------------------------------------------------------------------
    def _exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def _read_text(self, path: str) -> str | None:
        try:
            with self.fs.open_input_stream(path) as f:
                return f.read().decode()
        except FileNotFoundError:
            return None
        except OSError as err:
            if not self._exists(path):
                return None
            raise StateError(f"state error: cannot read {self.uri(path)}: {err}") from None

    def write_text(self, path: str, text: str) -> None:
        """Write ``text`` to ``path`` atomically (temp + rename locally, one put on object stores)."""
        atomic_put(self.fs, path, text.encode())

    def _write_json(self, path: str, obj: Any) -> None:
        self.write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")

    def _read_json(self, path: str) -> dict[str, Any] | None:
        text = self._read_text(path)
        if text is None:
            return None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise StateError(
                f"state error: {self.uri(path)} is not valid JSON ({err.msg})"
            ) from None
        if not isinstance(obj, dict):
            raise StateError(f"state error: {self.uri(path)} does not hold a JSON object")
        return obj

    def _mkdir_exclusive(self, path: str) -> bool:
        """Create ``path``; False if it already exists (exclusive on local file systems)."""
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                os.mkdir(path)
            except FileExistsError:
                return False
            return True
        # Object stores have no exclusive create: check, then claim with a marker object. With a
        # random suffix in generated ids two writers picking the same id is practically impossible.
        if self._exists(path + "/run.json") or self._exists(path + "/.claimed"):
            return False
        self.write_text(path + "/.claimed", now_iso() + "\n")
        return True

    # -- runs ------------------------------------------------------------------------------
    def create_run(
        self,
        cfg: Config,
        run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        address: str | None = None,
        job: dict[str, str] | None = None,
    ) -> str:
        """Create a new run folder (exclusively), write ``config.yaml`` and ``run.json``.

        With ``run_id`` given, an existing run of that id is an error, except the record that
        ``contrastive submit`` made for the same Ray Job (``job["submission_id"]``) and that no
        driver has started yet: the job's driver takes it over. Without ``run_id`` a fresh
        time-sortable id is generated.
        """
        created = now_iso()
        if run_id is not None:
            check_run_id(run_id)
            if not self._mkdir_exclusive(self.run_dir(run_id)):
                prior = self._submitted_record(run_id, job)
                if prior is None:
                    raise StateError(
                        f"state error: run {run_id!r} already exists under {self.root}"
                    )
                created = prior.created
        else:
            for _ in range(20):
                run_id = new_run_id()
                if self._mkdir_exclusive(self.run_dir(run_id)):
                    break
            else:  # pragma: no cover - 20 collisions of a 24-bit random suffix
                raise StateError(
                    f"state error: could not create a fresh run folder under {self.root}"
                )
        assert run_id is not None
        self.fs.create_dir(self.run_dir(run_id) + "/stages", recursive=True)
        self.write_text(self.run_dir(run_id) + "/config.yaml", cfg.to_yaml())
        info = RunInfo(
            run_id=run_id,
            created=created,
            status=RunStatus.CREATED,
            name=cfg.name,
            tracking_uri=tracking_uri,
            address=address,
            code=code_version(),
            job=dict(job) if job else None,
        )
        self._write_json(self.run_dir(run_id) + "/run.json", info.to_dict())
        return run_id

    def _submitted_record(self, run_id: str, job: dict[str, str] | None) -> RunInfo | None:
        """The record ``contrastive submit`` left for ``job``, if the run is still only that."""
        if not job or not job.get("submission_id"):
            return None
        try:
            info = self.load_run(run_id)
        except StateError:
            return None
        mine = (info.job or {}).get("submission_id") == job["submission_id"]
        return (
            info
            if mine and info.status == RunStatus.CREATED and not self.stage_names(run_id)
            else None
        )

    def load_run(self, run_id: str) -> RunInfo:
        """The run's record; an unknown id is a one-line error naming the storage root."""
        d = self._read_json(self.run_dir(run_id) + "/run.json")
        if d is None:
            raise StateError(f"state error: no run {run_id!r} under {self.root}")
        known = {k: v for k, v in d.items() if k in RunInfo.__dataclass_fields__ and k != "path"}
        return RunInfo(**known, path=self.uri(self.run_dir(run_id)))

    def load_config(self, run_id: str) -> Config:
        """The run's resolved config (``config.yaml``)."""
        text = self._read_text(self.run_dir(run_id) + "/config.yaml")
        if text is None:
            raise StateError(f"state error: run {run_id!r} under {self.root} has no config.yaml")
        return parse_config(yaml.safe_load(text))

    def update_run(self, run_id: str, **fields: Any) -> RunInfo:
        """Change fields of ``run.json`` (e.g. ``status``, ``mlflow_run_id``) and write it back."""
        info = self.load_run(run_id)
        for k, v in fields.items():
            if k not in RunInfo.__dataclass_fields__ or k in ("run_id", "path"):
                raise StateError(f"state error: run.json has no field {k!r}")
            if k == "status":
                if v not in RUN_STATES:
                    raise StateError(
                        f"state error: run status {v!r} is not one of {', '.join(RUN_STATES)}"
                    )
                v = RunStatus(v)
            setattr(info, k, v)
        info.updated = now_iso()
        self._write_json(self.run_dir(run_id) + "/run.json", info.to_dict())
        return info

    def list_runs(self) -> list[RunInfo]:
        """Every run under the root, oldest first (run ids sort by time)."""
        names: set[str] = set()
        for folder in (self.runs_dir, self._join(LEGACY_RUNS)):
            sel = pafs.FileSelector(folder, allow_not_found=True, recursive=False)
            names.update(
                fi.base_name
                for fi in self.fs.get_file_info(sel)
                if fi.type == pafs.FileType.Directory
                and _RUN_ID.match(fi.base_name)
                and fi.base_name not in RESERVED_NAMES
            )
        out = []
        for name in sorted(names):
            try:
                out.append(self.load_run(name))
            except StateError:
                continue  # a folder being created right now, or not a run
        return out

    # -- the driver's lease -----------------------------------------------------------------
    def _lease_path(self, run_id: str) -> str:
        return self.run_dir(run_id) + "/lease.json"

    def read_lease(self, run_id: str) -> Lease | None:
        """The run's lease, or None when no driver holds it (never held, or released)."""
        try:
            d = self._read_json(self._lease_path(run_id))
        except StateError:
            return None  # half-written by a driver that died mid-write: no live holder
        if d is None:
            return None
        try:
            return Lease(
                host=str(d["host"]),
                pid=int(d["pid"]),
                token=str(d["token"]),
                acquired=str(d.get("acquired", "")),
                heartbeat=float(d["heartbeat"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def _write_lease(self, run_id: str, lease: Lease) -> None:
        self._write_json(self._lease_path(run_id), asdict(lease))

    def acquire_lease(self, run_id: str, force: bool = False) -> Lease:
        """Take the run's lease for this process; :class:`LeaseHeld` if a live driver holds it
        (unless ``force``: then this driver takes over)."""
        self.load_run(run_id)  # a one-line error for an unknown run
        held = self.read_lease(run_id)
        if held is not None and held.alive() and not force:
            raise LeaseHeld(
                f"state error: run {run_id} is being run by {held.describe()}; "
                f"wait for it to end, or pass --force if that driver is gone"
            )
        lease = Lease(
            socket.gethostname(), os.getpid(), secrets.token_hex(8), now_iso(), time.time()
        )
        self._write_lease(run_id, lease)
        got = self.read_lease(run_id)
        if got is None or got.token != lease.token:  # another driver wrote after us
            raise LeaseHeld(
                f"state error: run {run_id} was taken by another driver at the same moment"
                + (f" ({got.describe()})" if got else "")
            )
        return lease

    def renew_lease(self, run_id: str, lease: Lease) -> bool:
        """Refresh the heartbeat; False (and no write) if another driver took the lease."""
        held = self.read_lease(run_id)
        if held is not None and held.token != lease.token:
            return False
        lease.heartbeat = time.time()
        self._write_lease(run_id, lease)
        return True

    def release_lease(self, run_id: str, lease: Lease) -> None:
        """Give the lease up (the run ended or stopped); a lease another driver took is left."""
        held = self.read_lease(run_id)
        if held is not None and held.token != lease.token:
            return
        try:
            self.fs.delete_file(self._lease_path(run_id))
        except OSError:
            pass

    def hold_lease(self, run_id: str, force: bool = False) -> LeaseKeeper:
        """``with store.hold_lease(run_id):`` take the lease, renew it in a background thread
        every :data:`LEASE_RENEW_S`, release it at the end."""
        return LeaseKeeper(self, run_id, force)

    def run_liveness(self, info: RunInfo) -> str:
        """``info.status``, except that a run recorded ``running`` (or ``created``, once a driver
        held it) whose driver is gone reads ``interrupted``."""
        if info.status not in (RunStatus.RUNNING, RunStatus.CREATED):
            return info.status
        lease = self.read_lease(info.run_id)
        if lease is not None and lease.alive():
            return info.status
        if lease is None and info.status == RunStatus.CREATED:
            return info.status  # e.g. a submitted job whose driver has not started yet
        return "interrupted"

    # -- stages ----------------------------------------------------------------------------
    def stage_names(self, run_id: str) -> list[str]:
        sel = pafs.FileSelector(self.run_dir(run_id) + "/stages", allow_not_found=True)
        return sorted(
            fi.base_name for fi in self.fs.get_file_info(sel) if fi.type == pafs.FileType.Directory
        )

    def read_state(self, run_id: str, stage: str) -> StageState:
        """The stage's state; a stage never started reads as ``pending``."""
        d = self._read_json(self.stage_dir(run_id, stage) + "/state.json")
        return StageState(name=stage) if d is None else StageState.from_dict(d)

    def write_state(self, run_id: str, st: StageState) -> None:
        if st.state not in STAGE_STATES:
            raise StateError(
                f"state error: stage {st.name!r}: state {st.state!r} is not one of {STAGE_STATES}"
            )
        self._write_json(self.stage_dir(run_id, st.name) + "/state.json", st.to_dict())

    def stage_states(self, run_id: str) -> dict[str, StageState]:
        return {name: self.read_state(run_id, name) for name in self.stage_names(run_id)}

    def read_manifest(self, run_id: str, stage: str) -> dict[str, Any] | None:
        """The stage's manifest, or None when the stage has not finished."""
        return self._read_json(self.stage_dir(run_id, stage) + "/manifest.json")

    def write_manifest(self, run_id: str, stage: str, manifest: dict[str, Any]) -> None:
        """Write the manifest (atomically, last): from now on the stage is finished."""
        if not isinstance(manifest.get("outputs"), dict):
            raise StateError(f"state error: stage {stage!r}: manifest needs an 'outputs' mapping")
        self._write_json(self.stage_dir(run_id, stage) + "/manifest.json", manifest)

    def delete_manifest(self, run_id: str, stage: str) -> None:
        """Mark a stage unfinished again (e.g. its cache key changed)."""
        try:
            self.fs.delete_file(self.stage_dir(run_id, stage) + "/manifest.json")
        except FileNotFoundError:
            pass
        except OSError:
            if self._exists(self.stage_dir(run_id, stage) + "/manifest.json"):
                raise

    def write_error(self, run_id: str, stage: str, traceback_text: str) -> str:
        """Write the failure's traceback to ``error.txt``; return where it is."""
        path = self.stage_dir(run_id, stage) + "/error.txt"
        self.write_text(path, traceback_text)
        return self.uri(path)

    def find_finished_by_key(
        self, cache_key: str, exclude_run_id: str | None = None
    ) -> tuple[str, str, dict[str, Any]] | None:
        """A finished stage of any run (newest run first) whose manifest has ``cache_key``.

        Returns ``(run_id, stage, manifest)`` or None. A manifest that was itself reused from an
        earlier run still counts (it points at the original outputs).
        """
        for info in reversed(self.list_runs()):
            if info.run_id == exclude_run_id:
                continue
            for stage in self.stage_names(info.run_id):
                try:
                    m = self.read_manifest(info.run_id, stage)
                except StateError:
                    continue
                if m is not None and m.get("cache_key") == cache_key:
                    return info.run_id, stage, m
        return None


class LeaseKeeper:
    """Holds a run's lease while a driver runs it (see :meth:`RunStore.hold_lease`)."""

    def __init__(self, store: RunStore, run_id: str, force: bool = False) -> None:
        self.store, self.run_id, self.force = store, run_id, force
        self.lease: Lease | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # another driver took the lease (``resume --force``)

    def __enter__(self) -> LeaseKeeper:
        if self.lease is not None:  # already held (taken early, before Ray connects)
            return self
        self.lease = self.store.acquire_lease(self.run_id, self.force)
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        import logging

        log = logging.getLogger(__name__)
        lease = self.lease
        if lease is None:  # started only once the lease is held
            return
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                if not self.store.renew_lease(self.run_id, lease):
                    self.lost = True
                    log.warning("run %s: another driver took over its lease", self.run_id)
                    return
            except Exception as err:  # noqa: BLE001 - a full disk: keep trying, never crash
                log.warning("run %s: cannot renew the driver lease: %s", self.run_id, err)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.lease is not None and not self.lost:
            self.store.release_lease(self.run_id, self.lease)
