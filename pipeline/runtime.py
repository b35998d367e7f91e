"""How a training stage talks to whatever runs it, without knowing what that is.

A stage receives a :class:`TrainContext`. In one process it is :class:`LocalContext`; under Ray
Train, ``workflows.train`` supplies one backed by ``ray.train`` (report + checkpoint). Keeping this
protocol here is what lets every stage run and be tested without Ray.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from pipeline.atomic import atomic_torch_save

__all__ = [
    "LocalContext",
    "StageResult",
    "TrainContext",
    "load_checkpoint_file",
]


#: One epoch's metrics as a stage reports them and keeps them in ``history.json`` (``epoch`` and
#: counts are whole numbers; everything is a number).
HistoryRow = dict[str, float]


@dataclass
class StageResult:
    """What a stage returns: output paths, final metrics (key metric first) and per-epoch history."""

    outputs: dict[str, str]
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[HistoryRow] = field(default_factory=list)


@runtime_checkable
class TrainContext(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def report(self, metrics: HistoryRow, checkpoint: dict[str, Any] | None = None) -> None:
        """Record per-epoch metrics; with ``checkpoint`` (a state dict), persist it as the latest."""

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The latest checkpoint state reported by an earlier attempt, or None."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move to the device; wrap for data parallelism when world_size > 1."""


def load_checkpoint_file(path: str | os.PathLike[str] | io.BytesIO, name: str | None = None) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain types only, never arbitrary
    unpickling (checkpoints may sit in storage others can write). A file holding anything else
    is a one-line error naming it (``name``, else ``path``)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise RuntimeError(
            f"checkpoint {name or path} holds objects other than tensors and plain types; it is "
            "not loaded (delete it to start the stage afresh)"
        ) from None


class LocalContext:
    """One process, no process group. Checkpoints live in ``checkpoint_dir/latest.pt``.

    ``on_report`` (optional) receives every metrics dict, e.g. to print progress.
    """

    def __init__(
        self,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        device: str | torch.device = "cpu",
        on_report: Callable[[HistoryRow], None] | None = None,
    ) -> None:
        self.rank = 0
        self.world_size = 1
        self.device = torch.device(device)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.on_report = on_report
        self.reports: list[HistoryRow] = []

    def report(self, metrics: HistoryRow, checkpoint: dict[str, Any] | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None and self.checkpoint_dir is not None:
            atomic_torch_save(checkpoint, self.checkpoint_dir / "latest.pt")
        if self.on_report is not None:
            self.on_report(metrics)

    def load_checkpoint(self) -> dict[str, Any] | None:
        if self.checkpoint_dir is None:
            return None
        p = self.checkpoint_dir / "latest.pt"
        if not p.is_file():
            return None
        return load_checkpoint_file(p)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def clear(self) -> None:
        if self.checkpoint_dir is not None and self.checkpoint_dir.exists():
            shutil.rmtree(self.checkpoint_dir)
