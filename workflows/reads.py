"""What each stage kind reads from the config: the slice its cache key hashes.

Every config field is either read by a stage kind (:data:`STAGE_READS`, dotted paths; a section or
sub-section path takes all of it) or listed in :data:`NOT_RESULTS` with the reason it cannot change
any stage's result (or, for ``resources.stages``, in :data:`RESOLVED`). ``tests/workflows/test_reads.py`` walks the config model field by field and checks
both: a field missing from both tables, or a change that does not reach the key of a stage that
reads it, fails there.

``resources.*`` is read after the stage kind's overrides (``resources.stages.<kind>``) are applied,
so an override for fine-tuning changes the keys of the fine-tuning stages only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config

__all__ = ["NOT_RESULTS", "RESOLVED", "STAGE_READS", "UNKEYED_READS", "Reads", "config_slice"]


@dataclass(frozen=True)
class Reads:
    """The config paths one stage kind reads.

    ``paths``: dotted paths into the config (``"model"``, ``"finetune.consistency"``,
    ``"pretrain.bf16"``); ``minus``: paths inside those whose value cannot change this kind's
    result (fine-tuning looks at ``finetune.consistency.baseline`` only to learn that the flag is
    not about it); ``when``: paths the kind reads only when the predicate holds for the config.
    """

    paths: tuple[str, ...]
    minus: tuple[str, ...] = ()
    when: dict[str, Callable[[Config], bool]] = field(default_factory=dict)


# Training on the CPU: the intra-op thread count (``torch_threads``, else one per whole CPU of
# ``cpus_per_worker``) sets the order of float reductions, so it moves the last bits of every
# number; the worker count splits each batch across ranks (each rank draws its own augmentation
# and BatchNorm sees per-rank batches between syncs); a GPU computes with other kernels. A stage
# trained at other resources is another result.
_TRAIN_RESOURCES = (
    "resources.num_workers",
    "resources.cpus_per_worker",
    "resources.torch_threads",
    "resources.use_gpu",
)
# One process (evaluation, each tune trial): the worker count is not read.
_ONE_PROCESS_RESOURCES = (
    "resources.cpus_per_worker",
    "resources.torch_threads",
    "resources.use_gpu",
)

# How the training and evaluation stages read the dataset (pipeline/stages/common.py use_memory,
# StreamSplit): in memory or streamed (another crop implementation and random stream), and when
# streamed, the loader workers and the shuffle buffer set which samples meet in a batch.
_DATA_READ = (
    "data.in_memory",
    "data.memory_budget_mb",
    "data.loader_workers",
    "data.shuffle_buffer",
)

# Fine-tuning and the baseline: pipeline/stages/finetune.py (plan_for, build_network, run) and
# the consistency phase (pipeline/stages/consistency.py). Both train at pretrain.bf16, build the
# network from model.* and crop to augment.image_size; the seed is finetune.seed, else seed.
_SUPERVISED = (
    "seed",
    "finetune.seed",
    "augment.image_size",
    "model",
    "pretrain.bf16",
    "finetune.from_head_layer",
    "finetune.epochs",
    "finetune.batch_size",
    "finetune.optimizer",
    "finetune.lr",
    "finetune.weight_decay",
    "finetune.min_steps",
    "finetune.crop_min_scale",
    *_TRAIN_RESOURCES,
    *_DATA_READ,
)

STAGE_READS: dict[str, Reads] = {
    # pipeline/stages/shard.py: the source and how it is split and sharded.
    "shard": Reads(("data",), minus=_DATA_READ),
    # workflows/tune/: short pretraining trials (pretrain.run), scored by the online val kNN.
    "tune": Reads(
        (
            "seed",
            "augment",
            "model",
            "pretrain",
            "tune",
            "evaluate.knn_k",
            "evaluate.knn_temperature",
            *_ONE_PROCESS_RESOURCES,
            *_DATA_READ,
        )
    ),
    # pipeline/stages/pretrain.py.
    "pretrain": Reads(("seed", "augment", "model", "pretrain", *_TRAIN_RESOURCES, *_DATA_READ)),
    # The consistency flag `baseline` only decides whether the baseline trains that way.
    "finetune": Reads(
        (*_SUPERVISED, "finetune.consistency"), minus=("finetune.consistency.baseline",)
    ),
    "baseline": Reads(
        (*_SUPERVISED, "finetune.baseline_lr", "finetune.consistency"),
        when={"finetune.consistency": lambda cfg: cfg.finetune.consistency.baseline},
    ),
    # pipeline/stages/distill.py: the student is model.* with distill.student's arch and width;
    # its crop defaults to fine-tuning's.
    "distill": Reads(
        (
            "seed",
            "finetune.seed",
            "augment.image_size",
            "model",
            "pretrain.bf16",
            "distill",
            "finetune.crop_min_scale",
            *_TRAIN_RESOURCES,
            *_DATA_READ,
        )
    ),
    # pipeline/stages/evaluate.py: probes and plots, and the report's header, which names these.
    "evaluate": Reads(
        (
            "seed",
            "evaluate",
            "data.source",
            "augment.image_size",
            "model.arch",
            "model.width",
            "model.stem_stride",
            "model.head_depth",
            "pretrain.method",
            "pretrain.temperature",
            "pretrain.epochs",
            "pretrain.batch_size",
            "pretrain.pseudo_label_from_epoch",
            "pretrain.pseudo_label_fraction",
            "finetune.consistency.epochs",
            "finetune.consistency.threshold",
            "finetune.consistency.baseline",
            *_ONE_PROCESS_RESOURCES,
            *_DATA_READ,
        )
    ),
}

# Fields that change no stage's result, with the reason; they are left out of every key.
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

# Fields read through others: the override of resources.<field> for one stage kind, which
# config_slice applies before slicing (so it is in that kind's key exactly when resources.<field>
# is).
RESOLVED: dict[str, str] = {
    "resources.stages": "per-kind overrides of resources.*, applied before a kind's slice is taken",
}

# Fields a kind reads that are deliberately not in its key, with the reason.
UNKEYED_READS: dict[str, dict[str, str]] = {
    "pretrain": {
        "evaluate.knn_k": "only the online val kNN monitor in history.json (never the weights): "
        "a new evaluation k does not re-run pretraining",
        "evaluate.knn_temperature": "only the online val kNN monitor, like evaluate.knn_k",
    },
}


def _get(d: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = d
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _put(d: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    for part in parents:
        d = d.setdefault(part, {})
    d[last] = value


def _drop(d: dict[str, Any], path: str) -> None:
    *parents, last = path.split(".")
    for part in parents:
        d = d.get(part)  # type: ignore[assignment]
        if not isinstance(d, dict):
            return
    d.pop(last, None)


def config_slice(kind: str, cfg: Config, reads: Reads | None = None) -> dict[str, Any]:
    """The part of ``cfg`` that stage kind ``kind`` reads (after its resource overrides), as a
    nested dict: what its cache key hashes. ``reads`` defaults to ``STAGE_READS[kind]``; an
    unknown kind or path raises ``KeyError``."""
    reads = STAGE_READS[kind] if reads is None else reads
    resolved = cfg.model_copy(update={"resources": cfg.resources.for_stage(kind)})
    d = resolved.to_dict()
    out: dict[str, Any] = {}
    for path in reads.paths:
        found, value = _get(d, path)
        if not found:
            raise KeyError(f"stage kind {kind!r} reads unknown config field {path!r}")
        if path in reads.when and not reads.when[path](cfg):
            continue
        _put(out, path, value)
    for path in (*reads.minus, *NOT_RESULTS):
        _drop(out, path)
    return out
