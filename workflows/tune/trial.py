"""The trial: one short pretraining inside Ray Tune, reporting the val kNN every epoch."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from ray import tune

from pipeline.config import Config
from pipeline.runtime import HistoryRow
from pipeline.slices import PretrainSlice
from pipeline.stages import pretrain
from workflows.tune.space import trial_config, trial_resources

__all__ = ["TuneTrialContext", "trainable"]


class TuneTrialContext:
    """A :class:`pipeline.runtime.TrainContext` inside a Tune trial (one process).

    ``report`` -> ``ray.tune.report`` with the state as a Tune :class:`~ray.tune.Checkpoint`;
    ``load_checkpoint`` -> ``ray.tune.get_checkpoint()`` (set when Tune resumes the trial).
    """

    def __init__(self, use_gpu: bool = False) -> None:
        self.rank, self.world_size = 0, 1
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")

    def report(self, metrics: HistoryRow, checkpoint: dict[str, Any] | None = None) -> None:
        """Report the numeric metrics (and the state as a checkpoint) to Tune."""
        clean = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        if checkpoint is None:
            tune.report(clean)
            return
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(checkpoint, os.path.join(tmp, "state.pt"))
            tune.report(clean, checkpoint=tune.Checkpoint.from_directory(tmp))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The state of the trial's latest checkpoint, or None on a fresh start."""
        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        from pipeline.runtime import load_checkpoint_file

        with ckpt.as_directory() as d:
            return load_checkpoint_file(os.path.join(d, "state.pt"))

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move the model to the trial's device (one process: no wrapping)."""
        return model.to(self.device)


def _trial(params: dict[str, Any], *, base: dict[str, Any], dataset_dir: str) -> None:
    """The Tune trainable: one short pretraining with the sampled ``params``.

    Its name is the trainable's name in the experiment, which ``Tuner.restore`` checks.
    """
    cfg = trial_config(base, params)
    torch.set_num_threads(cfg.resources.for_stage("pretrain").threads)
    ctx = TuneTrialContext(cfg.resources.use_gpu)
    # Tune stops a trial at its last report (ASHA's max_t), so the stage's own outputs are not
    # relied on: the weights live in the trial's Tune checkpoints.
    pretrain.run(
        PretrainSlice.of(cfg), {"dataset": dataset_dir}, tune.get_context().get_trial_dir(), ctx
    )


def trainable(base: dict[str, Any], dataset_dir: str, cfg: Config) -> Any:
    """:func:`_trial` bound to the search's base config and shards, with its resources."""
    fn = tune.with_parameters(_trial, base=base, dataset_dir=dataset_dir)
    return tune.with_resources(fn, trial_resources(cfg))
