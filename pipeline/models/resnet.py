"""ResNet encoders f(·) for contrastive learning, built on torchvision's ResNet classes.

The encoder maps an image batch to the pooled representation ``h = f(x)`` (SimCLR,
Chen et al. 2020, arXiv:2002.05709, §2.1: "h = f(x) = ResNet(x) ... the output after the average
pooling layer"). The classification layer ``fc`` is removed.

Two options matter for small images:

* ``width`` scales every stage's channels (SimCLR's ResNet-50 (2×, 4×) are the same knob in the
  other direction). The stem has ``64·width`` channels and stage *i* has ``64·2^i·width`` planes,
  each rounded and at least 8.
* ``cifar_stem`` replaces the 7×7 stride-2 stem and its max-pool by a 3×3 stride-1 convolution
  without max-pool, as the SimCLR authors do for CIFAR-10 (arXiv:2002.05709, appendix B.9); use it
  for images of at most 64 px, where the ImageNet stem would throw away most of the resolution.
* ``stem_stride`` (CIFAR stem only): 2 halves the stem's output side (28 px -> 14 px), a quarter of
  the positions in every later layer. On 28 px Fashion-MNIST at 2 CPU cores it trains about 3x as
  many images/s as stride 1 with the same parameters (benchmarks/step_throughput.py
  ``--stem-stride``; docs/recipe.md); the ImageNet stem (stride 4) always keeps its own.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["ARCHS", "ResNetEncoder", "build_encoder", "scaled_channels", "to_channels_last"]

EncoderArch = Literal["resnet18", "resnet34", "resnet50"]

#: arch -> (block class, blocks per stage)
ARCHS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}

_MIN_CHANNELS = 8


def scaled_channels(channels: int, width: float) -> int:
    """``round(channels · width)``, at least 8."""
    return max(_MIN_CHANNELS, int(round(channels * width)))


def _check_args(
    arch: str, width: float, cifar_stem: bool, in_channels: int, stem_stride: int
) -> None:
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)} (got {arch!r})")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a number > 0 (got {width!r})")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be an int >= 1 (got {in_channels!r})")
    if stem_stride not in (1, 2) or isinstance(stem_stride, bool):
        raise ValueError(f"stem_stride must be 1 or 2 (got {stem_stride!r})")
    if stem_stride != 1 and not cifar_stem:
        raise ValueError("stem_stride applies to the CIFAR stem only (cifar_stem=False)")


def _stem(
    cifar_stem: bool, in_channels: int, base: int, stem_stride: int
) -> tuple[nn.Conv2d, nn.Module]:
    """The first convolution and the pooling after it."""
    if cifar_stem:
        # (N, C, H, W) -> (N, base, H/s, W/s): 3x3 stride s (1: arXiv:2002.05709, B.9), no
        # max-pool
        conv = nn.Conv2d(
            in_channels, base, kernel_size=3, stride=stem_stride, padding=1, bias=False
        )
        return conv, nn.Identity()
    # (N, C, H, W) -> (N, base, H/4, W/4): 7x7 stride 2 + 3x3 max-pool stride 2
    conv = nn.Conv2d(in_channels, base, kernel_size=7, stride=2, padding=3, bias=False)
    return conv, nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


class ResNetEncoder(ResNet):
    """A torchvision :class:`~torchvision.models.ResNet` with scaled widths, an optional CIFAR stem
    and no classification layer.

    ``forward(x)`` maps ``(N, C, H, W)`` to ``h`` of shape ``(N, out_dim)``.

    Attributes:
        out_dim: size of the representation h (``8·base`` planes × block expansion).
        arch, width, cifar_stem, in_channels, stem_stride: the arguments it was built with.
        stage_planes: planes of the four stages (before the block expansion).
    """

    def __init__(
        self,
        arch: EncoderArch = "resnet18",
        width: float = 1.0,
        cifar_stem: bool = True,
        in_channels: int = 3,
        stem_stride: int = 1,
    ) -> None:
        _check_args(arch, width, cifar_stem, in_channels, stem_stride)
        block, layers = ARCHS[arch]
        # ``ResNet.__init__`` would first build the full-width ImageNet network; set up what
        # ``ResNet._make_layer`` and ``ResNet._forward_impl`` read instead, and build ours.
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.groups = 1
        self.base_width = 64  # Bottleneck width = planes (no ResNeXt / wide variant)
        base = scaled_channels(64, width)
        planes = [scaled_channels(64 * 2**i, width) for i in range(4)]
        self.arch, self.width = arch, float(width)
        self.cifar_stem, self.in_channels = bool(cifar_stem), in_channels
        self.stem_stride = stem_stride
        self.stage_planes = planes

        self.inplanes = base
        self.dilation = 1
        self.conv1, self.maxpool = _stem(cifar_stem, in_channels, base, stem_stride)
        self.bn1 = self._norm_layer(base)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0])  # (N, p0·e, H', W')
        self.layer2 = self._make_layer(
            block, planes[1], layers[1], stride=2
        )  # (N, p1·e, H'/2, W'/2)
        self.layer3 = self._make_layer(
            block, planes[2], layers[2], stride=2
        )  # (N, p2·e, H'/4, W'/4)
        self.layer4 = self._make_layer(
            block, planes[3], layers[3], stride=2
        )  # (N, p3·e, H'/8, W'/8)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))  # (N, out_dim, 1, 1)
        self.fc = nn.Identity()
        self.out_dim: int = planes[3] * block.expansion
        self._init_weights()

    def _init_weights(self) -> None:
        """torchvision's ResNet initialisation (zero_init_residual=False)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` (N, C, H, W) -> ``h`` (N, out_dim)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input of shape (N, {self.in_channels}, H, W) (got {tuple(x.shape)})"
            )
        return self._forward_impl(x)  # avgpool -> flatten -> fc (Identity): (N, out_dim)

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch}, width={self.width}, cifar_stem={self.cifar_stem}, "
            f"stem_stride={self.stem_stride}, "
            f"in_channels={self.in_channels}, out_dim={self.out_dim}"
        )


def build_encoder(
    arch: EncoderArch = "resnet18",
    width: float = 1.0,
    cifar_stem: bool = True,
    in_channels: int = 3,
    stem_stride: int = 1,
) -> ResNetEncoder:
    """A ResNet-18/34/50 encoder returning the pooled representation ``h`` (N, ``out_dim``).

    Args:
        arch: ``resnet18``, ``resnet34`` or ``resnet50`` (torchvision's block layout).
        width: channel multiplier for every stage (stem ``64·width``; at least 8 channels each).
        cifar_stem: 3×3 stride-1 stem without max-pool (images ≤ 64 px), else the ImageNet stem.
        in_channels: image channels (1 for Fashion-MNIST, 3 for CIFAR-10).
        stem_stride: stride of the CIFAR stem's convolution, 1 or 2.

    Raises:
        ValueError: on an unknown arch, a width ≤ 0, in_channels < 1 or a stem_stride other than
            1 or 2 (or 2 with the ImageNet stem).
    """
    return ResNetEncoder(arch, width, cifar_stem, in_channels, stem_stride)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Move a model's 4-d parameters and buffers to ``torch.channels_last`` (in place; returned).

    Inputs should be converted too (``x.contiguous(memory_format=torch.channels_last)``) for the
    convolutions to run in NHWC without layout conversions. Mostly a GPU (tensor-core) and
    oneDNN/CPU-bf16 win; measure before relying on it.
    """
    return model.to(memory_format=torch.channels_last)
