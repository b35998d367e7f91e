"""SimCLR augmentations (Chen et al. 2020, appendix A) and the deterministic eval transform.

The distribution, for colour strength ``s``:

1. random resized crop: area fraction in ``[crop_min_scale, 1]``, aspect ratio in ``[3/4, 4/3]``
   (log-uniform), resized to ``size`` x ``size``; horizontal flip with p = 0.5;
2. colour jitter with p = 0.8: brightness 0.8s, contrast 0.8s, saturation 0.8s, hue 0.2s;
3. random greyscale with p = 0.2;
4. Gaussian blur with p = 0.5 (sigma in [0.1, 2.0], kernel 10 % of the size) only when
   ``size >= 64`` (SimCLR drops it for CIFAR-sized images).

One-channel images: saturation, hue and greyscale do not exist for them and are skipped;
brightness and contrast still apply, so a greyscale image stays one-channel (the encoder is built
with ``in_channels=1``) rather than being replicated to RGB.

:class:`BatchTwoViewAugment` draws it for a whole uint8 batch at once with tensor ops: the crop
and flip are one separable bilinear resample (:func:`crop_resize`, two batched matrix products per
view), the jitter factors are per-sample vectors, greyscale is a mask, blur a grouped convolution.
Every stage uses it. Differences from ``torchvision.transforms.v2``, all small: a crop whose side
would exceed the image is clamped to the image instead of re-drawn (torchvision retries 10 times),
the jitter operations run in the fixed order brightness, contrast, saturation, hue (torchvision
permutes them), and hue is a rotation of the chroma plane in YIQ space (linear, vectorised)
rather than an HSV round trip.

It returns float views normalised as ``(x / 255 - mean) / std`` (default mean 0.5, std 0.25:
roughly zero-mean, unit-scale); :func:`normalize_batch` / :class:`EvalTransform` do the same
deterministically for evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

#: A draw of one uniform [0, 1) number per sample of the batch, ``(B,)``.
Draw = Callable[[], torch.Tensor]

__all__ = [
    "MEAN",
    "STD",
    "BatchTwoViewAugment",
    "EvalTransform",
    "crop_resize",
    "normalize_batch",
]

MEAN = 0.5
STD = 0.25
_LUMA = (0.299, 0.587, 0.114)


def _check(size: int, channels: int, strength: float, crop_min_scale: float) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size: must be a positive int (got {size!r})")
    if channels not in (1, 3):
        raise ValueError(f"channels: must be 1 or 3 (got {channels!r})")
    if not strength >= 0.0:
        raise ValueError(f"strength: must be >= 0 (got {strength!r})")
    if not 0.0 < crop_min_scale <= 1.0:
        raise ValueError(f"crop_min_scale: must lie in (0, 1] (got {crop_min_scale!r})")


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    """uint8 -> float in [0, 1]; float input is taken as already in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    if not x.is_floating_point():
        raise ValueError(f"images: expected uint8 or float, got {x.dtype}")
    return x.float()


def normalize_batch(
    images: torch.Tensor, size: int | None = None, mean: float = MEAN, std: float = STD
) -> torch.Tensor:
    """Deterministic eval preprocessing of a batch ``(B, C, H, W)`` (uint8 or float in [0, 1]):
    resize to ``size`` x ``size`` when given and different (bilinear, antialiased), then
    ``(x - mean) / std``."""
    if images.ndim != 4:
        raise ValueError(f"images: expected (B, C, H, W), got shape {tuple(images.shape)}")
    x = _to_unit(images)
    if size is not None and tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return (x - mean) / std


class EvalTransform:
    """Per-sample deterministic transform: uint8 ``(C, H, W)`` -> normalised float."""

    def __init__(self, size: int | None = None, mean: float = MEAN, std: float = STD) -> None:
        if size is not None and size < 1:
            raise ValueError(f"size: must be >= 1 (got {size})")
        self.size, self.mean, self.std = size, mean, std

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return normalize_batch(image.unsqueeze(0), self.size, self.mean, self.std)[0]


class BatchTwoViewAugment:
    """The SimCLR distribution on a whole batch with tensor ops (see the module docstring).

    ``aug(x, generator=None) -> (view1, view2)``: ``x`` is ``(B, C, H, W)`` uint8 (or float in
    [0, 1]) on any device; the views are float ``(B, C, size, size)`` on the same device.
    """

    def __init__(
        self,
        size: int,
        channels: int,
        strength: float = 0.5,
        crop_min_scale: float = 0.2,
        mean: float = MEAN,
        std: float = STD,
    ) -> None:
        _check(size, channels, strength, crop_min_scale)
        self.size, self.channels = size, channels
        self.strength, self.crop_min_scale = float(strength), float(crop_min_scale)
        self.mean, self.std = mean, std

    def __repr__(self) -> str:
        return (
            f"BatchTwoViewAugment(size={self.size}, channels={self.channels}, "
            f"strength={self.strength}, crop_min_scale={self.crop_min_scale})"
        )

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"images: expected (B, {self.channels}, H, W), got shape {tuple(images.shape)}"
            )
        x = _to_unit(images)
        return self.view(x, generator), self.view(x, generator)

    def single(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One augmented view of a uint8 (or [0, 1] float) batch: half the work of ``__call__``
        where a second view is not needed (supervised training)."""
        if images.ndim != 4 or images.shape[1] != self.channels:
            raise ValueError(
                f"images: expected (B, {self.channels}, H, W), got shape {tuple(images.shape)}"
            )
        return self.view(_to_unit(images), generator)

    # -- one view ---------------------------------------------------------------------------
    def _rand(self, n: int, dev: torch.device, g: torch.Generator | None) -> torch.Tensor:
        # Draw on the CPU (a CPU generator works for any device), then move.
        return torch.rand(n, generator=g).to(dev)

    def view(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmented, normalised view of a float batch in [0, 1]."""
        b = x.shape[0]
        dev = x.device
        r = lambda: self._rand(b, dev, generator)  # noqa: E731
        return self._finish(self._crop(x, r), r)

    def crop(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The random resized crop + flip of :meth:`view` alone: float ``(B, C, size, size)`` in
        [0, 1] (finish with :meth:`colour`)."""
        x = _to_unit(images)
        b = x.shape[0]
        return self._crop(x, lambda: self._rand(b, x.device, generator))

    def _crop(self, x: torch.Tensor, r: Draw) -> torch.Tensor:
        _, _, h, w = x.shape
        # random resized crop + flip, as one affine map of normalised coordinates
        area = self.crop_min_scale + (1.0 - self.crop_min_scale) * r()
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r()
        ratio = torch.exp(log_ratio)
        cw = torch.sqrt(area * ratio * (h / w)).clamp(max=1.0)  # crop width / image width
        ch = torch.sqrt(area / ratio * (w / h)).clamp(max=1.0)
        cx = (2 * r() - 1) * (1 - cw)  # crop centre, normalised coords
        cy = (2 * r() - 1) * (1 - ch)
        flip = torch.where(r() < 0.5, -1.0, 1.0)
        return crop_resize(x, cw * flip, cx, ch, cy, self.size)

    def colour(self, views: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The rest of a view after its crop: ``views`` are already cropped and flipped
        ``(B, C, size, size)`` (uint8 or [0, 1] float; the streaming path crops each sample in a
        loader worker, :class:`pipeline.data.decode.CropViews`); colour jitter, greyscale, blur
        and normalisation with the distribution of :meth:`view`."""
        if views.ndim != 4 or views.shape[1] != self.channels:
            raise ValueError(
                f"views: expected (B, {self.channels}, S, S), got shape {tuple(views.shape)}"
            )
        v = _to_unit(views)
        b = v.shape[0]
        return self._finish(v, lambda: self._rand(b, v.device, generator))

    def _finish(self, v: torch.Tensor, r: Draw) -> torch.Tensor:
        b = v.shape[0]
        s = self.strength
        if s > 0:
            apply = (r() < 0.8).view(b, 1, 1, 1)
            jit = self._jitter(v, s, r)
            v = torch.where(apply, jit, v)
        if self.channels == 3:
            grey = (r() < 0.2).view(b, 1, 1, 1)
            v = torch.where(grey, _luma(v).expand_as(v), v)
        if self.size >= 64:
            v = self._blur(v, r)
        return (v - self.mean) / self.std

    def _jitter(self, v: torch.Tensor, s: float, r: Draw) -> torch.Tensor:
        b = v.shape[0]

        def factor(amount: float) -> torch.Tensor:
            lo = max(0.0, 1.0 - amount)
            return (lo + (1.0 + amount - lo) * r()).view(b, 1, 1, 1)

        v = (v * factor(0.8 * s)).clamp_(0, 1)
        grey_mean = _luma(v).mean(dim=(1, 2, 3), keepdim=True)
        v = ((v - grey_mean) * factor(0.8 * s) + grey_mean).clamp_(0, 1)
        if self.channels == 3:
            g = _luma(v)
            v = ((v - g) * factor(0.8 * s) + g).clamp_(0, 1)
            hue = min(0.2 * s, 0.5)
            if hue > 0:
                angle = (2 * r() - 1) * hue * 2 * math.pi
                v = _hue_rotate(v, angle).clamp_(0, 1)
        return v

    def _blur(self, v: torch.Tensor, r: Draw) -> torch.Tensor:
        b, c, h, w = v.shape
        k = max(3, int(0.1 * self.size) // 2 * 2 + 1)
        sigma = (0.1 + 1.9 * r()).view(b, 1)
        apply = (r() < 0.5).view(b, 1, 1, 1)
        xs = torch.arange(k, device=v.device, dtype=v.dtype) - (k - 1) / 2
        kern = torch.exp(-(xs.view(1, k) ** 2) / (2 * sigma**2))
        kern = (kern / kern.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (b*c, k)
        pad = k // 2
        y = v.reshape(1, b * c, h, w)
        y = F.conv2d(
            F.pad(y, (pad, pad, 0, 0), mode="reflect"), kern.view(b * c, 1, 1, k), groups=b * c
        )
        y = F.conv2d(
            F.pad(y, (0, 0, pad, pad), mode="reflect"), kern.view(b * c, 1, k, 1), groups=b * c
        )
        return torch.where(apply, y.view(b, c, h, w), v)


def _reflect(pix: torch.Tensor, n: int) -> torch.Tensor:
    """``grid_sample``'s reflection padding (``align_corners=False``) of pixel coordinates: fold
    about the image's outer edges ``-0.5`` and ``n - 0.5`` (any number of times), then clip to
    ``[0, n - 1]``."""
    c = (pix + 0.5).abs()
    extra = torch.fmod(c, float(n))
    odd = torch.floor(c / n).remainder(2) == 1
    return torch.where(odd, n - extra - 0.5, extra - 0.5).clamp(0, n - 1)


def _interp_matrix(scale: torch.Tensor, shift: torch.Tensor, out: int, n: int) -> torch.Tensor:
    """Bilinear resampling of one axis as a matrix: output pixel ``i`` of ``out`` samples the input
    (``n`` pixels) at normalised coordinate ``scale * base_i + shift``, ``base`` the output pixel
    centres in ``[-1, 1]``. ``scale``, ``shift``: ``(B,)``. Returns ``(B, out, n)``; each row holds
    the two bilinear weights (summing to 1)."""
    b = scale.shape[0]
    base = torch.linspace(-1.0, 1.0, out, device=scale.device) * ((out - 1) / out)  # (out,)
    coord = scale[:, None] * base + shift[:, None]  # (B, out), normalised
    pix = _reflect(((coord + 1) * n - 1) / 2, n)  # (B, out), input pixels
    i0 = pix.floor()
    w1 = (pix - i0).unsqueeze(2)  # (B, out, 1)
    i0 = i0.long().unsqueeze(2)
    # column n holds the weight of a right neighbour past the edge (always 0), then is dropped
    m = torch.zeros(b, out, n + 1, device=scale.device, dtype=scale.dtype)
    m.scatter_add_(2, i0, 1 - w1).scatter_add_(2, i0 + 1, w1)
    return m[..., :n]


def crop_resize(
    x: torch.Tensor,
    scale_x: torch.Tensor,
    shift_x: torch.Tensor,
    scale_y: torch.Tensor,
    shift_y: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Axis-aligned crop + resize of a batch by per-sample scale and shift, bilinear, reflection
    padding: the same map as ``F.grid_sample(x, F.affine_grid(theta, ...), mode="bilinear",
    padding_mode="reflection", align_corners=False)`` with ``theta = [[scale_x, 0, shift_x], [0,
    scale_y, shift_y]]`` (equal up to float rounding), computed separably as ``My @ x @ Mx^T``.

    Without rotation or shear the sampling grid is a product of one x and one y coordinate per
    output pixel, so two small batched matrix products replace ``affine_grid``'s
    ``(B, S*S, 3) x (B, 3, 2)`` product and the 2-D sampler (a 256-image 28 px batch: ~1.7x less
    time with 2 threads, ~3x with 1). ``x``: ``(B, C, H, W)`` float; a negative ``scale_x`` flips; returns
    ``(B, C, size, size)``.
    """
    _, _, h, w = x.shape
    mx = _interp_matrix(scale_x.to(x.dtype), shift_x.to(x.dtype), size, w)  # (B, S, W)
    my = _interp_matrix(scale_y.to(x.dtype), shift_y.to(x.dtype), size, h)  # (B, S, H)
    return my.unsqueeze(1) @ x @ mx.transpose(1, 2).unsqueeze(1)  # (B, C, S, S)


def _luma(v: torch.Tensor) -> torch.Tensor:
    if v.shape[1] == 1:
        return v
    wts = torch.tensor(_LUMA, device=v.device, dtype=v.dtype).view(1, 3, 1, 1)
    return (v * wts).sum(dim=1, keepdim=True)


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_rotate(v: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Rotate the chroma (I, Q) plane of each image by ``angle`` radians (per sample)."""
    b = v.shape[0]
    m = _RGB2YIQ.to(v.device, v.dtype)
    minv = torch.linalg.inv(m)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(b, 3, 3, device=v.device, dtype=v.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1] = cos
    rot[:, 1, 2] = -sin
    rot[:, 2, 1] = sin
    rot[:, 2, 2] = cos
    t = minv @ rot @ m  # (b, 3, 3)
    return torch.einsum("bij,bjhw->bihw", t, v)
