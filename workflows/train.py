"""Running a training stage on Ray: Ray Train for several workers, a Ray task for one.

Every training stage is a plain function ``run(cfg, inputs, out_dir, ctx, **params)`` in
``pipeline.stages``. Here it gets a :class:`pipeline.runtime.TrainContext` backed by Ray:

* ``resources.num_workers > 1``: a ``TorchTrainer`` (gloo on CPU, nccl on GPU) with
  ``RunConfig(storage_path=<stage folder>/ray)`` and ``FailureConfig(max_failures)``; the loop
  restores from ``ray.train.get_checkpoint()`` after a worker failure; BatchNorm is synchronised
  and the loss gathers views across workers (both done by the stage when world_size > 1).
* ``resources.num_workers == 1``: a Ray task with the worker's CPUs/GPU and ``max_retries``;
  no process group is needed, which saves the ~20 s a ``TorchTrainer`` costs per stage on CPU.

Either way rank 0 also writes the checkpoint durably as ``<stage folder>/checkpoints/latest.pt``,
so ``contrastive resume`` continues an interrupted stage after the driver itself was killed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from pipeline.config import Config
from pipeline.runtime import StageResult, atomic_torch_save, atomic_write_text, load_checkpoint_file

log = logging.getLogger(__name__)

__all__ = ["RayTrainContext", "TaskContext", "run_training_stage"]

StageFn = Callable[..., StageResult]
RESULT_FILE = "result.json"
_PROGRESS = ("epoch", "loss", "views_per_s", "images_per_s", "val_knn_top1", "val_top1")


def _set_threads(cfg: Config) -> None:
    torch.set_num_threads(cfg.resources.threads)


class _Durable:
    """Rank 0's copy of the latest checkpoint in the stage folder, and the metrics sink."""

    def __init__(self, checkpoint_dir: str, sink: Callable[[dict, int], None] | None) -> None:
        self.path = Path(checkpoint_dir) / "latest.pt"
        self.sink = sink

    def save(self, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self.path)

    def load(self) -> dict[str, Any] | None:
        if self.path.is_file():
            return load_checkpoint_file(self.path)
        return None

    def close(self) -> int:
        """Flush the metrics sink (a bounded wait); returns the points it could not send."""
        close = getattr(self.sink, "close", None)
        return int(close()) if callable(close) else 0

    def log(self, metrics: dict[str, Any]) -> None:
        # one progress line per epoch; Ray forwards worker output to the driver's terminal
        shown = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in metrics.items()
            if k in _PROGRESS and isinstance(v, (int, float))
        )
        print(f"[{self.path.parent.parent.name}] {shown}", flush=True)
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

    def __init__(self, checkpoint_dir: str, sink=None, use_gpu: bool = False) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self._durable = _Durable(checkpoint_dir, sink)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> None:
        if checkpoint is not None:
            self._durable.save(checkpoint)
        self._durable.log(metrics)

    def load_checkpoint(self) -> dict[str, Any] | None:
        return self._durable.load()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)


class RayTrainContext:
    """A Ray Train worker: ``ray.train.report`` with checkpoints, ``get_checkpoint`` on restart."""

    def __init__(self, checkpoint_dir: str, sink=None) -> None:
        import ray.train
        import ray.train.torch

        tctx = ray.train.get_context()
        self.rank, self.world_size = tctx.get_world_rank(), tctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._durable = _Durable(checkpoint_dir, sink)

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> None:
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


def _write_result(out_dir: str, result: StageResult) -> None:
    atomic_write_text(
        Path(out_dir) / RESULT_FILE,
        json.dumps({"outputs": result.outputs, "metrics": result.metrics}, default=float),
    )


def _read_result(out_dir: str, history: list[dict[str, Any]]) -> StageResult:
    p = Path(out_dir) / RESULT_FILE
    if not p.is_file():
        raise RuntimeError(f"training stage finished without writing {p}")
    d = json.loads(p.read_text())
    return StageResult(outputs=d["outputs"], metrics=d["metrics"], history=history)


def _train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    cfg: Config = config["cfg"]
    _set_threads(cfg)
    ctx = RayTrainContext(config["checkpoint_dir"], config.get("sink"))
    try:
        result = config["fn"](cfg, config["inputs"], config["out_dir"], ctx, **config["params"])
    finally:
        dropped = ctx._durable.close()
    if ctx.rank == 0:
        _note_dropped(result, dropped)
        _write_result(config["out_dir"], result)


def _task_body(
    fn: StageFn,
    cfg: Config,
    inputs: dict[str, str],
    out_dir: str,
    params: dict[str, Any],
    checkpoint_dir: str,
    sink,
) -> StageResult:
    _set_threads(cfg)
    ctx = TaskContext(checkpoint_dir, sink, use_gpu=cfg.resources.use_gpu)
    try:
        result = fn(cfg, inputs, out_dir, ctx, **params)
    finally:
        dropped = ctx._durable.close()
    _note_dropped(result, dropped)
    result.history = list(result.history)
    return result


def run_training_stage(
    fn: StageFn,
    cfg: Config,
    inputs: dict[str, str],
    out_dir: str,
    params: dict[str, Any] | None = None,
    sink: Callable[[dict, int], None] | None = None,
    num_workers: int | None = None,
) -> StageResult:
    """Run ``fn`` on Ray with ``resources.num_workers`` workers (or ``num_workers``)."""
    params = params or {}
    res = cfg.resources
    workers = num_workers or res.num_workers
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_dir = str(out.parent / "checkpoints")
    if workers == 1:
        task = ray.remote(_task_body).options(
            num_cpus=res.cpus_per_worker,
            num_gpus=1 if res.use_gpu else 0,
            max_retries=res.max_failures,
            retry_exceptions=False,
        )
        return ray.get(task.remote(fn, cfg, inputs, out_dir, params, checkpoint_dir, sink))

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "fn": fn,
            "cfg": cfg,
            "inputs": inputs,
            "out_dir": out_dir,
            "params": params,
            "checkpoint_dir": checkpoint_dir,
            "sink": sink,
        },
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker},
        ),
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=RunConfig(
            name="train",
            storage_path=str(out.parent / "ray"),
            failure_config=FailureConfig(max_failures=res.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    history: list[dict[str, Any]] = []
    hist = out / "history.json"
    if hist.is_file():
        history = json.loads(hist.read_text())
    return _read_result(out_dir, history)
