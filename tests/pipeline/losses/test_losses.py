"""Losses against hand-written loop formulas (SimCLR arXiv:2002.05709, SupCon arXiv:2004.11362,
SimCLRv2 arXiv:2006.10029), plus invariances, gradcheck, validation and bf16 autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import (
    DistillationLoss,
    NTXentLoss,
    SupConLoss,
    align_distribution,
    confident_targets,
    distillation,
    fixmatch,
    nt_xent,
    supcon,
)


def naive_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, tau: float) -> float:
    """SimCLR eq. 1 with Python loops, views ordered [a_0..a_{N-1}, b_0..b_{N-1}]."""
    z = [F.normalize(v, dim=0) for v in torch.cat([z_a, z_b]).double()]
    n = z_a.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denom = sum(math.exp(float(z[i] @ z[k]) / tau) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / tau) / denom)
    return total / (2 * n)


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


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


# ---------------------------------------------------------------- NT-Xent


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_loop_formula(gen: torch.Generator, tau: float) -> None:
    z_a, z_b = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    assert nt_xent(z_a, z_b, tau).item() == pytest.approx(naive_nt_xent(z_a, z_b, tau), rel=1e-5)
    assert NTXentLoss(tau)(z_a, z_b).item() == pytest.approx(naive_nt_xent(z_a, z_b, tau), rel=1e-5)


def test_nt_xent_scale_invariant_and_permutation_invariant(gen: torch.Generator) -> None:
    z_a, z_b = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    ref = nt_xent(z_a, z_b, 0.3)
    perm = torch.randperm(6, generator=gen)
    torch.testing.assert_close(nt_xent(z_a[perm], z_b[perm], 0.3), ref)
    torch.testing.assert_close(nt_xent(3 * z_a, 0.5 * z_b, 0.3), ref)  # normalised inside
    torch.testing.assert_close(nt_xent(z_b, z_a, 0.3), ref)  # symmetric in the two views


def test_nt_xent_gradcheck() -> None:
    g = torch.Generator().manual_seed(1)
    z_a = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    z_b = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent(a, b, 0.5), (z_a, z_b))


# ---------------------------------------------------------------- SupCon


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


def test_contrastive_losses_stable_at_low_temperature(gen: torch.Generator) -> None:
    feats = torch.randn(4, 2, 3, generator=gen, requires_grad=True)
    for loss in (
        supcon(feats, torch.tensor([0, 0, -1, 1]), 0.01),
        nt_xent(feats[:, 0], feats[:, 1], 0.01),
    ):
        (grad,) = torch.autograd.grad(loss, feats)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_bf16_autocast_no_nan_and_close_to_fp32(gen: torch.Generator) -> None:
    lin = torch.nn.Linear(8, 6)
    x = torch.randn(8, 2, 8, generator=gen)
    labels = torch.tensor([0, 1, -1, 0, 2, -1, 1, 2])
    ref_s, ref_n = supcon(lin(x), labels, 0.1), nt_xent(lin(x[:, 0]), lin(x[:, 1]), 0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(x)  # bf16 under autocast
        assert z.dtype == torch.bfloat16
        s = SupConLoss(0.1)(z, labels)
        n = NTXentLoss(0.1)(z[:, 0], z[:, 1])
    for got, ref in ((s, ref_s), (n, ref_n)):
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert got.item() == pytest.approx(ref.item(), rel=0.05)
    s.backward()
    assert all(torch.isfinite(p.grad).all() for p in lin.parameters())


def test_validation_errors(gen: torch.Generator) -> None:
    z = torch.randn(4, 3, generator=gen)
    for tau in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            nt_xent(z, z, tau)
        with pytest.raises(ValueError, match="temperature"):
            supcon(z[:, None], None, tau)
        with pytest.raises(ValueError, match="temperature"):
            distillation(z, z, tau)
    for cls in (NTXentLoss, SupConLoss, DistillationLoss):
        with pytest.raises(ValueError, match="temperature"):
            cls(temperature=0)
    with pytest.raises(ValueError, match="2 views"):
        supcon(torch.randn(1, 1, 3), None)  # a single view in total
    with pytest.raises(ValueError, match="2 views"):
        nt_xent(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 3\)"):
        nt_xent(z, torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(N, V, D\).*\(4, 3\)"):
        supcon(z)
    with pytest.raises(ValueError, match=r"labels of shape.*\(3,\)"):
        supcon(z[:, None], torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="integer"):
        supcon(z[:, None], torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 2\)"):
        distillation(z, z[:, :2])
    with pytest.raises(ValueError, match="label_weight"):
        DistillationLoss(label_weight=1.5)


# ---------------------------------------------------------------- distillation


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


# ---------------------------------------------------------------- FixMatch


def naive_fixmatch(strong: torch.Tensor, weak: torch.Tensor, tau: float) -> float:
    """FixMatch eq. 4 with a loop: mean over all rows of 1[max q >= tau] · -log p_strong[argmax q]."""
    total = 0.0
    for s_b, w_b in zip(strong.double(), weak.double(), strict=True):
        q = torch.softmax(w_b, 0)
        if float(q.max()) >= tau:
            total += -float(torch.log_softmax(s_b, 0)[int(q.argmax())])
    return total / strong.shape[0]


@pytest.mark.parametrize("tau", [0.3, 0.6, 0.95])
def test_fixmatch_matches_formula(gen: torch.Generator, tau: float) -> None:
    strong = torch.randn(16, 5, generator=gen) * 2
    weak = torch.randn(16, 5, generator=gen) * 3
    _, keep = confident_targets(weak, tau)
    assert int(keep.sum()) > 0
    if tau > 0.5:
        assert int(keep.sum()) < 16  # dropped rows too
    got = fixmatch(strong, weak, tau)
    assert got.item() == pytest.approx(naive_fixmatch(strong, weak, tau), rel=1e-5)


def test_fixmatch_confident_targets_are_the_weak_argmax() -> None:
    weak = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.1, 0.0], [0.0, 0.0, 9.0]])
    targets, keep = confident_targets(weak, 0.9)
    assert targets.tolist() == [0, 1, 2]
    assert keep.tolist() == [True, False, True]


def test_fixmatch_no_confident_row_is_zero_with_grad_and_weak_gets_none(
    gen: torch.Generator,
) -> None:
    strong = torch.randn(4, 3, generator=gen, requires_grad=True)
    weak = torch.zeros(4, 3, requires_grad=True)  # uniform: max prob 1/3 < threshold
    loss = fixmatch(strong, weak, 0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert strong.grad is not None and torch.count_nonzero(strong.grad) == 0
    assert weak.grad is None


def test_fixmatch_gradient_pulls_the_strong_view_to_the_target() -> None:
    strong = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    weak = torch.tensor([[0.0, 8.0, 0.0]], dtype=torch.float64)
    fixmatch(strong, weak, 0.9).backward()
    # d CE / d logits = softmax - onehot(1): negative only at the target class.
    assert strong.grad[0, 1] < 0 and strong.grad[0, 0] > 0 and strong.grad[0, 2] > 0
    assert torch.autograd.gradcheck(lambda x: fixmatch(x, weak, 0.9), (strong,))


def test_fixmatch_validation_errors(gen: torch.Generator) -> None:
    x = torch.randn(4, 3, generator=gen)
    with pytest.raises(ValueError, match="threshold"):
        fixmatch(x, x, 0.0)
    with pytest.raises(ValueError, match="threshold"):
        fixmatch(x, x, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        fixmatch(x, x[:3], 0.9)
    with pytest.raises(ValueError, match="weak_logits"):
        confident_targets(torch.randn(4), 0.9)


def test_align_distribution_is_identity_when_the_running_mean_is_the_target(
    gen: torch.Generator,
) -> None:
    logits = torch.randn(6, 4, generator=gen)
    prior = torch.tensor([0.1, 0.2, 0.3, 0.4])
    got = align_distribution(logits, prior, prior)
    torch.testing.assert_close(got.softmax(1), logits.softmax(1))


def test_align_distribution_moves_targets_away_from_an_over_predicted_class() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0], [0.0, 0.0, 0.0]])
    uniform = torch.full((3,), 1 / 3)
    running = torch.tensor([0.6, 0.2, 0.2])  # the network says class 0 far too often
    q = align_distribution(logits, running, uniform).exp()
    torch.testing.assert_close(q.sum(1), torch.ones(2))
    # By hand: q ∝ softmax(logits) · (1/3) / running.
    p = logits.softmax(1) / running
    torch.testing.assert_close(q, p / p.sum(1, keepdim=True))
    assert q[0].argmax() == 1 and logits[0].argmax() == 0  # the close call flips
    assert q[1, 0] < q[1, 1] == q[1, 2]


def test_align_distribution_validation_errors(gen: torch.Generator) -> None:
    x = torch.randn(4, 3, generator=gen)
    ok = torch.full((3,), 1 / 3)
    with pytest.raises(ValueError, match="running: expected shape"):
        align_distribution(x, torch.ones(4), ok)
    with pytest.raises(ValueError, match="target: every class"):
        align_distribution(x, ok, torch.tensor([0.5, 0.5, 0.0]))
    with pytest.raises(ValueError, match="weak_logits"):
        align_distribution(torch.randn(3), ok, ok)
