"""pipeline.optim (its __init__): build_optimizer over the BN/bias exclusion groups."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pipeline.optim import build_optimizer


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer(tiny_model: Callable[[], nn.Module], name: str) -> None:
    model = tiny_model()
    opt = build_optimizer(name, model, lr=0.1, weight_decay=1e-3)
    assert len(opt.param_groups) == 2
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    x = torch.randn(8, 3)
    model(x).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_build_optimizer_bad_arguments(tiny_model: Callable[[], nn.Module]) -> None:
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("adam", tiny_model(), 0.1, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_optimizer("sgd", tiny_model(), 0.0, 0.0)
