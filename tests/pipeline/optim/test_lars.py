"""pipeline.optim.lars: LARS against a hand computation (arXiv:1708.03888) and the BN/bias
exclusion groups."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from pipeline.optim import LARS, exclude_bn_bias_groups


def test_lars_step_matches_hand_computation() -> None:
    lr, m, wd, eta = 0.5, 0.9, 0.1, 0.01
    w0 = torch.tensor([3.0, 4.0])  # ‖w‖ = 5
    g0 = torch.tensor([0.6, 0.8])  # ‖g‖ = 1
    b0 = torch.tensor([1.0, -2.0])  # excluded (bias-like)
    gb = torch.tensor([0.5, 0.25])
    w = nn.Parameter(w0.clone())
    b = nn.Parameter(b0.clone())
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.3}],
        lr=lr,
        momentum=m,
        weight_decay=wd,
        trust_coefficient=eta,
    )
    # step 1
    w.grad, b.grad = g0.clone(), gb.clone()
    opt.step()
    trust = eta * 5.0 / (1.0 + wd * 5.0)
    v_w = trust * (g0 + wd * w0)
    w1 = w0 - lr * v_w
    v_b = gb.clone()  # excluded: no weight decay, no trust ratio (despite weight_decay=0.3)
    b1 = b0 - lr * v_b
    torch.testing.assert_close(w.detach(), w1)
    torch.testing.assert_close(b.detach(), b1)
    # step 2: momentum accumulates, trust recomputed from the new weights
    g1 = torch.tensor([-0.3, 0.1])
    w.grad, b.grad = g1.clone(), gb.clone()
    opt.step()
    trust2 = eta * w1.norm() / (g1.norm() + wd * w1.norm())
    v_w = m * v_w + trust2 * (g1 + wd * w1)
    torch.testing.assert_close(w.detach(), w1 - lr * v_w)
    v_b = m * v_b + gb
    torch.testing.assert_close(b.detach(), b1 - lr * v_b)


def test_lars_zero_norms_use_unit_trust() -> None:
    w = nn.Parameter(torch.zeros(3))
    opt = LARS([w], lr=1.0, momentum=0.0, trust_coefficient=0.001)
    w.grad = torch.tensor([1.0, 2.0, 3.0])
    opt.step()
    torch.testing.assert_close(w.detach(), -torch.tensor([1.0, 2.0, 3.0]))
    p = nn.Parameter(torch.ones(2))
    opt = LARS([p], lr=1.0, momentum=0.0)
    p.grad = torch.zeros(2)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.ones(2))


def test_lars_skips_params_without_grad_and_closure() -> None:
    w = nn.Parameter(torch.ones(2))
    opt = LARS([w], lr=0.1)
    assert opt.step(lambda: 1.5) == 1.5
    torch.testing.assert_close(w.detach(), torch.ones(2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": -0.1},
        {"lr": 0.1, "momentum": 1.0},
        {"lr": 0.1, "momentum": -0.1},
        {"lr": 0.1, "weight_decay": -1.0},
        {"lr": 0.1, "trust_coefficient": 0.0},
        {"lr": 0.1, "eps": -1.0},
    ],
)
def test_lars_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        LARS([nn.Parameter(torch.ones(1))], **kwargs)


def test_exclude_bn_bias_groups(tiny_model: Callable[[], nn.Module]) -> None:
    model = tiny_model()
    model[3].weight.requires_grad_(False)
    groups = exclude_bn_bias_groups(model, 1e-4)
    assert len(groups) == 2
    decay, excl = groups
    assert decay["weight_decay"] == 1e-4 and not decay["lars_exclude"]
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]  # frozen weight left out
    assert excl["weight_decay"] == 0.0 and excl["lars_exclude"] is True
    assert all(p.ndim <= 1 for p in excl["params"]) and len(excl["params"]) == 3  # bias, BN w, BN b
    with pytest.raises(ValueError):
        exclude_bn_bias_groups(model, -1.0)
    with pytest.raises(ValueError, match="no trainable"):
        exclude_bn_bias_groups(nn.ReLU(), 0.0)
