"""FixMatch's consistency loss on unlabeled images.

Sohn, Berthelot, Li, Zhang, Carlini, Cubuk, Kurakin, Zhang, Raffel 2020, "FixMatch: Simplifying
Semi-Supervised Learning with Consistency and Confidence", arXiv:2001.07685, eq. (4):

    L_u = 1/(μB) Σ_b 1[max(q_b) ≥ τ] · H(argmax(q_b), p(y | A(u_b))),
    q_b = p(y | α(u_b)),

where α is a weak augmentation, A a strong one, and τ the confidence threshold. The weak view's
prediction is a constant target (no gradient). The mean runs over the whole unlabeled batch, not
over the rows kept, as in the paper: the loss grows as the model becomes confident on more images.

:func:`align_distribution` is ReMixMatch's distribution alignment (Berthelot et al. 2020,
arXiv:1911.09785, §3.2), applied to the weak view's prediction before it becomes a target.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["align_distribution", "confident_targets", "fixmatch"]


def _check_threshold(threshold: float) -> float:
    t = float(threshold)
    if not (math.isfinite(t) and 0.0 < t <= 1.0):
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    return t


@torch.no_grad()
def confident_targets(weak_logits: Tensor, threshold: float = 0.95) -> tuple[Tensor, Tensor]:
    """Hard pseudo-labels from the weak view and which of them are confident enough.

    Args:
        weak_logits: (B, C) logits of the weakly augmented unlabeled images.
        threshold: τ in (0, 1]; a row is kept when its largest softmax probability is ≥ τ.

    Returns:
        ``(targets, keep)``: (B,) int64 argmax classes and (B,) bool mask.
    """
    t = _check_threshold(threshold)
    if weak_logits.ndim != 2:
        raise ValueError(f"weak_logits: expected (B, C), got shape {tuple(weak_logits.shape)}")
    conf, targets = weak_logits.float().softmax(dim=1).max(dim=1)  # (B,), (B,)
    return targets, conf >= t


def fixmatch(strong_logits: Tensor, weak_logits: Tensor, threshold: float = 0.95) -> Tensor:
    """FixMatch's unlabeled loss (arXiv:2001.07685 eq. 4).

    Args:
        strong_logits: (B, C) logits of the strongly augmented views (gets the gradient).
        weak_logits: (B, C) logits of the weakly augmented views of the same images, row-aligned
            (treated as constant: no gradient flows into them).
        threshold: τ in (0, 1].

    Returns:
        Scalar: ``mean_b keep_b · CE(strong_b, argmax softmax(weak_b))``, in at least float32;
        0 (with a gradient path) when no row is confident.
    """
    if strong_logits.shape != weak_logits.shape:
        raise ValueError(
            f"strong_logits {tuple(strong_logits.shape)} and weak_logits "
            f"{tuple(weak_logits.shape)} must have the same shape"
        )
    targets, keep = confident_targets(weak_logits.detach(), threshold)
    dtype = torch.float64 if strong_logits.dtype == torch.float64 else torch.float32
    ce = F.cross_entropy(strong_logits.to(dtype), targets, reduction="none")  # (B,)
    return (ce * keep.to(dtype)).mean()


@torch.no_grad()
def align_distribution(weak_logits: Tensor, running: Tensor, target: Tensor) -> Tensor:
    """Distribution alignment (ReMixMatch, arXiv:1911.09785 §3.2):
    ``q̃ = normalise(q · target / running)`` for the weak view's class probabilities ``q``.

    Args:
        weak_logits: (B, C) logits of the weakly augmented unlabeled images.
        running: (C,) running mean of the model's class probabilities on unlabeled images.
        target: (C,) the class marginal to align to (e.g. the labeled subset's class frequencies).

    Returns:
        (B, C) ``log q̃``, usable wherever logits are (``softmax(log q̃) = q̃``).
    """
    if weak_logits.ndim != 2:
        raise ValueError(f"weak_logits: expected (B, C), got shape {tuple(weak_logits.shape)}")
    c = weak_logits.shape[1]
    for name, v in (("running", running), ("target", target)):
        if v.shape != (c,):
            raise ValueError(f"{name}: expected shape ({c},), got {tuple(v.shape)}")
        if not bool((v > 0).all()):
            raise ValueError(f"{name}: every class needs a probability > 0")
    q = weak_logits.float().softmax(dim=1) * (target.float() / running.float())  # (B, C)
    return torch.log(q / q.sum(dim=1, keepdim=True))
