"""Two-view SimCLR transforms: shapes, ranges, determinism, differing views, channel handling."""

from __future__ import annotations

import pytest
import torch

from pipeline.data.transforms import (
    MEAN,
    STD,
    BatchTwoViewAugment,
    EvalTransform,
    crop_resize,
    normalize_batch,
)

LO, HI = (0 - MEAN) / STD, (1 - MEAN) / STD


def _batch(b=16, c=1, h=28, w=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 64), (1, 16)])
def test_batched_shapes_ranges_channels(channels, size):
    x = _batch(c=channels, h=40, w=36)
    v1, v2 = BatchTwoViewAugment(size, channels, strength=1.0, crop_min_scale=0.2)(x)
    for v in (v1, v2):
        assert v.shape == (16, channels, size, size) and v.dtype == torch.float32
        assert v.min() >= LO - 1e-5 and v.max() <= HI + 1e-5
        assert torch.isfinite(v).all()


def test_batched_deterministic_under_seeded_generator_and_views_differ():
    x = _batch()
    aug = BatchTwoViewAugment(28, 1, 0.5, 0.2)
    a1, a2 = aug(x, torch.Generator().manual_seed(7))
    b1, b2 = aug(x, torch.Generator().manual_seed(7))
    c1, _ = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1)
    per_sample_diff = (a1 - a2).abs().flatten(1).amax(dim=1)
    assert (per_sample_diff > 1e-3).all()  # every sample's two views differ


def test_batched_crop_and_flip_geometry():
    # A horizontal ramp: crops change the value range, flips reverse the ramp direction.
    ramp = (
        torch.linspace(0, 255, 32).round().to(torch.uint8).view(1, 1, 1, 32).expand(64, 1, 32, 32)
    )
    aug = BatchTwoViewAugment(32, 1, strength=0.0, crop_min_scale=0.2)
    v, _ = aug(ramp.contiguous(), torch.Generator().manual_seed(0))
    slope = v[:, 0, 16, -1] - v[:, 0, 16, 0]
    assert (slope > 0).any() and (slope < 0).any()  # both orientations occur
    widths = slope.abs()
    assert widths.max() - widths.min() > 0.5  # crops of different sizes
    # crop_min_scale=1 and a square image: the whole image, so both ends of the ramp survive
    full = BatchTwoViewAugment(32, 1, strength=0.0, crop_min_scale=1.0)
    v, _ = full(ramp.contiguous(), torch.Generator().manual_seed(0))
    assert (v[:, 0, 16, [0, -1]].abs() > 1.5).all()


@pytest.mark.parametrize(
    "b,c,h,size,reach",
    [(32, 1, 28, 28, 1.0), (8, 3, 32, 32, 1.0), (8, 3, 40, 20, 1.0), (8, 1, 28, 36, 3.5)],
)
def test_crop_resize_equals_affine_grid_sample(b, c, h, size, reach):
    """The separable crop is grid_sample's bilinear / reflection / align_corners=False map, also
    for grids that leave the image (reach > 1: reflected, several times) and resizes up or down."""
    g = torch.Generator().manual_seed(b + c + h + size)
    x = torch.rand(b, c, h, h + 3, generator=g)  # non-square: each axis uses its own length
    sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    sx = (0.2 + 0.8 * torch.rand(b, generator=g)) * sign * reach
    sy = (0.2 + 0.8 * torch.rand(b, generator=g)) * reach
    tx, ty = ((2 * torch.rand(2, b, generator=g) - 1) * reach).unbind(0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, tx, sy, ty
    grid = torch.nn.functional.affine_grid(theta, [b, c, size, size], align_corners=False)
    want = torch.nn.functional.grid_sample(
        x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
    )
    got = crop_resize(x, sx, tx, sy, ty, size)
    assert got.shape == (b, c, size, size)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_crop_resize_identity_and_flip_are_exact():
    x = torch.rand(4, 2, 9, 9)
    one, zero = torch.ones(4), torch.zeros(4)
    torch.testing.assert_close(crop_resize(x, one, zero, one, zero, 9), x)
    torch.testing.assert_close(crop_resize(x, -one, zero, one, zero, 9), x.flip(-1))


def test_one_channel_jitter_changes_intensity_only_and_strength_zero_no_colour():
    x = torch.full((32, 1, 8, 8), 128, dtype=torch.uint8)
    v, _ = BatchTwoViewAugment(8, 1, strength=1.0, crop_min_scale=1.0)(
        x, torch.Generator().manual_seed(1)
    )
    means = v.mean(dim=(1, 2, 3))
    assert means.std() > 0.05  # brightness varies across samples
    v0, _ = BatchTwoViewAugment(8, 1, strength=0.0, crop_min_scale=1.0)(x)
    assert torch.allclose(v0, torch.full_like(v0, (128 / 255 - MEAN) / STD), atol=1e-5)


def test_rgb_greyscale_applied_to_about_a_fifth():
    x = _batch(b=400, c=3, h=8, w=8)
    v, _ = BatchTwoViewAugment(8, 3, strength=0.0, crop_min_scale=1.0)(
        x, torch.Generator().manual_seed(0)
    )
    grey = ((v[:, 0] - v[:, 1]).abs().amax(dim=(1, 2)) < 1e-6) & (
        (v[:, 1] - v[:, 2]).abs().amax(dim=(1, 2)) < 1e-6
    )
    assert 0.12 < grey.float().mean() < 0.28


def test_eval_transform_and_normalize_batch():
    x = _batch(b=4)
    n = normalize_batch(x)
    assert torch.allclose(n, (x.float() / 255 - MEAN) / STD)
    assert normalize_batch(x, size=16).shape == (4, 1, 16, 16)
    assert torch.equal(EvalTransform()(x[0]), n[0])


def test_validation():
    with pytest.raises(ValueError, match="crop_min_scale"):
        BatchTwoViewAugment(28, 1, 0.5, 0.0)
    with pytest.raises(ValueError, match="channels"):
        BatchTwoViewAugment(28, 2)
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        BatchTwoViewAugment(28, 1)(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))


def test_single_view_is_the_first_of_the_pair_and_validates_its_input() -> None:
    x = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8)
    aug = BatchTwoViewAugment(28, 1, strength=0.5, crop_min_scale=0.3)
    one = aug.single(x, torch.Generator().manual_seed(3))
    v1, v2 = aug(x, torch.Generator().manual_seed(3))
    assert one.shape == (6, 1, 28, 28)
    assert torch.equal(one, v1) and not torch.equal(one, v2)
    with pytest.raises(ValueError, match=r"expected \(B, 1, H, W\)"):
        aug.single(torch.zeros(6, 3, 28, 28, dtype=torch.uint8))
