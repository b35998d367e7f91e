"""Running a training stage on Ray: Ray Train for several workers, a Ray task for one.

Every training stage is a plain function ``run(settings, inputs, out_dir, ctx, **params)`` in
``pipeline.stages``. Here it gets a :class:`pipeline.runtime.TrainContext` backed by Ray:

* ``resources.num_workers > 1``: a ``TorchTrainer`` (gloo on CPU, nccl on GPU) with
  ``RunConfig(storage_path=<stage folder>/ray)`` and ``FailureConfig(max_failures)``; the loop
  restores from ``ray.train.get_checkpoint()`` after a worker failure; BatchNorm is synchronised
  and the loss gathers views across workers (both done by the stage when world_size > 1).
* ``resources.num_workers == 1``: a Ray task with the worker's CPUs/GPU and ``max_retries``;
  no process group is needed, which saves the ~20 s a ``TorchTrainer`` costs per stage on CPU.

Either way rank 0 also writes the checkpoint durably as ``<stage folder>/checkpoints/latest.pt``
in the run's storage (a local path or an object-store URI, see :mod:`workflows.stageio`), so
``contrastive resume`` continues an interrupted stage after the driver itself was killed or the
node it ran on was lost.

With the run on an object store every task and worker resolves its inputs from storage on its own
node (:func:`workflows.stageio.materialize_inputs`), writes into a local scratch folder, and rank 0
uploads that folder to ``<stage folder>/out`` before returning; the coordinator then copies the
(small) outputs back for its digest and MLflow.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.atomic import atomic_write_text
from pipeline.config import ResourcesConfig
from pipeline.runtime import HistoryRow, StageResult, load_checkpoint_file
from pipeline.slices import StageSlice
from workflows import stageio

log = logging.getLogger(__name__)

__all__ = ["RayTrainContext", "TaskContext", "TrainJob", "run_training_stage"]

StageFn = Callable[..., StageResult]
#: Receives each epoch's numeric metrics and the epoch (e.g. :class:`workflows.tracking` 's
#: buffered MLflow logger).
MetricsSink = Callable[[dict[str, float], int], None]
RESULT_FILE = "result.json"
_PROGRESS = ("epoch", "loss", "views_per_s", "images_per_s", "val_knn_top1", "val_top1")


def _set_threads(resources: ResourcesConfig) -> None:
    torch.set_num_threads(resources.threads)


class _Durable:
    """Rank 0's copy of the latest checkpoint in the stage folder, and the metrics sink."""

    def __init__(self, checkpoint_dir: str, sink: MetricsSink | None) -> None:
        self.path = stageio.join(checkpoint_dir, "latest.pt")  # a local path or a URI
        base = checkpoint_dir.partition("?")[0].rstrip("/")
        self.stage = posixpath.basename(posixpath.dirname(base)) or "stage"
        self.sink = sink

    def save(self, state: dict[str, Any]) -> None:
        stageio.save_torch(state, self.path)

    def load(self) -> dict[str, Any] | None:
        return stageio.load_torch(self.path)

    def close(self) -> int:
        """Flush the metrics sink (a bounded wait); returns the points it could not send."""
        close = getattr(self.sink, "close", None)
        return int(close()) if callable(close) else 0

    def log(self, metrics: HistoryRow) -> None:
        # one progress line per epoch; Ray forwards worker output to the driver's terminal
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if k in _PROGRESS and isinstance(v, (int, float))
        )
        print(f"[{self.stage}] {shown}", flush=True)
        if self.sink is not None:
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            self.sink(numeric, int(metrics.get("epoch", 0)))


def _note_dropped(result: StageResult, dropped: int) -> None:
    """Metric points the sink dropped go into the result as ``tracking_dropped_points``, which
    the runner takes out of the metrics and into the run's tracking gap."""
    if dropped:
        result.metrics["tracking_dropped_points"] = float(dropped)


class TaskContext:
    """One worker inside a Ray task: no process group."""

    def __init__(
        self, checkpoint_dir: str, sink: MetricsSink | None = None, use_gpu: bool = False
    ) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self._durable = _Durable(checkpoint_dir, sink)

    def report(self, metrics: HistoryRow, checkpoint: dict[str, Any] | None = None) -> None:
        if checkpoint is not None:
            self._durable.save(checkpoint)
        self._durable.log(metrics)

    def load_checkpoint(self) -> dict[str, Any] | None:
        return self._durable.load()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


class RayTrainContext:
    """A Ray Train worker: ``ray.train.report`` with checkpoints, ``get_checkpoint`` on restart."""

    def __init__(self, checkpoint_dir: str, sink: MetricsSink | None = None) -> None:
        import ray.train
        import ray.train.torch

        tctx = ray.train.get_context()
        self.rank, self.world_size = tctx.get_world_rank(), tctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._durable = _Durable(checkpoint_dir, sink)

    def report(self, metrics: HistoryRow, checkpoint: dict[str, Any] | None = None) -> None:
        import ray.train

        clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
        if checkpoint is not None and self.rank == 0:
            self._durable.save(checkpoint)
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(checkpoint, os.path.join(tmp, "state.pt"))
                ray.train.report(clean, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(clean)
        if self.rank == 0:
            self._durable.log(metrics)

    def load_checkpoint(self) -> dict[str, Any] | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is not None:
            with ckpt.as_directory() as d:
                return load_checkpoint_file(os.path.join(d, "state.pt"))
        return self._durable.load()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.world_size > 1:
            return ray.train.torch.prepare_model(model)
        return model.to(self.device)


WorkerContext = TaskContext | RayTrainContext


def _write_result(out_dir: str, result: StageResult) -> None:
    atomic_write_text(
        Path(out_dir) / RESULT_FILE,
        json.dumps({"outputs": result.outputs, "metrics": result.metrics}, default=float),
    )


def _read_result(out_dir: str, history: list[HistoryRow]) -> StageResult:
    p = Path(out_dir) / RESULT_FILE
    if not p.is_file():
        raise RuntimeError(f"training stage finished without writing {p}")
    d = json.loads(p.read_text())
    return StageResult(outputs=d["outputs"], metrics=d["metrics"], history=history)


@dataclass(frozen=True)
class TrainJob:
    """What every worker of a training stage runs (picklable): the stage function and its
    arguments (``settings``: the kind's config slice), the resources it runs with (after the
    kind's overrides), where checkpoints go, the metrics sink, and ``upload_to`` (the stage's
    output folder on an object store, or None when ``out_dir`` is shared storage)."""

    fn: StageFn
    settings: StageSlice
    resources: ResourcesConfig
    inputs: dict[str, str]
    out_dir: str
    params: dict[str, Any]
    checkpoint_dir: str
    sink: MetricsSink | None = None
    upload_to: str | None = None


def _call(job: TrainJob, inputs: dict[str, str], out_dir: str, ctx: WorkerContext) -> StageResult:
    """The stage function, then its metrics sink flushed (a bounded wait, also when it fails);
    points the sink could not send are noted in the result."""
    try:
        result = job.fn(job.settings, inputs, out_dir, ctx, **job.params)
    finally:
        dropped = ctx._durable.close()
    _note_dropped(result, dropped)
    return result


def _run_here(job: TrainJob, ctx: WorkerContext, write_result: bool) -> StageResult:
    """Run the stage function on this node: inputs resolved here; with ``job.upload_to`` it
    writes into a local scratch folder that rank 0 uploads there, and the outputs it returns are
    the paths they will have under ``job.out_dir`` once the coordinator has copied them back."""
    local_inputs = stageio.materialize_inputs(job.inputs)
    if job.upload_to is None:
        result = _call(job, local_inputs, job.out_dir, ctx)
        if write_result and ctx.rank == 0:
            _write_result(job.out_dir, result)
        return result
    scratch = tempfile.mkdtemp(prefix="contrastive-out-")
    try:
        result = _call(job, local_inputs, scratch, ctx)
        result.outputs = {
            k: os.path.join(job.out_dir, os.path.relpath(os.path.join(scratch, v), scratch))
            for k, v in result.outputs.items()
        }
        if ctx.rank == 0:
            if write_result:
                _write_result(scratch, result)
            stageio.upload_dir(scratch, job.upload_to)
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_worker(job: TrainJob, ray_train: bool = False) -> StageResult:
    """One worker of a training stage: a Ray task (``ray_train`` false: the result is returned)
    or a Ray Train worker (rank 0 also writes it to ``result.json`` in the outputs)."""
    _set_threads(job.resources)
    ctx: WorkerContext
    if ray_train:
        ctx = RayTrainContext(job.checkpoint_dir, job.sink)
    else:
        ctx = TaskContext(job.checkpoint_dir, job.sink, use_gpu=job.resources.use_gpu)
    result = _run_here(job, ctx, write_result=ray_train)
    result.history = list(result.history)
    return result


def _train_loop(config: dict[str, TrainJob]) -> None:
    """Ray Train's entry point (its ``train_loop_config`` is ``{"job": TrainJob}``)."""
    _run_worker(config["job"], ray_train=True)


def _run_as_task(job: TrainJob) -> StageResult:
    res = job.resources
    task = ray.remote(_run_worker).options(
        num_cpus=res.cpus_per_worker,
        num_gpus=1 if res.use_gpu else 0,
        max_retries=res.max_failures,
        retry_exceptions=False,
    )
    result: StageResult = ray.get(task.remote(job))
    if job.upload_to is not None:
        stageio.download_dir(job.upload_to, job.out_dir)
    return result


def _run_with_ray_train(job: TrainJob, workers: int, stage_dir: str) -> StageResult:
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    res = job.resources
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"job": job},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=RunConfig(
            name="train",
            storage_path=stageio.join(stage_dir, "ray"),
            failure_config=FailureConfig(max_failures=res.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if job.upload_to is not None:
        stageio.download_dir(job.upload_to, job.out_dir)
    history: list[HistoryRow] = []
    hist = Path(job.out_dir) / "history.json"
    if hist.is_file():
        history = json.loads(hist.read_text())
    return _read_result(job.out_dir, history)


def run_training_stage(
    fn: StageFn,
    settings: StageSlice,
    resources: ResourcesConfig,
    inputs: dict[str, str],
    out_dir: str,
    params: dict[str, Any] | None = None,
    sink: MetricsSink | None = None,
    num_workers: int | None = None,
    stage_dir: str | None = None,
) -> StageResult:
    """Run ``fn(settings, inputs, out_dir, ctx, **params)`` on Ray with
    ``resources.num_workers`` workers (or ``num_workers``): one as a Ray task, more through Ray
    Train. ``resources`` are the stage kind's (``resources.for_stage(kind)``).

    ``inputs`` are local paths or URIs (resolved on the node that runs each worker).
    ``stage_dir`` is the stage's folder in the run's storage (default: ``out_dir``'s parent):
    checkpoints go to ``<stage_dir>/checkpoints``, Ray Train's state to ``<stage_dir>/ray``. When
    it is an object-store URI, ``out_dir`` is a local folder of this process: the workers upload
    their outputs to ``<stage_dir>/out`` and they are copied into ``out_dir`` at the end.
    """
    workers = num_workers or resources.num_workers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage_dir = stage_dir or str(out.parent)
    job = TrainJob(
        fn,
        settings,
        resources,
        inputs,
        out_dir,
        params or {},
        checkpoint_dir=stageio.join(stage_dir, "checkpoints"),
        sink=sink,
        upload_to=stageio.join(stage_dir, "out") if stageio.is_uri(stage_dir) else None,
    )
    if workers == 1:
        return _run_as_task(job)
    return _run_with_ray_train(job, workers, stage_dir)
