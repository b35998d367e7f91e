"""One row of the results table (``trials.json``) per trial, and the choice of the best one."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workflows.tune.space import METRIC
from workflows.tune.store import TRIALS_FILE, read_json, write_json

__all__ = [
    "FINAL",
    "HISTORY_KEYS",
    "Epoch",
    "TrialRow",
    "TrialState",
    "best_row",
    "read_rows",
    "trial_index",
    "write_rows",
]

TrialState = Literal["pending", "running", "completed", "stopped_early", "error", "interrupted"]
"""``completed``: all ``tune.epochs``; ``stopped_early``: ASHA stopped it at a rung; ``error``: it
raised; ``interrupted``: the search stopped while it ran."""

FINAL: tuple[TrialState, ...] = ("completed", "stopped_early", "error")
"""The states a trial does not leave (except ``error``, which ``resume`` continues)."""

HISTORY_KEYS = ("epoch", "loss", METRIC, "lr", "views_per_s", "epoch_seconds")
"""The reported metrics a row keeps per epoch (beside ``training_iteration``)."""

Epoch = dict[str, float]
"""One reported epoch: ``training_iteration`` (an int) and the :data:`HISTORY_KEYS` it had."""


def trial_index(trial_id: str) -> int:
    """The trial's creation index from a random-search id (``<prefix>_00003`` -> 3); -1 for
    ids without one (model-based searchers use bare uuids)."""
    tail = trial_id.rsplit("_", 1)[-1] if "_" in trial_id else ""
    return int(tail) if tail.isdigit() else -1


@dataclass
class TrialRow:
    """A trial as ``trials.json`` holds it: its sampled values, its reported epochs, its state and
    its MLflow run. The last four fields are derived from ``history`` (:meth:`summarise`)."""

    trial_id: str
    index: int
    params: dict[str, float] = field(default_factory=dict)
    history: list[Epoch] = field(default_factory=list)
    state: TrialState = "pending"
    mlflow_run_id: str | None = None
    epochs_run: int = 0
    best_knn: float | None = None
    last_knn: float | None = None
    epochs_total: int = 0

    @classmethod
    def new(cls, trial_id: str, index: int, params: dict[str, float], epochs: int) -> TrialRow:
        """A pending row with no epochs yet, for a trial of ``epochs`` epochs."""
        row = cls(trial_id=trial_id, index=index, params=params)
        row.summarise(epochs)
        return row

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrialRow:
        """A row read back from ``trials.json`` (keys it does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The row as ``trials.json`` holds it."""
        return dataclasses.asdict(self)

    def summarise(self, epochs: int) -> None:
        """Set epochs run, best and last val kNN from the history; ``epochs`` is the trial's total."""
        knn = [h[METRIC] for h in self.history if isinstance(h.get(METRIC), (int, float))]
        self.epochs_run = max(
            (int(h.get("training_iteration", 0)) for h in self.history), default=0
        )
        self.best_knn = max(knn) if knn else None
        self.last_knn = knn[-1] if knn else None
        self.epochs_total = epochs

    def add_epochs(self, entries: list[Epoch]) -> None:
        """Add reported epochs; one that repeats an iteration replaces the older entry."""
        new = {int(e["training_iteration"]) for e in entries}
        kept = [h for h in self.history if h.get("training_iteration") not in new]
        self.history = sorted([*kept, *entries], key=lambda h: h["training_iteration"])

    def finished_state(self) -> TrialState:
        """``completed`` when it ran all its epochs, else ``stopped_early``."""
        return "completed" if self.epochs_run >= self.epochs_total else "stopped_early"


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The trial with the highest val kNN (over its epochs); ties go to more epochs, then the
    earlier trial. None when no trial reported a kNN."""
    scored = [r for r in rows if r.best_knn is not None and r.state != "error"]
    if not scored:
        return None
    return max(scored, key=lambda r: (r.best_knn or 0.0, r.epochs_run, -r.index))


def read_rows(d: Path) -> list[TrialRow]:
    """The rows of ``trials.json`` (none when the file does not exist yet)."""
    return [TrialRow.from_dict(r) for r in read_json(d / TRIALS_FILE) or []]


def write_rows(d: Path, rows: list[TrialRow]) -> None:
    """Write ``trials.json``: the rows in trial order."""
    ordered = sorted(rows, key=lambda r: (r.index, r.trial_id))
    write_json(d / TRIALS_FILE, [r.to_dict() for r in ordered])
