"""pipeline.models.flops: parameter counts and FLOPs per image."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

from pipeline.models import ContrastiveModel, count_params, flops_per_image


def test_count_params(small_model: Callable[..., ContrastiveModel]) -> None:
    model = small_model()
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    model.encoder.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model.head)


def test_flops_single_layers() -> None:
    lin = nn.Linear(10, 7)
    assert flops_per_image(lin, (10,)) == 2 * 10 * 7
    conv = nn.Conv2d(3, 5, kernel_size=3, stride=1, padding=1)
    assert flops_per_image(conv, (3, 8, 8)) == 2 * (5 * 8 * 8) * 3 * 3 * 3
    grouped = nn.Conv2d(4, 8, kernel_size=3, stride=2, padding=1, groups=2)
    assert flops_per_image(grouped, (4, 8, 8)) == 2 * (8 * 4 * 4) * (4 // 2) * 9
    seq = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert flops_per_image(seq, (1, 6, 6)) == 2 * (2 * 16 * 9) + 2 * 32 * 3
    with pytest.raises(ValueError):
        flops_per_image(lin, (0,))


def test_flops_model_keeps_training_mode(
    small_model: Callable[..., ContrastiveModel],
) -> None:
    model = small_model().train()
    f = flops_per_image(model, (1, 16, 16))
    assert model.training
    # stem conv alone: 2 * (8 * 16 * 16) * 1 * 9
    assert f > 2 * 8 * 16 * 16 * 9
