"""Settings and fixtures shared by the model tests: one intra-op thread, and a small contrastive
model builder."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.models import ContrastiveModel, build_contrastive_model

torch.set_num_threads(1)


def _small_model(depth: int = 3, channels: int = 1) -> ContrastiveModel:
    cfg = ModelConfig(arch="resnet18", width=0.125, head_depth=depth, head_hidden=24, head_out=10)
    return build_contrastive_model(cfg, channels)


@pytest.fixture
def small_model() -> Callable[..., ContrastiveModel]:
    """``small_model(depth=3, channels=1)``: a ResNet-18 at width 0.125 (h of 64 features) with a
    ``depth``-layer head of hidden width 24 and 10 outputs."""
    return _small_model
