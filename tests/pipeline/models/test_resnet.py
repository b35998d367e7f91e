"""pipeline.models.resnet: width-scaled ResNet encoders (stems, widths, stem stride, argument
checks) and channels-last."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import (
    build_contrastive_model,
    build_encoder,
    count_params,
    flops_per_image,
    to_channels_last,
)

ENCODER_CASES = [
    (arch, width, stem, ch)
    for arch in ("resnet18", "resnet34")
    for width in (0.25, 0.5)
    for stem in (True, False)
    for ch in (1, 3)
] + [("resnet50", 0.25, stem, ch) for stem in (True, False) for ch in (1, 3)]


def _expected_out_dim(arch: str, width: float) -> int:
    return max(8, round(512 * width)) * (4 if arch == "resnet50" else 1)


@pytest.mark.parametrize(("arch", "width", "stem", "ch"), ENCODER_CASES)
def test_encoder_output_shape(arch: str, width: float, stem: bool, ch: int) -> None:
    torch.manual_seed(0)
    enc = build_encoder(arch, width=width, cifar_stem=stem, in_channels=ch).eval()
    assert enc.out_dim == _expected_out_dim(arch, width)
    assert not any(isinstance(m, nn.Linear) for m in enc.modules())  # fc removed
    x = torch.randn(1, ch, 28, 28) if ch == 1 else torch.randn(2, ch, 32, 32)
    with torch.no_grad():
        h = enc(x)
    assert h.shape == (x.shape[0], enc.out_dim)
    assert torch.isfinite(h).all()


def test_encoder_stems_and_widths() -> None:
    cifar = build_encoder("resnet18", 0.25, cifar_stem=True, in_channels=1)
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert cifar.conv1.in_channels == 1 and cifar.conv1.out_channels == 16  # 64 * 0.25
    assert cifar.stage_planes == [16, 32, 64, 128]
    imagenet = build_encoder("resnet18", 0.25, cifar_stem=False)
    assert imagenet.conv1.kernel_size == (7, 7) and imagenet.conv1.stride == (2, 2)
    assert isinstance(imagenet.maxpool, nn.MaxPool2d)
    tiny = build_encoder("resnet18", 0.05)  # every stage at least 8 channels
    assert tiny.conv1.out_channels == 8 and tiny.stage_planes == [8, 8, 13, 26]
    full = build_encoder("resnet18", 1.0)
    assert full.out_dim == 512 and full.stage_planes == [64, 128, 256, 512]
    # the same layout as torchvision's resnet18 apart from the stem and fc
    import torchvision

    ref = torchvision.models.resnet18()
    assert count_params(full) == count_params(ref) - count_params(ref.fc) - (
        ref.conv1.weight.numel() - full.conv1.weight.numel()
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"arch": "resnet101"},
        {"width": 0.0},
        {"width": -1.0},
        {"in_channels": 0},
        {"in_channels": 2.5},
        {"stem_stride": 3},
        {"stem_stride": 2, "cifar_stem": False},
    ],
)
def test_encoder_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        build_encoder(**kwargs)


def test_stem_stride_two_quarters_the_positions_with_the_same_parameters() -> None:
    torch.manual_seed(0)
    s1 = build_encoder("resnet18", 0.125, in_channels=1)
    s2 = build_encoder("resnet18", 0.125, in_channels=1, stem_stride=2)
    assert s2.conv1.stride == (2, 2) and s2.stem_stride == 2 and "stem_stride=2" in repr(s2)
    assert count_params(s1) == count_params(s2)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert s1.layer1(s1.relu(s1.bn1(s1.conv1(x)))).shape[-2:] == (28, 28)
        assert s2.layer1(s2.relu(s2.bn1(s2.conv1(x)))).shape[-2:] == (14, 14)
        assert s2(x).shape == (2, s2.out_dim)
    assert flops_per_image(s2, (1, 28, 28)) < 0.3 * flops_per_image(s1, (1, 28, 28))


def test_encoder_rejects_wrong_channels() -> None:
    enc = build_encoder("resnet18", 0.125, in_channels=1)
    with pytest.raises(ValueError, match="expected input"):
        enc(torch.zeros(2, 3, 8, 8))


def test_channels_last() -> None:
    enc = to_channels_last(build_encoder("resnet18", 0.125, in_channels=3))
    assert enc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    assert enc.eval()(x).shape == (2, 64)
    cfg = ModelConfig(width=0.125, channels_last=True)
    m = build_contrastive_model(cfg, 3)
    assert m.encoder.conv1.weight.is_contiguous(memory_format=torch.channels_last)
