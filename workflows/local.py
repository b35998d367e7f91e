"""The whole pipeline in this process, on one device: no Ray, no MLflow, no run records.

``contrastive local CONFIG`` walks the same stage graph as ``contrastive run``
(:func:`workflows.dag.build_graph`, in topological order) and calls the same stage functions
(:func:`workflows.stages.stage_function`) with the same inputs, each with a
:class:`pipeline.runtime.LocalContext` on one device. What it leaves out is what Ray and MLflow
add: parallel stages, workers, durable stage records, resume, ``--reuse`` and tracking. It is for a
quick check of a config, a debugger, and a single-GPU machine where Ray is not installed (the
full-width GPU measurement in BENCHMARKS.md was made this way).

Output, under ``out_dir``: one folder per stage (``shard/``, ``pretrain/``, ``finetune@0.1/``...,
``evaluate/`` with ``report.md`` / ``report.json`` / plots) and ``summary.json``: the device, the
config, and per stage its wall seconds, metrics and outputs. Nothing here imports Ray or MLflow.

On the CPU each stage runs with the intra-op threads that ``contrastive run`` gives its worker
(``resources``, ``resources.stages``): it computes the same numbers as ``contrastive run`` (checked
on the demo config: every number of the report equal). On a GPU the host-side work (kNN, linear
probes, plots) uses torch's default threads, and cuDNN's autotuner is on (fixed batch shapes).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_write_json, atomic_write_text
from pipeline.config import Config
from pipeline.data.sources import DataError
from pipeline.errors import UserError
from pipeline.runtime import LocalContext, StageResult
from pipeline.slices import ShardSlice, slice_for
from workflows.dag import StageNode, build_graph
from workflows.stages import stage_function, stage_inputs, stage_params

__all__ = ["LocalRunError", "resolve_device", "run_local"]

log = logging.getLogger(__name__)


class LocalRunError(UserError, ValueError):
    """A local run that cannot start (unavailable device, a Tune stage) or a stage that stopped
    on bad input or a diverged loss; one line naming the stage."""


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LocalRunError(f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LocalRunError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LocalRunError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise LocalRunError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def _run_stage(
    node: StageNode,
    cfg: Config,
    outputs: dict[str, dict[str, str]],
    out_dir: Path,
    device: torch.device,
    started_at: float,
) -> StageResult:
    stage_dir = out_dir / node.name
    if node.kind == "shard":
        from pipeline.stages import shard

        return shard.run(ShardSlice.of(cfg), stage_dir)
    inputs = stage_inputs(node, {name: outputs[up] for name, up in node.deps.items()})
    params = stage_params(node, started_at)
    # A fresh checkpoint folder per stage: a local run never resumes an earlier attempt.
    ctx = LocalContext(stage_dir / "checkpoints", device=device)
    ctx.clear()
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The intra-op threads `contrastive run` gives this stage's worker (resources.stages):
        # the same reductions in the same order, so the same numbers as a Ray run.
        torch.set_num_threads(cfg.resources.for_stage(node.kind).threads)
    try:
        settings = slice_for(node.kind, cfg)
        return stage_function(node.kind)(settings, inputs, str(stage_dir), ctx, **params)
    finally:
        torch.set_num_threads(threads)
        ctx.clear()


def run_local(
    cfg: Config,
    out_dir: str | Path,
    device: str | torch.device = "auto",
    on_stage: Any = None,
) -> dict[str, Any]:
    """Run every stage of ``cfg``'s graph in order in this process; returns the summary (also
    written to ``out_dir/summary.json``). ``on_stage(name, seconds, result)`` is called after each
    stage. Raises :class:`LocalRunError` for a config with a Tune stage or an unavailable device."""
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    graph = build_graph(cfg)
    if "tune" in graph:
        raise LocalRunError(
            "tune.enabled: a Tune search needs Ray; use `contrastive run`, or --set tune.enabled=false"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if dev.type == "cuda":
        # Every stage feeds fixed-size batches: let cuDNN pick the fastest algorithm per shape.
        torch.backends.cudnn.benchmark = True
    started = time.time()
    summary: dict[str, Any] = {
        "config": cfg.name,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "tf32": {
            "cudnn": bool(torch.backends.cudnn.allow_tf32),
            "matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        },
        "stages": {},
    }
    outputs: dict[str, dict[str, str]] = {}
    for node in graph.topological_order():
        t0 = time.perf_counter()
        log.info("local: stage %s on %s", node.name, dev)
        try:
            result = _run_stage(node, cfg, outputs, out, dev, started)
        except (DataError, FloatingPointError) as err:  # bad input, diverged training: one line
            raise LocalRunError(f"stage {node.name}: {str(err).splitlines()[0]}") from err
        seconds = time.perf_counter() - t0
        outputs[node.name] = result.outputs
        summary["stages"][node.name] = {
            "seconds": round(seconds, 2),
            "metrics": result.metrics,
            "outputs": result.outputs,
        }
        if on_stage is not None:
            on_stage(node.name, seconds, result)
    summary["wall_seconds"] = round(time.time() - started, 2)
    atomic_write_json(out / "summary.json", summary, indent=1, default=float)
    atomic_write_text(out / "config.yaml", cfg.to_yaml())
    return summary
