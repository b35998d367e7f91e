"""pipeline.optim.schedule: the warm-up + cosine schedule and the LR scaling rules
(arXiv:2002.05709, §B.1)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.optim import scale_lr, warmup_cosine


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
