"""Contrastive and distillation losses: one pure function per loss plus an ``nn.Module`` wrapper.

- :func:`nt_xent` / :class:`NTXentLoss`: SimCLR's NT-Xent (Chen et al. 2020, arXiv:2002.05709).
- :func:`supcon` / :class:`SupConLoss`: SupCon L_out (Khosla et al. 2020, arXiv:2004.11362), with
  unlabeled images (label -1) for SimCLR and the semi-supervised mix.
- :func:`distillation` / :class:`DistillationLoss`: SimCLRv2 distillation (Chen et al. 2020,
  arXiv:2006.10029; Hinton et al. 2015).
- :func:`fixmatch` / :func:`confident_targets`: FixMatch's consistency loss on unlabeled images
  (Sohn et al. 2020, arXiv:2001.07685), for fine-tuning's consistency phase, and
  :func:`align_distribution` (ReMixMatch's distribution alignment of its targets).

The contrastive losses normalise their inputs, compute in float32 (float64 for float64 inputs)
even under autocast, and gather across ranks when asked (see ``pipeline.distributed``).
"""

from pipeline.losses.distill import DistillationLoss, distillation
from pipeline.losses.fixmatch import align_distribution, confident_targets, fixmatch
from pipeline.losses.ntxent import NTXentLoss, nt_xent
from pipeline.losses.supcon import SupConLoss, supcon

__all__ = [
    "DistillationLoss",
    "NTXentLoss",
    "SupConLoss",
    "align_distribution",
    "confident_targets",
    "distillation",
    "fixmatch",
    "nt_xent",
    "supcon",
]
