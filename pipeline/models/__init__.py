"""Models: ResNet encoders, projection heads, contrastive model, classifiers, model files.

* :func:`build_encoder` — ResNet-18/34/50 (torchvision blocks) with a width multiplier and an
  optional CIFAR stem, returning the pooled representation ``h`` (``.out_dim``).
* :class:`ProjectionHead`, :class:`ContrastiveModel` (``forward(x) -> (h, z)``), SimCLR
  (arXiv:2002.05709) / SimCLRv2 (arXiv:2006.10029).
* :func:`backbone_from` (encoder + first ``j`` head layers) and :class:`Classifier`.
* Builders from the ``model`` config section: :func:`build_contrastive_model`,
  :func:`build_classifier_from_config`; model files: :func:`save_model`, :func:`load_model`.
* :func:`count_params`, :func:`flops_per_image`, :func:`to_channels_last`.

Model file (``torch.save`` of a dict, written atomically)::

    {"kind": "contrastive" | "classifier", "model": <model section dict>, "in_channels": c,
     "num_classes": k | None, "head_layers": j | None, "state_dict": {...}, "extra": {...}}
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from pipeline.atomic import atomic_torch_save
from pipeline.config import ModelConfig, StudentConfig
from pipeline.models.flops import count_params, flops_per_image
from pipeline.models.heads import (
    Backbone,
    Classifier,
    ContrastiveModel,
    ProjectionHead,
    backbone_from,
)
from pipeline.models.resnet import ResNetEncoder, build_encoder, scaled_channels, to_channels_last

__all__ = [
    "Backbone",
    "Classifier",
    "ContrastiveModel",
    "ProjectionHead",
    "ResNetEncoder",
    "backbone_from",
    "build_classifier_from_config",
    "build_contrastive_model",
    "build_encoder",
    "count_params",
    "flops_per_image",
    "load_model",
    "model_config",
    "save_model",
    "scaled_channels",
    "to_channels_last",
]

ModelSection = ModelConfig | StudentConfig | dict[str, Any]
_KINDS = ("contrastive", "classifier")


def model_config(section: ModelSection) -> ModelConfig:
    """A :class:`ModelConfig` from a ``model`` section, a ``distill.student`` section (``arch``,
    ``width``, ``stem_stride`` when set; the other fields take ModelConfig's defaults — with no
    teacher section at hand, an unset student stem stride is the default 1) or a plain dict of either.

    Raises:
        ValueError: on an unknown key or a bad value (one line naming the field).
    """
    if isinstance(section, ModelConfig):
        return section
    if isinstance(section, BaseModel):
        section = section.model_dump(exclude_none=True)
    if not isinstance(section, dict):
        raise ValueError(
            f"model section must be a dict or ModelConfig (got {type(section).__name__})"
        )
    try:
        return ModelConfig.model_validate(section)
    except ValidationError as err:
        e = err.errors()[0]
        loc = ".".join(str(p) for p in e["loc"])
        raise ValueError(f"model.{loc}: {e['msg']} (got {e.get('input')!r})") from None


def build_contrastive_model(model_cfg: ModelSection, in_channels: int) -> ContrastiveModel:
    """Encoder + projection head from the ``model`` config section (random init).

    The head's hidden width is ``model.head_hidden`` or, when None, the encoder's ``out_dim``
    (SimCLR, arXiv:2002.05709, §B.9 uses the encoder width). ``model.channels_last`` converts the
    parameters to ``torch.channels_last``.
    """
    cfg = model_config(model_cfg)
    encoder = build_encoder(cfg.arch, cfg.width, cfg.cifar_stem, in_channels, cfg.stem_stride)
    hidden = cfg.head_hidden or encoder.out_dim
    head = ProjectionHead(
        encoder.out_dim, hidden, cfg.head_out, cfg.head_depth, last_bn=cfg.head_last_bn
    )
    model = ContrastiveModel(encoder, head)
    if cfg.channels_last:
        to_channels_last(model)
    return model


def build_classifier_from_config(
    model_cfg: ModelSection, in_channels: int, num_classes: int, head_layers: int = 0
) -> Classifier:
    """A randomly initialised classifier with the same network as the one fine-tuned from
    ``build_contrastive_model(model_cfg)`` at head layer ``head_layers`` (the supervised baseline),
    or, given a ``distill.student`` section, the student (``head_layers`` = 0).

    Built as ``build_contrastive_model -> backbone_from(j) -> Classifier``.

    Raises:
        ValueError: on a bad section, ``head_layers`` outside ``0..head_depth`` or num_classes < 1.
    """
    cfg = model_config(model_cfg)
    if isinstance(head_layers, bool) or not isinstance(head_layers, int):
        raise ValueError(f"head_layers must be an int (got {head_layers!r})")
    if not 0 <= head_layers <= cfg.head_depth:
        raise ValueError(
            f"head_layers must be in 0..{cfg.head_depth} (model.head_depth) (got {head_layers})"
        )
    backbone, feat_dim = backbone_from(build_contrastive_model(cfg, in_channels), head_layers)
    return Classifier(backbone, feat_dim, num_classes)


def _section_dict(section: ModelSection) -> dict[str, Any]:
    if isinstance(section, BaseModel):
        return section.model_dump(mode="json")
    if not isinstance(section, dict):
        raise ValueError(
            f"model section must be a dict or a config model (got {type(section).__name__})"
        )
    return dict(section)


_HEAD_KEY = re.compile(r"^backbone\.head_(\d+)\.")


def _strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) key prefixes."""
    out = {}
    for k, v in state_dict.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def save_model(
    path: str | os.PathLike[str],
    kind: Literal["contrastive", "classifier"],
    model_section: ModelSection,
    in_channels: int,
    num_classes: int | None,
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
    head_layers: int | None = None,
) -> None:
    """Write a model file that :func:`load_model` rebuilds (atomic: temp file + ``os.replace``).

    Args:
        kind: ``contrastive`` (a :class:`ContrastiveModel`) or ``classifier``.
        model_section: the ``model`` (or ``distill.student``) section the network was built from.
        num_classes: classes of a classifier; None for ``contrastive``.
        state_dict: the module's state dict (``_orig_mod.`` / ``module.`` prefixes are removed);
            tensors are stored on the CPU.
        extra: anything else to keep (plain Python values / tensors), stored under ``"extra"``.
        head_layers: for a classifier, the ``j`` of :func:`backbone_from`; None = read it from
            the state dict's ``backbone.head_<i>`` keys.

    Raises:
        ValueError: on an unknown kind, a bad section, or a classifier without num_classes.
    """
    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {_KINDS} (got {kind!r})")
    section = _section_dict(model_section)
    cfg = model_config(section)
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1 (got {in_channels!r})")
    sd = {
        k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
        for k, v in _strip_prefixes(state_dict).items()
    }
    if kind == "classifier":
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"a classifier needs num_classes >= 1 (got {num_classes!r})")
        if head_layers is None:
            idx = [int(m.group(1)) for k in sd if (m := _HEAD_KEY.match(k))]
            head_layers = max(idx) + 1 if idx else 0
        if not 0 <= head_layers <= cfg.head_depth:
            raise ValueError(f"head_layers must be in 0..{cfg.head_depth} (got {head_layers})")
    else:
        head_layers = None
    atomic_torch_save(
        {
            "kind": kind,
            "model": section,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "head_layers": head_layers,
            "state_dict": sd,
            "extra": dict(extra or {}),
        },
        path,
    )


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the module saved by :func:`save_model` and load its weights; returned in eval mode.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a model file of a known kind.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    blob = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(blob, dict) or blob.get("kind") not in _KINDS or "state_dict" not in blob:
        raise ValueError(f"{path} is not a model file (needs kind in {_KINDS} and a state_dict)")
    in_channels = int(blob["in_channels"])
    module: nn.Module
    if blob["kind"] == "contrastive":
        module = build_contrastive_model(blob["model"], in_channels)
    else:
        module = build_classifier_from_config(
            blob["model"], in_channels, int(blob["num_classes"]), int(blob.get("head_layers") or 0)
        )
    module.load_state_dict(_strip_prefixes(blob["state_dict"]))
    return module.to(map_location).eval()
