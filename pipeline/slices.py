"""What each stage kind reads of the config: one typed slice per kind.

A stage function receives its kind's slice, never the whole :class:`~pipeline.config.Config`:
what the slice does not hold, the stage cannot read (mypy rejects it; at run time it is an
``AttributeError``). :func:`slice_for` builds the slice once from a config, after the kind's
resource overrides (``resources.stages.<kind>``), and resolves the values that come from several
fields (the supervised stages' seed, semi-supervised pretraining's labeled fraction, the student's
model section and crop), so a stage reads the value, not the rule.

A stage's cache key (:mod:`workflows.dag`) hashes its slice (:meth:`StageSlice.key_dict`: less the
fields in the class's ``UNKEYED``, each with the reason it cannot change the stage's result), its
upstream keys and the package version. So a config field is in a stage's key when, and only when,
the stage reads it; ``tests/workflows/test_reads.py`` checks that field by field.

The kinds, their slices and the functions that receive them:

- ``shard``: :class:`ShardSlice`, :func:`pipeline.stages.shard.run`;
- ``tune``: :class:`TuneSlice`, the search (``workflows.tune``), each trial a
  :class:`PretrainSlice`;
- ``pretrain``: :class:`PretrainSlice`, :func:`pipeline.stages.pretrain.run`;
- ``finetune`` and ``baseline``: :class:`SupervisedSlice`, :func:`pipeline.stages.finetune.run`;
- ``distill``: :class:`DistillSlice`, :func:`pipeline.stages.distill.run`;
- ``evaluate``: :class:`EvaluateSlice`, :func:`pipeline.stages.evaluate.run`.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from pipeline.config import (
    AugmentConfig,
    Config,
    ConsistencyConfig,
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    PretrainConfig,
    TuneConfig,
    subset_fractions,
)

__all__ = [
    "SLICE_KINDS",
    "Compute",
    "DataRead",
    "DistillRead",
    "DistillSlice",
    "EvaluateSlice",
    "FinetuneRead",
    "KnnMonitor",
    "PretrainSlice",
    "ReportHeader",
    "ShardSlice",
    "StageSlice",
    "SupervisedSlice",
    "TrainCompute",
    "TuneSlice",
    "slice_for",
]

_S = TypeVar("_S", bound="StageSlice")


class StageSlice(BaseModel):
    """A frozen part of a validated config (the values are not validated again)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Dotted paths into the slice that the stage reads but that cannot change its result, with
    #: the reason; :meth:`key_dict` leaves them out.
    UNKEYED: ClassVar[dict[str, str]] = {}

    @classmethod
    def pick(cls: type[_S], section: BaseModel) -> _S:
        """This slice's fields, taken by name from a config section."""
        return cls(**{name: getattr(section, name) for name in cls.model_fields})

    def key_dict(self) -> dict[str, Any]:
        """The slice as JSON-ready data, less the ``UNKEYED`` paths: what a cache key hashes."""
        out = self.model_dump(mode="json")
        for path in self.UNKEYED:
            *parents, last = path.split(".")
            node: Any = out
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
            if isinstance(node, dict):
                node.pop(last, None)
        return out


# -- parts several slices share ---------------------------------------------------------------


class DataRead(StageSlice):
    """How a stage reads the shards (``data.*``; :func:`pipeline.stages.common.use_memory`,
    :class:`~pipeline.stages.common.StreamSplit`): in memory or streamed, which is another crop
    implementation and random stream, and when streamed, the loader workers and the shuffle
    buffer decide which samples meet in a batch."""

    in_memory: Literal["auto"] | bool
    memory_budget_mb: float
    loader_workers: int
    shuffle_buffer: int


class Compute(StageSlice):
    """What one process computes with (``resources.*`` after the kind's overrides). The
    intra-op thread count sets the order of float reductions and a GPU computes with other
    kernels, so either moves the last bits of every number."""

    cpus_per_worker: float
    torch_threads: int | None
    use_gpu: bool


class TrainCompute(Compute):
    """A training stage's compute: also its worker count, which splits each batch across ranks
    (each draws its own augmentation, and BatchNorm sees per-rank batches between syncs)."""

    num_workers: int


class KnnMonitor(StageSlice):
    """The val kNN classifier's settings (``evaluate.knn_k``, ``evaluate.knn_temperature``)."""

    knn_k: int
    knn_temperature: float


# -- shard ------------------------------------------------------------------------------------


class ShardSlice(StageSlice):
    """The source and how it is split and sharded (``data.*``), and the label fractions
    (percent) to write class-balanced subsets for."""

    data: DataConfig
    fractions: tuple[float, ...]

    UNKEYED: ClassVar[dict[str, str]] = {
        **{
            f"data.{name}": "how later stages read the shards, not what the shards hold"
            for name in DataRead.model_fields
        },
        "fractions": "the stage's label_fractions param: in its own key, not in the key its "
        "dependants fold in (each reads only its own fraction's subset)",
    }

    @classmethod
    def of(cls, cfg: Config) -> ShardSlice:
        return cls(data=cfg.data, fractions=tuple(subset_fractions(cfg)))


# -- pretrain and tune ------------------------------------------------------------------------


def _pretraining(cfg: Config) -> dict[str, Any]:
    """What pretraining and the Tune search's pretraining trials read (less the resources)."""
    semisup = cfg.pretrain.method == "semisup"
    return {
        "seed": cfg.seed,
        "augment": cfg.augment,
        "model": cfg.model,
        "pretrain": cfg.pretrain,
        "label_fraction": cfg.pretrain_label_fraction if semisup else None,
        "knn": KnnMonitor.pick(cfg.evaluate),
        "data": DataRead.pick(cfg.data),
    }


class PretrainSlice(StageSlice):
    """Contrastive pretraining (:mod:`pipeline.stages.pretrain`)."""

    seed: int
    augment: AugmentConfig
    model: ModelConfig
    pretrain: PretrainConfig
    #: semisup: the labeled subset (``pretrain.label_fraction``, by default the smallest
    #: fine-tuning fraction); None for simclr and supcon, which read no subset.
    label_fraction: float | None
    knn: KnnMonitor
    data: DataRead
    resources: TrainCompute

    UNKEYED: ClassVar[dict[str, str]] = {
        "knn": "only the online val kNN monitor in history.json (never the weights): a new "
        "evaluation k does not re-run pretraining",
    }

    @classmethod
    def of(cls, cfg: Config) -> PretrainSlice:
        return cls(
            **_pretraining(cfg), resources=TrainCompute.pick(cfg.resources.for_stage("pretrain"))
        )


class TuneSlice(StageSlice):
    """The Tune search (``workflows.tune``): short pretraining trials in one process each,
    scored by the online val kNN (so its settings are in the key here). A trial runs with the
    pretrain kind's resources (``resources.stages.pretrain``)."""

    seed: int
    augment: AugmentConfig
    model: ModelConfig
    pretrain: PretrainConfig
    label_fraction: float | None
    tune: TuneConfig
    knn: KnnMonitor
    data: DataRead
    resources: Compute

    @classmethod
    def of(cls, cfg: Config) -> TuneSlice:
        return cls(
            **_pretraining(cfg),
            tune=cfg.tune,
            resources=Compute.pick(cfg.resources.for_stage("pretrain")),
        )


# -- fine-tuning, baseline, distillation ------------------------------------------------------


class FinetuneRead(StageSlice):
    """The ``finetune.*`` fields fine-tuning and the baseline train with."""

    from_head_layer: int
    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adamw", "lars"]
    lr: float
    weight_decay: float
    min_steps: int
    crop_min_scale: float


class SupervisedSlice(StageSlice):
    """Fine-tuning (kind ``finetune``) or the baseline (kind ``baseline``) at one label fraction
    (:mod:`pipeline.stages.finetune`): both train at ``pretrain.bf16``, build the network from
    ``model.*`` and crop to ``augment.image_size``."""

    #: ``finetune.seed``, else ``seed``
    seed: int
    image_size: int | None
    model: ModelConfig
    bf16: bool
    finetune: FinetuneRead
    #: the baseline only: ``finetune.baseline_lr`` (one rate, or one per fraction)
    baseline_lr: float | dict[float, float] | None
    #: the consistency phase, when this kind has one: always for fine-tuning (it may have 0
    #: epochs), for the baseline only with ``finetune.consistency.baseline``
    consistency: ConsistencyConfig | None
    data: DataRead
    resources: TrainCompute

    UNKEYED: ClassVar[dict[str, str]] = {
        "consistency.baseline": "which kinds train with the phase: resolved into whether the "
        "slice holds the section",
    }

    @classmethod
    def of(cls, cfg: Config, baseline: bool = False) -> SupervisedSlice:
        c = cfg.finetune.consistency
        return cls(
            seed=cfg.supervised_seed,
            image_size=cfg.augment.image_size,
            model=cfg.model,
            bf16=cfg.pretrain.bf16,
            finetune=FinetuneRead.pick(cfg.finetune),
            baseline_lr=cfg.finetune.baseline_lr if baseline else None,
            consistency=c if (c.baseline or not baseline) else None,
            data=DataRead.pick(cfg.data),
            resources=TrainCompute.pick(
                cfg.resources.for_stage("baseline" if baseline else "finetune")
            ),
        )

    def lr_for(self, fraction: float) -> float:
        """The learning rate at ``fraction`` % labels: the baseline's ``finetune.baseline_lr``
        when set (one value or one per fraction; a fine-tuning slice holds none), else
        ``finetune.lr``."""
        v = self.baseline_lr
        if v is None:
            return self.finetune.lr
        if isinstance(v, dict):
            if fraction not in v:
                raise KeyError(f"finetune.baseline_lr has no rate for label fraction {fraction:g}")
            return v[fraction]
        return v


class DistillRead(StageSlice):
    """The ``distill.*`` fields the student trains with."""

    temperature: float
    label_weight: float
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float


class DistillSlice(StageSlice):
    """Distillation into a student (:mod:`pipeline.stages.distill`)."""

    #: ``finetune.seed``, else ``seed``
    seed: int
    image_size: int | None
    #: ``model.*`` with ``distill.student``'s arch, width and (when set) stem stride
    student: ModelConfig
    bf16: bool
    distill: DistillRead
    #: ``distill.crop_min_scale``, else ``finetune.crop_min_scale``
    crop_min_scale: float
    data: DataRead
    resources: TrainCompute

    @classmethod
    def of(cls, cfg: Config) -> DistillSlice:
        d = cfg.distill
        student = cfg.model.model_copy(update=d.student.model_dump(exclude_none=True))
        crop = d.crop_min_scale if d.crop_min_scale is not None else cfg.finetune.crop_min_scale
        return cls(
            seed=cfg.supervised_seed,
            image_size=cfg.augment.image_size,
            student=student,
            bf16=cfg.pretrain.bf16,
            distill=DistillRead.pick(d),
            crop_min_scale=crop,
            data=DataRead.pick(cfg.data),
            resources=TrainCompute.pick(cfg.resources.for_stage("distill")),
        )


# -- evaluate ---------------------------------------------------------------------------------


class ReportHeader(StageSlice):
    """What the label-efficiency report's header says about the run."""

    source: str
    arch: str
    width: float
    stem_stride: int
    head_depth: int
    method: str
    temperature: float
    epochs: int
    batch_size: int
    pseudo_label_from_epoch: int
    pseudo_label_fraction: float
    consistency_epochs: int
    consistency_threshold: float
    consistency_baseline: bool

    @classmethod
    def of(cls, cfg: Config) -> ReportHeader:
        m, p, c = cfg.model, cfg.pretrain, cfg.finetune.consistency
        return cls(
            source=cfg.data.source,
            arch=m.arch,
            width=m.width,
            stem_stride=m.stem_stride,
            head_depth=m.head_depth,
            method=p.method,
            temperature=p.temperature,
            epochs=p.epochs,
            batch_size=p.batch_size,
            pseudo_label_from_epoch=p.pseudo_label_from_epoch,
            pseudo_label_fraction=p.pseudo_label_fraction,
            consistency_epochs=c.epochs,
            consistency_threshold=c.threshold,
            consistency_baseline=c.baseline,
        )


class EvaluateSlice(StageSlice):
    """Evaluation (:mod:`pipeline.stages.evaluate`): probes, kNN, the report and its plots."""

    seed: int
    image_size: int | None
    evaluate: EvaluateConfig
    header: ReportHeader
    label_fractions: tuple[float, ...]
    data: DataRead
    resources: Compute

    UNKEYED: ClassVar[dict[str, str]] = {
        "label_fractions": "the graph: the stage's inputs name each fraction's stages, so its key "
        "follows them through the upstream keys",
    }

    @classmethod
    def of(cls, cfg: Config) -> EvaluateSlice:
        return cls(
            seed=cfg.seed,
            image_size=cfg.augment.image_size,
            evaluate=cfg.evaluate,
            header=ReportHeader.of(cfg),
            label_fractions=tuple(float(p) for p in cfg.finetune.label_fractions),
            data=DataRead.pick(cfg.data),
            resources=Compute.pick(cfg.resources.for_stage("evaluate")),
        )


_BUILDERS: dict[str, Any] = {
    "shard": ShardSlice.of,
    "tune": TuneSlice.of,
    "pretrain": PretrainSlice.of,
    "finetune": SupervisedSlice.of,
    "baseline": lambda cfg: SupervisedSlice.of(cfg, baseline=True),
    "distill": DistillSlice.of,
    "evaluate": EvaluateSlice.of,
}


#: The stage kinds that have a slice.
SLICE_KINDS = frozenset(_BUILDERS)


def slice_for(kind: str, cfg: Config) -> StageSlice:
    """The slice of ``cfg`` that stage kind ``kind`` reads; ``KeyError`` for an unknown kind."""
    if kind not in _BUILDERS:
        raise KeyError(f"stage kind {kind!r} has no config slice (known: {sorted(_BUILDERS)})")
    built: StageSlice = _BUILDERS[kind](cfg)
    return built
