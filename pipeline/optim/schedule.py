"""Learning-rate scaling and schedule.

SimCLR (Chen et al. 2020, arXiv:2002.05709, §B.1) uses ``lr = 0.3 · B / 256`` (linear) or, better
for small batches and short runs, ``lr = 0.075 · √B`` (square root), with a linear warm-up
followed by cosine decay without restarts.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["scale_lr", "warmup_cosine", "warmup_cosine_factor"]


def scale_lr(base_lr: float, batch_size: int, rule: Literal["linear", "sqrt"] = "sqrt") -> float:
    """The learning rate for ``batch_size`` (arXiv:2002.05709, appendix B.1).

    * ``linear``: ``base_lr · batch_size / 256``
    * ``sqrt``:   ``base_lr · √batch_size``

    Raises:
        ValueError: if ``base_lr <= 0``, ``batch_size < 1`` or the rule is unknown.
    """
    if not base_lr > 0:
        raise ValueError(f"base_lr must be > 0 (got {base_lr})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1 (got {batch_size!r})")
    if rule == "linear":
        return base_lr * batch_size / 256.0
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size)
    raise ValueError(f"rule must be 'linear' or 'sqrt' (got {rule!r})")


def warmup_cosine_factor(
    step: int, warmup_steps: int, total_steps: int, final_lr_ratio: float = 0.0
) -> float:
    """The LR multiplier at ``step`` (0-based): ``(step+1)/warmup`` during warm-up, then a cosine
    from 1 at ``step = warmup_steps`` to ``final_lr_ratio`` at ``step = total_steps`` (held after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_lr_ratio + (1.0 - final_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    final_lr_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps`` steps, then cosine decay
    to ``final_lr_ratio`` at ``total_steps`` (SimCLR, arXiv:2002.05709, §B.1). Call
    ``scheduler.step()`` once per optimiser step.

    Raises:
        ValueError: unless ``0 <= warmup_steps <= total_steps``, ``total_steps >= 1`` and
            ``0 <= final_lr_ratio <= 1``.
    """
    for name, v in (("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int (got {v!r})")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 (got {total_steps})")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"warmup_steps must be in 0..total_steps={total_steps} (got {warmup_steps})"
        )
    if not 0.0 <= final_lr_ratio <= 1.0:
        raise ValueError(f"final_lr_ratio must be in [0, 1] (got {final_lr_ratio})")

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, warmup_steps, total_steps, final_lr_ratio)

    return LambdaLR(optimizer, factor)
