"""Supervised contrastive loss (L_out), which also covers SimCLR and the semi-supervised mix.

Khosla et al. 2020, "Supervised Contrastive Learning", arXiv:2004.11362, eq. (2) (L_out, the form
the paper recommends): with I the 2N (here N·V) views, A(i) = I \\ {i} and P(i) the positives of
anchor i,

    L = sum_i  -1/|P(i)| · sum_{p in P(i)} log( exp(z_i·z_p / tau) / sum_{a in A(i)} exp(z_i·z_a / tau) ).

Here the sum becomes a mean over the anchors that have at least one positive (anchors without a
positive are left out instead of giving 0/0 = NaN; if none has one the loss is 0, still attached to
the graph).

Positives. Labeled anchors (label >= 0) take every other view of the same class; unlabeled anchors
(label -1) take only the other views of their own image. So ``labels=None`` (or all -1) is SimCLR
(Chen et al. 2020, arXiv:2002.05709) and, for V = 2, equals :func:`pipeline.losses.nt_xent`;
all-distinct labels also reduce to SimCLR; a mix of labeled and unlabeled images is the
semi-supervised loss.

With ``gather_distributed=True`` in a process group of W ranks, each rank scores its own N·V
anchors against the views of every rank; the rank's sum is divided by (anchors with a positive over
all ranks) / W, so the mean over ranks is exactly the global loss and DDP's gradient averaging gives
the one-process gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.distributed import gather_no_grad, gather_sizes, gather_with_grad, is_distributed
from pipeline.losses.ntxent import MASK_VALUE, ContrastiveLoss, check_temperature, compute_dtype

__all__ = ["SupConLoss", "supcon"]


def _views_with_positive(labels: Tensor, views: int) -> Tensor:
    """(M·V,) bool: does each view (image-major order) have at least one positive in the batch."""
    if views >= 2:  # every view has its own image's other views
        return torch.ones(labels.shape[0] * views, dtype=torch.bool, device=labels.device)
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return (labels >= 0) & (counts[inverse] > 1)  # (M,) a labeled class seen more than once


def supcon(
    features: Tensor,
    labels: Tensor | None = None,
    temperature: float = 0.1,
    gather_distributed: bool = False,
) -> Tensor:
    """SupCon L_out loss (arXiv:2004.11362 eq. 2) with unlabeled images (label -1) allowed.

    Args:
        features: (N, V, D) projections of V views of N images (normalised here).
        labels: (N,) integer class per image, -1 for unlabeled; None means all unlabeled (SimCLR).
        temperature: tau > 0.
        gather_distributed: in an initialised process group of more than one rank, contrast the
            local anchors with the views of every rank (autograd-aware gather).

    Returns:
        Scalar loss: mean over anchors having >= 1 positive of the mean over their positives of
        -log p(positive | anchor), p the softmax over every other view. Computed in at least
        float32 even under bf16 autocast.
    """
    tau = check_temperature(temperature)
    labels, dtype = _checked_inputs(features, labels)
    n, views, _ = features.shape
    device = features.device
    distributed = gather_distributed and is_distributed()
    sizes = gather_sizes(n, device) if distributed else [n]
    if sum(sizes) * views < 2:
        raise ValueError(
            f"supcon needs at least 2 views in total, got {sum(sizes)} image(s) x {views} view(s) "
            f"(features {tuple(features.shape)})"
        )

    with torch.autocast(device_type=device.type, enabled=False):
        f = F.normalize(features.to(dtype), dim=-1)  # (N, V, D)
        if distributed:
            rank = torch.distributed.get_rank()
            offset, world = sum(sizes[:rank]), len(sizes)
            all_f = gather_with_grad(f, sizes)  # (M, V, D), M = sum(sizes)
            all_labels = gather_no_grad(labels, sizes)  # (M,)
        else:
            offset, world, all_f, all_labels = 0, 1, f, labels
        m = all_f.shape[0]

        anchors = f.reshape(n * views, -1)  # (N·V, D) image-major: row i·V + v
        contrast = all_f.reshape(m * views, -1)  # (M·V, D)
        logits = anchors @ contrast.T / tau  # (N·V, M·V)
        self_mask, positives = _masks(labels, all_labels, views, offset, logits)
        per_anchor = _per_anchor(logits, self_mask, positives)  # (N·V,)

        n_valid = int(_views_with_positive(all_labels, views).sum())  # over all ranks
        if n_valid == 0:
            return f.sum() * 0.0  # nothing to contrast: 0, with the graph kept
        return per_anchor.sum() / (n_valid / world)


def _checked_inputs(features: Tensor, labels: Tensor | None) -> tuple[Tensor, torch.dtype]:
    """``labels`` as long on the features' device (all -1 for None) and the dtype to compute
    in, after checking both shapes and dtypes."""
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"supcon expects features of shape (N, V, D), got {shape}")
    n = features.shape[0]
    dtype = compute_dtype(features)
    device = features.device
    if labels is None:
        labels = torch.full((n,), -1, dtype=torch.long, device=device)
    if not isinstance(labels, Tensor) or labels.dim() != 1 or labels.shape[0] != n:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise ValueError(
            f"supcon expects labels of shape (N,) = ({n},) for features {tuple(features.shape)}, "
            f"got {shape}"
        )
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"supcon expects integer labels (-1 = unlabeled), got dtype {labels.dtype}"
        )
    return labels.to(device=device, dtype=torch.long), dtype


def _masks(
    labels: Tensor, all_labels: Tensor, views: int, offset: int, logits: Tensor
) -> tuple[Tensor, Tensor]:
    """``(self_mask, positives)``, both (N·V, M·V) bool like ``logits``: each anchor's own view,
    and its positives (the other views of its image; for a labeled anchor also every view of its
    class). ``offset``: the index of this rank's first image among all M."""
    n, m = labels.shape[0], all_labels.shape[0]
    device = logits.device
    img_a = (torch.arange(n, device=device) + offset).repeat_interleave(views)  # (N·V,)
    img_c = torch.arange(m, device=device).repeat_interleave(views)  # (M·V,)
    lab_a = labels.repeat_interleave(views)[:, None]  # (N·V, 1)
    lab_c = all_labels.repeat_interleave(views)[None, :]  # (1, M·V)
    rows = torch.arange(n * views, device=device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, rows + offset * views] = True
    same_image = img_a[:, None] == img_c[None, :]  # (N·V, M·V)
    same_class = (lab_a == lab_c) & (lab_a >= 0)  # (N·V, M·V) labeled anchors only
    return self_mask, (same_image | same_class) & ~self_mask


def _per_anchor(logits: Tensor, self_mask: Tensor, positives: Tensor) -> Tensor:
    """(N·V,) the mean over each anchor's positives of -log p(j | i); 0 without a positive.

    That mean is logsumexp_k l_ik minus the mean positive logit, so the (N·V, M·V)
    log-probabilities are never built (a pass less each way)."""
    pos_w = positives.to(logits.dtype)  # (N·V, M·V)
    n_pos = pos_w.sum(dim=1)  # (N·V,)
    lse = torch.logsumexp(logits.masked_fill(self_mask, MASK_VALUE), dim=1)  # (N·V,)
    pos_mean = (pos_w * logits).sum(dim=1) / n_pos.clamp(min=1)  # (N·V,)
    return torch.where(n_pos > 0, lse - pos_mean, torch.zeros_like(lse))


class SupConLoss(ContrastiveLoss):
    """Supervised / semi-supervised / SimCLR contrastive loss (Khosla et al. 2020, arXiv:2004.11362).

    See :func:`supcon`. ``forward(features, labels=None)`` with features (N, V, D) and labels (N,)
    (-1 = unlabeled).

    Args:
        temperature: tau > 0 (the paper uses 0.1).
        gather_distributed: contrast against the views of all ranks when a process group of more
            than one rank is initialised; ignored in one process.
    """

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True) -> None:
        super().__init__(temperature, gather_distributed)

    def forward(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """Loss for features (N, V, D) and optional labels (N,); see :func:`supcon`."""
        return supcon(features, labels, self.temperature, self.gather_distributed)
