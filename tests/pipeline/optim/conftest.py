"""Fixtures shared by the optimiser tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, bias=False))


@pytest.fixture
def tiny_model() -> Callable[[], nn.Module]:
    """``tiny_model()``: Linear(3, 4) with bias, BatchNorm1d(4), ReLU, Linear(4, 2) without bias;
    a new one on each call."""
    return _tiny
