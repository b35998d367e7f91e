"""What a run is made of: the types the runner's modules share, its errors, and an exception as
one line.

:func:`workflows.runner.run_graph` takes an :data:`Execute` (what runs a stage) and a
:class:`RunTracker` (MLflow), and returns a :class:`RunSummary` with one :class:`StageOutcome` per
stage. :class:`RunError` is a problem running the graph itself; :func:`one_line` is how a stage's
error (or the run's) is recorded: the root cause inside Ray's and Ray Train's wrappers, on one line.
Every module of the runner logs to the run's log, :data:`RUN_LOGGER`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import ray

from pipeline.config import Config
from pipeline.errors import UserError
from workflows.dag import StageNode
from workflows.state import RunStatus, TextEnum

if TYPE_CHECKING:
    from pipeline.runtime import StageResult
    from workflows.tracking import TrackingInfo

__all__ = [
    "RUN_LOGGER",
    "Execute",
    "Inputs",
    "Manifest",
    "OutcomeStatus",
    "RunError",
    "RunSummary",
    "RunTracker",
    "StageOutcome",
    "one_line",
    "root_cause",
    "safe_tracking",
]

#: The run's log, shared by the runner's modules: stage starts and ends, reuse warnings, tracking
#: failures (:class:`workflows.progress.ProgressDisplay` watches it for stage ends).
RUN_LOGGER = "workflows.runner"

log = logging.getLogger(RUN_LOGGER)

_T = TypeVar("_T")

#: What a stage reads: each input name mapped to its upstream manifest's outputs.
Inputs = dict[str, dict[str, str]]
#: A ``manifest.json``: stage, kind, run_id, cache_key, outputs, digest, output_digests, metrics,
#: key_metric, mlflow_run_id, attempts, finished, and ``reused_from`` for a linked stage (JSON as
#: read from disk: older records may lack fields).
Manifest = dict[str, Any]

#: ``execute(node, inputs, out_dir, tracking_info) -> StageResult`` (or a mapping with
#: ``outputs``, ``metrics``, ``history``); ``tracking_info`` is None without tracking.
Execute = Callable[
    [StageNode, Inputs, str, "TrackingInfo | None"], "StageResult | Mapping[str, Any]"
]


class RunTracker(Protocol):
    """What the runner asks of a tracker (:class:`workflows.tracking.Tracker` is one)."""

    uri: str

    def start_parent(self, run_id: str, cfg: Config, code: str | None = None) -> str: ...

    def resume_run(self, run_id: str) -> bool: ...

    def start_child(
        self,
        parent_id: str,
        node: StageNode,
        cache_key: str,
        upstream_mlflow_ids: Mapping[str, str],
        *,
        config_slice: Mapping[str, Any] | None = None,
        pipeline_run_id: str | None = None,
    ) -> str: ...

    def info(self, run_id: str, parent_run_id: str | None = None) -> TrackingInfo: ...

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None: ...

    def end(self, run_id: str, status: str = "FINISHED") -> None: ...

    def gap(self, extra_points: int = 0) -> str | None: ...


class RunError(UserError, RuntimeError):
    """A problem running the graph itself (not a stage failure); one line."""


class OutcomeStatus(TextEnum):
    """What happened to a stage in one :func:`workflows.runner.run_graph` call."""

    SUCCEEDED = "succeeded"  # ran now
    SKIPPED = "skipped"  # finished earlier in this run
    REUSED = "reused"  # linked from an earlier run
    FAILED = "failed"
    NOT_RUN = "not_run"  # upstream failed, or the run stopped


@dataclass
class StageOutcome:
    """What happened to one stage in one :func:`workflows.runner.run_graph` call.

    ``status``: ``succeeded`` (ran now), ``skipped`` (finished earlier in this run), ``reused``
    (linked from an earlier run), ``failed``, or ``not_run`` (upstream failed or run stopped).
    """

    name: str
    status: OutcomeStatus
    duration_s: float | None = None
    error: str | None = None
    traceback_file: str | None = None
    attempts: int = 0
    reused_from: dict[str, str] | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class RunSummary:
    """The result of :func:`workflows.runner.run_graph`."""

    run_id: str
    status: RunStatus
    stages: dict[str, StageOutcome]
    duration_s: float
    mlflow_run_id: str | None = None

    def names(self, status: str) -> list[str]:
        return [n for n, o in self.stages.items() if o.status == status]

    @property
    def failed(self) -> list[str]:
        return self.names(OutcomeStatus.FAILED)

    @property
    def failed_stage(self) -> str | None:
        f = self.failed
        return f[0] if f else None

    @property
    def executed(self) -> list[str]:
        ran = (OutcomeStatus.SUCCEEDED, OutcomeStatus.FAILED)
        return [n for n, o in self.stages.items() if o.status in ran]

    @property
    def not_run(self) -> list[str]:
        return self.names(OutcomeStatus.NOT_RUN)

    def message(self) -> str:
        """One line: how the run ended, and which stage failed with what error."""
        counts = ", ".join(f"{len(self.names(s))} {s}" for s in OutcomeStatus if self.names(s))
        head = f"run {self.run_id} {self.status} in {self.duration_s:.1f}s ({counts})"
        if self.failed:
            o = self.stages[self.failed[0]]
            head += f"; stage {o.name} failed: {o.error}"
            if o.traceback_file:
                head += f" (traceback: {o.traceback_file})"
        return head


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


def root_cause(err: BaseException) -> BaseException:
    """The exception a wrapper stands for: the cause inside a ``RayTaskError`` (a stage task or a
    training task raised), the first worker's error inside Ray Train's ``WorkerGroupError``, the
    controller's inside ``ControllerError``, the ``__cause__`` of Ray Train's (v1)
    ``TrainingFailedError``; wrappers nested in each other are unwrapped all the way."""
    for _ in range(20):
        nxt: BaseException | None = None
        if isinstance(err, ray.exceptions.RayTaskError):
            nxt = err.cause
        else:
            failures = getattr(err, "worker_failures", None)
            if isinstance(failures, Mapping) and failures:
                nxt = failures[min(failures)]
            elif isinstance(getattr(err, "controller_failure", None), BaseException):
                nxt = err.controller_failure  # type: ignore[attr-defined]
            elif type(err).__name__ == "TrainingFailedError":
                nxt = err.__cause__
        if not isinstance(nxt, BaseException) or nxt is err:
            return err
        err = nxt
    return err


def one_line(err: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message`` of the root cause (see :func:`root_cause`), without
    ANSI colour codes or the password of a ``user:password@`` URI, at most ``limit``
    characters."""
    from workflows.tracking import redact  # URIs with user:password@ in messages (MLflow's)

    err = root_cause(err)
    text = redact("", _ANSI.sub("", str(err)))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    msg = f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def safe_tracking(what: str, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T | None:
    """Call a tracking function; a failure is a warning, never the end of the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # tracking must not take the pipeline down
        log.warning("tracking: %s failed: %s", what, one_line(err))
        return None
