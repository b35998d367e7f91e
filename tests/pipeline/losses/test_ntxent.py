"""pipeline.losses.ntxent: NT-Xent against SimCLR's loop formula (arXiv:2002.05709), invariances,
gradcheck and validation; and, for both contrastive losses, the float32 computation of
``compute_dtype`` and the finite self-mask that ntxent.py holds: stable at a low temperature, bf16
autocast."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import NTXentLoss, SupConLoss, nt_xent, supcon


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


def test_nt_xent_validation_errors(gen: torch.Generator) -> None:
    z = torch.randn(4, 3, generator=gen)
    for tau in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            nt_xent(z, z, tau)
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0)
    with pytest.raises(ValueError, match="2 views"):
        nt_xent(torch.randn(0, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 3\)"):
        nt_xent(z, torch.randn(5, 3))


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
