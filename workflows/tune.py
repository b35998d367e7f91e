"""Ray Tune search over the pretraining temperature, the projection-head depth, the augmentation
strength and (optionally) the learning rate.

Each trial is a short run of :func:`pipeline.stages.pretrain.run` on the search's shards, in one
process with ``resources.cpus_per_worker`` CPUs (and one GPU with ``resources.use_gpu``), reporting
the val kNN top-1 every epoch through :class:`TuneTrialContext`; an ASHA scheduler stops weak
trials at its rungs. Trials run concurrently as far as the cluster's resources allow; a trial that
no node can hold is a one-line error before anything starts.

A search lives in ``<storage.root>/tune/<search_id>/``::

    search.json        id, state (running | finished | failed | interrupted), config, dataset, MLflow ids
    config.yaml        the resolved config the search started from
    dataset/           the shards (``search``), or search.json names an existing shard folder
    experiment/        the Ray Tune experiment (RunConfig storage), what ``resume`` restores
    trials.json        the results table: one row per trial (params, history, best kNN, state)
    best.yaml          a full config with the best values and ``tune.enabled: false``
    plots/             val kNN vs temperature and vs head depth (also logged to MLflow)

MLflow: a parent run for the search (or the caller's run), a nested child run per trial with its
sampled params, per-epoch metrics and a ``trial_state`` tag (completed / stopped_early / error);
the best trial's run is tagged ``best: true``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import ray
import torch
import yaml
from ray import tune

from pipeline.config import Config, ConfigError, parse_config
from pipeline.runtime import atomic_write_text
from pipeline.stages import pretrain
from workflows.tracking import Tracker, TrackingError

log = logging.getLogger(__name__)

__all__ = [
    "METRIC",
    "PARAMS",
    "TuneError",
    "TuneTrialContext",
    "apply_params",
    "best_config_path",
    "check_resources",
    "format_table",
    "param_space",
    "resume",
    "run_search",
    "search",
    "show",
    "trial_config",
]

METRIC = "val_knn_top1"
"""What every trial reports each epoch and ASHA compares (val kNN top-1, percent)."""

PARAMS: dict[str, str] = {
    "temperature": "pretrain.temperature",
    "head_depth": "model.head_depth",
    "strength": "augment.strength",
    "lr": "pretrain.lr",
}
"""Search-space names -> the config fields they set."""

EXPERIMENT_DIR = "experiment"
SEARCH_FILE = "search.json"
TRIALS_FILE = "trials.json"
BEST_FILE = "best.yaml"
FAULT_FILE = ".inject-failure.json"
"""Fault injection for tests: ``{"trial_index": i, "after_epoch": e}`` in the search folder makes
trial ``i`` raise once, right after reporting epoch ``e`` (the file is consumed)."""

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class TuneError(click.ClickException, ValueError):
    """A search problem; ``str(err)`` is one line. The CLI prints it as ``error: ...``.

    ``exit_code`` is 2 for bad input (the default) and 1 for a search that failed or stopped.
    """

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


# -- search folder ------------------------------------------------------------------------------
def new_search_id() -> str:
    """A fresh, sortable search id: ``YYYYmmdd-HHMMSS-xxxx``."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def search_dir(storage_root: str, search_id: str) -> Path:
    """``<storage_root>/tune/<search_id>``; a malformed id or a URI root is a one-line error."""
    if not _ID.match(search_id or ""):
        raise TuneError(f"tune: {search_id!r} is not a search id (letters, digits, . _ -)")
    if "://" in str(storage_root):
        raise TuneError(f"tune: storage.root must be a local or shared path (got {storage_root})")
    return Path(storage_root).expanduser().resolve() / "tune" / search_id


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as err:
        raise TuneError(f"tune: {path} is not valid JSON ({err.msg})") from None


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):  # numpy scalars
        return v.item()
    return str(v)


def _load_search(storage_root: str, search_id: str) -> tuple[Path, dict[str, Any]]:
    d = search_dir(storage_root, search_id)
    info = _read_json(d / SEARCH_FILE)
    if not isinstance(info, dict):
        raise TuneError(f"tune: no search {search_id} under {Path(storage_root) / 'tune'}")
    return d, info


def _update_search(d: Path, **fields: Any) -> dict[str, Any]:
    info = _read_json(d / SEARCH_FILE) or {}
    info.update(fields)
    info["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    _write_json(d / SEARCH_FILE, info)
    return info


# -- space, configs, resources ------------------------------------------------------------------
def param_space(cfg: Config) -> dict[str, Any]:
    """The Tune search space from ``cfg.tune``: log-uniform temperature (and lr, when a range is
    given), integer head depth (inclusive range), uniform augmentation strength."""
    tc = cfg.tune
    space: dict[str, Any] = {
        "temperature": tune.loguniform(*tc.temperature)
        if tc.temperature[0] < tc.temperature[1]
        else tc.temperature[0],
        "head_depth": tune.randint(tc.head_depth[0], tc.head_depth[1] + 1)
        if tc.head_depth[0] < tc.head_depth[1]
        else int(tc.head_depth[0]),
        "strength": tune.uniform(*tc.strength)
        if tc.strength[0] < tc.strength[1]
        else tc.strength[0],
    }
    if tc.lr is not None:
        space["lr"] = tune.loguniform(*tc.lr) if tc.lr[0] < tc.lr[1] else tc.lr[0]
    return space


def _clean_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The sampled values as plain Python numbers (head depth an int), search-space names only."""
    out: dict[str, Any] = {}
    for name in PARAMS:
        if name in params and params[name] is not None:
            v = params[name]
            v = v.item() if hasattr(v, "item") else v
            out[name] = int(v) if name == "head_depth" else float(v)
    return out


def apply_params(base: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A full config dict: ``base`` with the sampled values set and ``tune.enabled`` false.

    ``finetune.from_head_layer`` is lowered to the head depth when it would exceed it (the config
    requires ``from_head_layer <= head_depth``). Raises :class:`TuneError` if the result is not a
    valid config.
    """
    raw = json.loads(json.dumps(dict(base), default=_json_default))
    for name, value in _clean_params(params).items():
        section, key = PARAMS[name].split(".")
        raw.setdefault(section, {})[key] = value
    depth = raw.get("model", {}).get("head_depth")
    ft = raw.setdefault("finetune", {})
    if depth is not None and int(ft.get("from_head_layer", 1)) > int(depth):
        ft["from_head_layer"] = int(depth)
    raw.setdefault("tune", {})["enabled"] = False
    try:
        parse_config(raw)
    except ConfigError as err:
        raise TuneError(f"tune: sampled values make a bad config: {err}") from None
    return raw


def trial_config(base: Mapping[str, Any], params: Mapping[str, Any]) -> Config:
    """The config one trial pretrains with: :func:`apply_params`, ``pretrain.epochs`` set to
    ``tune.epochs`` and the online val kNN every epoch (what ASHA compares)."""
    raw = apply_params(base, params)
    raw["pretrain"]["epochs"] = int(raw.get("tune", {}).get("epochs", 3))
    raw["pretrain"]["knn_every"] = 1
    return parse_config(raw)


def trial_resources(cfg: Config) -> dict[str, float]:
    """What one trial asks Ray for: ``resources.cpus_per_worker`` CPUs, and 1 GPU with
    ``resources.use_gpu`` (a trial is one worker process; ``resources.stages.pretrain`` applies)."""
    res = cfg.resources.for_stage("pretrain")
    return {
        "cpu": float(res.cpus_per_worker),
        "gpu": 1.0 if cfg.resources.use_gpu else 0.0,
    }


def check_resources(cfg: Config) -> dict[str, float]:
    """Raise a one-line :class:`TuneError` unless some live Ray node can hold one trial.

    Without this, Tune would wait forever for resources no node has. Returns the cluster's total
    CPUs and GPUs (``{"CPU": n, "GPU": m}``).
    """
    need = trial_resources(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    fits = [
        n
        for n in nodes
        if n.get("Resources", {}).get("CPU", 0.0) >= need["cpu"]
        and n.get("Resources", {}).get("GPU", 0.0) >= need["gpu"]
    ]
    if not fits:
        cpu = max((n.get("Resources", {}).get("CPU", 0.0) for n in nodes), default=0.0)
        gpu = max((n.get("Resources", {}).get("GPU", 0.0) for n in nodes), default=0.0)
        ask = f"{need['cpu']:g} CPUs" + (f" and {need['gpu']:g} GPU" if need["gpu"] else "")
        raise TuneError(
            f"tune: a trial asks {ask} but no Ray node has that (largest node: {cpu:g} CPUs, "
            f"{gpu:g} GPUs); lower resources.cpus_per_worker or set resources.use_gpu=false"
        )
    total = ray.cluster_resources()
    return {"CPU": float(total.get("CPU", 0.0)), "GPU": float(total.get("GPU", 0.0))}


def _searcher(cfg: Config) -> Any:
    """The search algorithm named by ``tune.search_alg``, seeded with ``tune.seed``."""
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


def _check_config(cfg: Config) -> None:
    if cfg.tune.grace_period > cfg.tune.epochs:
        raise TuneError(
            f"tune: tune.grace_period {cfg.tune.grace_period} exceeds tune.epochs {cfg.tune.epochs}"
        )
    # The base config must survive the round trip (apply_params, inside trial_config, raises
    # TuneError if not), and a trial's (pretrain.epochs = tune.epochs) must be valid too.
    try:
        trial_config(cfg.to_dict(), {})
    except ConfigError as err:
        raise TuneError(f"tune: with tune.epochs {cfg.tune.epochs} a trial's {err}") from None


# -- the trial ----------------------------------------------------------------------------------
def _trial_index(trial_id: str) -> int:
    """The trial's creation index from a random-search id (``<prefix>_00003`` -> 3); -1 for
    ids without one (model-based searchers use bare uuids)."""
    tail = trial_id.rsplit("_", 1)[-1] if "_" in trial_id else ""
    return int(tail) if tail.isdigit() else -1


class TuneTrialContext:
    """A :class:`pipeline.runtime.TrainContext` inside a Tune trial (one process).

    ``report`` -> ``ray.tune.report`` with the state as a Tune :class:`~ray.tune.Checkpoint`;
    ``load_checkpoint`` -> ``ray.tune.get_checkpoint()`` (set when Tune resumes the trial).
    """

    def __init__(self, use_gpu: bool = False, fault_file: str | None = None) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self._fault_file = fault_file

    def report(self, metrics: dict[str, Any], checkpoint: dict[str, Any] | None = None) -> None:
        """Report the numeric metrics (and the state as a checkpoint) to Tune."""
        clean = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if checkpoint is None:
            tune.report(clean)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(checkpoint, os.path.join(tmp, "state.pt"))
                tune.report(clean, checkpoint=tune.Checkpoint.from_directory(tmp))
        self._maybe_fail(int(metrics.get("epoch", 0)))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state of the trial's latest checkpoint, or None on a fresh start."""
        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            from pipeline.runtime import load_checkpoint_file

            return load_checkpoint_file(os.path.join(d, "state.pt"))

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model to the trial's device (one process: no wrapping)."""
        return model.to(self.device)

    def _maybe_fail(self, epoch: int) -> None:
        if not self._fault_file or not os.path.isfile(self._fault_file):
            return
        try:
            spec = json.loads(Path(self._fault_file).read_text())
        except (OSError, json.JSONDecodeError):
            return
        index = _trial_index(tune.get_context().get_trial_id())
        if spec.get("trial_index") != index or spec.get("after_epoch") != epoch:
            return
        claimed = f"{self._fault_file}.{index}.claimed"
        try:
            os.rename(self._fault_file, claimed)  # only one attempt wins
        except OSError:
            return
        raise RuntimeError(f"injected failure in trial {index} after epoch {epoch}")


def _trial(
    params: dict[str, Any], *, base: dict[str, Any], dataset_dir: str, search_dir: str
) -> None:
    """The Tune trainable: one short pretraining with the sampled ``params``."""
    cfg = trial_config(base, params)
    torch.set_num_threads(cfg.resources.for_stage("pretrain").threads)
    ctx = TuneTrialContext(cfg.resources.use_gpu, os.path.join(search_dir, FAULT_FILE))
    # Tune stops a trial at its last report (ASHA's max_t), so the stage's own outputs are not
    # relied on: the weights live in the trial's Tune checkpoints.
    pretrain.run(cfg, {"dataset": dataset_dir}, tune.get_context().get_trial_dir(), ctx)


def _trainable(cfg_dict: dict[str, Any], dataset_dir: str, d: Path, cfg: Config) -> Any:
    fn = tune.with_parameters(_trial, base=cfg_dict, dataset_dir=dataset_dir, search_dir=str(d))
    return tune.with_resources(fn, trial_resources(cfg))


# -- recording: results table + MLflow ----------------------------------------------------------
_HISTORY_KEYS = ("epoch", "loss", METRIC, "lr", "views_per_s", "epoch_seconds")


def _row_from_history(row: dict[str, Any], epochs: int) -> None:
    hist = row.get("history", [])
    knn = [h[METRIC] for h in hist if isinstance(h.get(METRIC), (int, float))]
    row["epochs_run"] = max((int(h.get("training_iteration", 0)) for h in hist), default=0)
    row["best_knn"] = max(knn) if knn else None
    row["last_knn"] = knn[-1] if knn else None
    row["epochs_total"] = epochs


class _Recorder(tune.Callback):
    """Driver-side Tune callback: keeps ``trials.json`` current and mirrors every trial into an
    MLflow child run (created on start, metrics per epoch, state tag on completion).

    It holds only strings (it is pickled into the Tune experiment and restored by ``resume``)
    and re-reads ``trials.json`` on first use, so a resumed search continues the same rows and
    MLflow runs.
    """

    def __init__(
        self,
        search_dir: str,
        epochs: int,
        tracking_uri: str | None,
        experiment: str | None,
        parent_run_id: str | None,
        search_id: str,
    ) -> None:
        self.search_dir = search_dir
        self.epochs = epochs
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.search_id = search_id
        self._rows: dict[str, dict[str, Any]] | None = None
        self._tracker: Tracker | None = None
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rows"], state["_tracker"], state["_warned"] = None, None, False
        return state

    # -- state ------------------------------------------------------------------------------
    @property
    def rows(self) -> dict[str, dict[str, Any]]:
        if self._rows is None:
            data = _read_json(Path(self.search_dir) / TRIALS_FILE) or []
            self._rows = {r["trial_id"]: r for r in data}
        return self._rows

    def save(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: (r.get("index", 0), r["trial_id"]))
        _write_json(Path(self.search_dir) / TRIALS_FILE, rows)

    def next_index(self, trial_id: str) -> int:
        """The index of a new row: the id's creation counter when it has one, else the next
        number in order of first sight."""
        index = _trial_index(trial_id)
        if index >= 0:
            return index
        return max((r.get("index", -1) for r in self.rows.values()), default=-1) + 1

    def _row(self, trial: Any) -> dict[str, Any]:
        tid = trial.trial_id
        row = self.rows.get(tid)
        if row is None:
            row = self.rows[tid] = {
                "trial_id": tid,
                "index": self.next_index(tid),
                "params": _clean_params(trial.config),
                "history": [],
                "state": "pending",
                "mlflow_run_id": None,
            }
            _row_from_history(row, self.epochs)
        return row

    def tracker(self) -> Tracker | None:
        if self.tracking_uri is None or self.parent_run_id is None:
            return None
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.experiment or "contrastive")
        return self._tracker

    def _mlflow(self, fn: Any, *args: Any) -> Any:
        """Call an MLflow action; tracking trouble is logged once and never stops the search."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - tracking must not kill trials
            if not self._warned:
                log.warning("tune: MLflow tracking failed: %s", str(err).splitlines()[0])
                self._warned = True
            return None

    def ensure_run(self, row: dict[str, Any]) -> str | None:
        """The trial's MLflow child run (created with its params on first sight)."""
        tr = self.tracker()
        if tr is None:
            return None
        if row.get("mlflow_run_id"):
            return row["mlflow_run_id"]

        def create() -> str:
            tags = {
                "mlflow.parentRunId": self.parent_run_id,
                "tune_search_id": self.search_id,
                "trial_id": row["trial_id"],
                "trial_index": str(row["index"]),
                "trial_state": row["state"],
            }
            run = tr.client.create_run(
                tr.experiment_id, run_name=f"trial-{row['index']:05d}", tags=tags
            )
            from mlflow.entities import Param

            params = [Param(PARAMS[k], str(v)) for k, v in row["params"].items()]
            params += [Param("trial_id", row["trial_id"]), Param("tune.epochs", str(self.epochs))]
            tr.client.log_batch(run.info.run_id, params=params)
            return run.info.run_id

        row["mlflow_run_id"] = self._mlflow(create)
        return row["mlflow_run_id"]

    def log_epoch(self, row: dict[str, Any], entry: dict[str, Any]) -> None:
        tr, rid = self.tracker(), row.get("mlflow_run_id")
        if tr is not None and rid:
            metrics = {k: v for k, v in entry.items() if k not in ("epoch", "training_iteration")}
            self._mlflow(tr.log_metrics, rid, metrics, int(entry.get("training_iteration", 0)))

    def finish(self, row: dict[str, Any], state: str) -> None:
        """Set the trial's final state in the table and in MLflow (tag + run status)."""
        row["state"] = state
        _row_from_history(row, self.epochs)
        tr = self.tracker()
        rid = self.ensure_run(row)
        if tr is not None and rid:
            self._mlflow(tr.set_tags, rid, {"trial_state": state})
            if row.get("best_knn") is not None:
                self._mlflow(
                    tr.log_metrics,
                    rid,
                    {"best_val_knn_top1": row["best_knn"], "epochs_run": row["epochs_run"]},
                    row["epochs_run"],
                )
            self._mlflow(tr.end, rid, "FAILED" if state == "error" else "FINISHED")

    # -- Tune hooks -------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self._row(trial)
        row["state"] = "running"
        rid = self.ensure_run(row)
        tr = self.tracker()
        if tr is not None and rid:
            self._mlflow(tr.resume_run, rid)
            self._mlflow(tr.set_tags, rid, {"trial_state": "running"})
        self.save()

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        row = self._row(trial)
        entry = {k: result[k] for k in _HISTORY_KEYS if isinstance(result.get(k), (int, float))}
        entry["training_iteration"] = int(result.get("training_iteration", 0))
        it = entry["training_iteration"]
        row["history"] = [h for h in row["history"] if h.get("training_iteration") != it]
        row["history"].append(entry)
        row["history"].sort(key=lambda h: h["training_iteration"])
        row["state"] = "running"
        _row_from_history(row, self.epochs)
        self.ensure_run(row)
        self.log_epoch(row, entry)
        self.save()
        log.info(
            "tune: trial %d epoch %d/%d val kNN %s",
            row["index"],
            it,
            self.epochs,
            f"{entry[METRIC]:.1f}%" if METRIC in entry else "-",
        )

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self._row(trial)
        _row_from_history(row, self.epochs)
        state = "completed" if row["epochs_run"] >= self.epochs else "stopped_early"
        self.finish(row, state)
        self.save()
        log.info("tune: trial %d %s after %d epochs", row["index"], state, row["epochs_run"])

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self._row(trial)
        self.finish(row, "error")
        self.save()
        log.warning("tune: trial %d failed after %d epochs", row["index"], row["epochs_run"])


# -- after the fit ------------------------------------------------------------------------------
_FINAL = ("completed", "stopped_early", "error")


def _tune_trials(grid: Any, experiment: Path) -> list[tuple[str | None, str | None, Any]]:
    """``(trial_id, status, result)`` for every trial of a fit.

    The status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) is the one in the experiment state
    Tune saved on disk, which is what a restore acts on: after an interrupted fit (Ctrl-C) the
    in-memory trials look terminated while the saved state says RUNNING. None when unknown.
    """
    saved: dict[str, str] = {}
    try:
        saved = {t.trial_id: t.status for t in tune.ExperimentAnalysis(str(experiment)).trials}
    except Exception as err:  # noqa: BLE001 - fall back to the in-memory view
        log.debug("tune: cannot read the saved experiment state: %s", err)
    analysis = getattr(grid, "_experiment_analysis", None)
    trials = list(getattr(analysis, "trials", None) or [])
    out = []
    for i, result in enumerate(grid):
        trial = trials[i] if i < len(trials) else None
        tid = (
            trial.trial_id
            if trial is not None
            else (result.metrics or {}).get("trial_id") or _trial_id_from_path(result.path)
        )
        status = saved.get(tid or "") or (trial.status if trial is not None else None)
        if status is None and result.error is not None:
            status = "ERROR"
        out.append((tid, status, result))
    return out


def _reconcile(rec: _Recorder, grid: Any) -> list[dict[str, Any]]:
    """Make the table agree with Tune's view of the trials after a fit.

    A trial Tune calls TERMINATED is completed (all epochs) or stopped early (fewer); ERROR is an
    error; anything else (the fit was interrupted) is ``interrupted`` and its MLflow run KILLED.
    """
    for tid, status, result in _tune_trials(grid, Path(rec.search_dir) / EXPERIMENT_DIR):
        if not tid:
            continue
        row = rec.rows.get(tid)
        if row is None:  # the driver died before the callback saw it: rebuild from Tune's log
            row = rec.rows[tid] = {
                "trial_id": tid,
                "index": rec.next_index(tid),
                "params": _clean_params(result.config or {}),
                "history": [],
                "state": "pending",
                "mlflow_run_id": None,
            }
        df = result.metrics_dataframe
        seen = {h.get("training_iteration") for h in row["history"]}
        if df is not None and len(df) and "training_iteration" in df.columns:
            # Tune's own log; a trial restarted from an older checkpoint repeats iterations there
            keep = [k for k in (*_HISTORY_KEYS, "training_iteration") if k in df.columns]
            latest: dict[int, dict[str, Any]] = {}
            for r in df[keep].to_dict("records"):
                entry = {
                    k: float(v)
                    for k, v in r.items()
                    if k != "training_iteration" and not math.isnan(float(v))
                }
                latest[int(r["training_iteration"])] = {
                    **entry,
                    "training_iteration": int(r["training_iteration"]),
                }
            missing = [latest[i] for i in sorted(latest) if i not in seen]
            if missing:  # the driver died before the callback logged these
                row["history"] = sorted(
                    [*row["history"], *missing], key=lambda h: h["training_iteration"]
                )
                rec.ensure_run(row)
                for entry in missing:
                    rec.log_epoch(row, entry)
        _row_from_history(row, rec.epochs)
        if status == "ERROR" or (status is None and result.error is not None):
            state = "error"
        elif status == "TERMINATED" or (status is None and row.get("state") in _FINAL):
            state = "completed" if row["epochs_run"] >= rec.epochs else "stopped_early"
        else:
            state = "interrupted"
        if row.get("state") != state:
            if state == "interrupted":
                row["state"] = state
                tr, rid = rec.tracker(), row.get("mlflow_run_id")
                if tr is not None and rid:
                    rec._mlflow(tr.set_tags, rid, {"trial_state": state})
                    rec._mlflow(tr.end, rid, "KILLED")
            else:
                rec.finish(row, state)
    rec.save()
    return sorted(rec.rows.values(), key=lambda r: (r["index"], r["trial_id"]))


def _trial_id_from_path(path: str | None) -> str | None:
    if not path:
        return None
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(str(path)))
    return m.group(1) if m else None


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The trial with the highest val kNN (over its epochs); ties go to more epochs, then the
    earlier trial. None when no trial reported a kNN."""
    scored = [r for r in rows if r.get("best_knn") is not None and r.get("state") != "error"]
    if not scored:
        return None
    return max(scored, key=lambda r: (r["best_knn"], r["epochs_run"], -r["index"]))


def _write_best(d: Path, base: dict[str, Any], row: dict[str, Any], search_id: str) -> str:
    raw = apply_params(base, row["params"])
    parse_config(raw)
    header = (
        f"# Best configuration of Tune search {search_id}: trial {row['index']} "
        f"({row['trial_id']}), val kNN top-1 {row['best_knn']:.2f}% after "
        f"{row['epochs_run']} epoch(s).\n"
        f"# contrastive run --from-tune {search_id}   (or: contrastive run {d / BEST_FILE})\n"
    )
    path = d / BEST_FILE
    atomic_write_text(path, header + yaml.safe_dump(raw, sort_keys=False))
    return str(path)


def _plots(rows: list[dict[str, Any]], out: Path) -> list[str]:
    """val kNN (best per trial) vs temperature and vs head depth, as PNGs; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, NullFormatter

    pts = [r for r in rows if r.get("best_knn") is not None]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, xlabel, logx in (
        ("temperature", "temperature (log scale)", True),
        ("head_depth", "projection-head depth", False),
    ):
        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for label, marker, colour in (
            ("completed", "o", "tab:blue"),
            ("stopped_early", "x", "tab:red"),
            ("unfinished", ".", "tab:grey"),
        ):
            sel = [
                r
                for r in pts
                if name in r["params"]
                and (r.get("state") if r.get("state") in _FINAL[:2] else "unfinished") == label
            ]
            if sel:
                ax.scatter(
                    [r["params"][name] for r in sel],
                    [r["best_knn"] for r in sel],
                    marker=marker,
                    c=colour,
                    label=label.replace("_", " "),
                )
        if logx:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("best val kNN top-1 (%)")
        ax.set_title(f"val kNN vs {name.replace('_', ' ')}")
        if pts:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"knn_vs_{name}.png"
        fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{path.name}.", suffix=".png")
        os.close(fd)
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, path)
        paths.append(str(path))
    return paths


# -- running ------------------------------------------------------------------------------------
def _ensure_ray() -> None:
    if not ray.is_initialized():
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)


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
        search_alg=_searcher(cfg),
        scheduler=scheduler,
        num_samples=cfg.tune.num_trials,
        reuse_actors=True,
    )


def _fit_and_finish(
    tuner: Any, rec: _Recorder, d: Path, base: dict[str, Any], info: dict[str, Any]
) -> dict[str, Any]:
    """Run the tuner, then reconcile the table, write best.yaml and plots, close MLflow."""
    search_id = info["search_id"]
    tr = rec.tracker()
    try:
        grid = tuner.fit()
    except KeyboardInterrupt:
        _update_search(d, state="interrupted")
        raise
    except Exception as err:
        _update_search(d, state="failed", error=str(err).splitlines()[0] if str(err) else "")
        if tr is not None and info.get("own_parent"):
            rec._mlflow(tr.end, rec.parent_run_id, "FAILED")
        raise
    rows = _reconcile(rec, grid)
    plots = _plots(rows, d / "plots")
    parent = rec.parent_run_id
    unfinished = [r for r in rows if r["state"] not in _FINAL]
    errors = [r for r in rows if r["state"] == "error"]
    best = best_row(rows)
    why = None
    missing = max(0, int(info.get("num_trials", len(rows))) - len(rows)) + len(unfinished)
    if missing:
        why, state, status = (
            f"interrupted with {missing} trial(s) unfinished",
            "interrupted",
            "KILLED",
        )
    elif errors:
        why, state, status = f"{len(errors)} of {len(rows)} trials failed", "failed", "FAILED"
    elif best is None:
        why, state, status = "no trial reported a val kNN", "failed", "FAILED"
    if why is not None:
        msg = (
            f"tune: search {search_id} is incomplete: {why}; contrastive tune --resume {search_id}"
        )
        _update_search(d, state=state, error=msg)
        if tr is not None and parent and info.get("own_parent"):
            rec._mlflow(tr.set_tags, parent, {"tune_state": state})
            rec._mlflow(tr.end, parent, status)
        raise TuneError(msg, exit_code=1)
    assert best is not None
    best_path = _write_best(d, base, best, search_id)
    best_out = {PARAMS[k]: v for k, v in best["params"].items()}
    best_out.update(knn_top1=best["best_knn"], trial_id=best["trial_id"], trial_index=best["index"])
    _update_search(d, state="finished", best=best_out, best_config=best_path, error=None)
    if tr is not None and parent:
        rid = best.get("mlflow_run_id")
        if rid:
            rec._mlflow(tr.set_tags, rid, {"best": "true"})
        tags = {
            "tune_search_id": search_id,
            "tune_state": "finished",
            "tune_best_trial": best["trial_id"],
        }
        if rid:
            tags["tune_best_run_id"] = rid
        rec._mlflow(tr.set_tags, parent, tags)
        rec._mlflow(tr.log_metrics, parent, {"best_val_knn_top1": best["best_knn"]}, 0)
        for p in plots:
            rec._mlflow(tr.log_artifact, parent, p, "plots")
        for f in (TRIALS_FILE, BEST_FILE):
            rec._mlflow(tr.log_artifact, parent, str(d / f), "tune")
        if info.get("own_parent"):
            rec._mlflow(tr.end, parent, "FINISHED")
    return {
        "best_config": best_path,
        "best": best_out,
        "search_dir": str(d),
        "search_id": search_id,
        "trials": rows,
    }


def _quiet_tune() -> None:
    """Silence Tune's "snapshotting triggered multiple times" warning: with ``num_to_keep=1``
    every epoch's checkpoint forces a (cheap, local) snapshot, which is intended here."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def _new_tuner(cfg: Config, base: dict[str, Any], dataset: str, d: Path, rec: _Recorder) -> Any:
    _quiet_tune()
    return tune.Tuner(
        _trainable(base, dataset, d, cfg),
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


def _recorder(d: Path, cfg: Config, tracking: Mapping[str, Any] | None) -> _Recorder:
    tracking = tracking or {}
    return _Recorder(
        str(d),
        cfg.tune.epochs,
        tracking.get("uri"),
        tracking.get("experiment"),
        tracking.get("parent_run_id"),
        d.name,
    )


def _stored_result(d: Path, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "best_config": str(d / BEST_FILE),
        "best": dict(info.get("best") or {}),
        "search_dir": str(d),
        "search_id": d.name,
        "trials": _read_json(d / TRIALS_FILE) or [],
    }


def _continue(d: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Continue the search recorded in ``d``: Tune restores it (finished trials stay finished,
    errored and unfinished ones continue from their last checkpoint), then it is finished."""
    search_id = d.name
    try:
        cfg = parse_config(info.get("config"))
    except ConfigError as err:
        raise TuneError(f"tune: {d / SEARCH_FILE}: {err}") from None
    dataset = str(info.get("dataset") or "")
    if not (Path(dataset) / "dataset.json").is_file():
        raise TuneError(f"tune: the shards of search {search_id} are gone ({dataset or '?'})")
    _searcher(cfg)
    _ensure_ray()
    check_resources(cfg)
    tracking = info.get("tracking") or {}
    rec = _recorder(d, cfg, tracking)
    tr = rec.tracker()
    if tr is not None and tracking.get("own_parent"):
        rec._mlflow(tr.resume_run, rec.parent_run_id)
    base = cfg.to_dict()
    exp = str(d / EXPERIMENT_DIR)
    if tune.Tuner.can_restore(exp):
        _quiet_tune()
        tuner = tune.Tuner.restore(
            exp, trainable=_trainable(base, dataset, d, cfg), resume_errored=True
        )
    else:  # stopped before Tune wrote its state: no trial had finished, start them anew
        shutil.rmtree(exp, ignore_errors=True)
        tuner = _new_tuner(cfg, base, dataset, d, rec)
    info = _update_search(d, state="running", error=None)
    info["own_parent"] = bool(tracking.get("own_parent"))
    log.info("tune: resuming search %s", search_id)
    return _fit_and_finish(tuner, rec, d, base, info)


def _same_config(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a, default=_json_default)) == json.loads(
        json.dumps(b, default=_json_default)
    )


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
    "trial_id": ..., "trial_index": ...}, "search_dir", "search_id", "trials": rows}``.
    Raises :class:`TuneError` (one line) on bad input, missing resources or failed trials.
    """
    d = Path(search_dir).expanduser().resolve()
    search_id = d.name
    if not _ID.match(search_id):
        raise TuneError(f"tune: {search_id!r} is not a search id (letters, digits, . _ -)")
    if not (Path(dataset_dir) / "dataset.json").is_file():
        raise TuneError(f"tune: {dataset_dir} holds no shards (no dataset.json)")
    _check_config(cfg)
    _searcher(cfg)  # a missing optional package fails here, before any work
    base = cfg.to_dict()
    old = _read_json(d / SEARCH_FILE)
    if isinstance(old, dict):
        if not _same_config(old.get("config"), base):
            raise TuneError(f"tune: {d} holds a search with another config; use a new folder")
        if old.get("state") == "finished" and (d / BEST_FILE).is_file():
            return _stored_result(d, old)
        return _continue(d, old)
    _ensure_ray()
    check_resources(cfg)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / "config.yaml", cfg.to_yaml())

    if tracker is None:
        try:
            tracker = Tracker.from_config(cfg)
        except TrackingError as err:
            raise TuneError(str(err)) from None
    own_parent = False
    if tracker is not None:
        try:
            tracker.check_reachable()
        except TrackingError as err:
            raise TuneError(str(err)) from None
        if parent_run_id is None:
            parent_run_id = tracker.start_parent(f"tune-{search_id}", cfg)
            tracker.set_tags(parent_run_id, {"tune_search_id": search_id, "kind": "tune"})
            own_parent = True
    tracking = (
        {
            "uri": tracker.uri,
            "experiment": tracker.experiment,
            "parent_run_id": parent_run_id,
            "own_parent": own_parent,
        }
        if tracker is not None
        else None
    )
    info = _update_search(
        d,
        search_id=search_id,
        state="running",
        created=time.strftime("%Y-%m-%dT%H:%M:%S"),
        config=base,
        dataset=str(Path(dataset_dir).resolve()),
        experiment=str(d / EXPERIMENT_DIR),
        num_trials=cfg.tune.num_trials,
        tracking=tracking,
        best=None,
        error=None,
    )
    info["own_parent"] = own_parent
    rec = _recorder(d, cfg, tracking)
    tuner = _new_tuner(cfg, base, info["dataset"], d, rec)
    log.info(
        "tune: search %s: %d trials x %d epochs, %s search, ASHA (grace %d, rf %d), %s per trial",
        search_id,
        cfg.tune.num_trials,
        cfg.tune.epochs,
        cfg.tune.search_alg,
        cfg.tune.grace_period,
        cfg.tune.reduction_factor,
        trial_resources(cfg),
    )
    return _fit_and_finish(tuner, rec, d, base, info)


def _summary(result: dict[str, Any]) -> str:
    b = result["best"]
    vals = ", ".join(f"{k}={v:.4g}" for k, v in b.items() if "." in k)
    return (
        f"best: trial {b['trial_index']} val kNN {b['knn_top1']:.2f}% ({vals})\n"
        f"next: contrastive run --from-tune {result['search_id']} CONFIG"
    )


def search(cfg: Config) -> int:
    """``contrastive tune CONFIG``: shard the data into a new search folder, run the search,
    print the table and the best config. Returns the exit code (0 ok, 1 failed, 2 bad input)."""
    search_id = "SEARCH_ID"
    try:
        _check_config(cfg)
        _searcher(cfg)
        search_id = new_search_id()
        d = search_dir(cfg.storage.root, search_id)
        _ensure_ray()
        check_resources(cfg)
        click.echo(f"search: {search_id} ({d})")
        from workflows.sharding import shard_with_ray

        try:
            shards = shard_with_ray(cfg, d / "dataset").outputs["dataset"]
        except (FileNotFoundError, ValueError) as err:
            raise TuneError(
                f"tune: sharding failed: {str(err).splitlines()[0]}", exit_code=1
            ) from None
        result = run_search(cfg, shards, d)
    except TuneError as err:
        click.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        click.echo(f"interrupted; continue with: contrastive tune --resume {search_id}", err=True)
        return 130
    click.echo(show(cfg.storage.root, search_id))
    click.echo(_summary(result))
    return 0


def resume(storage_root: str, search_id: str) -> int:
    """``contrastive tune --resume SEARCH_ID``: continue an interrupted or failed search.

    Finished trials are not run again (Tune restores them from the experiment); unfinished and
    errored ones continue from their last checkpoint. A finished search is left as it is.
    Returns the exit code (0 ok, 1 trials failed again, 2 bad input).
    """
    try:
        d, info = _load_search(storage_root, search_id)
        if info.get("state") == "finished" and (d / BEST_FILE).is_file():
            click.echo(f"search {search_id} is finished; nothing to resume")
            click.echo(show(storage_root, search_id))
            return 0
        click.echo(f"resuming search {search_id} ({d})")
        result = _continue(d, info)
    except TuneError as err:
        click.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    except KeyboardInterrupt:
        click.echo(f"interrupted; continue with: contrastive tune --resume {search_id}", err=True)
        return 130
    click.echo(show(storage_root, search_id))
    click.echo(_summary(result))
    return 0


# -- reading ------------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.4g}"
    return str(v)


def format_table(rows: list[dict[str, Any]], best_id: str | None = None) -> str:
    """The results table: trial, params, best kNN, epochs run, state (best trial marked ``*``)."""
    names = [n for n in PARAMS if any(n in r.get("params", {}) for r in rows)]
    header = ["trial", *names, "best kNN", "epochs", "state"]
    body = []
    for r in rows:
        mark = "*" if best_id and r["trial_id"] == best_id else ""
        body.append(
            [
                f"{r['index']}{mark}",
                *(_fmt(r.get("params", {}).get(n)) for n in names),
                "-" if r.get("best_knn") is None else f"{r['best_knn']:.2f}",
                f"{r.get('epochs_run', 0)}/{r.get('epochs_total', '?')}",
                str(r.get("state", "?")).replace("_", " "),
            ]
        )
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths, strict=True)).rstrip() for b in body]
    return "\n".join(lines)


def show(storage_root: str, search_id: str) -> str:
    """``contrastive tune --show SEARCH_ID``: the search's state and its results table."""
    d, info = _load_search(storage_root, search_id)
    rows = _read_json(d / TRIALS_FILE) or []
    best = info.get("best") or {}
    head = (
        f"search {search_id}: {info.get('state', '?')}, {len(rows)}/{info.get('num_trials', '?')}"
        f" trials"
    )
    if best:
        head += f", best trial {best.get('trial_index')} (val kNN {best.get('knn_top1', 0):.2f}%)"
    out = [head, format_table(rows, best.get("trial_id")) if rows else "(no trials yet)"]
    if info.get("error"):
        out.append(info["error"])
    if info.get("best_config"):
        out.append(f"best config: {info['best_config']}")
    return "\n".join(out)


def best_config_path(storage_root: str, search_id: str) -> str:
    """The path of the search's ``best.yaml``; a one-line :class:`TuneError` if it has none."""
    d, info = _load_search(storage_root, search_id)
    path = d / BEST_FILE
    if not path.is_file():
        raise TuneError(
            f"tune: search {search_id} has no best.yaml yet (state {info.get('state', '?')}); "
            f"see contrastive tune --show {search_id}"
        )
    return str(path)
