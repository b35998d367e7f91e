"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR.

Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", arXiv:2002.05709, eq. (1): for a batch of N images there are 2N views; view i's
positive is its partner j(i), the other 2N - 2 views are negatives, and

    l(i) = -log( exp(sim(z_i, z_j(i)) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),

with sim the cosine similarity; the loss is the mean of l over the 2N views.

With ``gather_distributed=True`` in a process group of W ranks, each rank scores its own 2N anchors
against the 2·(sum of local batches) views of all ranks (more negatives, as in the paper's large
batch training); the positive index is offset by this rank's start in the gathered batch. Each rank
divides its sum by (global anchors / W), so the mean of the ranks' losses is the global loss and
DDP's gradient averaging gives the one-process gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.distributed import gather_sizes, gather_with_grad, is_distributed

__all__ = ["NTXentLoss", "nt_xent"]

# Added to self-similarity logits so that they vanish from the softmax. A finite constant, not -inf:
# -inf minus -inf (log-sum-exp of a fully masked row, or inf * 0 in a masked sum) is NaN.
MASK_VALUE = -1e9


def check_temperature(temperature: float) -> float:
    """Return ``temperature`` as a float, or raise ValueError unless it is finite and > 0."""
    t = float(temperature)
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def compute_dtype(x: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 inputs, float64 for float64 (so gradcheck works)."""
    if not x.is_floating_point():
        raise ValueError(f"expected a floating point tensor, got dtype {x.dtype}")
    return torch.promote_types(x.dtype, torch.float32)


def nt_xent(
    z_a: Tensor,
    z_b: Tensor,
    temperature: float = 0.5,
    gather_distributed: bool = False,
) -> Tensor:
    """NT-Xent loss (SimCLR eq. 1, arXiv:2002.05709), mean over this rank's 2N anchors.

    Distributed, the rank's sum is divided by (2 · images over all ranks) / world: the local mean
    when every rank has the same batch, and in every case the mean over ranks is the global loss.

    Args:
        z_a: (N, D) projections of the first view of each image (normalised here).
        z_b: (N, D) projections of the second view, row i the partner of ``z_a[i]``.
        temperature: tau > 0.
        gather_distributed: in an initialised process group of more than one rank, contrast the
            local anchors with the views of every rank (autograd-aware gather).

    Returns:
        Scalar loss (float32, or float64 for float64 inputs), computed in at least float32 even
        under bf16 autocast.
    """
    tau = check_temperature(temperature)
    if not isinstance(z_a, Tensor) or not isinstance(z_b, Tensor):
        raise ValueError("nt_xent expects two tensors z_a, z_b of shape (N, D)")
    if z_a.dim() != 2 or z_a.shape != z_b.shape:
        raise ValueError(
            f"nt_xent expects z_a and z_b of the same shape (N, D), got {tuple(z_a.shape)} "
            f"and {tuple(z_b.shape)}"
        )
    n = z_a.shape[0]
    if n < 1:
        raise ValueError(f"nt_xent needs at least 2 views in total, got a batch of {n} images")
    dtype = compute_dtype(z_a)

    with torch.autocast(device_type=z_a.device.type, enabled=False):
        a = F.normalize(z_a.to(dtype), dim=1)  # (N, D)
        b = F.normalize(z_b.to(dtype), dim=1)  # (N, D)
        if gather_distributed and is_distributed():
            sizes = gather_sizes(n, a.device)
            rank = torch.distributed.get_rank()
            offset, world = sum(sizes[:rank]), len(sizes)
            all_a = gather_with_grad(a, sizes)  # (M, D), M = sum(sizes)
            all_b = gather_with_grad(b, sizes)  # (M, D)
        else:
            offset, world, all_a, all_b = 0, 1, a, b
        m = all_a.shape[0]

        anchors = torch.cat([a, b])  # (2N, D)
        contrast = torch.cat([all_a, all_b])  # (2M, D)
        logits = anchors @ contrast.T / tau  # (2N, 2M)

        local = torch.arange(n, device=a.device) + offset  # (N,) global image index
        self_idx = torch.cat([local, local + m])  # (2N,) column of the anchor itself
        pos_idx = torch.cat([local + m, local])  # (2N,) column of its partner view
        rows = torch.arange(2 * n, device=a.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, self_idx] = True
        logits = logits.masked_fill(self_mask, MASK_VALUE)

        total = F.cross_entropy(logits, pos_idx, reduction="sum")  # () sum over 2N anchors
        return total / (2 * m / world)


class ContrastiveLoss(nn.Module):
    """The settings every contrastive loss module holds: ``temperature`` (tau > 0) and
    ``gather_distributed`` (contrast against the views of all ranks when a process group of more
    than one rank is initialised; ignored in one process)."""

    def __init__(self, temperature: float, gather_distributed: bool = True) -> None:
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.gather_distributed = bool(gather_distributed)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"


class NTXentLoss(ContrastiveLoss):
    """NT-Xent loss of SimCLR (Chen et al. 2020, arXiv:2002.05709); see :func:`nt_xent`.

    Args:
        temperature: tau > 0 (the paper's default for large batches is 0.5; 0.1–0.2 for small).
        gather_distributed: contrast against the views of all ranks when a process group of more
            than one rank is initialised; ignored in one process.
    """

    def __init__(self, temperature: float = 0.5, gather_distributed: bool = True) -> None:
        super().__init__(temperature, gather_distributed)

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        """Loss for z_a, z_b of shape (N, D): the mean over the 2N anchors."""
        return nt_xent(z_a, z_b, self.temperature, self.gather_distributed)
