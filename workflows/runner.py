"""Execute a stage graph on Ray, durably: skip finished stages, resume, reuse across runs.

Each ready stage runs as a Ray task with ``num_cpus=0`` (a coordinator: the real work inside asks
for its own resources, e.g. a Ray Train trainer), so independent branches run concurrently. The
driver is the only writer of run records: when a stage's task returns, the driver writes its
``state.json`` and then, last, its ``manifest.json``.

Before a stage is launched:

* a manifest in this run with the same cache key -> the stage is skipped (its MLflow run reused);
* a manifest with another cache key (the config changed) -> it is deleted and the stage reruns;
* with ``reuse=True``, a finished stage of an earlier run with the same cache key is linked: this
  run's manifest points at that run's outputs and records ``reused_from``.

A stage that raises is marked failed (one-line error, traceback in ``error.txt``); its dependants
are not started, stages already running finish, and the run ends ``failed``. Calling
:func:`run_graph` again with the same ``run_id`` resumes: finished stages are skipped, failed or
killed ones run again with ``attempts + 1``.

Scheduling (:class:`Scheduler`) is a ready-queue loop of small steps: settle every ready stage
that a cache check can finish (:meth:`~Scheduler.try_skip`, :meth:`~Scheduler.try_reuse`), launch
the others (:meth:`~Scheduler.launch`) within ``max_concurrency``, wait for one running stage and
record it (:meth:`~Scheduler.record_success`, :meth:`~Scheduler.record_failure`, which blocks its
dependants: :meth:`~Scheduler.block_dependants`), until nothing runs. Ready stages are launched
longest remaining path first (the critical path, :func:`launch_priorities`): a stage's priority is
its own estimated cost plus the costliest chain of stages after it, with the per-kind estimates of
:data:`STAGE_COST`. Stage coordinators take no CPUs: each asks Ray for its workers' CPUs
(``resources.cpus_per_worker``, per kind in ``resources.stages``) once it runs, and Ray would hand
them out in no set order. So the runner keeps a CPU budget: an ``execute`` with a ``cpus(node)``
method (:class:`workflows.stages.StageExecutor`) declares what each stage will hold, and a stage
is launched only when that fits in the cluster's CPUs next to the stages running (a stage larger
than the cluster starts when nothing else runs). Ready stages are considered in priority order, so
the critical path takes the CPUs first and smaller stages fill what is left; ``max_concurrency``
caps the number of stages on top.

Object-store storage: the coordinator passes the upstream outputs on as URIs, and whoever uses an
input resolves it on its own node (:func:`workflows.stageio.materialize_input`; the training
tasks do that on the node they run on). The stage writes into a local scratch folder of the
coordinator (training tasks upload theirs from their own node, see :mod:`workflows.train`); the
coordinator uploads that folder to ``stages/<name>/out/`` before the driver writes the manifest,
whose outputs are URIs of real objects under it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, NamedTuple, Protocol, TypeVar

import pyarrow.fs as pafs
import ray

from pipeline.config import Config
from pipeline.errors import UserError
from workflows.dag import Graph, StageNode, compute_keys, stage_config
from workflows.state import (
    RunInfo,
    RunStatus,
    RunStore,
    StageState,
    StageStatus,
    StateError,
    TextEnum,
    code_label,
    now_iso,
)

if TYPE_CHECKING:
    from pipeline.runtime import StageResult
    from workflows.tracking import TrackingInfo

__all__ = [
    "STAGE_COST",
    "Execute",
    "OutcomeStatus",
    "RunError",
    "RunSummary",
    "RunTracker",
    "Scheduler",
    "StageOutcome",
    "launch_priorities",
    "output_digest",
    "run_graph",
    "stage_cost",
    "stage_cpus",
]

log = logging.getLogger(__name__)

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
    """What happened to a stage in one :func:`run_graph` call."""

    SUCCEEDED = "succeeded"  # ran now
    SKIPPED = "skipped"  # finished earlier in this run
    REUSED = "reused"  # linked from an earlier run
    FAILED = "failed"
    NOT_RUN = "not_run"  # upstream failed, or the run stopped


@dataclass
class StageOutcome:
    """What happened to one stage in one :func:`run_graph` call.

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
    """The result of :func:`run_graph`."""

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


#: Opens one file of an output for reading (a local file or an object of a pyarrow file system).
Opener = Callable[[str], BinaryIO]


def _open_local(full: str) -> BinaryIO:
    return open(full, "rb")  # noqa: SIM115 - the caller closes it


def _uri_files(path: str) -> tuple[list[tuple[str, str]] | None, Opener]:
    """The files of an output given as a URI, as (relative name, full path) sorted by name (a
    file on its own is ``.``; None when it does not exist), and how to open them."""
    fs, base = pafs.FileSystem.from_uri(path)
    info = fs.get_file_info(base)
    files: list[tuple[str, str]] | None = None
    if info.type == pafs.FileType.Directory:
        sel = pafs.FileSelector(base, recursive=True)
        files = sorted(
            (posix_rel(fi.path, base), fi.path)
            for fi in fs.get_file_info(sel)
            if fi.type == pafs.FileType.File
        )
    elif info.type == pafs.FileType.File:
        files = [(".", base)]

    def opener(full: str) -> BinaryIO:
        stream: BinaryIO = fs.open_input_stream(full)
        return stream

    return files, opener


def _local_files(path: str) -> tuple[list[tuple[str, str]] | None, Opener]:
    """As :func:`_uri_files`, for a local path."""
    if os.path.isdir(path):
        files = sorted(
            (os.path.relpath(os.path.join(d, f), path), os.path.join(d, f))
            for d, _, names in os.walk(path)
            for f in names
        )
        return files, _open_local
    if os.path.exists(path):
        return [(".", path)], _open_local
    return None, _open_local


def _digests(outputs: Mapping[str, str]) -> tuple[str, dict[str, str]]:
    """:func:`output_digest` of all outputs, and the same digest of each output on its own.

    An output is a local path or a URI :func:`pyarrow.fs.FileSystem.from_uri` understands (a
    reused stage's outputs on object storage); folders are walked."""
    whole = hashlib.sha256()
    each: dict[str, str] = {}
    for name in sorted(outputs):
        path = outputs[name]
        one = hashlib.sha256()
        hs = (whole, one)
        for h in hs:
            h.update(f"output:{name}\n".encode())
        files, opener = _uri_files(path) if "://" in path else _local_files(path)
        if files is None:
            for h in hs:
                h.update(b"missing\n")
        else:
            for rel, full in files:
                for h in hs:
                    h.update(f"file:{rel}\n".encode())
                with opener(full) as fh:
                    while chunk := fh.read(1 << 20):
                        for h in hs:
                            h.update(chunk)
        each[name] = one.hexdigest()
    return whole.hexdigest(), each


def posix_rel(path: str, base: str) -> str:
    return path[len(base.rstrip("/")) + 1 :]


def output_digest(outputs: Mapping[str, str]) -> str:
    """SHA-256 over the outputs' names, relative file names and contents (folders walked)."""
    return _digests(outputs)[0]


class DigestMismatch(RunError):
    """A finished stage's outputs are not what its manifest recorded; one line naming them."""


def verify_outputs(manifest: Mapping[str, Any], where: str) -> None:
    """Re-hash the outputs a manifest points at and compare with its recorded ``digest``;
    raise :class:`DigestMismatch` naming the changed output (and its path). Manifests without a
    digest (written before digests were recorded) pass."""
    recorded = manifest.get("digest")
    outputs = manifest.get("outputs") or {}
    if not recorded or not isinstance(outputs, Mapping):
        return
    try:
        whole, each = _digests(outputs)
    except OSError as err:
        raise DigestMismatch(
            f"{where}: cannot read its outputs to verify them: {one_line(err)}"
        ) from None
    if whole == recorded:
        return
    per = manifest.get("output_digests") or {}
    changed = [n for n in sorted(outputs) if per.get(n) and per[n] != each[n]] or sorted(outputs)
    name = changed[0]
    raise DigestMismatch(
        f"{where}: output {name!r} ({outputs[name]}) does not match the digest recorded when it "
        "was written (changed or damaged since)"
    )


def _normalize(
    result: object, node: StageNode, out_dir: str
) -> tuple[dict[str, str], dict[str, float], list[dict[str, Any]]]:
    """Turn a StageResult-like value into (outputs with absolute paths, metrics, history)."""
    if isinstance(result, Mapping):
        outputs, metrics, history = (
            result.get("outputs"),
            result.get("metrics", {}),
            result.get("history", []),
        )
    else:
        outputs = getattr(result, "outputs", None)
        metrics = getattr(result, "metrics", {}) or {}
        history = getattr(result, "history", []) or []
    if not isinstance(outputs, Mapping):
        raise RunError(
            f"stage {node.name!r} returned {type(result).__name__}, not a StageResult with 'outputs'"
        )
    root = os.path.realpath(out_dir)
    out: dict[str, str] = {}
    for name, p in outputs.items():
        full = os.path.realpath(os.path.join(out_dir, os.fspath(p)))
        if full != root and not full.startswith(root + os.sep):
            raise RunError(f"stage {node.name!r} output {name!r} is outside its out dir: {p}")
        if not os.path.exists(full):
            raise RunError(f"stage {node.name!r} output {name!r} does not exist: {p}")
        out[str(name)] = full
    clean_metrics = {}
    for k, v in dict(metrics).items():
        try:
            clean_metrics[str(k)] = float(v)
        except (TypeError, ValueError):
            raise RunError(f"stage {node.name!r} metric {k!r} is not a number: {v!r}") from None
    return out, clean_metrics, list(history)


def _output_uri(store: RunStore, out_dir: str, local_out: str, path: str) -> str:
    """Where ``path`` (inside ``local_out``) lives once ``local_out`` is uploaded to ``out_dir``;
    the output folder itself is ``out_dir``'s URI (never ``out/.``)."""
    rel = os.path.relpath(path, os.path.realpath(local_out))
    if rel == ".":
        return store.uri(out_dir)
    return store.uri(posixpath.join(out_dir, *rel.split(os.sep)))


@dataclass
class TaskResult:
    """What a stage's Ray task returns: ``ok`` with the stage's outputs (paths or URIs), metrics,
    history and output digests, or not ``ok`` with a one-line error and the traceback."""

    ok: bool
    duration_s: float
    outputs: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    digest: str = ""
    output_digests: dict[str, str] = field(default_factory=dict)
    error: str = ""
    traceback: str = ""


def _stage_task_body(
    execute: Execute,
    node: StageNode,
    inputs: Inputs,
    out_dir: str,
    tracking_info: TrackingInfo | None,
    store: RunStore,
) -> TaskResult:
    """Run one stage (inside a Ray task); never raises: failures come back as a result."""
    t0 = time.time()
    scratch: str | None = None
    try:
        if store.is_local:
            local_out = out_dir
        else:
            scratch = tempfile.mkdtemp(prefix=f"contrastive-{node.name.replace('@', '-')}-")
            local_out = os.path.join(scratch, "out")
        os.makedirs(local_out, exist_ok=True)
        result = execute(node, inputs, local_out, tracking_info)
        outputs, metrics, history = _normalize(result, node, local_out)
        digest, digests = _digests(outputs)
        if not store.is_local:
            pafs.copy_files(local_out, out_dir, destination_filesystem=store.fs, use_threads=True)
            outputs = {k: _output_uri(store, out_dir, local_out, v) for k, v in outputs.items()}
        return TaskResult(
            ok=True,
            duration_s=time.time() - t0,
            outputs=outputs,
            metrics=metrics,
            history=history,
            digest=digest,
            output_digests=digests,
        )
    except Exception as err:
        return TaskResult(
            ok=False,
            duration_s=time.time() - t0,
            error=one_line(err),
            traceback=traceback.format_exc(),
        )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


#: A stage metric the training tasks add when their MLflow sink dropped points (never recorded as
#: a metric: the runner adds it to the run's tracking gap).
DROPPED_METRIC = "tracking_dropped_points"

_stage_task = ray.remote(num_cpus=0, max_retries=0)(_stage_task_body)


def _driver_node_strategy() -> object:
    """Pin the (CPU-free) stage coordinators to the driver's node, so that losing a worker node
    only takes training work with it (retried from checkpoints), never a stage's bookkeeping."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # e.g. a client connection without a local node
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def _safe(what: str, fn: Callable[..., _T], *args: object, **kwargs: object) -> _T | None:
    """Call a tracking function; a failure is a warning, never the end of the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # tracking must not take the pipeline down
        log.warning("tracking: %s failed: %s", what, one_line(err))
        return None


def _final_only(metrics: Mapping[str, float], history: list[dict[str, Any]]) -> dict[str, float]:
    """The final metrics that no history row holds (those were logged per epoch)."""
    seen = {k for row in history for k in row}
    return {k: v for k, v in metrics.items() if k not in seen}


def _code_of(store: RunStore, run_id: str) -> str:
    """The code label of an earlier run (``unknown`` if its record is gone or has none)."""
    try:
        return code_label(store.load_run(run_id).code)
    except StateError:
        return "unknown"


# -- the critical path ----------------------------------------------------------------------------

#: Estimated cost of a stage of each kind, in rough units of one evaluation: the search runs many
#: short pretrainings; pretraining (a large encoder, many epochs) is the longest single stage;
#: fine-tuning, the supervised baseline and distillation train small networks or few epochs;
#: sharding and evaluation are light. A kind not listed costs :data:`DEFAULT_STAGE_COST`.
STAGE_COST: dict[str, float] = {
    "tune": 30.0,
    "pretrain": 10.0,
    "finetune": 3.0,
    "baseline": 3.0,
    "distill": 3.0,
    "evaluate": 1.0,
    "shard": 1.0,
}
DEFAULT_STAGE_COST = 1.0


def stage_cost(node: StageNode) -> float:
    """The estimated cost of ``node`` (:data:`STAGE_COST` of its kind)."""
    return STAGE_COST.get(node.kind, DEFAULT_STAGE_COST)


def launch_priorities(
    graph: Graph, cost: Callable[[StageNode], float] = stage_cost
) -> dict[str, float]:
    """Each stage's launch priority: the estimated cost of the costliest path from it to a sink,
    itself included (:meth:`workflows.dag.Graph.remaining_cost`). Among ready stages the highest
    goes first, so the chain that bounds the run's length starts as early as possible."""
    return graph.remaining_cost(cost)


# -- the scheduler --------------------------------------------------------------------------------


@dataclass
class RunContext:
    """What stays the same during one :func:`run_graph` call."""

    graph: Graph
    cfg: Config
    store: RunStore
    run_id: str
    execute: Execute
    keys: dict[str, str]  # cache key by stage name
    this_code: str  # the code label of this run
    tracker: RunTracker | None = None
    parent_id: str | None = None  # the run's MLflow parent run
    max_concurrency: int | None = None
    reuse: bool = False
    keep_going: bool = False


class Running(NamedTuple):
    node: StageNode
    started: float  # time.time() at launch
    cpus: float = 0.0  # what it holds of the CPU budget


def stage_cpus(execute: object, node: StageNode) -> float:
    """The CPUs ``node`` will hold while it runs, as ``execute.cpus(node)`` declares them (0 for
    an ``execute`` without that method: such stages are never held back for CPUs)."""
    cpus = getattr(execute, "cpus", None)
    return max(0.0, float(cpus(node))) if callable(cpus) else 0.0


def cluster_cpus() -> float | None:
    """The Ray cluster's CPUs (None before Ray is initialised, or when it has none listed)."""
    if not ray.is_initialized():
        return None
    total = ray.cluster_resources().get("CPU")
    return float(total) if total else None


@dataclass
class RunState:
    """What changes during one :func:`run_graph` call."""

    stages: dict[str, StageState]  # every stage's durable state, as last written
    manifests: dict[str, Manifest] = field(default_factory=dict)  # finished in this call
    outcomes: dict[str, StageOutcome] = field(default_factory=dict)
    running: dict[ray.ObjectRef, Running] = field(default_factory=dict)
    blocked: set[str] = field(default_factory=set)  # downstream of a failure: never started
    checked: set[str] = field(default_factory=set)  # no cached result to skip or reuse
    sink_dropped: int = 0  # metric points the stages' own MLflow sinks could not send

    @property
    def done(self) -> set[str]:
        return set(self.manifests)

    @property
    def any_failed(self) -> bool:
        return any(o.status == OutcomeStatus.FAILED for o in self.outcomes.values())

    def mark_not_run(self) -> None:
        """Give every stage without an outcome the outcome ``not_run``."""
        for name, st in self.stages.items():
            if name not in self.outcomes:
                self.outcomes[name] = StageOutcome(
                    name, OutcomeStatus.NOT_RUN, attempts=st.attempts
                )


class Scheduler:
    """The steps of one run, each on its own: see the module docstring for the loop."""

    def __init__(self, ctx: RunContext, state: RunState) -> None:
        self.ctx = ctx
        self.state = state
        self.priority = launch_priorities(ctx.graph)

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> BaseException | None:
        """Run until no stage runs and none can start; return what interrupted the loop
        (KeyboardInterrupt, a store error), after recording the stages it stopped."""
        try:
            while True:
                self.settle()
                self.launch_ready()
                if not self.state.running:
                    return None
                self.collect()
        except BaseException as err:  # leave the records consistent
            self.stop_running(err)
            return err

    def waiting(self) -> list[StageNode]:
        """Ready stages that are neither running nor decided, highest priority first (ties in
        declaration order)."""
        st = self.state
        busy = {r.node.name for r in st.running.values()}
        nodes = [
            n
            for n in self.ctx.graph.ready(st.done)
            if n.name not in busy and n.name not in st.outcomes and n.name not in st.blocked
        ]
        return sorted(nodes, key=lambda n: -self.priority[n.name])

    def settle(self) -> None:
        """Skip or reuse every waiting stage that has a cached result, until none has (a
        skipped stage can make its dependants ready)."""
        progressed = True
        while progressed:
            progressed = False
            for node in self.waiting():
                if node.name not in self.state.checked:
                    progressed |= self.check_cache(node)

    def check_cache(self, node: StageNode) -> bool:
        """Skip or reuse ``node``; True when that decided it (an output that no longer matches
        its digest fails it). Otherwise it is marked checked, to be launched."""
        try:
            if self.try_skip(node) or (self.ctx.reuse and self.try_reuse(node)):
                return True
        except DigestMismatch as err:
            self.record_failure(node, str(err), traceback.format_exc(), 0.0, finished=False)
            return True
        self.state.checked.add(node.name)
        return False

    def may_launch(self) -> bool:
        """Whether another stage may start: no failure (unless ``keep_going``), a free slot."""
        if self.state.any_failed and not self.ctx.keep_going:
            return False
        limit = self.ctx.max_concurrency
        return limit is None or len(self.state.running) < limit

    def fits(self, node: StageNode, capacity: float | None) -> bool:
        """Whether ``node``'s CPUs (:func:`stage_cpus`) fit in ``capacity`` next to the running
        stages' (always, with nothing running: Ray or its autoscaler then decides)."""
        need = stage_cpus(self.ctx.execute, node)
        held = sum(r.cpus for r in self.state.running.values())
        if need <= 0 or capacity is None or held <= 0:
            return True
        return held + need <= capacity + 1e-9

    def launch_ready(self) -> None:
        """Launch waiting stages, highest priority first, while :meth:`may_launch`; a stage whose
        CPUs do not fit now waits, and a lower one that fits may go."""
        capacity = cluster_cpus()
        for node in self.waiting():
            if not self.may_launch():
                return
            if self.fits(node, capacity):
                self.launch(node)

    def collect(self) -> None:
        """Wait for a running stage to end and record how it ended."""
        finished, _ = ray.wait(list(self.state.running), num_returns=1)
        for ref in finished:
            node, t0, _ = self.state.running.pop(ref)
            try:
                res: TaskResult = ray.get(ref)
            except Exception as err:  # the task itself died (worker crash, OOM kill, ...)
                self.record_failure(node, one_line(err), traceback.format_exc(), time.time() - t0)
                continue
            if res.ok:
                self.record_success(node, res)
            else:
                self.record_failure(node, res.error, res.traceback, res.duration_s)

    def stop_running(self, err: BaseException) -> None:
        """Cancel the running stages and record them failed, interrupted by ``err``."""
        for ref, (node, t0, _) in list(self.state.running.items()):
            _safe(f"cancel {node.name}", ray.cancel, ref, force=False, recursive=True)
            self.record_failure(
                node,
                f"interrupted: {one_line(err)}",
                "".join(traceback.format_exception(err)),
                time.time() - t0,
            )
        self.state.running.clear()

    # -- the steps ---------------------------------------------------------------------------
    def _finish_from_manifest(
        self, node: StageNode, manifest: Manifest, status: OutcomeStatus
    ) -> None:
        self.state.manifests[node.name] = manifest
        st = self.state.stages[node.name]
        self.state.outcomes[node.name] = StageOutcome(
            node.name,
            status,
            duration_s=st.duration_s,
            attempts=st.attempts,
            reused_from=manifest.get("reused_from"),
            metrics=dict(manifest.get("metrics", {})),
        )

    def try_skip(self, node: StageNode) -> bool:
        """Skip ``node`` if this run finished it with the same cache key and its outputs still
        match their digest (:class:`DigestMismatch` if not); a manifest with another key is
        deleted (the stage runs again)."""
        ctx = self.ctx
        key = ctx.keys[node.name]
        m = ctx.store.read_manifest(ctx.run_id, node.name)
        if m is None:
            return False
        if m.get("cache_key") != key:
            log.info("stage %s: config changed since it finished; running it again", node.name)
            ctx.store.delete_manifest(ctx.run_id, node.name)
            return False
        manifest_file = ctx.store.uri(ctx.store.stage_dir(ctx.run_id, node.name) + "/manifest.json")
        verify_outputs(
            m, f"stage {node.name} (finished earlier; delete {manifest_file} to run it again)"
        )
        log.info("stage %s skipped: finished earlier (cache key %s)", node.name, key[:12])
        self._finish_from_manifest(node, m, OutcomeStatus.SKIPPED)
        return True

    def try_reuse(self, node: StageNode) -> bool:
        """Link ``node`` to a finished stage of an earlier run with the same cache key (outputs
        verified against their digest); False when there is none."""
        ctx = self.ctx
        hit = ctx.store.find_finished_by_key(ctx.keys[node.name], exclude_run_id=ctx.run_id)
        if hit is None:
            return False
        src_run, src_stage, src = hit
        origin = dict(src.get("reused_from") or {"run_id": src_run, "stage": src_stage})
        verify_outputs(
            src, f"stage {node.name} (--reuse of run {origin['run_id']} stage {origin['stage']})"
        )
        # The key covers the config and the package version, not the commit: say when the linked
        # result was computed by other code (lineage shows it too).
        origin.setdefault("code", _code_of(ctx.store, origin["run_id"]))
        if origin["code"] != ctx.this_code:
            log.warning(
                "stage %s: reusing the result of run %s, made with code %s (this run: %s)",
                node.name,
                origin["run_id"],
                origin["code"],
                ctx.this_code,
            )
        self._link(node, src, origin)
        return True

    def _link(self, node: StageNode, src: Manifest, origin: dict[str, str]) -> None:
        """Record ``node`` as finished by the earlier run's manifest ``src``."""
        ctx = self.ctx
        manifest = dict(
            src, stage=node.name, run_id=ctx.run_id, reused_from=origin, finished=now_iso()
        )
        st = self.state.stages[node.name]
        st.state, st.cache_key, st.ended = StageStatus.SKIPPED, ctx.keys[node.name], now_iso()
        st.error = st.traceback_file = None
        st.metrics = dict(src.get("metrics", {}))
        st.key_metric = next(iter(st.metrics), None)
        st.mlflow_run_id = src.get("mlflow_run_id")
        st.reused_from = origin
        ctx.store.write_state(ctx.run_id, st)
        ctx.store.write_manifest(ctx.run_id, node.name, manifest)
        log.info(
            "stage %s reused from run %s (stage %s)", node.name, origin["run_id"], origin["stage"]
        )
        self._finish_from_manifest(node, manifest, OutcomeStatus.REUSED)

    def launch(self, node: StageNode) -> None:
        """Mark ``node`` running (attempts + 1), open its MLflow run, start its Ray task."""
        ctx = self.ctx
        key = ctx.keys[node.name]
        st = self.state.stages[node.name]
        same_key = st.cache_key == key
        st.state, st.attempts, st.started = StageStatus.RUNNING, st.attempts + 1, now_iso()
        st.ended = st.duration_s = st.error = st.traceback_file = None
        st.reused_from, st.metrics, st.key_metric = None, {}, None
        tracking_info = self._start_tracking(node, st, same_key)
        st.cache_key = key
        ctx.store.write_state(ctx.run_id, st)
        inputs = {dep: dict(self.state.manifests[up]["outputs"]) for dep, up in node.deps.items()}
        out_dir = ctx.store.out_dir(ctx.run_id, node.name)
        if ctx.store.is_local:
            os.makedirs(out_dir, exist_ok=True)
        log.info("stage %s started (attempt %d)", node.name, st.attempts)
        ref = self.submit(node, inputs, out_dir, tracking_info)
        self.state.running[ref] = Running(node, time.time(), stage_cpus(ctx.execute, node))

    def submit(
        self, node: StageNode, inputs: Inputs, out_dir: str, tracking_info: TrackingInfo | None
    ) -> ray.ObjectRef:
        """Start the stage's Ray task (a CPU-free coordinator on the driver's node)."""
        options: dict[str, Any] = {
            "name": f"stage:{node.name}",
            "scheduling_strategy": _driver_node_strategy(),
        }
        if self.ctx.cfg.resources.env:  # inherited by the stage's own tasks and Train workers
            options["runtime_env"] = {"env_vars": dict(self.ctx.cfg.resources.env)}
        return _stage_task.options(**options).remote(
            self.ctx.execute, node, inputs, out_dir, tracking_info, self.ctx.store
        )

    def _start_tracking(
        self, node: StageNode, st: StageState, same_key: bool
    ) -> TrackingInfo | None:
        """The stage's MLflow run (the earlier attempt's when the key is the same and it still
        exists, else a new child of the parent run), as the stage's tracking info."""
        tracker, parent_id = self.ctx.tracker, self.ctx.parent_id
        if tracker is None or parent_id is None:
            return None
        child = st.mlflow_run_id if same_key else None
        if child is not None and not _safe("resume stage run", tracker.resume_run, child):
            child = None
        if child is None:
            child = _safe(
                f"start run of stage {node.name}",
                tracker.start_child,
                parent_id,
                node,
                self.ctx.keys[node.name],
                self._upstream_mlflow(node),
                config_slice=stage_config(node, self.ctx.cfg),
                pipeline_run_id=self.ctx.run_id,
            )
        st.mlflow_run_id = child
        return tracker.info(child, parent_id) if child is not None else None

    def _upstream_mlflow(self, node: StageNode) -> dict[str, str]:
        out = {}
        for dep_input, up in node.deps.items():
            rid = self.state.manifests.get(up, {}).get("mlflow_run_id")
            if rid:
                out[dep_input] = rid
        return out

    def record_success(self, node: StageNode, res: TaskResult) -> None:
        """Write the stage's state, close its MLflow run, write its manifest (last)."""
        ctx, st = self.ctx, self.state.stages[node.name]
        metrics, duration = res.metrics, float(res.duration_s)
        self.state.sink_dropped += int(metrics.pop(DROPPED_METRIC, 0))
        st.state, st.ended, st.duration_s = StageStatus.SUCCEEDED, now_iso(), duration
        st.metrics, st.key_metric = metrics, next(iter(metrics), None)
        ctx.store.write_state(ctx.run_id, st)
        manifest: Manifest = {
            "stage": node.name,
            "kind": node.kind,
            "run_id": ctx.run_id,
            "cache_key": ctx.keys[node.name],
            "outputs": res.outputs,
            "digest": res.digest,
            "output_digests": res.output_digests,
            "metrics": metrics,
            "key_metric": st.key_metric,
            "mlflow_run_id": st.mlflow_run_id,
            "attempts": st.attempts,
            "finished": st.ended,
        }
        if ctx.tracker is not None and st.mlflow_run_id:
            # the per-epoch history reached MLflow from the workers already: log only the final
            # metrics that are not one of its curves (once each); the stage's dataset input is
            # logged by the stage itself, with the data's digest
            final = _final_only(metrics, res.history)
            _safe("log metrics", ctx.tracker.log_metrics, st.mlflow_run_id, final, len(res.history))
            _safe("end stage run", ctx.tracker.end, st.mlflow_run_id, "FINISHED")
        ctx.store.write_manifest(ctx.run_id, node.name, manifest)  # last: the stage is finished
        self.state.manifests[node.name] = manifest
        self.state.outcomes[node.name] = StageOutcome(
            node.name, OutcomeStatus.SUCCEEDED, duration, attempts=st.attempts, metrics=metrics
        )
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:3])
        log.info("stage %s finished in %.1fs%s", node.name, duration, f": {shown}" if shown else "")

    def record_failure(
        self, node: StageNode, error: str, tb: str, duration: float, finished: bool = True
    ) -> None:
        """Mark the stage failed and block its dependants; ``finished=False``: it never ran in
        this call (its MLflow run, if any, is an earlier attempt's and stays as it is)."""
        ctx, st = self.ctx, self.state.stages[node.name]
        st.state, st.ended, st.duration_s, st.error = StageStatus.FAILED, now_iso(), duration, error
        try:  # a full disk or a read-only store must not hide the stage's own error
            st.traceback_file = ctx.store.write_error(ctx.run_id, node.name, tb)
            ctx.store.write_state(ctx.run_id, st)
        except Exception as err:  # noqa: BLE001
            st.traceback_file = None
            log.error("stage %s: cannot record its failure: %s", node.name, one_line(err))
        if finished and ctx.tracker is not None and st.mlflow_run_id:
            _safe("end stage run", ctx.tracker.end, st.mlflow_run_id, "FAILED")
        self.state.outcomes[node.name] = StageOutcome(
            node.name, OutcomeStatus.FAILED, duration, error, st.traceback_file, st.attempts
        )
        self.block_dependants(node.name)
        log.error("stage %s failed after %.1fs: %s", node.name, duration, error)

    def block_dependants(self, name: str) -> None:
        """No stage downstream of ``name`` starts in this call."""
        self.state.blocked.update(self.ctx.graph.dependants(name))


# -- one run ---------------------------------------------------------------------------------------


def _open_run(ctx: RunContext, info: RunInfo) -> str | None:
    """Mark the run running; with a tracker, resume (or start) its MLflow parent run and return
    its id."""
    tracker = ctx.tracker
    if tracker is None:
        ctx.store.update_run(ctx.run_id, status=RunStatus.RUNNING, error=None)
        return None
    parent_id = info.mlflow_run_id
    if parent_id is None or not _safe("resume parent run", tracker.resume_run, parent_id):
        parent_id = tracker.start_parent(ctx.run_id, ctx.cfg, code=ctx.this_code)  # as recorded
    ctx.store.update_run(
        ctx.run_id,
        status=RunStatus.RUNNING,
        mlflow_run_id=parent_id,
        tracking_uri=tracker.uri,
        error=None,
        tracking_gap=None,
    )
    return parent_id


def _load_states(ctx: RunContext) -> dict[str, StageState]:
    """Every stage's state; a stage never started gets its ``state.json`` now, so that ``status``
    shows the whole graph."""
    states: dict[str, StageState] = {}
    for node in ctx.graph:
        st = ctx.store.read_state(ctx.run_id, node.name)
        if st.cache_key is None and st.state == StageStatus.PENDING:
            st.cache_key = ctx.keys[node.name]
            ctx.store.write_state(ctx.run_id, st)
        states[node.name] = st
    return states


def _close_run(
    ctx: RunContext, state: RunState, interrupted: BaseException | None
) -> tuple[RunStatus, BaseException | None]:
    """Record how the run ended (``run.json``, the MLflow parent run, the tracking gap); return
    its status and what interrupted it (a store error recording the end counts)."""
    ok = len(state.manifests) == len(ctx.graph) and interrupted is None
    status = RunStatus.SUCCEEDED if ok else RunStatus.FAILED
    error = None
    if not ok:
        failed = (o for o in state.outcomes.values() if o.status == OutcomeStatus.FAILED)
        first = next(failed, None)
        error = f"stage {first.name} failed: {first.error}" if first else "interrupted"
    if isinstance(interrupted, Exception):
        error = f"run failed: {one_line(interrupted)}"
    try:
        ctx.store.update_run(ctx.run_id, status=status, error=error)
    except Exception as err:  # noqa: BLE001 - e.g. the disk is full: say so, keep the cause
        log.error("run %s: cannot record its end (%s): %s", ctx.run_id, status, one_line(err))
        if interrupted is None:
            interrupted = err
    if ctx.tracker is not None and ctx.parent_id is not None:
        _safe("end parent run", ctx.tracker.end, ctx.parent_id, "FINISHED" if ok else "FAILED")
    gap = ctx.tracker.gap(state.sink_dropped) if ctx.tracker is not None else None
    if gap is not None:
        log.warning("tracking: %s", gap)
        _safe("record the tracking gap", ctx.store.update_run, ctx.run_id, tracking_gap=gap)
    return status, interrupted


def run_graph(
    graph: Graph,
    cfg: Config,
    store: RunStore,
    run_id: str,
    execute: Execute,
    tracker: RunTracker | None = None,
    max_concurrency: int | None = None,
    reuse: bool = False,
    keep_going: bool = False,
) -> RunSummary:
    """Run (or resume) ``graph`` as run ``run_id`` of ``store``; see the module docstring.

    ``tracker`` is a :class:`workflows.tracking.Tracker` (or None: no tracking). At most
    ``max_concurrency`` stages run at once (None: no limit); ready stages start longest remaining
    path first (:func:`launch_priorities`). After a failure no new stage starts unless
    ``keep_going`` (then independent branches go on; dependants of the failure never run).
    Ray is initialised with defaults when it is not yet.
    """
    t_run = time.time()
    graph.validate()
    if max_concurrency is not None and max_concurrency < 1:
        raise RunError(f"run error: max_concurrency must be >= 1 (got {max_concurrency})")
    keys = compute_keys(graph, cfg)
    info = store.load_run(run_id)
    ctx = RunContext(
        graph=graph,
        cfg=cfg,
        store=store,
        run_id=run_id,
        execute=execute,
        keys=keys,
        this_code=code_label(info.code),
        tracker=tracker,
        max_concurrency=max_concurrency,
        reuse=reuse,
        keep_going=keep_going,
    )
    ctx.parent_id = _open_run(ctx, info)
    state = RunState(_load_states(ctx))
    interrupted = Scheduler(ctx, state).run()
    state.mark_not_run()
    status, interrupted = _close_run(ctx, state, interrupted)
    summary = RunSummary(
        run_id=run_id,
        status=status,
        stages={n.name: state.outcomes[n.name] for n in graph},
        duration_s=time.time() - t_run,
        mlflow_run_id=ctx.parent_id,
    )
    (log.info if status == RunStatus.SUCCEEDED else log.error)("%s", summary.message())
    if isinstance(interrupted, Exception):  # a store error (disk full, read-only, ...): one line
        raise RunError(f"run {run_id} failed: {one_line(interrupted)}") from interrupted
    if interrupted is not None:
        raise interrupted
    return summary
