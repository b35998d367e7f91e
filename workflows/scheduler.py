"""The scheduler of one run: which ready stage starts when, and what the driver records.

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

The driver is the only writer of run records: when a stage's task
(:mod:`workflows.stagetask`) returns, the scheduler writes the stage's ``state.json`` and then,
last, its ``manifest.json``. What stays the same during a run is a :class:`RunContext`, what
changes a :class:`RunState`; :func:`workflows.runner.run_graph` makes both and runs the loop.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import ray

from pipeline.config import Config
from pipeline.runtime import HistoryRow
from workflows.dag import Graph, StageNode, stage_config
from workflows.digests import DigestMismatch, verify_outputs
from workflows.runtypes import (
    RUN_LOGGER,
    Execute,
    Inputs,
    Manifest,
    OutcomeStatus,
    RunTracker,
    StageOutcome,
    one_line,
    safe_tracking,
)
from workflows.stagetask import TaskResult, submit_stage
from workflows.state import RunStore, StageState, StageStatus, StateError, code_label, now_iso

if TYPE_CHECKING:
    from workflows.tracking import TrackingInfo

__all__ = [
    "DROPPED_METRIC",
    "STAGE_COST",
    "RunContext",
    "RunState",
    "Running",
    "Scheduler",
    "cluster_cpus",
    "launch_priorities",
    "stage_cost",
    "stage_cpus",
]

log = logging.getLogger(RUN_LOGGER)


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


#: A stage metric the training tasks add when their MLflow sink dropped points (never recorded as
#: a metric: the runner adds it to the run's tracking gap).
DROPPED_METRIC = "tracking_dropped_points"


def _final_only(metrics: Mapping[str, float], history: list[HistoryRow]) -> dict[str, float]:
    """The final metrics that no history row holds (those were logged per epoch)."""
    seen = {k for row in history for k in row}
    return {k: v for k, v in metrics.items() if k not in seen}


def _code_of(store: RunStore, run_id: str) -> str:
    """The code label of an earlier run (``unknown`` if its record is gone or has none)."""
    try:
        return code_label(store.load_run(run_id).code)
    except StateError:
        return "unknown"


@dataclass
class RunContext:
    """What stays the same during one :func:`workflows.runner.run_graph` call."""

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
    """What changes during one :func:`workflows.runner.run_graph` call."""

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
            safe_tracking(f"cancel {node.name}", ray.cancel, ref, force=False, recursive=True)
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
        ctx = self.ctx
        return submit_stage(
            ctx.execute, node, inputs, out_dir, tracking_info, ctx.store, ctx.cfg.resources.env
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
        if child is not None and not safe_tracking("resume stage run", tracker.resume_run, child):
            child = None
        if child is None:
            child = safe_tracking(
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
            safe_tracking(
                "log metrics", ctx.tracker.log_metrics, st.mlflow_run_id, final, len(res.history)
            )
            safe_tracking("end stage run", ctx.tracker.end, st.mlflow_run_id, "FINISHED")
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
            safe_tracking("end stage run", ctx.tracker.end, st.mlflow_run_id, "FAILED")
        self.state.outcomes[node.name] = StageOutcome(
            node.name, OutcomeStatus.FAILED, duration, error, st.traceback_file, st.attempts
        )
        self.block_dependants(node.name)
        log.error("stage %s failed after %.1fs: %s", node.name, duration, error)

    def block_dependants(self, name: str) -> None:
        """No stage downstream of ``name`` starts in this call."""
        self.state.blocked.update(self.ctx.graph.dependants(name))
