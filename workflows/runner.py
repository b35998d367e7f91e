"""Execute a stage graph on Ray, durably: skip finished stages, resume, reuse across runs.

Each ready stage runs as a Ray task (:mod:`workflows.stagetask`), so independent branches run
concurrently; the scheduler (:mod:`workflows.scheduler`) decides which starts when, critical path
first within a CPU budget. The driver is the only writer of run records: when a stage's task
returns, the driver writes its ``state.json`` and then, last, its ``manifest.json``.

Before a stage is launched:

* a manifest in this run with the same cache key -> the stage is skipped (its MLflow run reused);
* a manifest with another cache key (the config changed) -> it is deleted and the stage reruns;
* with ``reuse=True``, a finished stage of an earlier run with the same cache key is linked: this
  run's manifest points at that run's outputs and records ``reused_from``.

A skipped or linked stage's outputs are hashed again first (:mod:`workflows.digests`): outputs
changed since they were written fail the stage. A stage that raises is marked failed (one-line
error, traceback in ``error.txt``); its dependants are not started, stages already running finish,
and the run ends ``failed``. Calling :func:`run_graph` again with the same ``run_id`` resumes:
finished stages are skipped, failed or killed ones run again with ``attempts + 1``.

This module holds one run: open its records and MLflow parent run, load the stages' states, run
the scheduler, record how the run ended. The types it shares with the other modules (the
:class:`~workflows.runtypes.RunSummary` it returns, :class:`~workflows.runtypes.RunError`) are in
:mod:`workflows.runtypes`.
"""

from __future__ import annotations

import logging
import time

from pipeline.config import Config
from workflows.dag import Graph, compute_keys
from workflows.runtypes import (
    RUN_LOGGER,
    Execute,
    OutcomeStatus,
    RunError,
    RunSummary,
    RunTracker,
    one_line,
    safe_tracking,
)
from workflows.scheduler import RunContext, RunState, Scheduler
from workflows.state import RunInfo, RunStatus, RunStore, StageState, StageStatus, code_label

__all__ = ["run_graph"]

log = logging.getLogger(RUN_LOGGER)


def _open_run(ctx: RunContext, info: RunInfo) -> str | None:
    """Mark the run running; with a tracker, resume (or start) its MLflow parent run and return
    its id."""
    tracker = ctx.tracker
    if tracker is None:
        ctx.store.update_run(ctx.run_id, status=RunStatus.RUNNING, error=None)
        return None
    parent_id = info.mlflow_run_id
    if parent_id is None or not safe_tracking("resume parent run", tracker.resume_run, parent_id):
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
        safe_tracking(
            "end parent run", ctx.tracker.end, ctx.parent_id, "FINISHED" if ok else "FAILED"
        )
    gap = ctx.tracker.gap(state.sink_dropped) if ctx.tracker is not None else None
    if gap is not None:
        log.warning("tracking: %s", gap)
        safe_tracking("record the tracking gap", ctx.store.update_run, ctx.run_id, tracking_gap=gap)
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
