"""After a fit: make the results table agree with what Tune saved about each trial."""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any

from ray import tune

from workflows.tune.callback import Recorder
from workflows.tune.rows import FINAL, HISTORY_KEYS, Epoch, TrialRow, TrialState
from workflows.tune.store import EXPERIMENT_DIR

log = logging.getLogger("workflows.tune")

__all__ = ["reconcile"]


def _trial_id_from_path(path: str | None) -> str | None:
    if not path:
        return None
    m = re.search(r"_([0-9a-f]{5}_\d{5})_", os.path.basename(str(path)))
    return m.group(1) if m else None


def _saved_statuses(experiment: Path) -> dict[str, str]:
    """Trial id -> status in the experiment state Tune saved on disk (empty when unreadable)."""
    try:
        return {t.trial_id: t.status for t in tune.ExperimentAnalysis(str(experiment)).trials}
    except Exception as err:  # noqa: BLE001 - fall back to the in-memory view
        log.debug("tune: cannot read the saved experiment state: %s", err)
        return {}


def _tune_trials(grid: Any, experiment: Path) -> list[tuple[str | None, str | None, Any]]:
    """``(trial_id, status, result)`` for every trial of a fit.

    The status (TERMINATED, ERROR, RUNNING, PENDING, PAUSED) is the one in the experiment state
    Tune saved on disk, which is what a restore acts on: after an interrupted fit (Ctrl-C) the
    in-memory trials look terminated while the saved state says RUNNING. None when unknown.
    """
    saved = _saved_statuses(experiment)
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


def _logged_epochs(df: Any) -> dict[int, Epoch]:
    """Tune's own per-trial log, by iteration (a trial restarted from an older checkpoint
    repeats iterations there: the latest entry wins)."""
    if df is None or not len(df) or "training_iteration" not in df.columns:
        return {}
    keep = [k for k in (*HISTORY_KEYS, "training_iteration") if k in df.columns]
    latest: dict[int, Epoch] = {}
    for r in df[keep].to_dict("records"):
        it = int(r["training_iteration"])
        entry: Epoch = {
            k: float(v)
            for k, v in r.items()
            if k != "training_iteration" and not math.isnan(float(v))
        }
        latest[it] = {**entry, "training_iteration": it}
    return latest


def _add_missing_epochs(rec: Recorder, row: TrialRow, df: Any) -> None:
    """Add (and log to MLflow) the epochs Tune logged that the callback never saw (the driver
    died before it did)."""
    seen = {h.get("training_iteration") for h in row.history}
    latest = _logged_epochs(df)
    missing = [latest[i] for i in sorted(latest) if i not in seen]
    if missing:
        row.add_epochs(missing)
        rec.ensure_run(row)
        for entry in missing:
            rec.log_epoch(row, entry)


def _state(row: TrialRow, status: str | None, result: Any) -> TrialState:
    """A trial Tune calls TERMINATED is completed (all epochs) or stopped early (fewer); ERROR is
    an error; anything else (the fit was interrupted) is ``interrupted``."""
    if status == "ERROR" or (status is None and result.error is not None):
        return "error"
    if status == "TERMINATED" or (status is None and row.state in FINAL):
        return row.finished_state()
    return "interrupted"


def reconcile(rec: Recorder, grid: Any) -> list[TrialRow]:
    """Make the table agree with Tune's view of the trials after a fit; returns it, in order.

    An interrupted trial's MLflow run is KILLED; the others are finished as :func:`_state` says.
    """
    for tid, status, result in _tune_trials(grid, Path(rec.search_dir) / EXPERIMENT_DIR):
        if not tid:
            continue
        # a trial the callback never saw (the driver died first) is rebuilt from Tune's log
        row = rec.row(tid, result.config)
        _add_missing_epochs(rec, row, result.metrics_dataframe)
        row.summarise(rec.epochs)
        state = _state(row, status, result)
        if row.state != state:
            if state == "interrupted":
                rec.interrupt(row)
            else:
                rec.finish(row, state)
    rec.save()
    return rec.sorted_rows()
