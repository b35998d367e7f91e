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
from typing import Any

import pyarrow.fs as pafs
import ray

from pipeline.config import Config
from pipeline.errors import UserError
from workflows.dag import Graph, StageNode, compute_keys, stage_config
from workflows.state import RunStore, StageState, StateError, code_label, now_iso

__all__ = ["Execute", "RunError", "RunSummary", "StageOutcome", "output_digest", "run_graph"]

log = logging.getLogger(__name__)

#: ``execute(node, inputs, out_dir, tracking_info) -> StageResult`` (or a dict with ``outputs``,
#: ``metrics``, ``history``): ``inputs`` maps each input name to its upstream manifest's outputs.
Execute = Callable[[StageNode, dict[str, dict[str, str]], str, Any], Any]


class RunError(UserError, RuntimeError):
    """A problem running the graph itself (not a stage failure); one line."""


@dataclass
class StageOutcome:
    """What happened to one stage in one :func:`run_graph` call.

    ``status``: ``succeeded`` (ran now), ``skipped`` (finished earlier in this run), ``reused``
    (linked from an earlier run), ``failed``, or ``not_run`` (upstream failed or run stopped).
    """

    name: str
    status: str
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
    status: str
    stages: dict[str, StageOutcome]
    duration_s: float
    mlflow_run_id: str | None = None

    def names(self, status: str) -> list[str]:
        return [n for n, o in self.stages.items() if o.status == status]

    @property
    def failed(self) -> list[str]:
        return self.names("failed")

    @property
    def failed_stage(self) -> str | None:
        f = self.failed
        return f[0] if f else None

    @property
    def executed(self) -> list[str]:
        return [n for n, o in self.stages.items() if o.status in ("succeeded", "failed")]

    @property
    def not_run(self) -> list[str]:
        return self.names("not_run")

    def message(self) -> str:
        """One line: how the run ended, and which stage failed with what error."""
        counts = ", ".join(
            f"{len(self.names(s))} {s}"
            for s in ("succeeded", "skipped", "reused", "failed", "not_run")
            if self.names(s)
        )
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
        if "://" in path:
            fs, base = pafs.FileSystem.from_uri(path)
            info = fs.get_file_info(base)
            if info.type == pafs.FileType.Directory:
                sel = pafs.FileSelector(base, recursive=True)
                files = sorted(
                    (posix_rel(fi.path, base), fi.path)
                    for fi in fs.get_file_info(sel)
                    if fi.type == pafs.FileType.File
                )
            elif info.type == pafs.FileType.File:
                files = [(".", base)]
            else:
                files = None

            def opener(full: str, fs: pafs.FileSystem = fs) -> Any:
                return fs.open_input_stream(full)
        else:
            if os.path.isdir(path):
                files = sorted(
                    (os.path.relpath(os.path.join(d, f), path), os.path.join(d, f))
                    for d, _, fs_ in os.walk(path)
                    for f in fs_
                )
            elif os.path.exists(path):
                files = [(".", path)]
            else:
                files = None

            def opener(full: str) -> Any:
                return open(full, "rb")  # noqa: SIM115 - closed by the with below

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


def _normalize(result: Any, node: StageNode, out_dir: str) -> tuple[dict, dict, list]:
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


def _stage_task_body(
    execute: Execute,
    node: StageNode,
    inputs: dict[str, dict[str, str]],
    out_dir: str,
    tracking_info: Any,
    store: RunStore,
) -> dict[str, Any]:
    """Run one stage (inside a Ray task); never raises: failures come back as a dict."""
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
        return {
            "ok": True,
            "outputs": outputs,
            "metrics": metrics,
            "history": history,
            "digest": digest,
            "output_digests": digests,
            "duration_s": time.time() - t0,
        }
    except Exception as err:
        return {
            "ok": False,
            "error": one_line(err),
            "traceback": traceback.format_exc(),
            "duration_s": time.time() - t0,
        }
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


#: A stage metric the training tasks add when their MLflow sink dropped points (never recorded as
#: a metric: the runner adds it to the run's tracking gap).
DROPPED_METRIC = "tracking_dropped_points"

_stage_task = ray.remote(num_cpus=0, max_retries=0)(_stage_task_body)


def _driver_node_strategy() -> Any:
    """Pin the (CPU-free) stage coordinators to the driver's node, so that losing a worker node
    only takes training work with it (retried from checkpoints), never a stage's bookkeeping."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # e.g. a client connection without a local node
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def _safe(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a tracking function; a failure is a warning, never the end of the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # tracking must not take the pipeline down
        log.warning("tracking: %s failed: %s", what, one_line(err))
        return None


def _final_only(metrics: Mapping[str, float], history: list[dict]) -> dict[str, float]:
    """The final metrics that no history row holds (those were logged per epoch)."""
    seen = {k for row in history for k in row}
    return {k: v for k, v in metrics.items() if k not in seen}


def _code_of(store: RunStore, run_id: str) -> str:
    """The code label of an earlier run (``unknown`` if its record is gone or has none)."""
    try:
        return code_label(store.load_run(run_id).code)
    except StateError:
        return "unknown"


def run_graph(
    graph: Graph,
    cfg: Config,
    store: RunStore,
    run_id: str,
    execute: Execute,
    tracker: Any | None = None,
    max_concurrency: int | None = None,
    reuse: bool = False,
    keep_going: bool = False,
) -> RunSummary:
    """Run (or resume) ``graph`` as run ``run_id`` of ``store``; see the module docstring.

    ``tracker`` is a :class:`workflows.tracking.Tracker` (or None: no tracking). At most
    ``max_concurrency`` stages run at once (None: no limit). After a failure no new stage starts
    unless ``keep_going`` (then independent branches go on; dependants of the failure never run).
    Ray is initialised with defaults when it is not yet.
    """
    t_run = time.time()
    graph.validate()
    if max_concurrency is not None and max_concurrency < 1:
        raise RunError(f"run error: max_concurrency must be >= 1 (got {max_concurrency})")
    keys = compute_keys(graph, cfg)
    info = store.load_run(run_id)
    this_code = code_label(info.code)

    parent_id: str | None = None
    if tracker is not None:
        parent_id = info.mlflow_run_id
        if parent_id is None or not _safe("resume parent run", tracker.resume_run, parent_id):
            parent_id = tracker.start_parent(run_id, cfg, code=this_code)  # as recorded
        store.update_run(
            run_id,
            status="running",
            mlflow_run_id=parent_id,
            tracking_uri=tracker.uri,
            error=None,
            tracking_gap=None,
        )
    else:
        store.update_run(run_id, status="running", error=None)

    # Every stage gets a state.json up front, so `status` shows the whole graph.
    states: dict[str, StageState] = {}
    for node in graph:
        st = store.read_state(run_id, node.name)
        if st.cache_key is None and st.state == "pending":
            st.cache_key = keys[node.name]
            store.write_state(run_id, st)
        states[node.name] = st

    done: set[str] = set()
    manifests: dict[str, dict[str, Any]] = {}
    outcomes: dict[str, StageOutcome] = {}
    running: dict[ray.ObjectRef, tuple[StageNode, float]] = {}
    blocked: set[str] = set()

    def upstream_mlflow(node: StageNode) -> dict[str, str]:
        out = {}
        for dep_input, up in node.deps.items():
            rid = manifests.get(up, {}).get("mlflow_run_id")
            if rid:
                out[dep_input] = rid
        return out

    def finish_from_manifest(node: StageNode, manifest: dict[str, Any], status: str) -> None:
        done.add(node.name)
        manifests[node.name] = manifest
        st = states[node.name]
        outcomes[node.name] = StageOutcome(
            node.name,
            status,
            duration_s=st.duration_s,
            attempts=st.attempts,
            reused_from=manifest.get("reused_from"),
            metrics=dict(manifest.get("metrics", {})),
        )

    def try_skip(node: StageNode) -> bool:
        key = keys[node.name]
        m = store.read_manifest(run_id, node.name)
        if m is not None and m.get("cache_key") == key:
            manifest_file = store.uri(store.stage_dir(run_id, node.name) + "/manifest.json")
            verify_outputs(m, f"stage {node.name} (finished earlier; delete {manifest_file} to "
                           "run it again)")  # fmt: skip
            log.info("stage %s skipped: finished earlier (cache key %s)", node.name, key[:12])
            finish_from_manifest(node, m, "skipped")
            return True
        if m is not None:
            log.info("stage %s: config changed since it finished; running it again", node.name)
            store.delete_manifest(run_id, node.name)
        if not reuse:
            return False
        hit = store.find_finished_by_key(key, exclude_run_id=run_id)
        if hit is None:
            return False
        src_run, src_stage, src = hit
        origin = dict(src.get("reused_from") or {"run_id": src_run, "stage": src_stage})
        verify_outputs(
            src, f"stage {node.name} (--reuse of run {origin['run_id']} stage {origin['stage']})"
        )
        # The key covers the config and the package version, not the commit: say when the linked
        # result was computed by other code (lineage shows it too).
        origin.setdefault("code", _code_of(store, origin["run_id"]))
        if origin["code"] != this_code:
            log.warning(
                "stage %s: reusing the result of run %s, made with code %s (this run: %s)",
                node.name,
                origin["run_id"],
                origin["code"],
                this_code,
            )
        manifest = dict(src, stage=node.name, run_id=run_id, reused_from=origin, finished=now_iso())
        st = states[node.name]
        st.state, st.cache_key, st.ended = "skipped", key, now_iso()
        st.error = st.traceback_file = None
        st.metrics = dict(src.get("metrics", {}))
        st.key_metric = next(iter(st.metrics), None)
        st.mlflow_run_id = src.get("mlflow_run_id")
        st.reused_from = origin
        store.write_state(run_id, st)
        store.write_manifest(run_id, node.name, manifest)
        log.info(
            "stage %s reused from run %s (stage %s)", node.name, origin["run_id"], origin["stage"]
        )
        finish_from_manifest(node, manifest, "reused")
        return True

    def launch(node: StageNode) -> None:
        key = keys[node.name]
        st = states[node.name]
        same_key = st.cache_key == key
        st.state, st.attempts, st.started = "running", st.attempts + 1, now_iso()
        st.ended = st.duration_s = st.error = st.traceback_file = None
        st.reused_from, st.metrics, st.key_metric = None, {}, None
        tracking_info = None
        if tracker is not None and parent_id is not None:
            child = st.mlflow_run_id if same_key else None
            if child is not None and not _safe("resume stage run", tracker.resume_run, child):
                child = None
            if child is None:
                child = _safe(
                    f"start run of stage {node.name}",
                    tracker.start_child,
                    parent_id,
                    node,
                    key,
                    upstream_mlflow(node),
                    config_slice=stage_config(node, cfg),
                    pipeline_run_id=run_id,
                )
            st.mlflow_run_id = child
            if child is not None:
                tracking_info = tracker.info(child, parent_id)
        st.cache_key = key
        store.write_state(run_id, st)
        inputs = {dep: dict(manifests[up]["outputs"]) for dep, up in node.deps.items()}
        out_dir = store.out_dir(run_id, node.name)
        if store.is_local:
            os.makedirs(out_dir, exist_ok=True)
        log.info("stage %s started (attempt %d)", node.name, st.attempts)
        options: dict[str, Any] = {
            "name": f"stage:{node.name}",
            "scheduling_strategy": _driver_node_strategy(),
        }
        if cfg.resources.env:  # inherited by the stage's own tasks and Ray Train workers
            options["runtime_env"] = {"env_vars": dict(cfg.resources.env)}
        ref = _stage_task.options(**options).remote(
            execute, node, inputs, out_dir, tracking_info, store
        )
        running[ref] = (node, time.time())

    def record_failure(
        node: StageNode, error: str, tb: str, duration: float, finished: bool = True
    ) -> None:
        """Mark the stage failed; ``finished=False``: it never ran in this call (its MLflow run,
        if any, is an earlier attempt's and stays as it is)."""
        st = states[node.name]
        st.state, st.ended, st.duration_s, st.error = "failed", now_iso(), duration, error
        try:  # a full disk or a read-only store must not hide the stage's own error
            st.traceback_file = store.write_error(run_id, node.name, tb)
            store.write_state(run_id, st)
        except Exception as err:  # noqa: BLE001
            st.traceback_file = None
            log.error("stage %s: cannot record its failure: %s", node.name, one_line(err))
        if finished and tracker is not None and st.mlflow_run_id:
            _safe("end stage run", tracker.end, st.mlflow_run_id, "FAILED")
        outcomes[node.name] = StageOutcome(
            node.name, "failed", duration, error, st.traceback_file, st.attempts
        )
        blocked.update(graph.dependants(node.name))
        log.error("stage %s failed after %.1fs: %s", node.name, duration, error)

    sink_dropped = [0]  # metric points the stages' own MLflow sinks could not send

    def record_success(node: StageNode, res: dict[str, Any], duration: float) -> None:
        st = states[node.name]
        metrics = res["metrics"]
        sink_dropped[0] += int(metrics.pop(DROPPED_METRIC, 0))
        st.state, st.ended, st.duration_s = "succeeded", now_iso(), duration
        st.metrics, st.key_metric = metrics, next(iter(metrics), None)
        store.write_state(run_id, st)
        manifest = {
            "stage": node.name,
            "kind": node.kind,
            "run_id": run_id,
            "cache_key": keys[node.name],
            "outputs": res["outputs"],
            "digest": res["digest"],
            "output_digests": res.get("output_digests", {}),
            "metrics": metrics,
            "key_metric": st.key_metric,
            "mlflow_run_id": st.mlflow_run_id,
            "attempts": st.attempts,
            "finished": st.ended,
        }
        if tracker is not None and st.mlflow_run_id:
            child = st.mlflow_run_id
            # the per-epoch history reached MLflow from the workers already: log only the final
            # metrics that are not one of its curves (once each)
            _safe(
                "log metrics",
                tracker.log_metrics,
                child,
                _final_only(metrics, res["history"]),
                len(res["history"]),
            )
            # (the stage's dataset input is logged by the stage itself, with the data's digest)
            _safe("end stage run", tracker.end, child, "FINISHED")
        store.write_manifest(run_id, node.name, manifest)  # last: the stage is now finished
        done.add(node.name)
        manifests[node.name] = manifest
        outcomes[node.name] = StageOutcome(
            node.name, "succeeded", duration, attempts=st.attempts, metrics=metrics
        )
        shown = ", ".join(f"{k}={v:.4g}" for k, v in list(metrics.items())[:3])
        log.info("stage %s finished in %.1fs%s", node.name, duration, f": {shown}" if shown else "")

    interrupted: BaseException | None = None
    try:
        while True:
            progressed = True
            while progressed:
                progressed = False
                busy = {n.name for n, _ in running.values()}
                for node in graph.ready(done):
                    if node.name in busy or node.name in outcomes or node.name in blocked:
                        continue
                    try:
                        skipped = try_skip(node)
                    except DigestMismatch as err:
                        record_failure(node, str(err), traceback.format_exc(), 0.0, finished=False)
                        progressed = True
                        continue
                    if skipped:
                        progressed = True
                        continue
                    if outcomes and any(o.status == "failed" for o in outcomes.values()):
                        if not keep_going:
                            continue
                    if max_concurrency is not None and len(running) >= max_concurrency:
                        continue
                    launch(node)
                    busy.add(node.name)
            if not running:
                break
            finished, _ = ray.wait(list(running), num_returns=1)
            for ref in finished:
                node, t0 = running.pop(ref)
                try:
                    res = ray.get(ref)
                except Exception as err:  # the task itself died (worker crash, OOM kill, ...)
                    record_failure(node, one_line(err), traceback.format_exc(), time.time() - t0)
                    continue
                if res.get("ok"):
                    record_success(node, res, float(res["duration_s"]))
                else:
                    record_failure(node, res["error"], res["traceback"], float(res["duration_s"]))
    except BaseException as err:  # KeyboardInterrupt, or a store error: leave records consistent
        interrupted = err
        for ref, (node, t0) in list(running.items()):
            _safe(f"cancel {node.name}", ray.cancel, ref, force=False, recursive=True)
            record_failure(
                node,
                f"interrupted: {one_line(err)}",
                "".join(traceback.format_exception(err)),
                time.time() - t0,
            )
        running.clear()

    for node in graph:
        if node.name not in outcomes:
            outcomes[node.name] = StageOutcome(
                node.name, "not_run", attempts=states[node.name].attempts
            )
    ok = len(done) == len(graph) and interrupted is None
    status = "succeeded" if ok else "failed"
    error = None
    if not ok:
        first = next((o for o in outcomes.values() if o.status == "failed"), None)
        error = f"stage {first.name} failed: {first.error}" if first else "interrupted"
    if isinstance(interrupted, Exception):
        error = f"run failed: {one_line(interrupted)}"
    try:
        store.update_run(run_id, status=status, error=error)
    except Exception as err:  # noqa: BLE001 - e.g. the disk is full: say so, keep the cause
        log.error("run %s: cannot record its end (%s): %s", run_id, status, one_line(err))
        if interrupted is None:
            interrupted = err
    if tracker is not None and parent_id is not None:
        _safe("end parent run", tracker.end, parent_id, "FINISHED" if ok else "FAILED")
    gap = tracker.gap(sink_dropped[0]) if tracker is not None else None
    if gap is not None:
        log.warning("tracking: %s", gap)
        _safe("record the tracking gap", store.update_run, run_id, tracking_gap=gap)
    summary = RunSummary(
        run_id=run_id,
        status=status,
        stages={n.name: outcomes[n.name] for n in graph},
        duration_s=time.time() - t_run,
        mlflow_run_id=parent_id,
    )
    (log.info if ok else log.error)("%s", summary.message())
    if isinstance(interrupted, Exception):  # a store error (disk full, read-only, ...): one line
        raise RunError(f"run {run_id} failed: {one_line(interrupted)}") from interrupted
    if interrupted is not None:
        raise interrupted
    return summary
