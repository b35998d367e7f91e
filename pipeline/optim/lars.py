"""LARS: layer-wise adaptive rate scaling (You, Gitman & Ginsburg 2017, arXiv:1708.03888).

SimCLR trains with LARS at large batch sizes (Chen et al. 2020, arXiv:2002.05709, §B.1 / §2.2),
excluding batch-norm and bias parameters from both weight decay and the adaptation. For every
parameter tensor ``w`` with gradient ``g`` in a group that is not excluded::

    trust = η · ‖w‖ / (‖g‖ + wd · ‖w‖ + eps)      (1 if ‖w‖ = 0 or ‖g‖ = 0)
    d     = g + wd · w
    v     = momentum · v + trust · d
    w     = w − lr · v

and for a group with ``lars_exclude=True`` (plain momentum SGD, no weight decay)::

    v = momentum · v + g ;   w = w − lr · v

``η`` is ``trust_coefficient``.

Where the learning rate sits. Here it multiplies *outside* the momentum buffer (as in
``torch.optim.SGD``, solo-learn and lightly), so a schedule acts on the very next step. The
TensorFlow original (google-research/simclr ``lars_optimizer.py``) puts it *inside*:
``v = momentum · v + lr · trust · d ; w = w − v``. The two give the same trajectory while the
learning rate is constant, and differ while it changes: during warm-up the TF buffer still carries
the smaller rates of earlier steps, and during the cosine decay the larger ones, so the TF update
lags the schedule by about ``1 / (1 − momentum)`` steps. A recipe tuned on the TF code may need a
slightly different warm-up here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["LARS", "exclude_bn_bias_groups"]


class LARS(torch.optim.Optimizer):
    """LARS optimiser (arXiv:1708.03888) with SimCLR's exclusion of BN/bias parameters.

    Args:
        params: parameters or param groups; a group with ``lars_exclude=True`` gets neither weight
            decay nor trust-ratio adaptation (see :func:`exclude_bn_bias_groups`).
        lr: learning rate (≥ 0).
        momentum: momentum factor in [0, 1).
        weight_decay: L2 penalty (≥ 0), applied inside the adapted update.
        trust_coefficient: η (> 0), 0.001 in the paper and in SimCLR.
        eps: added to the trust-ratio denominator (≥ 0).

    Raises:
        ValueError: on a value out of range.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"LARS lr must be >= 0 (got {lr})")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"LARS momentum must be in [0, 1) (got {momentum})")
        if not weight_decay >= 0.0:
            raise ValueError(f"LARS weight_decay must be >= 0 (got {weight_decay})")
        if not trust_coefficient > 0.0:
            raise ValueError(f"LARS trust_coefficient must be > 0 (got {trust_coefficient})")
        if not eps >= 0.0:
            raise ValueError(f"LARS eps must be >= 0 (got {eps})")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter with a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            exclude = bool(group["lars_exclude"])
            wd = 0.0 if exclude else group["weight_decay"]
            eta, eps = group["trust_coefficient"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                if exclude:
                    d = g
                else:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        eta * w_norm / (g_norm + wd * w_norm + eps),
                        torch.ones_like(w_norm),
                    )
                    d = g.add(p, alpha=wd) if wd != 0.0 else g.clone()
                    d.mul_(trust)
                if momentum != 0.0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss


def exclude_bn_bias_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two param groups: weights with decay, and BN/bias parameters (``ndim <= 1``) without.

    The second group has ``weight_decay=0`` and ``lars_exclude=True`` (SimCLR, arXiv:2002.05709,
    §B.1: "exclude batch normalization and bias parameters from weight decay and LARS
    adaptation"). Only parameters with ``requires_grad`` are included; empty groups are dropped.

    Raises:
        ValueError: if ``weight_decay < 0`` or the model has no trainable parameter.
    """
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0 (got {weight_decay})")
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    if not decay and not no_decay:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    groups: list[dict[str, Any]] = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "lars_exclude": False})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars_exclude": True})
    return groups
