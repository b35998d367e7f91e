"""Optimisers and learning-rate schedules: LARS (arXiv:1708.03888), BN/bias exclusion, the SimCLR
LR scaling rules and warm-up + cosine schedule (arXiv:2002.05709, §B.1)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from pipeline.optim.lars import LARS, exclude_bn_bias_groups
from pipeline.optim.schedule import scale_lr, warmup_cosine, warmup_cosine_factor

__all__ = [
    "LARS",
    "build_optimizer",
    "exclude_bn_bias_groups",
    "scale_lr",
    "warmup_cosine",
    "warmup_cosine_factor",
]

OPTIMIZERS = ("lars", "sgd", "adamw")


def build_optimizer(
    name: Literal["lars", "sgd", "adamw"],
    model: nn.Module,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """``lars``, ``sgd`` (momentum) or ``adamw`` over :func:`exclude_bn_bias_groups` groups (no
    weight decay on BN and bias parameters for all three; LARS also skips their adaptation).

    Raises:
        ValueError: on an unknown name or a bad value.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} (got {name!r})")
    if not lr > 0:
        raise ValueError(f"lr must be > 0 (got {lr})")
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1) (got {momentum})")
    groups = exclude_bn_bias_groups(model, weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
