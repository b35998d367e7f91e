"""Parameter and FLOP counts.

FLOP convention (:func:`flops_per_image`): forward-pass FLOPs = 2 × multiply-adds of the
convolution and linear layers only, for one image. Batch/layer norm, activations, pooling,
residual additions and biases are not counted (together a few percent for a ResNet). A training
step costs about 3× the forward FLOPs (forward + backward w.r.t. activations and weights), which is
the factor model-FLOPs-utilisation figures use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["count_params", "flops_per_image"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def count_params(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def flops_per_image(module: nn.Module, input_size: Sequence[int] = (3, 32, 32)) -> int:
    """Forward FLOPs for one image of shape ``input_size = (C, H, W)``.

    Counted with forward hooks on every ``nn.Conv{1,2,3}d`` and ``nn.Linear`` during one forward
    pass of a single zero image (eval mode, no grad; the training mode is restored after):

    * conv: ``2 · out.numel() · (C_in / groups) · prod(kernel_size)``
    * linear: ``2 · out.numel() · in_features``

    i.e. 2 × multiply-adds (see the module docstring for what is left out).

    Raises:
        ValueError: if ``input_size`` is not a sequence of positive ints.
    """
    size = tuple(input_size)
    if not size or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"input_size must be positive ints, e.g. (C, H, W) (got {input_size!r})")
    total = 0

    def conv_hook(m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        assert isinstance(m, _CONV)
        total += 2 * out.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)

    def linear_hook(m: nn.Module, _inp: tuple[Tensor, ...], out: Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += 2 * out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, _CONV):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    first = next(module.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros((1, *size), device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    return int(total)
