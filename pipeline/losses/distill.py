"""Knowledge distillation loss of SimCLRv2 (self-training with a fine-tuned teacher).

Chen, Kornblith, Swersky, Norouzi, Hinton 2020, "Big Self-Supervised Models are Strong
Semi-Supervised Learners", arXiv:2006.10029, eq. (2):

    L_distill = - sum_{x} sum_y  P_T(y | x; tau) log P_S(y | x; tau),
    P(y | x; tau) = softmax(logits / tau),

averaged over the batch here, following Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a
Neural Network", arXiv:1503.02531 (soft targets at temperature tau).

Conventions, which differ between the sources:

- tau^2. The paper's formula has no tau^2 factor, and neither does this loss. The authors' code
  (google-research/simclr, and Hinton et al.) multiplies the distillation term by tau^2, which
  keeps its gradient's scale independent of tau. The two agree at tau = 1; at another tau, scale
  the learning rate by tau^2 to match the authors' code.
- Mixing with labels. The paper weights the distillation term by alpha and the labeled
  cross-entropy by 1 - alpha. To leave no doubt about which term a weight belongs to, this loss
  takes ``label_weight`` w, the weight of the cross-entropy: (1 - w) · L_distill + w · CE (so
  w = 1 - alpha of the paper; w = 0, the default, is pure distillation).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.losses.ntxent import check_temperature, compute_dtype

__all__ = ["DistillationLoss", "distillation"]


def _check_weight(label_weight: float) -> float:
    w = float(label_weight)
    if not (math.isfinite(w) and 0.0 <= w <= 1.0):
        raise ValueError(f"label_weight must be in [0, 1], got {label_weight!r}")
    return w


def distillation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    label_weight: float = 0.0,
) -> Tensor:
    """SimCLRv2 distillation loss (arXiv:2006.10029 eq. 2), optionally mixed with cross-entropy.

    Args:
        student_logits: (B, C) student outputs (gets the gradient).
        teacher_logits: (B, C) teacher outputs (treated as constant: detached).
        temperature: tau > 0, applied to both teacher and student logits.
        labels: (B,) integer classes, -1 for unlabeled entries; used only when
            ``label_weight > 0``.
        label_weight: weight w of the cross-entropy on labeled entries, in [0, 1] (the paper's
            1 - alpha). Without labels, or with ``w == 0``, the loss is the distillation term alone.

    Returns:
        Scalar: ``mean_b[-sum_y softmax(t_b / tau)_y · log_softmax(s_b / tau)_y]``, mixed as
        ``(1 - w) · that + w · CE(student, labels)`` over entries with label >= 0 (a batch
        without any labeled entry adds 0). Computed in at least float32, also under autocast.
        Its gradient w.r.t. the student logits is ``(softmax(s / tau) - softmax(t / tau)) / (tau·B)``
        for the distillation term: 0 when student == teacher.
    """
    tau = check_temperature(temperature)
    w = _check_weight(label_weight)
    _check_logits(student_logits, teacher_logits)
    if labels is not None:
        _check_labels(labels, student_logits.shape)
    dtype = compute_dtype(student_logits)

    with torch.autocast(device_type=student_logits.device.type, enabled=False):
        s = student_logits.to(dtype)  # (B, C)
        p_teacher = F.softmax(teacher_logits.detach().to(dtype) / tau, dim=1)  # (B, C)
        log_p_student = F.log_softmax(s / tau, dim=1)  # (B, C)
        kd = -(p_teacher * log_p_student).sum(dim=1).mean()  # ()
        if labels is None or w == 0.0:
            return kd
        return (1.0 - w) * kd + w * _labeled_cross_entropy(s, labels)


def _check_logits(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """ValueError unless both logits are tensors of one non-empty ``(B, C)`` shape."""
    if not isinstance(student_logits, Tensor) or not isinstance(teacher_logits, Tensor):
        raise ValueError("distillation expects student_logits and teacher_logits tensors (B, C)")
    if student_logits.dim() != 2 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"distillation expects student and teacher logits of the same shape (B, C), got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    b, c = student_logits.shape
    if b < 1 or c < 1:
        raise ValueError(
            f"distillation needs a non-empty batch, got logits {tuple(student_logits.shape)}"
        )


def _check_labels(labels: Tensor, logits_shape: torch.Size) -> None:
    """ValueError unless ``labels`` is a ``(B,)`` integer tensor of classes below ``C``, for
    ``(B, C)`` logits."""
    b, c = logits_shape
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != b:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"distillation expects labels of shape (B,) = ({b},) for logits "
            f"{tuple(logits_shape)}, got {shape}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"distillation expects integer labels, got dtype {labels.dtype}")
    if labels.numel() and int(labels.max()) >= c:
        raise ValueError(f"distillation labels must be < {c} classes, got max {int(labels.max())}")


def _labeled_cross_entropy(s: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy of logits ``s`` over the entries with label >= 0 (0, graph kept, when
    there is none)."""
    labels = labels.to(device=s.device, dtype=torch.long)
    labeled = labels >= 0  # (B,)
    if bool(labeled.any()):
        return F.cross_entropy(s[labeled], labels[labeled])  # () mean over labeled entries
    return s.sum() * 0.0  # no labeled entry: 0, graph kept


class DistillationLoss(nn.Module):
    """SimCLRv2 distillation loss (Chen et al. 2020, arXiv:2006.10029; Hinton et al. 2015).

    See :func:`distillation`. ``forward(student_logits, teacher_logits, labels=None)``.

    Args:
        temperature: tau > 0 for the soft targets.
        label_weight: weight in [0, 1] of the ground-truth cross-entropy on labeled entries
            (the paper's 1 - alpha; see the module docstring).
    """

    def __init__(self, temperature: float = 1.0, label_weight: float = 0.0) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.label_weight = _check_weight(label_weight)

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor | None = None
    ) -> Tensor:
        """Loss for (B, C) student and teacher logits and optional (B,) labels (-1 = unlabeled)."""
        return distillation(
            student_logits, teacher_logits, self.temperature, labels, self.label_weight
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, label_weight={self.label_weight}"
