"""pipeline.optim: LARS, BN/bias exclusion, LR scaling and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.optim import (
    LARS,
    build_optimizer,
    exclude_bn_bias_groups,
    scale_lr,
    warmup_cosine,
)


def _tiny() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2, bias=False))


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


def test_exclude_bn_bias_groups() -> None:
    model = _tiny()
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


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_build_optimizer(name: str) -> None:
    model = _tiny()
    opt = build_optimizer(name, model, lr=0.1, weight_decay=1e-3)
    assert len(opt.param_groups) == 2
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    x = torch.randn(8, 3)
    model(x).square().mean().backward()
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_build_optimizer_bad_arguments() -> None:
    with pytest.raises(ValueError, match="optimizer"):
        build_optimizer("adam", _tiny(), 0.1, 0.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build_optimizer("sgd", _tiny(), 0.0, 0.0)


def test_warmup_cosine_values() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, final_lr_ratio=0.1)
    lrs = []
    for _ in range(121):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 * 1 / 10)  # step 0: ~0
    assert lrs[9] == pytest.approx(2.0)  # last warm-up step
    assert lrs[10] == pytest.approx(2.0)  # end of warm-up: peak
    assert lrs[60] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))  # half-way through the cosine
    assert lrs[35] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))))
    assert lrs[110] == pytest.approx(2.0 * 0.1)  # end
    assert lrs[120] == pytest.approx(2.0 * 0.1)  # held after the end
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_warmup_cosine_without_warmup() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine(opt, 0, 4)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx(
        [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 - math.cos(math.pi / 4)), 0.0]
    )


@pytest.mark.parametrize(
    "args", [(-1, 10), (11, 10), (0, 0), (2, 10, -0.1), (2, 10, 1.5), (2.5, 10)]
)
def test_warmup_cosine_bad_arguments(args: tuple) -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError):
        warmup_cosine(opt, *args)


def test_scale_lr() -> None:
    assert scale_lr(0.3, 512, "linear") == pytest.approx(0.6)
    assert scale_lr(0.3, 256, "linear") == pytest.approx(0.3)
    assert scale_lr(0.075, 256, "sqrt") == pytest.approx(1.2)
    assert scale_lr(0.075, 4096, "sqrt") == pytest.approx(0.075 * 64)
    for bad in [(0.0, 256, "sqrt"), (0.1, 0, "linear"), (0.1, 256, "log"), (0.1, 2.0, "sqrt")]:
        with pytest.raises(ValueError):
            scale_lr(*bad)  # type: ignore[arg-type]
