"""Typed pipeline configuration.

A config is YAML validated by pydantic models, one model per section (``data``, ``augment``,
``model``, ``pretrain``, ``finetune``, ``distill``, ``evaluate``, ``tune``, ``resources``,
``storage``, ``tracking``).  Every problem — an unknown key, a wrong type, a bad value — becomes a
:class:`ConfigError` whose message is one line naming the dotted field, e.g.::

    config error: pretrain.temperature: must be > 0 (got 0.0)

Overrides use ``a.b=value`` strings (the CLI's ``--set``); the value is parsed as YAML, so
``--set finetune.label_fractions=[1,10]`` and ``--set pretrain.bf16=true`` work.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import UserError

__all__ = [
    "AugmentConfig",
    "Config",
    "ConfigError",
    "ConsistencyConfig",
    "DataConfig",
    "DistillConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "ModelConfig",
    "PretrainConfig",
    "ResourcesConfig",
    "StorageConfig",
    "StudentConfig",
    "TrackingConfig",
    "TuneConfig",
    "apply_overrides",
    "config_hash",
    "format_fraction",
    "load_config",
    "parse_config",
    "subset_fractions",
]


class ConfigError(UserError, ValueError):
    """A configuration problem; ``str(err)`` is one line naming the dotted field."""


FRACTION_DECIMALS = 6


def format_fraction(p: float) -> str:
    """A label percentage as it appears in subset file and stage names, with at most
    :data:`FRACTION_DECIMALS` decimals: 1 -> '1', 10.0 -> '10', 0.1 -> '0.1', 12.5 -> '12.5'.

    The one formatting of fractions (``pipeline.data.shards`` and ``workflows.dag`` use it); a
    value outside (0, 100] or one that rounds to 0 is a ``ValueError``. Two fractions with the same
    name are rejected when a config is validated.
    """
    p = float(p)
    if not 0.0 < p <= 100.0:
        raise ValueError(f"label fraction {p:g} is outside (0, 100]")
    s = f"{p:.{FRACTION_DECIMALS}f}".rstrip("0").rstrip(".")
    if s == "0":
        raise ValueError(
            f"label fraction {p:g} rounds to 0 (subset names keep {FRACTION_DECIMALS} decimals)"
        )
    return s


class _Section(BaseModel):
    # inf and nan are never meaningful settings (a learning rate of inf trains to nan)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Arch = Literal["resnet18", "resnet34", "resnet50"]


IMAGE_KEYS_DEFAULT = ("jpg", "jpeg", "png", "webp")
_EXT = re.compile(r"^[A-Za-z0-9_-]+$")


class DataConfig(_Section):
    source: Literal["fashion-mnist", "cifar10", "image-folder", "digits", "webdataset"] = "digits"
    root: str | None = Field(None, description="where the source's files are; None = its default")
    download: bool = Field(
        False, description="fetch fashion-mnist/cifar10 when absent (needs the internet)"
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="part of train carved out as val")
    shard_size: int = Field(5000, ge=1, description="samples per tar shard")
    max_train: int | None = Field(None, ge=1, description="cap on train images (class-stratified)")
    max_test: int | None = Field(None, ge=1, description="cap on test images (class-stratified)")
    seed: int = 0
    loader_workers: int = Field(
        1, ge=0, description="DataLoader worker processes that decode and crop (streaming path)"
    )
    in_memory: Literal["auto"] | bool = Field(
        "auto",
        description="true: decode each split once into a uint8 tensor; false: stream the shards; "
        "auto: in memory when the decoded splits fit in memory_budget_mb",
    )
    memory_budget_mb: float = Field(
        1024.0,
        gt=0.0,
        description="in_memory=auto: the most decoded image bytes (all splits, MiB) a stage holds "
        "in memory; every training process holds its own copy (and on a GPU, on the device)",
    )
    shuffle_buffer: int = Field(
        1000,
        ge=1,
        description="streaming: samples (still encoded) each loader worker shuffles in",
    )

    @field_validator("in_memory", mode="before")
    @classmethod
    def _in_memory(cls, v: Any) -> Any:
        if isinstance(v, str):
            low = v.strip().lower()
            table = {"auto": "auto", "true": True, "yes": True, "on": True, "1": True}
            table.update({"false": False, "no": False, "off": False, "0": False})
            if low in table:
                return table[low]
            raise ValueError("expected auto, true or false")
        return v

    max_side: int | None = Field(
        None,
        ge=8,
        description="image-folder: images whose longer side exceeds this are resized to it (and "
        "re-encoded); None = every image keeps its original bytes",
    )
    train_urls: str | list[str] | None = Field(
        None,
        description="webdataset: the train shards, a brace pattern or a list (local paths, "
        "file://, s3://, gs://, pipe:)",
    )
    test_urls: str | list[str] | None = Field(None, description="webdataset: the test shards")
    val_urls: str | list[str] | None = Field(
        None,
        description="webdataset: the val shards; None = val_fraction of train, chosen by a stable "
        "hash of the sample key",
    )
    image_keys: list[str] = Field(
        default_factory=lambda: list(IMAGE_KEYS_DEFAULT),
        description="webdataset: member extensions holding the image, first present wins",
    )
    label_key: str = Field(
        "cls", description="webdataset: the label member (an ASCII integer), or json:<field>"
    )
    classes: list[str] | None = Field(
        None,
        description="webdataset: class names (label i is classes[i]; labels outside are skipped); "
        "None = 0..the largest label",
    )

    @field_validator("train_urls", "test_urls", "val_urls")
    @classmethod
    def _urls(cls, v: str | list[str] | None) -> str | list[str] | None:
        if v is None:
            return v
        items = [v] if isinstance(v, str) else v
        if not items:
            raise ValueError("needs at least one shard URL")
        for u in items:
            if not u.strip():
                raise ValueError("empty shard URL")
        return v

    @field_validator("image_keys")
    @classmethod
    def _image_keys(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one member extension, e.g. [jpg, png]")
        for k in v:
            if not _EXT.match(k):
                raise ValueError(f"{k!r} is not a member extension (letters, digits, _ or -)")
        return v

    @field_validator("label_key")
    @classmethod
    def _label_key(cls, v: str) -> str:
        if v.startswith("json:"):
            if not v[5:]:
                raise ValueError("json: needs a field name, e.g. json:label")
        elif not _EXT.match(v):
            raise ValueError(f"{v!r}: expected a member extension (e.g. cls) or json:<field>")
        return v

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (len(v) < 2 or len(set(v)) != len(v)):
            raise ValueError(f"needs at least two distinct class names (got {v})")
        return v

    @model_validator(mode="after")
    def _webdataset(self) -> DataConfig:
        if self.source == "webdataset":
            for name in ("train_urls", "test_urls"):
                if getattr(self, name) is None:
                    raise ValueError(f"{name}: required for source webdataset")
            for name in ("max_train", "max_test"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: not supported for source webdataset (the shards are read as "
                        "they are; make a smaller shard list instead)"
                    )
        if self.max_side is not None and self.source != "image-folder":
            why = (
                "its shards are read in place"
                if self.source == "webdataset"
                else "its images are decoded arrays, kept as they are"
            )
            raise ValueError(f"max_side: only for source image-folder ({self.source}: {why})")
        if self.source != "webdataset":
            for name in ("train_urls", "test_urls", "val_urls", "classes"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: only for source webdataset (source is {self.source})"
                    )
        return self


class AugmentConfig(_Section):
    strength: float = Field(0.5, ge=0.0, description="colour-jitter strength s")
    crop_min_scale: float = Field(0.2, gt=0.0, le=1.0)
    image_size: int | None = Field(None, ge=4, description="view size; None = the native size")


class ModelConfig(_Section):
    arch: Arch = "resnet18"
    width: float = Field(1.0, gt=0.0, description="channel width multiplier")
    cifar_stem: bool = Field(True, description="3x3 stem without max-pool (small images)")
    stem_stride: Literal[1, 2] = Field(
        1, description="stride of the CIFAR stem (2: a quarter of the positions, ~3x images/s)"
    )
    head_depth: int = Field(2, ge=1, le=4, description="projection-head layers")
    head_hidden: int | None = Field(None, ge=1, description="hidden width; None = encoder width")
    head_out: int = Field(128, ge=1)
    head_last_bn: bool = Field(
        False,
        description="last head layer: bias-free Linear + scale-only BatchNorm (SimCLRv2) "
        "instead of Linear with bias (SimCLR)",
    )
    channels_last: bool = False

    @model_validator(mode="after")
    def _stem(self) -> ModelConfig:
        if self.stem_stride != 1 and not self.cifar_stem:
            raise ValueError("stem_stride applies to the CIFAR stem only (cifar_stem is false)")
        return self


class PretrainConfig(_Section):
    method: Literal["simclr", "supcon", "semisup"] = "simclr"
    temperature: float = Field(0.2, gt=0.0)
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=2)
    optimizer: Literal["lars", "sgd", "adamw"] = "lars"
    lr: float | None = Field(None, gt=0.0, description="absolute LR; None = scaled from base_lr")
    base_lr: float = Field(0.075, gt=0.0)
    lr_scaling: Literal["linear", "sqrt"] = "sqrt"
    weight_decay: float = Field(1e-6, ge=0.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    warmup_epochs: float = Field(1.0, ge=0.0)
    bf16: bool = False
    knn_every: int = Field(1, ge=0, description="online val kNN every N epochs; 0 = never")
    knn_bank: int = Field(5000, ge=1, description="train images in the online kNN bank")
    knn_queries: int = Field(2000, ge=1, description="val images the online kNN scores")
    label_fraction: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="semisup: the labeled subset (percent); None = the smallest finetune fraction",
    )
    labeled_per_batch: int = Field(
        0,
        ge=0,
        description="semisup: images of the labeled subset drawn into every batch (the rest of "
        "the batch stays unlabeled); 0 = only their natural share",
    )
    pseudo_label_from_epoch: int = Field(
        0,
        ge=0,
        description="semisup: from this epoch (1-based) on, unlabeled images whose nearest class "
        "prototype of the labeled subset is confident take that class as a pseudo-label (re-drawn "
        "every epoch); 0 = never",
    )
    pseudo_label_fraction: float = Field(
        0.6,
        gt=0.0,
        le=1.0,
        description="semisup pseudo-labels: the most confident share of the unlabeled images, "
        "taken per predicted class (class-balanced)",
    )
    max_steps_per_epoch: int | None = Field(None, ge=1)


class ConsistencyConfig(_Section):
    """FixMatch-style consistency training on the unlabeled train images after fine-tuning (Sohn
    et al. 2020, arXiv:2001.07685): a weak view's confident prediction is the strong view's
    target, next to cross-entropy on the labeled subset."""

    epochs: int = Field(
        0, ge=0, description="epochs over the unlabeled train images after fine-tuning; 0 = off"
    )
    threshold: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="softmax confidence a weak view's prediction needs to become a target",
    )
    weight: float = Field(1.0, gt=0.0, description="weight of the unlabeled loss")
    strength: float = Field(
        1.0, ge=0.0, description="the strong view's brightness/contrast (colour) jitter"
    )
    crop_min_scale: float = Field(1.0, gt=0.0, le=1.0, description="the strong view's crop")
    batch_size: int = Field(256, ge=2, description="unlabeled images per step")
    labeled_batch_size: int = Field(64, ge=1, description="labeled images per step")
    lr: float = Field(1e-3, gt=0.0, description="AdamW, cosine decay, no warm-up")
    distribution_alignment: bool = Field(
        False,
        description="scale the weak view's class probabilities by the labeled subset's class "
        "frequencies over their running mean before thresholding (ReMixMatch)",
    )
    baseline: bool = Field(
        False,
        description="train the from-scratch baseline this way too (a semi-supervised reference "
        "that was not pretrained); off: the baseline sees only its labeled subset",
    )


class FinetuneConfig(_Section):
    label_fractions: list[float] = Field(default_factory=lambda: [1.0, 10.0])
    from_head_layer: int = Field(1, ge=0, le=4)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    optimizer: Literal["sgd", "adamw", "lars"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    baseline_lr: float | dict[float, float] | None = Field(
        None,
        description="the from-scratch baseline's learning rate: one value, or one per label "
        "fraction (e.g. {0.1: 0.1, 1: 0.03}; every fraction of label_fractions named, others "
        "ignored); None = finetune.lr",
    )
    weight_decay: float = Field(1e-4, ge=0.0)
    min_steps: int = Field(200, ge=1, description="lower bound on steps for tiny subsets")
    crop_min_scale: float = Field(0.5, gt=0.0, le=1.0, description="crop+flip augmentation")
    baseline: bool = True
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    seed: int | None = Field(
        None,
        description="seed of fine-tuning, baseline and distillation; None = the run's seed. "
        "Changing only this re-seeds those stages and keeps the pretraining's cache key, so "
        "`--reuse` re-runs just them (a cheap repeat at few labels; `contrastive compare`)",
    )

    @field_validator("label_fractions")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("needs at least one label fraction")
        for p in v:
            format_fraction(p)
        if len(set(v)) != len(v):
            raise ValueError(f"label fractions repeat: {v}")
        return v

    @field_validator("baseline_lr", mode="before")
    @classmethod
    def _baseline_lr_shape(cls, v: Any) -> Any:
        def number(x: Any) -> float | None:
            if isinstance(x, bool):
                return None
            try:
                return float(x)
            except (TypeError, ValueError):
                return None

        if v is None:
            return v
        if not isinstance(v, dict):
            lr = number(v)
            if lr is None:
                raise ValueError("must be a number, or a mapping label fraction -> number")
            return lr
        out: dict[float, float] = {}
        for k, x in v.items():
            p, lr = number(k), number(x)
            if p is None:
                raise ValueError(f"{k}: must be a label fraction (a number)")
            if lr is None:
                raise ValueError(f"{k}: must be a number (got {x!r})")
            out[p] = lr
        return out

    @model_validator(mode="after")
    def _baseline_lr(self) -> FinetuneConfig:
        v = self.baseline_lr
        for p, lr in (v if isinstance(v, dict) else {None: v}).items():
            if lr is not None and not lr > 0:
                where = "baseline_lr" if p is None else f"baseline_lr.{p:g}"
                raise ValueError(f"{where}: must be > 0 (got {lr})")
        if isinstance(v, dict):
            # Every fraction that runs needs its rate (no silent fallback); rates for fractions
            # that do not run are allowed, so `--set finetune.label_fractions=[0.1]` works on a
            # config that names more.
            missing = [p for p in self.label_fractions if p not in v]
            if missing:
                raise ValueError(
                    f"baseline_lr: names label fractions {sorted(v)} but label_fractions are "
                    f"{self.label_fractions} (missing {missing})"
                )
        return self


class StudentConfig(_Section):
    arch: Arch = "resnet18"
    width: float = Field(0.5, gt=0.0)
    stem_stride: Literal[1, 2] | None = Field(None, description="None = the teacher's")


class DistillConfig(_Section):
    enabled: bool = True
    student: StudentConfig = Field(default_factory=StudentConfig)
    temperature: float = Field(1.0, gt=0.0)
    label_weight: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="w: loss = (1 - w) * distillation + w * cross-entropy on the labeled subset",
    )
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=2)
    lr: float = Field(2e-3, gt=0.0)
    weight_decay: float = Field(1e-4, ge=0.0)
    crop_min_scale: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="the student's crop+flip augmentation (1.0: flip only, the teacher's targets "
        "are computed on the whole image); default: finetune.crop_min_scale",
    )


class EvaluateConfig(_Section):
    knn_k: int = Field(200, ge=1)
    knn_temperature: float = Field(0.1, gt=0.0)
    linear_epochs: int = Field(100, ge=1)
    linear_lr: float = Field(0.1, gt=0.0)
    embedding_samples: int = Field(2000, ge=10)


class TuneConfig(_Section):
    enabled: bool = False
    num_trials: int = Field(4, ge=1)
    epochs: int = Field(3, ge=1)
    search_alg: Literal["random", "optuna", "hyperopt"] = "random"
    temperature: tuple[float, float] = (0.05, 1.0)
    head_depth: tuple[int, int] = (1, 4)
    strength: tuple[float, float] = (0.25, 1.5)
    lr: tuple[float, float] | None = None
    grace_period: int = Field(1, ge=1)
    reduction_factor: int = Field(2, ge=2)
    seed: int = 0

    @model_validator(mode="after")
    def _ranges(self) -> TuneConfig:
        for name in ("temperature", "head_depth", "strength", "lr"):
            lo_hi = getattr(self, name)
            if lo_hi is not None and not (0 < lo_hi[0] <= lo_hi[1]):
                raise ValueError(f"{name}: needs 0 < low <= high (got {list(lo_hi)})")
        if not 1 <= self.head_depth[0] <= self.head_depth[1] <= 4:
            raise ValueError(f"head_depth: range must lie in 1..4 (got {list(self.head_depth)})")
        return self


StageKind = Literal["pretrain", "finetune", "baseline", "distill", "evaluate"]


class StageResources(_Section):
    """Per-stage-kind overrides of :class:`ResourcesConfig` (unset fields keep the default)."""

    num_workers: int | None = Field(None, ge=1)
    cpus_per_worker: float | None = Field(None, gt=0.0)
    torch_threads: int | None = Field(None, ge=1)


class ResourcesConfig(_Section):
    num_workers: int = Field(1, ge=1, description="Ray Train workers per training stage")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    torch_threads: int | None = Field(None, ge=1, description="intra-op threads per worker")
    max_failures: int = Field(2, ge=0)
    stages: dict[StageKind, StageResources] = Field(
        default_factory=dict,
        description="overrides per stage kind, e.g. small-batch stages on 1 CPU each so two run "
        "at once: {finetune: {cpus_per_worker: 1, torch_threads: 1}}",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="environment variables for the driver and every stage's tasks and workers "
        "(their Ray runtime environment), e.g. {AWS_ENDPOINT_URL: http://minio:9000}; visible in "
        "the Ray dashboard and the run's config: endpoints, not credentials",
    )

    @field_validator("env", mode="before")
    @classmethod
    def _env_strings(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        out = {}
        for k, x in v.items():
            if not isinstance(k, str) or not k or "=" in k or k.strip() != k:
                raise ValueError(f"variable name {k!r} is not valid")
            if isinstance(x, (dict, list)) or x is None:
                raise ValueError(f"{k}: the value must be a string or a number")
            out[k] = str(x).lower() if isinstance(x, bool) else str(x)
        return out

    @property
    def threads(self) -> int:
        """Intra-op threads of one worker: ``torch_threads``, else one per whole CPU."""
        return self.torch_threads or max(1, int(self.cpus_per_worker))

    def for_stage(self, kind: str) -> ResourcesConfig:
        """These resources with ``stages[kind]``'s set fields applied."""
        over = self.stages.get(kind)  # type: ignore[call-overload]
        if over is None:
            return self
        return self.model_copy(update=over.model_dump(exclude_none=True))


class StorageConfig(_Section):
    root: str = "runs"

    @field_validator("root")
    @classmethod
    def _root(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty (a folder or a URI such as s3://bucket/prefix)")
        return v


#: Schemes an MLflow tracking URI may have (SQLAlchemy database URIs take a ``+driver`` suffix).
TRACKING_SCHEMES = (
    "http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "oracle",
    "databricks", "databricks-uc", "uc",
)  # fmt: skip


class TrackingConfig(_Section):
    enabled: bool = True
    uri: str | None = Field(
        None, description="MLflow tracking URI; None = sqlite under storage.root"
    )
    experiment: str = "contrastive"

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.strip():
            raise ValueError(
                "must not be empty (leave it out for the SQLite store under storage.root)"
            )
        scheme = v.split("://", 1)[0].lower() if "://" in v else None
        if scheme is None:
            head = v.split(":", 1)[0].lower()
            if ":" in v and len(head) > 1 and head.split("+")[0] in TRACKING_SCHEMES:
                raise ValueError(f"{head}: needs '://' (e.g. {head}://...)")
            if v != "databricks" and ":" in v and len(head) > 1:
                raise ValueError(
                    f"unknown scheme {head!r}; use one of {', '.join(TRACKING_SCHEMES)}"
                )
            return v  # a local folder (MLflow's file store)
        if scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise ValueError(
                f"unknown scheme {scheme!r} (a typo?); use one of {', '.join(TRACKING_SCHEMES)}"
            )
        if scheme in ("http", "https") and not v.split("://", 1)[1].split("/")[0].strip():
            raise ValueError("has no host")
        return v


class Config(_Section):
    name: str = "run"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @property
    def pretrain_label_fraction(self) -> float:
        """The labeled subset (%) semi-supervised pretraining uses: ``pretrain.label_fraction``, by
        default the smallest fine-tuning fraction (no evaluated fraction sees more labels than it
        is credited with)."""
        return float(self.pretrain.label_fraction or min(self.finetune.label_fractions))

    @property
    def supervised_seed(self) -> int:
        """The seed of fine-tuning, baseline and distillation: ``finetune.seed``, else ``seed``."""
        return self.seed if self.finetune.seed is None else self.finetune.seed

    @model_validator(mode="after")
    def _cross(self) -> Config:
        if self.finetune.from_head_layer > self.model.head_depth:
            raise ValueError(
                f"finetune.from_head_layer: {self.finetune.from_head_layer} exceeds "
                f"model.head_depth {self.model.head_depth}"
            )
        _check_fraction_names(self)
        pl = self.pretrain.pseudo_label_from_epoch
        if pl and self.pretrain.method != "semisup":
            raise ValueError(
                f"pretrain.pseudo_label_from_epoch: pseudo-labels need pretrain.method semisup, "
                f"not {self.pretrain.method}"
            )
        if pl > self.pretrain.epochs:
            raise ValueError(
                f"pretrain.pseudo_label_from_epoch: {pl} is after the last epoch "
                f"({self.pretrain.epochs})"
            )
        return self

    # -- helpers ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as a plain dict (a stage's config slice)."""
        d = self.to_dict()
        return {n: d[n] for n in names}

    def tracking_uri(self) -> str:
        if self.tracking.uri:
            return self.tracking.uri
        root = self.storage.root
        if "://" in root:
            raise ConfigError("config error: tracking.uri: must be set when storage.root is a URI")
        return "sqlite:///" + str(Path(root).expanduser().resolve() / "mlflow.db")


def subset_fractions(cfg: Config) -> list[float]:
    """The label percentages the shard stage writes subsets for: ``finetune.label_fractions`` and,
    when set, ``pretrain.label_fraction`` (duplicates removed, order kept)."""
    fr = [float(p) for p in cfg.finetune.label_fractions]
    if cfg.pretrain.label_fraction is not None:
        fr.append(float(cfg.pretrain.label_fraction))
    return list(dict.fromkeys(fr))


def _check_fraction_names(cfg: Config) -> None:
    """Two different label fractions that format to one subset name would share one file."""
    seen: dict[str, float] = {}
    for p in subset_fractions(cfg):
        field = (
            "finetune.label_fractions"
            if p in cfg.finetune.label_fractions
            else "pretrain.label_fraction"
        )
        try:
            name = format_fraction(p)
        except ValueError as err:
            raise ValueError(f"{field}: {err}") from None
        other = seen.setdefault(name, p)
        if other != p:
            raise ValueError(
                f"{field}: {other!r} and {p!r} give the same subset name label_{name} "
                f"(names keep {FRACTION_DECIMALS} decimals)"
            )


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-")]
    return ".".join(parts) if parts else "(top level)"


# Keys that were renamed: the unknown-key error names the new one.
_RENAMED = {
    "distill.alpha": "distill.label_weight (the weight of the cross-entropy term; the "
    "distillation term gets 1 - label_weight)",
}

# Keys that were removed: the unknown-key error says why.
_REMOVED = {
    "augment.backend": "every stage augments whole batches with tensor ops "
    "(pipeline.data.transforms.BatchTwoViewAugment); delete the key",
    "finetune.classifier_init": "the classifier always starts from random initialisation "
    "(a linear-probe start did not help, docs/recipe.md); delete the key",
}


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = _format_loc(first["loc"])
    kind, msg, got = first["type"], first["msg"], first.get("input")
    if kind == "extra_forbidden":
        if loc in _RENAMED:
            return f"config error: {loc}: unknown key; it is now {_RENAMED[loc]}"
        if loc in _REMOVED:
            return f"config error: {loc}: removed; {_REMOVED[loc]}"
        return f"config error: {loc}: unknown key"
    msg = msg.removeprefix("Value error, ")
    if kind == "value_error" and isinstance(got, dict):
        # A model validator: its message starts with the field, relative to the section.
        prefix = "" if loc == "(top level)" else loc + "."
        return f"config error: {prefix}{msg}"
    for long, short in (
        ("Input should be greater than or equal to", "must be >="),
        ("Input should be greater than", "must be >"),
        ("Input should be less than or equal to", "must be <="),
        ("Input should be less than", "must be <"),
        ("Input should be", "must be"),
    ):
        msg = msg.replace(long, short)
    got_s = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"config error: {loc}: {msg}{got_s}"


def parse_config(raw: dict[str, Any] | None) -> Config:
    """Validate a plain dict into a :class:`Config`, raising a one-line :class:`ConfigError`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"config error: (top level): must be a mapping (got {type(raw).__name__})"
        )
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (value parsed as YAML) to a copy of ``raw``."""
    out = copy.deepcopy(raw) if raw else {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(
                f"config error: --set {item!r}: expected KEY=VALUE, e.g. pretrain.epochs=5"
            )
        key, value_s = item.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise ConfigError(f"config error: --set {item!r}: empty key")
        try:
            value = yaml.safe_load(value_s) if value_s.strip() else None
        except yaml.YAMLError:
            value = value_s
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"config error: {key}: {p} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config error: {path}: is a folder, not a config file")
    if not p.is_file():
        builtin = (
            Path(__file__).resolve().parent.parent / "workflows" / "configs" / f"{p.stem}.yaml"
        )
        if p.suffix in ("", ".yaml") and not p.parent.name and builtin.is_file():
            p = builtin
        else:
            raise ConfigError(f"config error: {path}: no such file")
    try:
        data = p.read_bytes()
    except OSError as err:
        raise ConfigError(f"config error: {path}: cannot read it ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"config error: {path}: line {line} is not UTF-8 text "
            f"(byte 0x{data[err.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as err:
        raise ConfigError(f"config error: {path}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config error: {path}:{where} is not valid YAML") from None
    return raw or {}


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load``, except that a key given twice in one mapping is an error (PyYAML keeps
    the last one silently, so a forgotten earlier setting would win without a word)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise _DuplicateKey(
                        f"line {line}: duplicate key {key!r} (first given on line {seen[key]})"
                    )
            except TypeError:  # an unhashable key: SafeLoader's own error follows
                continue
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_config(
    path: str | os.PathLike[str] | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """Load a YAML config (a path, or the name of a shipped config such as ``smoke``), apply
    ``--set`` overrides, validate, and resolve ``storage.root`` to an absolute path."""
    raw = _read_yaml(path) if path is not None else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping")
    cfg = parse_config(apply_overrides(raw, overrides))
    root = cfg.storage.root
    if "://" not in root:
        cfg.storage.root = str(Path(root).expanduser().resolve())
    return cfg


def config_hash(obj: Any) -> str:
    """A stable SHA-256 hex digest of a JSON-serialisable object (canonical key order)."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()
