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

The modules: :mod:`~workflows.tune.space` (search space, trial and tuned configs),
:mod:`~workflows.tune.trial` (the trainable), :mod:`~workflows.tune.callback` (the table and
MLflow, as a Tune callback), :mod:`~workflows.tune.rows` (a trial's row), :mod:`~workflows.tune.store`
(the folder), :mod:`~workflows.tune.search` and :mod:`~workflows.tune.reconcile` (running,
continuing, finishing), :mod:`~workflows.tune.plots`, :mod:`~workflows.tune.commands` (what the
CLI prints). Errors are :class:`TuneError`; the CLI turns them into its one-line messages.
"""

from __future__ import annotations

from workflows.tune.callback import Recorder
from workflows.tune.commands import format_table, resume, search, show
from workflows.tune.errors import TuneError
from workflows.tune.rows import TrialRow, best_row
from workflows.tune.search import check_resources, run_search, searcher
from workflows.tune.space import (
    METRIC,
    PARAMS,
    apply_params,
    apply_values,
    param_space,
    trial_config,
    trial_resources,
)
from workflows.tune.store import (
    BEST_FILE,
    EXPERIMENT_DIR,
    SEARCH_FILE,
    TRIALS_FILE,
    best_config_path,
    new_search_id,
    search_dir,
)
from workflows.tune.trial import TuneTrialContext
from workflows.tune.trial import _trial as _trial

# Searches started before the package split pickled these two by their old names.
_Recorder = Recorder

__all__ = [
    "BEST_FILE",
    "EXPERIMENT_DIR",
    "METRIC",
    "PARAMS",
    "SEARCH_FILE",
    "TRIALS_FILE",
    "Recorder",
    "TrialRow",
    "TuneError",
    "TuneTrialContext",
    "apply_params",
    "apply_values",
    "best_config_path",
    "best_row",
    "check_resources",
    "format_table",
    "new_search_id",
    "param_space",
    "resume",
    "run_search",
    "search",
    "search_dir",
    "searcher",
    "show",
    "trial_config",
    "trial_resources",
]
