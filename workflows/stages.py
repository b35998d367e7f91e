"""How each kind of stage node is executed on Ray and recorded in MLflow.

:class:`StageExecutor` is the ``execute(node, inputs, out_dir, tracking_info)`` callable that
:func:`workflows.runner.run_graph` runs inside a stage's coordinator task:

==========  ======================================================  ===========================
kind        runs                                                    inputs (from upstream)
==========  ======================================================  ===========================
shard       :func:`workflows.sharding.shard_with_ray`               -
pretrain    ``pipeline.stages.pretrain.run`` on Ray Train / a task  dataset
finetune    ``pipeline.stages.finetune.run(fraction=p)``            dataset, pretrain
baseline    ``pipeline.stages.finetune.run(fraction=p, baseline)``  dataset
distill     ``pipeline.stages.distill.run(fraction=p)``             dataset, teacher
evaluate    ``pipeline.stages.evaluate.run`` (one worker)           dataset, pretrain, models
==========  ======================================================  ===========================

Upstream outputs are mapped to the paths a stage function takes: the ``dataset`` input is the
shard folder, every other input the upstream's ``model`` file. With the run on an object store
these are URIs, resolved on the node that runs the training task
(:func:`workflows.stageio.materialize_input`); the stage's checkpoints live in the run's storage.

MLflow (when tracking is on): per-epoch metrics stream from the training workers through a
:class:`workflows.tracking.MetricsSink`; afterwards the stage's run receives its config slice
(``config.yaml``), history, reports and plots as artifacts, the final model file as a checkpoint
artifact, and the encoder / teacher / baseline / student through ``mlflow.pytorch.log_model``
(a logged model linked to the run, loadable with ``mlflow.pytorch.load_model``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, cast

import torch
import yaml

from pipeline.atomic import atomic_write_text
from pipeline.config import Config
from pipeline.errors import first_line
from pipeline.runtime import StageResult
from pipeline.slices import slice_for
from workflows import stageio
from workflows.dag import StageNode, build_graph, compute_keys, stage_config

if TYPE_CHECKING:
    from workflows.tracking import Tracker, TrackingInfo

__all__ = ["MODEL_NAMES", "StageExecutor", "stage_function", "stage_inputs", "stage_params"]

log = logging.getLogger(__name__)

#: What the model a stage kind produces is called in MLflow.
MODEL_NAMES = {
    "pretrain": "encoder",
    "finetune": "teacher",
    "baseline": "baseline",
    "distill": "student",
}
_KEY_FILE = "cache_key"


def stage_function(kind: str) -> Any:
    """The ``pipeline.stages`` function that runs a training-like stage kind: it takes the kind's
    config slice (:func:`pipeline.slices.slice_for`), its inputs, out_dir and context."""
    from pipeline.stages import distill, evaluate, finetune, pretrain

    fns = {
        "pretrain": pretrain.run,
        "finetune": finetune.run,
        "baseline": finetune.run,
        "distill": distill.run,
        "evaluate": evaluate.run,
    }
    if kind not in fns:
        raise ValueError(f"stage kind {kind!r} has no stage function (known: {sorted(fns)})")
    return fns[kind]


def stage_params(node: StageNode, started_at: float | None) -> dict[str, Any]:
    """The keyword arguments of a node's stage function beyond (slice, inputs, out_dir, ctx):
    ``fraction``, ``baseline`` and (evaluate) ``started_at``, the run's start time."""
    params: dict[str, Any] = {}
    if "fraction" in node.params:
        params["fraction"] = float(node.params["fraction"])
    if node.kind == "baseline":
        params["baseline"] = True
    if node.kind == "evaluate":
        params["started_at"] = started_at
    return params


def stage_inputs(node: StageNode, inputs: dict[str, dict[str, str]]) -> dict[str, str]:
    """Upstream manifests' outputs -> the paths a stage function takes (the tune node's output
    is not a stage input: it changes the stage's config, see :func:`tuned_config`)."""
    out: dict[str, str] = {}
    for name, outputs in inputs.items():
        if name == "tune":
            continue
        want = "dataset" if name == "dataset" else "model"
        if want not in outputs:
            raise ValueError(
                f"stage {node.name}: input {name!r} has no {want!r} output "
                f"(upstream outputs: {sorted(outputs)})"
            )
        out[name] = outputs[want]
    return out


def tuned_config(cfg: Config, inputs: dict[str, dict[str, str]]) -> Config:
    """``cfg`` with the best values of the pipeline's Tune search applied (when it has one), as
    ``contrastive tune`` applies them (:func:`workflows.tune.apply_values`)."""
    if "tune" not in inputs:
        return cfg
    from pipeline.config import parse_config
    from workflows.tune import apply_values

    best = json.loads(stageio.read_text(inputs["tune"]["best_params"]))
    return parse_config(apply_values(cfg.to_dict(), best))


def _run_tune(
    cfg: Config, dataset_dir: str, out_dir: str, info: TrackingInfo | None
) -> StageResult:
    """The search as the first node of the graph: trials nest under this stage's MLflow run."""
    from workflows.tune import PARAMS, run_search

    tracker = parent = None
    if info is not None:
        from workflows.tracking import Tracker

        tracker = Tracker(info.uri, info.experiment or cfg.tracking.experiment)
        parent = info.run_id
    res = run_search(cfg, dataset_dir, Path(out_dir) / "search", tracker, parent)
    best = {k: v for k, v in res["best"].items() if k in PARAMS.values()}
    best_file = Path(out_dir) / "best_params.json"
    atomic_write_text(best_file, json.dumps(best, indent=1))
    metrics = {"best_knn_top1": float(res["best"]["knn_top1"]), "trials": float(len(res["trials"]))}
    outputs = {
        "best_params": str(best_file),
        "best_config": str(res["best_config"]),
        "search": str(res["search_dir"]),
    }
    return StageResult(outputs=outputs, metrics=metrics, history=[])


def _guard_checkpoints(checkpoint_dir: str, key: str) -> None:
    """Drop checkpoints an earlier attempt left under a *different* cache key (config changed).
    ``checkpoint_dir`` is a local path or an object-store URI."""
    marker = stageio.join(checkpoint_dir, _KEY_FILE)
    if not stageio.is_uri(checkpoint_dir):
        d = Path(checkpoint_dir)
        if d.is_dir() and (not Path(marker).is_file() or Path(marker).read_text().strip() != key):
            if any(p.name != _KEY_FILE for p in d.iterdir()):
                log.info("checkpoints in %s are from another config; starting afresh", d)
            shutil.rmtree(d, ignore_errors=True)
        atomic_write_text(marker, key + "\n")
        return
    old = stageio.read_text(marker).strip() if stageio.exists(marker) else None
    if old != key:
        if stageio.exists(stageio.join(checkpoint_dir, "latest.pt")):
            log.info("checkpoints in %s are from another config; starting afresh", checkpoint_dir)
        stageio.remove_tree(checkpoint_dir)
        stageio.write_text(marker, key + "\n")


class StageExecutor:
    """Runs one stage node of a pipeline run (picklable: it is sent to the stage's Ray task).

    ``started_at`` (epoch seconds) is when the pipeline run started; the evaluate stage reports
    the wall time since then. ``run_id`` names the run in ``cfg.storage.root``: a stage's
    checkpoints then live in ``<run>/stages/<stage>/checkpoints`` there (an object store
    included); without it, next to the ``out_dir`` it is given.
    """

    def __init__(
        self,
        cfg: Config,
        started_at: float | None = None,
        run_id: str | None = None,
        progress: Any = None,
    ) -> None:
        self.cfg = cfg
        self.started_at = started_at if started_at is not None else time.time()
        self.run_id = run_id
        self.progress = progress  # a workflows.progress board actor, or None
        self._keys: dict[str, str] | None = None

    def stage_dir(self, node: StageNode, out_dir: str) -> str:
        """The stage's folder in the run's storage (a local path or a URI)."""
        if self.run_id is None:
            return str(Path(out_dir).parent)
        from workflows.state import RunStore

        store = RunStore(self.cfg.storage.root)
        return store.uri(store.stage_dir(self.run_id, node.name))

    def cpus(self, node: StageNode) -> float:
        """The CPUs the stage's work holds while it runs (its training task, or its Ray Train
        workers: ``num_workers`` x ``cpus_per_worker`` after ``resources.stages``; evaluation
        runs one worker), for the runner's CPU budget. 0 for sharding and the search, whose many
        short tasks come and go (each is alone on its level of the graph)."""
        if node.kind in ("shard", "tune"):
            return 0.0
        res = self.cfg.resources.for_stage(node.kind)
        workers = 1 if node.kind == "evaluate" else res.num_workers
        return float(workers * res.cpus_per_worker)

    def cache_key(self, node: StageNode) -> str:
        if self._keys is None:
            self._keys = compute_keys(build_graph(self.cfg), self.cfg)
        return self._keys.get(node.name, "")

    def __call__(
        self,
        node: StageNode,
        inputs: dict[str, dict[str, str]],
        out_dir: str,
        tracking_info: TrackingInfo | None = None,
    ) -> StageResult:
        from workflows.progress import LOG_FILE, StageLog

        log_path = str(Path(out_dir).parent / LOG_FILE)
        with StageLog(log_path):
            return self._run(node, inputs, out_dir, tracking_info, log_path)

    def _run(
        self,
        node: StageNode,
        inputs: dict[str, dict[str, str]],
        out_dir: str,
        tracking_info: TrackingInfo | None,
        log_path: str,
    ) -> StageResult:
        from workflows.progress import LoggedStageFn, ProgressSink

        cfg = tuned_config(self.cfg, inputs)
        sink: Callable[[dict[str, float], int], None] | None = None
        if tracking_info is not None:
            sink = tracking_info.sink()
        if self.progress is not None:
            sink = ProgressSink(self.progress, node.name, sink)
        if node.kind == "shard":
            from workflows.sharding import shard_with_ray

            # on object storage out_dir is this node's scratch: shard tasks elsewhere send bytes
            result = shard_with_ray(
                cfg, out_dir, ship_bytes=stageio.is_uri(self.stage_dir(node, out_dir))
            )
        elif node.kind == "tune":
            # the trials read the dataset in this node's cache (one copy for every trial)
            dataset = stageio.materialize_input("dataset", inputs["dataset"]["dataset"])
            return _run_tune(cfg, dataset, out_dir, tracking_info)
        else:
            from workflows.train import run_training_stage

            stage_dir = self.stage_dir(node, out_dir)
            _guard_checkpoints(stageio.join(stage_dir, "checkpoints"), self.cache_key(node))
            params = stage_params(node, self.started_at)
            workers = 1 if node.kind == "evaluate" else None
            result = run_training_stage(
                LoggedStageFn(stage_function(node.kind), log_path),
                slice_for(node.kind, cfg),
                cfg.resources.for_stage(node.kind),
                stage_inputs(node, inputs),
                out_dir,
                params=params,
                sink=sink,
                num_workers=workers,
                stage_dir=stage_dir,
            )
        if tracking_info is not None:
            dataset_dir = (inputs.get("dataset") or {}).get("dataset")
            _log_stage(cfg, node, result, out_dir, tracking_info, dataset_dir)
        return result


def _log_stage(
    cfg: Config,
    node: StageNode,
    result: StageResult,
    out_dir: str,
    info: TrackingInfo,
    dataset_dir: str | None,
) -> None:
    """:func:`log_stage_to_mlflow`; a failure is a warning (tracking problems never fail a
    finished stage) whose MLflow error has any URI password redacted."""
    from workflows.tracking import error_line

    try:
        log_stage_to_mlflow(cfg, node, result, out_dir, info, dataset_dir)
    except Exception as err:  # noqa: BLE001 - MLflow's errors are not one type
        log.warning("tracking: logging stage %s failed: %s", node.name, error_line(err))


class DatasetRef(TypedDict):
    """The data a stage read, as MLflow links it to runs and models."""

    name: str
    digest: str
    source: str


def log_stage_to_mlflow(
    cfg: Config,
    node: StageNode,
    result: StageResult,
    out_dir: str,
    info: TrackingInfo,
    dataset_dir: str | None = None,
) -> None:
    """Artifacts and models of a finished stage into its MLflow run ``info.run_id``."""
    from workflows.tracking import Tracker

    tracker = Tracker(info.uri, info.experiment or cfg.tracking.experiment)
    rid = info.run_id
    slice_path = Path(out_dir).parent / "mlflow" / "config.yaml"
    atomic_write_text(
        slice_path,
        yaml.safe_dump(stage_config(node, cfg), sort_keys=False, default_flow_style=None),
    )
    tracker.log_artifact(rid, str(slice_path))
    data, shape = None, None
    if dataset_dir:
        data, shape = _log_dataset(tracker, rid, cfg, node, dataset_dir)
    outs = result.outputs
    if node.kind in ("shard", "evaluate"):
        _log_files(tracker, rid, node.kind, outs)
        return
    if "history" in outs:
        tracker.log_artifact(rid, outs["history"])
    if "model" in outs:
        tracker.log_artifact(rid, outs["model"], "checkpoint")
        uri = log_torch_model(
            info,
            outs["model"],
            MODEL_NAMES.get(node.kind, "model"),
            node.kind,
            shape,
            metrics=result.metrics,
            dataset=data,
            step=int((result.history or [{}])[-1].get("epoch", len(result.history))),
        )
        if node.kind in REGISTERED_KINDS:
            digest = data["digest"] if data else ""
            register_stage_model(tracker, cfg, node, rid, uri, digest)


def _log_dataset(
    tracker: Tracker, rid: str, cfg: Config, node: StageNode, dataset_dir: str
) -> tuple[DatasetRef, tuple[int, int, int] | None]:
    """Record the stage's dataset as an input of run ``rid``; returns it and, for images of one
    size (or a crop size), the ``(C, H, W)`` of a model signature."""
    d = json.loads(stageio.read_text(stageio.join(dataset_dir, "dataset.json")))
    size = cfg.augment.image_size or d.get("height")
    shape = None
    if size and d.get("channels"):
        shape = (int(d["channels"]), int(size), int(size))
    data = DatasetRef(name=cfg.data.source, digest=str(d.get("digest", "")), source=dataset_dir)
    try:
        tracker.log_dataset(
            rid,
            data["name"],
            data["digest"],
            dataset_dir,
            d.get("counts", {}).get("train"),
            "evaluation" if node.kind == "evaluate" else "training",
        )
    except Exception as err:  # the run's input record only: the model and files still go
        log.warning("tracking: stage %s: dataset input not logged: %s", node.name, first_line(err))
    return data, shape


def _log_files(tracker: Tracker, rid: str, kind: str, outs: dict[str, str]) -> None:
    """The files of a stage without a model: the shard stage's dataset description (its
    manifest below 50 MiB), the evaluate stage's history and reports."""
    if kind == "shard":
        for key in ("dataset_json", "skipped"):
            if key in outs and os.path.isfile(outs[key]):
                tracker.log_artifact(rid, outs[key], "dataset")
        if "manifest" in outs and os.path.getsize(outs["manifest"]) < 50 << 20:
            tracker.log_artifact(rid, outs["manifest"], "dataset")
        return
    if "history" in outs:
        tracker.log_artifact(rid, outs["history"])
    for path in outs.values():
        if os.path.isfile(path):
            tracker.log_artifact(rid, path, "report")


#: Stage kinds whose models go to the Model Registry, one registered model per config name,
#: kind and label fraction (e.g. ``demo-student-1pct``), a version per pipeline run.
REGISTERED_KINDS = {"finetune": "teacher", "distill": "student"}


def registered_name(cfg: Config, node: StageNode) -> str:
    """``<config>-<teacher|student>-<fraction>pct``, e.g. ``demo-teacher-0.1pct``."""
    from pipeline.data import format_fraction

    frac = node.params.get("fraction")
    tail = f"-{format_fraction(float(frac))}pct" if frac is not None else ""
    return f"{cfg.name}-{REGISTERED_KINDS[node.kind]}{tail}"


def register_stage_model(
    tracker: Any, cfg: Config, node: StageNode, run_id: str, model_uri: str, digest: str
) -> Any:
    """A new version of the stage's registered model, tagged with its pipeline run and data."""
    import mlflow

    tags = tracker.client.get_run(run_id).data.tags
    version_tags = {
        "pipeline_run_id": tags.get("pipeline_run_id", ""),
        "stage": node.name,
        "data_digest": digest,
        "cache_key": tags.get("cache_key", ""),
    }
    mlflow.set_tracking_uri(tracker.uri)
    return mlflow.register_model(model_uri, registered_name(cfg, node), tags=version_tags)


def log_torch_model(
    info: TrackingInfo,
    model_file: str,
    name: str,
    kind: str,
    input_shape: tuple[int, ...] | None = None,
    metrics: dict[str, float] | None = None,
    dataset: DatasetRef | None = None,
    step: int = 0,
) -> str:
    """``mlflow.pytorch.log_model`` of the module saved in ``model_file``, inside run
    ``info.run_id``; the pretrain stage logs only the encoder. With ``input_shape`` (C, H, W) a
    normalised example batch gives the model a signature. The key metric of ``metrics`` (the
    stage's final ones) is logged as ``final_<name>`` linked to the model and, with ``dataset``
    (name, digest, source), to the data, so the model's page names its dataset. Returns the
    model URI.

    The module is saved whole (pickle format, the only one that keeps an eager module loadable
    with ``mlflow.pytorch.load_model``); MLflow's generic warning about loading pickles is kept
    out of the output because these models are only loaded from the pipeline's own store."""
    import mlflow
    import mlflow.pytorch

    from pipeline.models import load_model

    module: torch.nn.Module = load_model(model_file)
    if kind == "pretrain":
        module = cast(torch.nn.Module, module.encoder)
    mlflow.set_tracking_uri(info.uri)
    pickle_note = _DropMessage("Saving pytorch model by Pickle")
    torch_log = logging.getLogger("mlflow.pytorch")
    torch_log.addFilter(pickle_note)
    try:
        with mlflow.start_run(run_id=info.run_id, nested=True):
            logged = mlflow.pytorch.log_model(
                module, name=name, **_log_model_kwargs(kind, input_shape)
            )
            _log_final_metric(logged.model_id, metrics or {}, dataset, step)
    finally:
        torch_log.removeFilter(pickle_note)
    return str(logged.model_uri)


def _log_model_kwargs(kind: str, input_shape: tuple[int, ...] | None) -> dict[str, Any]:
    import numpy as np

    from workflows.tracking import SOURCE_NAME

    kwargs: dict[str, Any] = {
        # explicit requirements: inferring them costs a model reload in a subprocess
        "pip_requirements": [f"torch=={torch.__version__.split('+')[0]}", "contrastive-pipeline"],
        "serialization_format": "pickle",
        "tags": {"mlflow.source.name": f"{SOURCE_NAME}: {kind}", "mlflow.source.type": "LOCAL"},
    }
    if input_shape is not None:
        kwargs["input_example"] = np.zeros((2, *input_shape), dtype=np.float32)
    return kwargs


def _log_final_metric(
    model_id: str, metrics: dict[str, float], dataset: DatasetRef | None, step: int
) -> None:
    """The stage's key metric once more as ``final_<name>``, linked to the model and the data
    (its per-epoch curve is in the run already), in the active MLflow run."""
    import mlflow
    from mlflow.entities import Dataset

    from workflows.tracking import is_count

    key = next((k for k in metrics if not is_count(k)), None)
    if key is None:
        return
    ds = None
    if dataset:
        ds = Dataset(
            name=dataset["name"],
            digest=dataset["digest"][:36],
            source_type="local",
            source=json.dumps({"uri": dataset["source"]}),
        )
    mlflow.log_metrics(
        {f"final_{key}": float(metrics[key])}, step=step, model_id=model_id, dataset=ds
    )


class _DropMessage(logging.Filter):
    """Drop log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)
