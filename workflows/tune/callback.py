"""The driver-side Tune callback: ``trials.json`` kept current, every trial mirrored into MLflow."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ray import tune

from workflows.tracking import Tracker, error_line
from workflows.tune.rows import (
    HISTORY_KEYS,
    Epoch,
    TrialRow,
    TrialState,
    read_rows,
    trial_index,
    write_rows,
)
from workflows.tune.space import METRIC, PARAMS, clean_params

log = logging.getLogger("workflows.tune")

__all__ = ["Recorder"]


class Recorder(tune.Callback):
    """Keeps ``trials.json`` current and mirrors every trial into an MLflow child run (created on
    start, metrics per epoch, state tag on completion).

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
        self._rows: dict[str, TrialRow] | None = None
        self._tracker: Tracker | None = None
        self._warned = False

    @classmethod
    def for_search(cls, d: Path, epochs: int, tracking: Mapping[str, Any] | None) -> Recorder:
        """The recorder of search folder ``d`` (``tracking`` as ``search.json`` holds it)."""
        tracking = tracking or {}
        return cls(
            str(d),
            epochs,
            tracking.get("uri"),
            tracking.get("experiment"),
            tracking.get("parent_run_id"),
            d.name,
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_rows"], state["_tracker"], state["_warned"] = None, None, False
        return state

    # -- state ------------------------------------------------------------------------------
    @property
    def rows(self) -> dict[str, TrialRow]:
        """The table, by trial id (read from ``trials.json`` on first use)."""
        if self._rows is None:
            self._rows = {r.trial_id: r for r in read_rows(Path(self.search_dir))}
        return self._rows

    def sorted_rows(self) -> list[TrialRow]:
        """The table in trial order."""
        return sorted(self.rows.values(), key=lambda r: (r.index, r.trial_id))

    def save(self) -> None:
        """Write ``trials.json``."""
        write_rows(Path(self.search_dir), list(self.rows.values()))

    def next_index(self, trial_id: str) -> int:
        """The index of a new row: the id's creation counter when it has one, else the next
        number in order of first sight."""
        index = trial_index(trial_id)
        if index >= 0:
            return index
        return max((r.index for r in self.rows.values()), default=-1) + 1

    def row(self, trial_id: str, config: Mapping[str, Any] | None) -> TrialRow:
        """The trial's row, created (pending, with the sampled values of ``config``) when new."""
        row = self.rows.get(trial_id)
        if row is None:
            params = clean_params(config or {})
            row = TrialRow.new(trial_id, self.next_index(trial_id), params, self.epochs)
            self.rows[trial_id] = row
        return row

    # -- MLflow -----------------------------------------------------------------------------
    def tracker(self) -> Tracker | None:
        """The search's tracker; None when tracking is off."""
        if self.tracking_uri is None or self.parent_run_id is None:
            return None
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.experiment or "contrastive")
        return self._tracker

    def quietly(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call an MLflow action; tracking trouble is logged once and never stops the search."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - tracking must not kill trials
            if not self._warned:
                log.warning("tune: MLflow tracking failed: %s", error_line(err))
                self._warned = True
            return None

    def _create_run(self, tr: Tracker, row: TrialRow) -> str:
        from mlflow.entities import Param

        tags = {
            "mlflow.parentRunId": str(self.parent_run_id),
            "tune_search_id": self.search_id,
            "trial_id": row.trial_id,
            "trial_index": str(row.index),
            "trial_state": row.state,
        }
        run = tr.client.create_run(tr.experiment_id, run_name=f"trial-{row.index:05d}", tags=tags)
        params = [Param(PARAMS[k], str(v)) for k, v in row.params.items()]
        params += [Param("trial_id", row.trial_id), Param("tune.epochs", str(self.epochs))]
        tr.client.log_batch(run.info.run_id, params=params)
        return str(run.info.run_id)

    def ensure_run(self, row: TrialRow) -> str | None:
        """The trial's MLflow child run (created with its params on first sight)."""
        tr = self.tracker()
        if tr is None:
            return None
        if not row.mlflow_run_id:
            row.mlflow_run_id = self.quietly(self._create_run, tr, row)
        return row.mlflow_run_id

    def log_epoch(self, row: TrialRow, entry: Epoch) -> None:
        """Log one reported epoch's metrics to the trial's run."""
        tr, rid = self.tracker(), row.mlflow_run_id
        if tr is not None and rid:
            metrics = {k: v for k, v in entry.items() if k not in ("epoch", "training_iteration")}
            self.quietly(tr.log_metrics, rid, metrics, int(entry.get("training_iteration", 0)))

    def finish(self, row: TrialRow, state: TrialState) -> None:
        """Set the trial's final state in the table and in MLflow (tag + run status)."""
        row.state = state
        row.summarise(self.epochs)
        tr = self.tracker()
        rid = self.ensure_run(row)
        if tr is None or not rid:
            return
        self.quietly(tr.set_tags, rid, {"trial_state": state})
        if row.best_knn is not None:
            metrics = {"best_val_knn_top1": row.best_knn, "epochs_run": row.epochs_run}
            self.quietly(tr.log_metrics, rid, metrics, row.epochs_run)
        self.quietly(tr.end, rid, "FAILED" if state == "error" else "FINISHED")

    def interrupt(self, row: TrialRow) -> None:
        """Mark a trial the search stopped while it ran: ``interrupted``, its run KILLED."""
        row.state = "interrupted"
        tr, rid = self.tracker(), row.mlflow_run_id
        if tr is not None and rid:
            self.quietly(tr.set_tags, rid, {"trial_state": "interrupted"})
            self.quietly(tr.end, rid, "KILLED")

    # -- Tune hooks -------------------------------------------------------------------------
    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self.row(trial.trial_id, trial.config)
        row.state = "running"
        rid = self.ensure_run(row)
        tr = self.tracker()
        if tr is not None and rid:
            self.quietly(tr.resume_run, rid)
            self.quietly(tr.set_tags, rid, {"trial_state": "running"})
        self.save()

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        row = self.row(trial.trial_id, trial.config)
        entry: Epoch = {
            k: result[k] for k in HISTORY_KEYS if isinstance(result.get(k), (int, float))
        }
        entry["training_iteration"] = int(result.get("training_iteration", 0))
        row.add_epochs([entry])
        row.state = "running"
        row.summarise(self.epochs)
        self.ensure_run(row)
        self.log_epoch(row, entry)
        self.save()
        knn = f"{entry[METRIC]:.1f}%" if METRIC in entry else "-"
        it = int(entry["training_iteration"])
        log.info("tune: trial %d epoch %d/%d val kNN %s", row.index, it, self.epochs, knn)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self.row(trial.trial_id, trial.config)
        row.summarise(self.epochs)
        state = row.finished_state()
        self.finish(row, state)
        self.save()
        log.info("tune: trial %d %s after %d epochs", row.index, state, row.epochs_run)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        row = self.row(trial.trial_id, trial.config)
        self.finish(row, "error")
        self.save()
        log.warning("tune: trial %d failed after %d epochs", row.index, row.epochs_run)
