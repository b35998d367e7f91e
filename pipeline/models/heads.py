"""Projection head g(·), the contrastive model (f, g), and networks cut from it for fine-tuning.

SimCLR (Chen et al. 2020, arXiv:2002.05709, §2.1) puts a small MLP ``z = g(h)`` on top of the
encoder and applies the contrastive loss to ``z``. SimCLRv2 (Chen et al. 2020, arXiv:2006.10029,
§2) makes the head deeper (3 layers) and fine-tunes from a *middle* layer of it: the encoder plus
the first ``j`` head layers. :func:`backbone_from` cuts that network; :class:`Classifier` puts a
linear layer on it.

Head layout (``depth`` linear layers)::

    block 0 .. depth-2 : Linear(d_in, hidden, bias=False) -> BatchNorm1d(hidden) -> ReLU
    block depth-1      : Linear(d_in, out)                                (last_bn=False: SimCLR)
                         Linear(d_in, out, bias=False) -> BatchNorm(scale, no shift)
                                                                          (last_bn=True: SimCLRv2)

The ``last_bn`` form is the one of the SimCLRv2 authors' code (google-research/simclr
``tf2/model.py``: every head layer is a bias-free dense layer with batch norm; the last one has
``center=False`` and no ReLU).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import Tensor, nn

__all__ = [
    "Backbone",
    "Classifier",
    "ContrastiveModel",
    "ProjectionHead",
    "ScaleOnlyBatchNorm1d",
    "backbone_from",
]


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        rng = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an int {rng} (got {value!r})")
    return value


class ScaleOnlyBatchNorm1d(nn.Module):
    """Batch norm with a learned scale and no shift (TF's ``center=False``): ``bn(x) * weight``
    with ``bn`` a ``BatchNorm1d(affine=False)``, so ``SyncBatchNorm`` conversion applies to it
    as to any other batch norm, and the 1-d ``weight`` falls in the no-decay group like a BN
    scale."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, affine=False)
        self.weight = nn.Parameter(torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(x) * self.weight


class ProjectionHead(nn.Module):
    """MLP projection head ``z = g(h)`` with ``depth`` linear layers (1..4).

    Hidden layers are ``Linear -> BatchNorm1d -> ReLU``; the last layer is a plain ``Linear`` or,
    with ``last_bn``, a bias-free ``Linear`` followed by a scale-only batch norm, with no ReLU
    after it either way (SimCLRv2, arXiv:2006.10029). ``z`` is *not* normalised: the loss does that.

    Args:
        in_dim: size of h (the encoder's ``out_dim``).
        hidden_dim: width of the hidden layers (unused when ``depth == 1``).
        out_dim: size of z.
        depth: number of linear layers, 1..4.
        last_bn: end in ``Linear(bias=False) -> ScaleOnlyBatchNorm1d`` (SimCLRv2) instead of a
            ``Linear`` with a bias (SimCLR).

    Attributes:
        blocks: ``nn.ModuleList`` of ``depth`` ``nn.Sequential`` blocks (see the module docstring).
        dims: ``[in_dim, hidden_dim, ..., out_dim]``, the size after each block (``len == depth+1``).
    """

    def __init__(
        self, in_dim: int, hidden_dim: int, out_dim: int, depth: int = 2, last_bn: bool = False
    ) -> None:
        super().__init__()
        _check_int("in_dim", in_dim, 1)
        _check_int("hidden_dim", hidden_dim, 1)
        _check_int("out_dim", out_dim, 1)
        _check_int("depth", depth, 1, 4)
        self.in_dim, self.hidden_dim, self.out_dim, self.depth = in_dim, hidden_dim, out_dim, depth
        self.last_bn = bool(last_bn)
        self.dims: list[int] = [in_dim] + [hidden_dim] * (depth - 1) + [out_dim]
        blocks: list[nn.Sequential] = []
        for i in range(depth):
            d_in, d_out = self.dims[i], self.dims[i + 1]
            if i < depth - 1:
                # (N, d_in) -> (N, d_out); the BN's shift makes a linear bias redundant
                blocks.append(
                    nn.Sequential(
                        nn.Linear(d_in, d_out, bias=False),
                        nn.BatchNorm1d(d_out),
                        nn.ReLU(inplace=True),
                    )
                )
            elif self.last_bn:  # (N, d_in) -> (N, out_dim), SimCLRv2's last layer
                blocks.append(
                    nn.Sequential(nn.Linear(d_in, d_out, bias=False), ScaleOnlyBatchNorm1d(d_out))
                )
            else:
                blocks.append(nn.Sequential(nn.Linear(d_in, d_out)))  # (N, d_in) -> (N, out_dim)
        self.blocks = nn.ModuleList(blocks)

    def forward(self, h: Tensor) -> Tensor:
        """``h`` (N, in_dim) -> ``z`` (N, out_dim)."""
        for block in self.blocks:
            h = block(h)
        return h


class ContrastiveModel(nn.Module):
    """Encoder f and projection head g: ``forward(x) -> (h, z)`` with ``h = f(x)``, ``z = g(h)``.

    ``x`` (N, C, H, W) -> ``h`` (N, encoder.out_dim), ``z`` (N, head.out_dim), z not normalised
    (SimCLR, arXiv:2002.05709, §2.1).
    """

    def __init__(self, encoder: nn.Module, head: ProjectionHead) -> None:
        super().__init__()
        enc_dim = getattr(encoder, "out_dim", None)
        if enc_dim is not None and enc_dim != head.in_dim:
            raise ValueError(f"head.in_dim {head.in_dim} does not match encoder.out_dim {enc_dim}")
        self.encoder = encoder
        self.head = head

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.encoder(x)  # (N, D)
        z = self.head(h)  # (N, out)
        return h, z


class Backbone(nn.Sequential):
    """Encoder followed by the first ``j`` head blocks; ``forward(x)`` -> (N, ``out_dim``).

    Children are named ``encoder``, ``head_0`` .. ``head_{j-1}`` (stable state-dict keys).
    """

    def __init__(self, encoder: nn.Module, head_blocks: list[nn.Module], out_dim: int) -> None:
        modules: OrderedDict[str, nn.Module] = OrderedDict(encoder=encoder)
        for i, block in enumerate(head_blocks):
            modules[f"head_{i}"] = block
        super().__init__(modules)
        self.out_dim = out_dim
        self.head_layers = len(head_blocks)


def backbone_from(model: ContrastiveModel, j: int) -> tuple[Backbone, int]:
    """The network to fine-tune from head layer ``j`` (SimCLRv2, arXiv:2006.10029, §2).

    ``j = 0`` is the plain encoder (h); ``1 <= j < depth`` adds the first ``j`` head blocks
    (Linear+BN+ReLU each); ``j = depth`` is the whole head (ending in the last Linear, no ReLU).
    The result is a fresh module holding *copies* of the weights (training it leaves ``model``
    unchanged).

    Returns:
        ``(backbone, feat_dim)``: the module (``x`` (N, C, H, W) -> (N, feat_dim)) and its output size.

    Raises:
        ValueError: if ``j`` is not in ``0..model.head.depth``.
    """
    if not isinstance(model, ContrastiveModel):
        raise ValueError(f"backbone_from needs a ContrastiveModel (got {type(model).__name__})")
    depth = model.head.depth
    _check_int("j (head layers to keep)", j, 0, depth)
    if j == 0:
        feat_dim = getattr(model.encoder, "out_dim", model.head.in_dim)
    else:
        feat_dim = model.head.dims[j]
    encoder = copy.deepcopy(model.encoder)
    blocks = [copy.deepcopy(model.head.blocks[i]) for i in range(j)]
    return Backbone(encoder, blocks, feat_dim), feat_dim


class Classifier(nn.Module):
    """``backbone`` followed by a linear layer: ``x`` (N, C, H, W) -> logits (N, num_classes)."""

    def __init__(self, backbone: nn.Module, feat_dim: int, num_classes: int) -> None:
        super().__init__()
        _check_int("feat_dim", feat_dim, 1)
        _check_int("num_classes", num_classes, 1)
        self.backbone = backbone
        self.feat_dim, self.num_classes = feat_dim, num_classes
        self.fc = nn.Linear(feat_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """``x`` (N, C, H, W) -> features (N, feat_dim)."""
        return self.backbone(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.backbone(x))  # (N, num_classes)
