"""MLflow tracking: one parent run per pipeline run, one nested child run per stage.

Everything goes through :class:`mlflow.MlflowClient` with explicit run ids — never the global
"active run" — so it works the same from the driver, from Ray tasks and from Ray Train workers.

* parent run: run name = our run id, tag ``pipeline_run_id``, params = the flattened config
  (dotted keys, e.g. ``pretrain.temperature``);
* child run per stage: tag ``mlflow.parentRunId`` (nesting), tags ``stage``, ``stage_kind``,
  ``cache_key``, ``upstream.<input>`` = the upstream stage's MLflow run id (lineage), params = the
  stage's config slice and its own params;
* datasets are logged as run inputs (``MlflowClient.log_inputs`` with a
  :class:`mlflow.entities.DatasetInput`), the equivalent of ``mlflow.log_input``;
* :class:`MetricsSink` is a picklable ``(metrics, step)`` callable for Ray Train workers: it only
  puts the point on a bounded queue, and a background thread sends it (bounded retries), so a
  tracking server that goes away never stalls training; what could not be sent is counted.

A tracking outage never stops a run. MLflow's own HTTP retries are bounded
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 2, ``..._BACKOFF_FACTOR`` 1, ``..._TIMEOUT`` 10 s unless set
in the environment), and after a failed call to an http(s) server the tracker skips calls for
``OUTAGE_S`` seconds instead of waiting on each; every metric point not recorded is counted
(:meth:`Tracker.gap`). Values that look like credentials are redacted in params (:func:`redact`).

The default tracking URI is ``cfg.tracking_uri()``: a SQLite file under ``storage.root``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.config import Config
from pipeline.errors import UserError
from workflows.dag import StageNode

__all__ = [
    "MetricsSink",
    "Tracker",
    "TrackingError",
    "TrackingInfo",
    "error_line",
    "flatten",
    "redact",
]

log = logging.getLogger(__name__)

#: MLflow's HTTP client retries a failed request 7 times with exponential backoff and waits up to
#: 120 s per attempt by default: minutes per call against a server that went away.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
#: After a failed call to a tracking server, further calls are skipped for this long.
OUTAGE_S = 30.0

_STATUS = {
    "FINISHED": "FINISHED",
    "FAILED": "FAILED",
    "KILLED": "KILLED",
    "RUNNING": "RUNNING",
    "SUCCEEDED": "FINISHED",
    "SKIPPED": "FINISHED",
}
_BAD_KEY = re.compile(r"[^\w\-. /:]")
#: The experiment tag that makes MLflow 3's UI open an experiment on its training runs.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
#: Entry point shown as the source of runs and logged models.
SOURCE_NAME = "contrastive run"
_MAX_PARAM = 6000  # MLflow's limit on a param value
_DATASET_ATTEMPTS = 3  # log_dataset: tries when a concurrent stage created the same dataset row


def _duplicate_key(err: BaseException) -> bool:
    """Whether a tracking store refused an insert on a unique key (SQLite, PostgreSQL, MySQL)."""
    msg = str(err).lower()
    return "unique constraint" in msg or "duplicate entry" in msg or "duplicate key" in msg


class TrackingError(UserError, RuntimeError):
    """A tracking problem; ``str(err)`` is one line."""


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


_SECRET_KEY = re.compile(r"secret|token|password|passwd|credential|api[_-]?key", re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*):[^/@\s]*@")
_QUERY_SECRET = re.compile(
    r"(?P<k>[?&][^=&\s]*(?:secret|token|password|passwd|credential|api[_-]?key)[^=&\s]*=)[^&\s]*",
    re.IGNORECASE,
)
REDACTED = "***"


def redact(key: str, value: Any) -> Any:
    """``value`` with what looks like a credential replaced by ``***``: the whole value of a key
    named like ``*secret*``, ``*token*``, ``*password*`` (or credential, api key); the password
    of ``scheme://user:password@host`` and secret-looking query parameters in strings."""
    leaf = str(key).rsplit(".", 1)[-1]
    if _SECRET_KEY.search(leaf) and value not in (None, ""):
        return REDACTED
    if isinstance(value, str):
        value = _URI_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", value)
        return _QUERY_SECRET.sub(lambda m: m["k"] + REDACTED, value)
    if isinstance(value, (list, tuple)):
        return type(value)(redact("", v) for v in value)
    if isinstance(value, Mapping):
        return {k: redact(str(k), v) for k, v in value.items()}
    return value


def _key(name: str) -> str:
    """A metric / param / tag name MLflow accepts (alphanumerics, ``_ - . / : space``)."""
    return _BAD_KEY.sub("_", str(name))


def _value(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v, default=str)
    return s if len(s) <= _MAX_PARAM else s[: _MAX_PARAM - 3] + "..."


def _chunks(items: list[Any], n: int) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def bound_http_retries() -> None:
    """Set :data:`HTTP_DEFAULTS` in this process's environment where the user has not; a
    tracking URI with ``user:password@`` also keeps MLflow from printing run URLs (with it)."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)


def _client(uri: str) -> Any:
    from mlflow import MlflowClient

    bound_http_retries()
    if _URI_USERINFO.search(uri):
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    return MlflowClient(tracking_uri=uri)


def is_count(key: str) -> bool:
    """Numbers a stage reports that are not curves: the epoch counter, parameter and image
    counts. They go to MLflow as params, not as metric charts."""
    return (
        key in ("epoch", "world_size", "resumed_from_epoch")
        or key.endswith(("params", "_images"))
        or key.startswith("num_")
    )


def _sqlite_client(uri: str) -> Any:
    """A client of the SQLite store at ``uri``, its folder made and checked writable, and the
    database created or migrated under a file lock: MLflow's schema migration is not safe to run
    from two processes at once (two first runs on a fresh store: one failed with "duplicate
    column name: step")."""
    from filelock import FileLock, Timeout

    db = os.path.abspath(uri[len("sqlite:///") :])
    folder = os.path.dirname(db) or "."
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".mlflow-write-check-"):
            pass
    except OSError as err:
        raise TrackingError(
            f"tracking error: cannot write the MLflow store {db}: {err.strerror or err}"
        ) from None
    try:
        with FileLock(db + ".lock", timeout=120):  # the client creates / migrates the schema
            client = _client(uri)
            client._tracking_client.store  # noqa: B018 - (and the registry's) at once
    except Timeout:
        raise TrackingError(
            f"tracking error: {db}.lock held for 120 s by another process"
        ) from None
    except Exception as err:  # noqa: BLE001 - e.g. a damaged database: one line naming it
        raise TrackingError(f"tracking error: MLflow store {db}: {error_line(err)}") from None
    return client


def error_line(err: BaseException) -> str:
    """``Type: first line`` (at most 200 characters), credentials in URIs redacted (MLflow's
    errors quote the request URL, user and password included)."""
    lines = [ln for ln in redact("", str(err)).strip().splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[0][:200]}" if lines else type(err).__name__


def _is_outage(err: BaseException) -> bool:
    """A failure of the server or the way to it (not a 4xx answer such as 'no such run')."""
    code = getattr(err, "get_http_status_code", None)
    if callable(code):
        try:
            status = int(code())
        except Exception:  # noqa: BLE001
            status = 500
        if 400 <= status < 500 and "Max retries" not in str(err):
            return False
    return True


class _GuardedClient:
    """An ``MlflowClient`` proxy for an http(s) server: after a call fails because the server is
    away, calls for the next :data:`OUTAGE_S` seconds fail at once (counted) instead of each
    waiting through MLflow's retries."""

    def __init__(self, client: Any, uri: str) -> None:
        self._client, self._uri = client, redact("", uri)
        self._down_until = 0.0
        self.skipped_calls = 0
        self.last_error: str | None = None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if time.time() < self._down_until:
                self.skipped_calls += 1
                raise TrackingError(
                    f"tracking error: {self._uri} unreachable ({self.last_error}); {name} skipped"
                )
            try:
                result = attr(*args, **kwargs)
            except Exception as err:
                if _is_outage(err):
                    self._down_until = time.time() + OUTAGE_S
                    self.skipped_calls += 1
                    self.last_error = error_line(err)
                raise
            self._down_until = 0.0
            return result

        return call


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or is_count(str(k)):
            continue
        v = float(v)
        if math.isnan(v) or math.isinf(v):
            continue  # not storable in every backend; the stage logs them itself if it wants
        out[k] = v
    return out


def _log_metrics(client: Any, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    ms = [
        Metric(_key(k), v, ts, int(step))
        for k, v in _numeric(metrics).items()
        if not is_count(str(k))
    ]
    for chunk in _chunks(ms, 1000):
        client.log_batch(run_id, metrics=chunk)


@dataclass(frozen=True)
class TrackingInfo:
    """What a stage (or a Ray Train worker) needs to log into its own MLflow run."""

    uri: str
    run_id: str
    parent_run_id: str | None = None
    experiment: str | None = None

    def sink(self) -> MetricsSink:
        return MetricsSink(self.uri, self.run_id)


class MetricsSink:
    """A picklable ``sink(metrics, step)`` that logs numeric metrics to one MLflow run without
    ever blocking its caller.

    A call puts the point on a queue of at most :attr:`QUEUE_SIZE` points (a full queue drops
    it); a daemon thread sends points, each with up to :attr:`ATTEMPTS` tries (one while the
    server keeps failing). :meth:`close` waits at most ``timeout`` seconds for the rest and
    returns how many points were dropped, with a warning naming the count."""

    QUEUE_SIZE = 256
    ATTEMPTS = 3
    RETRY_S = 0.5

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri = uri
        self.run_id = run_id
        self._reset()

    def _reset(self) -> None:
        self._client: Any = None
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._failing = False
        self._inflight = 0
        self.sent = 0
        self.dropped = 0
        self.last_error: str | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.uri, self.run_id = state["uri"], state["run_id"]
        self._reset()

    def __call__(self, metrics: Mapping[str, Any], step: int) -> None:
        point = (_numeric(metrics), int(step))
        if not point[0]:
            return
        with self._lock:
            if self._closing.is_set():
                self.dropped += 1
                return
            if self._thread is None:
                self._queue = queue.Queue(maxsize=self.QUEUE_SIZE)
                self._thread = threading.Thread(
                    target=self._run, name="mlflow-metrics", daemon=True
                )
                self._thread.start()
            points = self._queue
        assert points is not None  # made with the thread
        try:
            points.put_nowait(point)
        except queue.Full:
            with self._lock:
                self.dropped += 1

    def _run(self) -> None:
        assert self._queue is not None
        while True:
            point = self._queue.get()
            if point is None:
                return
            with self._lock:
                self._inflight = 1
            ok = self._send(*point)
            with self._lock:
                self._inflight = 0
                if ok:
                    self.sent += 1
                elif not self._closing.is_set():
                    self.dropped += 1  # after close() the point is already counted

    def _send(self, metrics: dict[str, float], step: int) -> bool:
        tries = 1 if self._failing else self.ATTEMPTS
        for i in range(tries):
            try:
                if self._client is None:
                    self._client = _client(self.uri)
                _log_metrics(self._client, self.run_id, metrics, step)
                self._failing = False
                return True
            except Exception as err:  # noqa: BLE001 - never let tracking reach the training loop
                self.last_error = error_line(err)
                if i + 1 < tries and self._closing.wait(self.RETRY_S * 2**i):
                    break
        self._failing = True
        return False

    def close(self, timeout: float = 10.0) -> int:
        """Send what is queued within ``timeout`` seconds, then stop; returns the number of
        points that were not recorded (and warns with it when it is not 0)."""
        if self._queue is not None:
            deadline = time.time() + timeout
            while time.time() < deadline:
                with self._lock:
                    busy = self._inflight or not self._queue.empty()
                if not busy or self._failing:  # a server that is away: do not wait for it
                    break
                time.sleep(0.05)
            with self._lock:
                self._closing.set()
                left = self._inflight
                while True:
                    try:
                        if self._queue.get_nowait() is not None:
                            left += 1
                    except queue.Empty:
                        break
                self.dropped += left
            self._queue.put(None)
        self._closing.set()
        if self.dropped:
            log.warning(
                "tracking: %d of %d metric points of MLflow run %s were not recorded "
                "(%s): the stage's history file has them all",
                self.dropped,
                self.dropped + self.sent,
                self.run_id,
                self.last_error or "tracking server unreachable",
            )
        return self.dropped


class Tracker:
    """MLflow tracking for one experiment at one tracking URI."""

    def __init__(self, uri: str, experiment: str = "contrastive") -> None:
        if not uri:
            raise TrackingError("tracking error: tracking.uri is empty")
        if not experiment:
            raise TrackingError("tracking error: tracking.experiment is empty")
        self.uri = uri
        self.experiment = experiment
        self._experiment_id: str | None = None
        if uri.startswith("sqlite:///"):
            self.client = _sqlite_client(uri)
        else:
            self.client = _client(uri)
        if uri.startswith(("http://", "https://")):
            self.client = _GuardedClient(self.client, uri)
        self.dropped_points = 0  # metric points that could not be logged (see gap())

    @classmethod
    def from_config(cls, cfg: Config, uri: str | None = None) -> Tracker | None:
        """A tracker for ``cfg`` (``uri`` overrides the config's), or None when tracking is off."""
        if not cfg.tracking.enabled:
            return None
        return cls(uri or cfg.tracking_uri(), cfg.tracking.experiment)

    # -- set-up ----------------------------------------------------------------------------
    def check_reachable(self, timeout: float = 3.0) -> None:
        """For an http(s) tracking server, raise a one-line error unless it answers quickly.

        Call it before any compute. Other URIs (sqlite, file, databricks) are not checked.
        """
        if not self.uri.startswith(("http://", "https://")):
            return
        url = self.uri.rstrip("/") + "/health"
        parts = urllib.parse.urlsplit(url)
        headers = {}
        if parts.username is not None:  # user:password@ in the URI: basic auth, as MLflow does
            import base64

            token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
            url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
        try:
            req = urllib.request.Request(url, headers=headers)
            with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 - http(s) only
                resp.read(64)
        except urllib.error.HTTPError as err:
            if err.code in (401, 403):
                return  # reachable; authentication is MLflow's business
            raise TrackingError(
                f"tracking error: MLflow server {redact('', self.uri)} answered HTTP {err.code} at /health"
            ) from None
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingError(
                f"tracking error: MLflow server {redact('', self.uri)} is not reachable ({reason}); "
                "start it or set tracking.uri"
            ) from None

    @property
    def experiment_id(self) -> str:
        """The experiment's id, created on first use (tolerating a concurrent creator)."""
        if self._experiment_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            if exp is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment,
                        artifact_location=self._artifact_location(),
                        tags=dict([EXPERIMENT_KIND]),
                    )
                except Exception:
                    exp = self.client.get_experiment_by_name(self.experiment)
                    if exp is None:
                        raise
                    self._experiment_id = exp.experiment_id
            else:
                if exp.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"tracking error: experiment {self.experiment!r} is deleted; "
                        "restore it or choose another tracking.experiment"
                    )
                self._experiment_id = exp.experiment_id
                if EXPERIMENT_KIND[0] not in (exp.tags or {}):
                    self.client.set_experiment_tag(self._experiment_id, *EXPERIMENT_KIND)
        return self._experiment_id

    def run_link(self, run_id: str) -> str:
        """The MLflow UI's address of a run, relative to the UI's root (``#/experiments/...``)."""
        return f"#/experiments/{self.experiment_id}/runs/{run_id}"

    def _artifact_location(self) -> str | None:
        """For a SQLite store, artifacts go next to the database (not into the working dir)."""
        if self.uri.startswith("sqlite:///"):
            db = os.path.abspath(self.uri[len("sqlite:///") :])
            return "file://" + os.path.join(os.path.dirname(db), "mlartifacts")
        return None

    def info(self, run_id: str, parent_run_id: str | None = None) -> TrackingInfo:
        return TrackingInfo(self.uri, run_id, parent_run_id, self.experiment)

    # -- runs ------------------------------------------------------------------------------
    def _log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        ps = [Param(_key(k), _value(redact(k, v))) for k, v in params.items()]
        for chunk in _chunks(ps, 100):
            self.client.log_batch(run_id, params=chunk)

    def start_parent(self, run_id: str, cfg: Config, code: str | None = None) -> str:
        """Create the parent run for pipeline run ``run_id``; return its MLflow run id. ``code``:
        the run record's code label (tag ``code_commit``); None = this checkout's, read now."""
        import pipeline
        from workflows.state import code_label, code_version

        if code is None:
            code = code_label(code_version())
        run = self.client.create_run(
            self.experiment_id,
            run_name=f"{cfg.name}-{run_id}",
            tags={
                "pipeline_run_id": run_id,
                "pipeline_name": cfg.name,
                "pipeline_version": pipeline.__version__,
                "code_commit": code,  # abc1234[+changes-<hash>] or unknown
                "mlflow.source.name": f"{SOURCE_NAME} {cfg.name}",
                "mlflow.source.type": "LOCAL",
            },
        )
        self._log_params(run.info.run_id, flatten(cfg.to_dict()))
        return run.info.run_id

    def start_child(
        self,
        parent_id: str,
        node: StageNode,
        cache_key: str,
        upstream_mlflow_ids: Mapping[str, str],
        *,
        config_slice: Mapping[str, Any] | None = None,
        pipeline_run_id: str | None = None,
    ) -> str:
        """Create the nested run of one stage; return its MLflow run id.

        ``upstream_mlflow_ids`` maps the stage's input names to the upstream stages' MLflow run
        ids (tags ``upstream.<input>``); ``config_slice`` (the stage's config sections) and the
        node's params become the run's params.
        """
        tags = {
            "mlflow.parentRunId": parent_id,
            "stage": node.name,
            "stage_kind": node.kind,
            "cache_key": cache_key,
            "training": str(node.training).lower(),
        }
        if pipeline_run_id:
            tags["pipeline_run_id"] = pipeline_run_id
        tags["mlflow.source.name"] = f"{SOURCE_NAME}: stage {node.name}"
        tags["mlflow.source.type"] = "LOCAL"
        for dep, rid in upstream_mlflow_ids.items():
            tags[f"upstream.{_key(dep)}"] = rid
        if upstream_mlflow_ids:
            # the run's description (Markdown in the UI): its inputs as links to their runs
            links = ", ".join(
                f"[{dep}]({self.run_link(rid)})" for dep, rid in upstream_mlflow_ids.items()
            )
            tags["mlflow.note.content"] = f"Stage `{node.name}` ({node.kind}). Inputs: {links}."
        run = self.client.create_run(self.experiment_id, run_name=node.name, tags=tags)
        params = flatten(dict(config_slice or {}))
        params.update({f"stage.{k}": v for k, v in flatten(node.params).items()})
        self._log_params(run.info.run_id, params)
        return run.info.run_id

    def resume_run(self, run_id: str) -> bool:
        """Mark an existing run RUNNING again (a resumed stage or pipeline); False if it is gone."""
        try:
            run = self.client.get_run(run_id)
        except Exception:
            return False
        if run.info.lifecycle_stage == "deleted":
            return False
        self.client.update_run(run_id, status="RUNNING")
        return True

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
        """Log the numeric entries of ``metrics`` at ``step`` (others are ignored); counts
        (:func:`is_count`) become params ``result.<name>`` instead of charts. A failure counts
        the points as dropped (see :meth:`gap`) and raises."""
        try:
            _log_metrics(self.client, run_id, metrics, step)
        except Exception:
            self.dropped_points += len(_numeric(metrics))
            raise
        counts = {
            f"result.{k}": int(v) if float(v).is_integer() else v
            for k, v in metrics.items()
            if is_count(str(k)) and k != "epoch" and isinstance(v, (int, float))
        }
        if counts:
            self._log_params(run_id, counts)

    def gap(self, extra_points: int = 0) -> str | None:
        """One line on what this tracker could not record (None when nothing was lost):
        ``extra_points`` are points the stages' own sinks dropped."""
        points = self.dropped_points + int(extra_points)
        calls = getattr(self.client, "skipped_calls", 0)
        if not points and not calls:
            return None
        why = getattr(self.client, "last_error", None) or "tracking server unreachable"
        return (
            f"MLflow at {redact('', self.uri)} missed {points} metric point(s) and {calls} call(s) ({why}); "
            "the run's records under storage.root are complete"
        )

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        """Upload a file or a folder as artifacts of ``run_id``."""
        if os.path.isdir(path):
            self.client.log_artifacts(run_id, path, artifact_path)
        elif os.path.isfile(path):
            self.client.log_artifact(run_id, path, artifact_path)
        else:
            raise TrackingError(f"tracking error: artifact {path} does not exist")

    def log_dataset(
        self,
        run_id: str,
        name: str,
        digest: str,
        source: str,
        num_rows: int | None = None,
        context: str = "training",
    ) -> None:
        """Record a dataset as an input of ``run_id`` (what ``mlflow.log_input`` does)."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source_type = source.split("://", 1)[0] if "://" in source else "local"
        profile: dict[str, str | int] = {"digest": digest}
        if num_rows is not None:
            profile["num_rows"] = int(num_rows)
        ds = Dataset(
            name=name,
            digest=digest[:36],  # MLflow stores at most 36 characters
            source_type=source_type,
            source=json.dumps({"uri": source}),
            profile=json.dumps(profile),
        )
        tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
        for attempt in range(_DATASET_ATTEMPTS):
            try:
                self.client.log_inputs(run_id, datasets=[DatasetInput(dataset=ds, tags=tags)])
                return
            except Exception as err:
                # Two stages that finish together both create the experiment's row for this
                # dataset; the store's get-or-create is not atomic, so the second insert fails
                # on the unique (experiment, name, digest) key. Again, it finds the row.
                if attempt + 1 == _DATASET_ATTEMPTS or not _duplicate_key(err):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(run_id, _key(k), _value(v))

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        """End a run: FINISHED, FAILED or KILLED (also accepts succeeded/failed)."""
        s = _STATUS.get(str(status).upper())
        if s is None:
            raise TrackingError(
                f"tracking error: run status {status!r} is not FINISHED, FAILED or KILLED"
            )
        self.client.set_terminated(run_id, status=s)
