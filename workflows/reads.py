"""What a stage's cache key hashes of the config: its kind's typed slice.

Each stage kind reads the config through one slice class (:mod:`pipeline.slices`), which its stage
function receives; :func:`config_slice` is that slice as data, less the fields the class declares
as not changing the stage's result (``UNKEYED``). Every other config field is listed in
:data:`NOT_RESULTS` with the reason it cannot change any stage's result (or, for
``resources.stages``, in :data:`RESOLVED`). ``tests/workflows/test_reads.py`` walks the config
model field by field and checks both: a field that no slice reads and no table lists, or a change
that does not reach the key of a stage that reads it, fails there.
"""

from __future__ import annotations

from typing import Any

from pipeline.config import Config
from pipeline.slices import slice_for

__all__ = ["NOT_RESULTS", "RESOLVED", "config_slice"]

# Fields that change no stage's result, with the reason: no slice holds them in its key (the
# graph-shaping ones reach a stage's key through its params and inputs instead).
NOT_RESULTS: dict[str, str] = {
    "name": "the run's display name",
    "finetune.label_fractions": "shapes the graph: each stage's fraction is its own param "
    "(finetune@<p>), and evaluate's inputs name every stage",
    "finetune.baseline": "shapes the graph (whether baseline@<p> stages exist)",
    "distill.enabled": "shapes the graph (whether distill@<p> stages exist)",
    "tune.enabled": "shapes the graph (a tune stage that every later stage depends on)",
    "resources.max_failures": "how often a failed attempt is retried (resumed from its checkpoint)",
    "resources.env": "how the stages reach storage and services (endpoints); the thread count a "
    "stage trains with is set from resources.* whatever the environment says",
    "storage.root": "where results are stored, not what they are",
    "tracking.enabled": "MLflow logging only",
    "tracking.uri": "MLflow logging only",
    "tracking.experiment": "MLflow logging only",
}

# Fields read through others: the override of resources.<field> for one stage kind, which the
# slices apply before taking resources.* (so it is in that kind's key exactly when
# resources.<field> is).
RESOLVED: dict[str, str] = {
    "resources.stages": "per-kind overrides of resources.*, applied before a kind's slice is taken",
}


def config_slice(kind: str, cfg: Config) -> dict[str, Any]:
    """The part of ``cfg`` that stage kind ``kind`` reads (after its resource overrides), as
    JSON-ready data, less its slice's unkeyed fields: what its cache key hashes. An unknown kind
    raises ``KeyError``."""
    return slice_for(kind, cfg).key_dict()
