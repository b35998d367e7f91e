"""pipeline.losses.fixmatch: FixMatch's consistency loss (arXiv:2001.07685) against its formula,
its confident targets and gradient, and ReMixMatch's distribution alignment."""

from __future__ import annotations

import pytest
import torch

from pipeline.losses import align_distribution, confident_targets, fixmatch


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
