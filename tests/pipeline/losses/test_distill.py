"""pipeline.losses.distill: SimCLRv2's distillation loss (arXiv:2006.10029) against its formula,
the mixing with labels, its gradient, gradcheck and validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import DistillationLoss, distillation


def naive_distillation(s: torch.Tensor, t: torch.Tensor, tau: float) -> float:
    total = 0.0
    for sb, tb in zip(s.double(), t.double(), strict=True):
        pt = [math.exp(v / tau) for v in tb.tolist()]
        ps = [math.exp(v / tau) for v in sb.tolist()]
        total -= sum(p / sum(pt) * math.log(q / sum(ps)) for p, q in zip(pt, ps, strict=True))
    return total / s.shape[0]


@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_distillation_matches_formula(gen: torch.Generator, tau: float) -> None:
    s, t = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    assert DistillationLoss(tau)(s, t).item() == pytest.approx(
        naive_distillation(s, t, tau), rel=1e-5
    )


def test_distillation_label_weight_mixing(gen: torch.Generator) -> None:
    s, t = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    labels = torch.tensor([0, -1, 3, 2, -1, 1])
    kd = distillation(s, t, 2.0)
    ce = F.cross_entropy(s[labels >= 0], labels[labels >= 0])
    got = DistillationLoss(2.0, label_weight=0.3)(s, t, labels)
    torch.testing.assert_close(got, 0.7 * kd + 0.3 * ce)
    torch.testing.assert_close(DistillationLoss(2.0, label_weight=0.0)(s, t, labels), kd)
    torch.testing.assert_close(DistillationLoss(2.0, label_weight=1.0)(s, t, labels), ce)
    unlabeled = torch.full((6,), -1)  # no labeled entry: the CE term adds 0, never NaN
    torch.testing.assert_close(DistillationLoss(2.0, label_weight=0.3)(s, t, unlabeled), 0.7 * kd)


def test_distillation_labels_as_their_own_tensor_match_the_packed_column(
    gen: torch.Generator,
) -> None:
    """The distillation stage passes the hard labels as their own int64 tensor (-1: unlabeled);
    the loss is the very one of the labels packed as a float column beside the teacher's logits
    and read back with ``.long()``, and matches the formula."""
    s, t = torch.randn(8, 5, generator=gen), torch.randn(8, 5, generator=gen)
    labels = torch.tensor([0, -1, 4, 2, -1, 1, 3, -1])
    packed = torch.cat([t, labels[:, None].float()], dim=1)  # (B, K + 1)
    loss = DistillationLoss(1.5, label_weight=0.25)
    new = loss(s, t, labels)
    assert torch.equal(new, loss(s, packed[:, :-1], packed[:, -1].long()))
    keep = labels >= 0
    ce = -F.log_softmax(s[keep].double(), dim=1)[torch.arange(int(keep.sum())), labels[keep]]
    expected = 0.75 * naive_distillation(s, t, 1.5) + 0.25 * float(ce.mean())
    assert new.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_distillation_gradient_is_softmax_difference(gen: torch.Generator, tau: float) -> None:
    s = torch.randn(3, 4, generator=gen, requires_grad=True)
    t = torch.randn(3, 4, generator=gen, requires_grad=True)
    (gs,) = torch.autograd.grad(distillation(s, t, tau), s)
    expected = (F.softmax(s / tau, 1) - F.softmax(t / tau, 1)).detach() / (tau * 3)
    torch.testing.assert_close(gs, expected)
    # at student == teacher the distillation term is at its minimum: zero gradient
    (g0,) = torch.autograd.grad(distillation(t, t.detach(), tau), t)
    torch.testing.assert_close(g0, torch.zeros_like(g0))


def test_distillation_teacher_gets_no_gradient_and_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    s = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.tensor([1, -1, 0])
    assert torch.autograd.gradcheck(lambda x: distillation(x, t, 2.0, labels, 0.4), (s,))
    loss = distillation(s, t, 2.0, labels, 0.4)
    loss.backward()
    assert t.grad is None


def test_distillation_validation_errors(gen: torch.Generator) -> None:
    z = torch.randn(4, 3, generator=gen)
    for tau in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            distillation(z, z, tau)
    with pytest.raises(ValueError, match="temperature"):
        DistillationLoss(temperature=0)
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        distillation(z, z[:, :2])
    with pytest.raises(ValueError, match="label_weight"):
        DistillationLoss(label_weight=1.5)
