"""A stage's Ray task: the coordinator that runs one stage and reports how it went.

Each ready stage runs as a Ray task with ``num_cpus=0`` (a coordinator: the real work inside asks
for its own resources, e.g. a Ray Train trainer), pinned to the driver's node. It calls the
stage's ``execute``, checks what that returned (:func:`_normalize`: outputs inside the stage's out
dir, numeric metrics), hashes the outputs (:func:`workflows.digests.digest_outputs`), and returns a
:class:`TaskResult`; it never raises, and it writes no run record (the driver does, from the
result).

Object-store storage: the coordinator passes the upstream outputs on as URIs, and whoever uses an
input resolves it on its own node (:func:`workflows.stageio.materialize_input`; the training
tasks do that on the node they run on). The stage writes into a local scratch folder of the
coordinator (training tasks upload theirs from their own node, see :mod:`workflows.train`); the
coordinator uploads that folder to ``stages/<name>/out/`` before the driver writes the manifest,
whose outputs are URIs of real objects under it.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs
import ray

from pipeline.runtime import HistoryRow
from workflows.dag import StageNode
from workflows.digests import digest_outputs
from workflows.runtypes import Execute, Inputs, RunError, one_line
from workflows.state import RunStore

if TYPE_CHECKING:
    from workflows.tracking import TrackingInfo

__all__ = ["TaskResult", "stage_task_body", "submit_stage"]


def _normalize(
    result: object, node: StageNode, out_dir: str
) -> tuple[dict[str, str], dict[str, float], list[HistoryRow]]:
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
    history: list[HistoryRow] = field(default_factory=list)
    digest: str = ""
    output_digests: dict[str, str] = field(default_factory=dict)
    error: str = ""
    traceback: str = ""


def stage_task_body(
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
        digest, digests = digest_outputs(outputs)
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


#: The Ray task of :func:`stage_task_body` (at module level: Ray pickles it by reference).
_stage_task = ray.remote(num_cpus=0, max_retries=0)(stage_task_body)


def _driver_node_strategy() -> object:
    """Pin the (CPU-free) stage coordinators to the driver's node, so that losing a worker node
    only takes training work with it (retried from checkpoints), never a stage's bookkeeping."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:  # e.g. a client connection without a local node
        return "DEFAULT"
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)


def submit_stage(
    execute: Execute,
    node: StageNode,
    inputs: Inputs,
    out_dir: str,
    tracking_info: TrackingInfo | None,
    store: RunStore,
    env: Mapping[str, str],
) -> ray.ObjectRef:
    """Start the stage's Ray task (a CPU-free coordinator on the driver's node); ``env``: the
    environment variables of the task, inherited by the stage's own tasks and Train workers."""
    options: dict[str, Any] = {
        "name": f"stage:{node.name}",
        "scheduling_strategy": _driver_node_strategy(),
    }
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return _stage_task.options(**options).remote(
        execute, node, inputs, out_dir, tracking_info, store
    )
