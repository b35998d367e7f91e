"""pipeline.losses.supcon: SupCon L_out against a loop formula (arXiv:2004.11362) with labeled,
unlabeled and mixed batches, its reduction to NT-Xent, invariances, gradcheck and validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import SupConLoss, nt_xent, supcon


def naive_supcon(features: torch.Tensor, labels: list[int] | None, tau: float) -> float:
    """SupCon L_out with loops; label -1 = unlabeled (positives: only its own image's views)."""
    n, v, _ = features.shape
    labels = labels if labels is not None else [-1] * n
    views = [(i, F.normalize(features[i, k].double(), dim=0)) for i in range(n) for k in range(v)]
    losses = []
    for a, (img_a, za) in enumerate(views):
        denom = sum(math.exp(float(za @ zk) / tau) for k, (_, zk) in enumerate(views) if k != a)
        pos = [
            k
            for k, (img_k, _) in enumerate(views)
            if k != a
            and (img_k == img_a or (labels[img_a] >= 0 and labels[img_k] == labels[img_a]))
        ]
        if not pos:
            continue
        terms = [-math.log(math.exp(float(za @ views[p][1]) / tau) / denom) for p in pos]
        losses.append(sum(terms) / len(terms))
    return sum(losses) / len(losses) if losses else 0.0


def test_supcon_simclr_equals_nt_xent(gen: torch.Generator) -> None:
    feats = torch.randn(6, 2, 5, generator=gen)
    ref = nt_xent(feats[:, 0], feats[:, 1], 0.2)
    torch.testing.assert_close(supcon(feats, None, 0.2), ref)
    torch.testing.assert_close(SupConLoss(0.2)(feats, torch.full((6,), -1)), ref)
    torch.testing.assert_close(supcon(feats, torch.arange(6), 0.2), ref)  # all-distinct labels


@pytest.mark.parametrize(
    "labels",
    [
        [0, 1, 0, 2, 1, 2],  # every image labeled
        [0, -1, 0, 1, -1, 2],  # semi-supervised mix (class 1, 2 seen once)
        [-1, -1, -1, -1, -1, -1],
    ],
)
@pytest.mark.parametrize("views", [2, 3])
def test_supcon_matches_loop_formula(gen: torch.Generator, labels: list[int], views: int) -> None:
    feats = torch.randn(6, views, 4, generator=gen)
    got = supcon(feats, torch.tensor(labels), 0.3).item()
    assert got == pytest.approx(naive_supcon(feats, labels, 0.3), rel=1e-5)


def test_supcon_single_view_excludes_anchors_without_positive(gen: torch.Generator) -> None:
    # V = 1: only same-class labeled images have positives; the rest are left out of the mean.
    feats = torch.randn(5, 1, 4, generator=gen, requires_grad=True)
    labels = [0, 0, 1, -1, 2]
    loss = supcon(feats, torch.tensor(labels), 0.5)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(naive_supcon(feats.detach(), labels, 0.5), rel=1e-5)
    loss.backward()
    assert torch.isfinite(feats.grad).all()


def test_supcon_no_positive_at_all_is_zero_with_grad(gen: torch.Generator) -> None:
    feats = torch.randn(4, 1, 3, generator=gen, requires_grad=True)
    loss = supcon(feats, torch.tensor([0, 1, -1, 2]), 0.1)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(feats.grad, torch.zeros_like(feats))


def test_supcon_permutation_invariant(gen: torch.Generator) -> None:
    feats = torch.randn(7, 2, 4, generator=gen)
    labels = torch.tensor([0, 1, -1, 0, 2, -1, 1])
    perm = torch.randperm(7, generator=gen)
    torch.testing.assert_close(supcon(feats[perm], labels[perm], 0.2), supcon(feats, labels, 0.2))
    vperm = torch.tensor([1, 0])  # swapping the views of every image changes nothing either
    torch.testing.assert_close(supcon(feats[:, vperm], labels, 0.2), supcon(feats, labels, 0.2))


def test_supcon_gradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(4, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([0, -1, 0, 1])
    assert torch.autograd.gradcheck(lambda f: supcon(f, labels, 0.5), (feats,))


def test_supcon_validation_errors(gen: torch.Generator) -> None:
    z = torch.randn(4, 3, generator=gen)
    for tau in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            supcon(z[:, None], None, tau)
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(temperature=0)
    with pytest.raises(ValueError, match="2 views"):
        supcon(torch.randn(1, 1, 3), None)  # a single view in total
    with pytest.raises(ValueError, match=r"\(N, V, D\).*\(4, 3\)"):
        supcon(z)
    with pytest.raises(ValueError, match=r"labels of shape.*\(3,\)"):
        supcon(z[:, None], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        supcon(z[:, None], torch.zeros(4))
