"""Running a search: resources, the tuner, a new search or a continued one, the finish.

:func:`run_search` starts (or continues, or returns) the search in a folder; ``best.yaml``,
``search.json``, the plots and the MLflow parent run are written when the fit ends.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import ray
import yaml
from ray import tune

from pipeline.atomic import atomic_write_text
from pipeline.config import Config, ConfigError, parse_config
from workflows.tracking import Tracker, TrackingError
from workflows.tune.callback import Recorder
from workflows.tune.errors import TuneError
from workflows.tune.plots import plot_rows
from workflows.tune.reconcile import reconcile
from workflows.tune.rows import FINAL, TrialRow, best_row, read_rows
from workflows.tune.space import (
    METRIC,
    PARAMS,
    apply_params,
    check_config,
    param_space,
    trial_resources,
)
from workflows.tune.store import (
    BEST_FILE,
    EXPERIMENT_DIR,
    SEARCH_FILE,
    TRIALS_FILE,
    check_search_id,
    plain,
    read_json,
    update_search,
)
from workflows.tune.trial import trainable

log = logging.getLogger("workflows.tune")

__all__ = ["check_resources", "continue_search", "ensure_ray", "run_search", "searcher"]


# -- resources and the tuner --------------------------------------------------------------------
def ensure_ray() -> None:
    """A private local Ray unless already connected (``contrastive tune --address`` connects
    first); never an attachment to another cluster on the machine."""
    if not ray.is_initialized():
        ray.init(
            address="local", include_dashboard=False, configure_logging=False, log_to_driver=False
        )


def check_resources(cfg: Config) -> dict[str, float]:
    """Raise a one-line :class:`TuneError` unless some live Ray node can hold one trial.

    Without this, Tune would wait forever for resources no node has. Returns the cluster's total
    CPUs and GPUs (``{"CPU": n, "GPU": m}``).
    """
    need = trial_resources(cfg)
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    fits = [
        r for r in nodes if r.get("CPU", 0.0) >= need["cpu"] and r.get("GPU", 0.0) >= need["gpu"]
    ]
    if not fits:
        cpu = max((r.get("CPU", 0.0) for r in nodes), default=0.0)
        gpu = max((r.get("GPU", 0.0) for r in nodes), default=0.0)
        ask = f"{need['cpu']:g} CPUs" + (f" and {need['gpu']:g} GPU" if need["gpu"] else "")
        raise TuneError(
            f"tune: a trial asks {ask} but no Ray node has that (largest node: {cpu:g} CPUs, "
            f"{gpu:g} GPUs); lower resources.cpus_per_worker or set resources.use_gpu=false"
        )
    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}


def searcher(cfg: Config) -> Any:
    """The search algorithm named by ``tune.search_alg``, seeded with ``tune.seed``; a missing
    optional package is a one-line error."""
    alg, seed = cfg.tune.search_alg, cfg.tune.seed
    if alg == "random":
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=seed)
    if alg == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise TuneError(
                "tune: tune.search_alg=optuna needs the optuna package: pip install optuna "
                "(or pip install 'contrastive-pipeline[tune]')"
            ) from None
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    try:
        import hyperopt  # noqa: F401
    except ImportError:
        raise TuneError(
            "tune: tune.search_alg=hyperopt needs the hyperopt package: pip install hyperopt"
        ) from None
    from ray.tune.search.hyperopt import HyperOptSearch

    return HyperOptSearch(random_state_seed=seed)


def _tune_config(cfg: Config) -> tune.TuneConfig:
    from ray.tune.schedulers import ASHAScheduler

    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=cfg.tune.epochs,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
    )
    return tune.TuneConfig(
        metric=METRIC,
        mode="max",
        search_alg=searcher(cfg),
        scheduler=scheduler,
        num_samples=cfg.tune.num_trials,
        reuse_actors=True,
    )


def _quiet_tune() -> None:
    """Silence Tune's "snapshotting triggered multiple times" warning: with ``num_to_keep=1``
    every epoch's checkpoint forces a (cheap, local) snapshot, which is intended here."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _new_tuner(cfg: Config, base: dict[str, Any], dataset: str, d: Path, rec: Recorder) -> Any:
    _quiet_tune()
    return tune.Tuner(
        trainable(base, dataset, cfg),
        param_space=param_space(cfg),
        tune_config=_tune_config(cfg),
        run_config=tune.RunConfig(
            name=EXPERIMENT_DIR,
            storage_path=str(d),
            failure_config=tune.FailureConfig(max_failures=cfg.resources.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=[rec],
            verbose=0,
        ),
    )


# -- the finish ---------------------------------------------------------------------------------
def _write_best(d: Path, base: dict[str, Any], row: TrialRow, search_id: str) -> str:
    raw = apply_params(base, row.params)
    parse_config(raw)
    header = (
        f"# Best configuration of Tune search {search_id}: trial {row.index} "
        f"({row.trial_id}), val kNN top-1 {row.best_knn:.2f}% after "
        f"{row.epochs_run} epoch(s).\n"
        f"# contrastive run --from-tune {search_id}   (or: contrastive run {d / BEST_FILE})\n"
    )
    path = d / BEST_FILE
    atomic_write_text(path, header + yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _incomplete(rows: list[TrialRow], info: dict[str, Any]) -> tuple[str, str, str] | None:
    """``(why, search state, MLflow status)`` when the search did not finish; else None."""
    unfinished = [r for r in rows if r.state not in FINAL]
    errors = [r for r in rows if r.state == "error"]
    missing = max(0, int(info.get("num_trials", len(rows))) - len(rows)) + len(unfinished)
    if missing:
        return f"interrupted with {missing} trial(s) unfinished", "interrupted", "KILLED"
    if errors:
        return f"{len(errors)} of {len(rows)} trials failed", "failed", "FAILED"
    if best_row(rows) is None:
        return "no trial reported a val kNN", "failed", "FAILED"
    return None


def _log_best(rec: Recorder, d: Path, best: TrialRow, plots: list[str], own: bool) -> None:
    """Tag the best trial's run and the parent run; log the best kNN, plots and tables."""
    tr, parent = rec.tracker(), rec.parent_run_id
    if tr is None or not parent:
        return
    rid = best.mlflow_run_id
    if rid:
        rec.quietly(tr.set_tags, rid, {"best": "true"})
    tags = {"tune_search_id": d.name, "tune_state": "finished", "tune_best_trial": best.trial_id}
    if rid:
        tags["tune_best_run_id"] = rid
    rec.quietly(tr.set_tags, parent, tags)
    rec.quietly(tr.log_metrics, parent, {"best_val_knn_top1": best.best_knn}, 0)
    for p in plots:
        rec.quietly(tr.log_artifact, parent, p, "plots")
    for f in (TRIALS_FILE, BEST_FILE):
        rec.quietly(tr.log_artifact, parent, str(d / f), "tune")
    if own:
        rec.quietly(tr.end, parent, "FINISHED")


def _fit(tuner: Any, rec: Recorder, d: Path, own_parent: bool) -> Any:
    """``tuner.fit()``; a failure or Ctrl-C is recorded in ``search.json`` (and MLflow) first."""
    try:
        return tuner.fit()
    except KeyboardInterrupt:
        update_search(d, state="interrupted")
        raise
    except Exception as err:
        update_search(d, state="failed", error=str(err).splitlines()[0] if str(err) else "")
        tr = rec.tracker()
        if tr is not None and own_parent:
            rec.quietly(tr.end, rec.parent_run_id, "FAILED")
        raise


def _fit_and_finish(
    tuner: Any, rec: Recorder, d: Path, base: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """Run the tuner, then reconcile the table, write best.yaml and plots, close MLflow."""
    search_id, own = info["search_id"], bool(info.get("own_parent"))
    rows = reconcile(rec, _fit(tuner, rec, d, own))
    plots = plot_rows(rows, d / "plots")
    stop = _incomplete(rows, info)
    if stop is not None:
        why, state, status = stop
        msg = (
            f"tune: search {search_id} is incomplete: {why}; contrastive tune --resume {search_id}"
        )
        update_search(d, state=state, error=msg)
        tr = rec.tracker()
        if tr is not None and rec.parent_run_id and own:
            rec.quietly(tr.set_tags, rec.parent_run_id, {"tune_state": state})
            rec.quietly(tr.end, rec.parent_run_id, status)
        raise TuneError(msg, exit_code=1)
    best = best_row(rows)
    assert best is not None
    best_path = _write_best(d, base, best, search_id)
    best_out: dict[str, Any] = {PARAMS[k]: v for k, v in best.params.items()}
    best_out.update(knn_top1=best.best_knn, trial_id=best.trial_id, trial_index=best.index)
    update_search(d, state="finished", best=best_out, best_config=best_path, error=None)
    _log_best(rec, d, best, plots, own)
    return {
        "best_config": best_path,
        "best": best_out,
        "search_dir": str(d),
        "search_id": search_id,
        "trials": rows,
    }


# -- starting and continuing --------------------------------------------------------------------
def _stored_result(d: Path, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "best_config": str(d / BEST_FILE),
        "best": dict(info.get("best") or {}),
        "search_dir": str(d),
        "search_id": d.name,
        "trials": read_rows(d),
    }


def continue_search(d: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Continue the search recorded in ``d``: Tune restores it (finished trials stay finished,
    errored and unfinished ones continue from their last checkpoint), then it is finished."""
    try:
        cfg = parse_config(info.get("config"))
    except ConfigError as err:
        raise TuneError(f"tune: {d / SEARCH_FILE}: {err}") from None
    dataset = str(info.get("dataset") or "")
    if not (Path(dataset) / "dataset.json").is_file():
        raise TuneError(f"tune: the shards of search {d.name} are gone ({dataset or '?'})")
    searcher(cfg)
    ensure_ray()
    check_resources(cfg)
    tracking = info.get("tracking") or {}
    rec = Recorder.for_search(d, cfg.tune.epochs, tracking)
    tr = rec.tracker()
    if tr is not None and tracking.get("own_parent"):
        rec.quietly(tr.resume_run, rec.parent_run_id)
    base = cfg.to_dict()
    exp = str(d / EXPERIMENT_DIR)
    if tune.Tuner.can_restore(exp):
        _quiet_tune()
        tuner = tune.Tuner.restore(
            exp, trainable=trainable(base, dataset, cfg), resume_errored=True
        )
    else:  # stopped before Tune wrote its state: no trial had finished, start them anew
        shutil.rmtree(exp, ignore_errors=True)
        tuner = _new_tuner(cfg, base, dataset, d, rec)
    info = update_search(d, state="running", error=None)
    info["own_parent"] = bool(tracking.get("own_parent"))
    log.info("tune: resuming search %s", d.name)
    return _fit_and_finish(tuner, rec, d, base, info)


def _start_tracking(
    cfg: Config, tracker: Tracker | None, parent_run_id: str | None, search_id: str
) -> dict[str, Any] | None:
    """The search's tracking (as ``search.json`` holds it); creates the parent run unless the
    caller gave one. None when tracking is off."""
    if tracker is None:
        try:
            tracker = Tracker.from_config(cfg)
        except TrackingError as err:
            raise TuneError(str(err)) from None
    if tracker is None:
        return None
    try:
        tracker.check_reachable()
    except TrackingError as err:
        raise TuneError(str(err)) from None
    own_parent = parent_run_id is None
    if parent_run_id is None:
        parent_run_id = tracker.start_parent(f"tune-{search_id}", cfg)
        tracker.set_tags(parent_run_id, {"tune_search_id": search_id, "kind": "tune"})
    return {
        "uri": tracker.uri,
        "experiment": tracker.experiment,
        "parent_run_id": parent_run_id,
        "own_parent": own_parent,
    }


def _start(d: Path, cfg: Config, dataset_dir: str, tracking: dict[str, Any] | None) -> Any:
    """Record a new search in ``search.json``; returns what it holds."""
    info = update_search(
        d,
        search_id=d.name,
        state="running",
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        config=cfg.to_dict(),
        dataset=str(Path(dataset_dir).resolve()),
        experiment=str(d / EXPERIMENT_DIR),
        num_trials=cfg.tune.num_trials,
        tracking=tracking,
        best=None,
        error=None,
    )
    info["own_parent"] = bool(tracking and tracking["own_parent"])
    return info


def run_search(
    cfg: Config,
    dataset_dir: str,
    search_dir: str | os.PathLike[str],
    tracker: Tracker | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """Run the search of ``cfg.tune`` on the shards in ``dataset_dir``, into ``search_dir``.

    ``tracker`` defaults to ``Tracker.from_config(cfg)`` (None when tracking is off). With
    ``parent_run_id`` (e.g. the tune node's run in a pipeline) the trial runs nest under it and it
    is left open; otherwise a parent run named after the search is created and ended here.
    Call it from the driver (or a task holding no CPUs): the trials need the cluster's CPUs.

    Idempotent: if ``search_dir`` already holds a search with the same config, a finished one is
    returned as it is and an unfinished one is continued (finished trials are not rerun).

    Returns ``{"best_config": <search_dir>/best.yaml, "best": {"pretrain.temperature": ...,
    "model.head_depth": ..., "augment.strength": ..., ["pretrain.lr": ...,] "knn_top1": ...,
    "trial_id": ..., "trial_index": ...}, "search_dir", "search_id", "trials": [TrialRow]}``.
    Raises :class:`TuneError` (one line) on bad input, missing resources or failed trials.
    """
    d = Path(search_dir).expanduser().resolve()
    check_search_id(d.name)
    if not (Path(dataset_dir) / "dataset.json").is_file():
        raise TuneError(f"tune: {dataset_dir} holds no shards (no dataset.json)")
    check_config(cfg)
    searcher(cfg)  # a missing optional package fails here, before any work
    base = cfg.to_dict()
    old = read_json(d / SEARCH_FILE)
    if isinstance(old, dict):
        if plain(old.get("config")) != plain(base):
            raise TuneError(f"tune: {d} holds a search with another config; use a new folder")
        if old.get("state") == "finished" and (d / BEST_FILE).is_file():
            return _stored_result(d, old)
        return continue_search(d, old)
    ensure_ray()
    check_resources(cfg)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "config.yaml", cfg.to_yaml())
    tracking = _start_tracking(cfg, tracker, parent_run_id, d.name)
    info = _start(d, cfg, dataset_dir, tracking)
    rec = Recorder.for_search(d, cfg.tune.epochs, tracking)
    tuner = _new_tuner(cfg, base, info["dataset"], d, rec)
    log.info(
        "tune: search %s: %d trials x %d epochs, %s search, ASHA (grace %d, rf %d), %s per trial",
        d.name,
        cfg.tune.num_trials,
        cfg.tune.epochs,
        cfg.tune.search_alg,
        cfg.tune.grace_period,
        cfg.tune.reduction_factor,
        trial_resources(cfg),
    )
    return _fit_and_finish(tuner, rec, d, base, info)
