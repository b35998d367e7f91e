"""Image decoding (PIL) and the per-sample views the streaming path makes in DataLoader workers.

* :class:`TensorDecoder` - the whole image as a uint8 ``C x H x W`` tensor (converted to the
  dataset's channels: ``L`` for 1, ``RGB`` for 3).
* :class:`CropViews` - random resized crops *of the original image*, each resized to ``size`` x
  ``size`` with a horizontal flip (p = 0.5): the geometric half of the SimCLR augmentation
  (:class:`pipeline.data.transforms.BatchTwoViewAugment` draws the same distribution: area fraction
  uniform in ``[min_scale, 1]``, log-uniform aspect ratio in ``[3/4, 4/3]``, a side that would
  exceed the image clamped to it, a uniform position). The colour half stays batched on the
  training device (``BatchTwoViewAugment.colour``). JPEGs are decoded at a reduced scale
  (``PIL.Image.draft``: 1/2, 1/4 or 1/8) when the crop still covers at least ``size`` pixels
  of the reduced image on both axes, so the resample only ever shrinks or keeps detail that the
  full decode would have had. PIL's bilinear resize is antialiased on downscaling; the batched
  in-memory crop is plain bilinear (identical for upscaling crops, as on 28 px data).
* :class:`ResizeView` - the deterministic evaluation view: the whole image resized to ``size`` x
  ``size`` (bilinear, antialiased: the same op as :func:`pipeline.data.transforms.normalize_batch`),
  as a float tensor in ``[0, 1]``.

Every decoder is a picklable callable ``(data: bytes, where: str) -> tensor | tuple``; a file that
does not decode is a one-line :class:`DataError` naming ``where`` (shard and sample key).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.sources import DataError

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

__all__ = ["CropViews", "ResizeView", "TensorDecoder", "decode_array", "open_image"]

_MODES = {1: "L", 3: "RGB"}


def open_image(
    data: bytes,
    where: str,
    channels: int | None = None,
    draft: Callable[[PILImage, bool], None] | None = None,
) -> PILImage:
    """A decoded PIL image of ``data`` (EXIF orientation applied), converted to ``channels``
    (None: L/RGB kept, any other mode made RGB). ``draft(img, swapped)`` may call
    ``img.draft(...)`` before a JPEG's pixels are decoded (``swapped``: the orientation turns the
    image by 90 degrees, so its displayed width is ``img.size[1]``)."""
    from PIL import Image, ImageOps

    try:
        img: PILImage = Image.open(io.BytesIO(data))
        orient = 1
        if img.format in ("JPEG", "MPO", "WEBP"):
            orient = int(img.getexif().get(0x0112, 1) or 1)
        if draft is not None and img.format in ("JPEG", "MPO"):
            draft(img, orient in (5, 6, 7, 8))
        img.load()
        if orient != 1:  # the EXIF orientation, as the shard stage measured the sizes
            img = ImageOps.exif_transpose(img)
        mode = _MODES.get(channels) if channels else None
        if mode is None:
            mode = img.mode if img.mode in ("L", "RGB") else "RGB"
        if img.mode != mode:
            img = img.convert(mode)
        return img
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is a bad sample
        raise DataError(
            f"{where}: cannot decode {_kind(data)} ({type(err).__name__}: {err})"
        ) from None


def _kind(data: bytes) -> str:
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return "image"


def decode_array(data: bytes, where: str, channels: int | None = None) -> np.ndarray:
    """uint8 ``H x W`` (one channel) or ``H x W x 3``."""
    return np.asarray(open_image(data, where, channels))


def _chw(img: PILImage) -> torch.Tensor:
    a = np.asarray(img)
    t = torch.from_numpy(np.array(a, dtype=np.uint8, copy=True))
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


class TensorDecoder:
    """The whole image as uint8 ``C x H x W``; with ``size=(h, w)`` resized to it (bilinear,
    PIL) when it differs (the in-memory path of a dataset whose images differ in size)."""

    def __init__(self, channels: int | None = None, size: tuple[int, int] | None = None) -> None:
        self.channels, self.size = channels, size

    def __call__(self, data: bytes, where: str) -> torch.Tensor:
        img = open_image(data, where, self.channels)
        if self.size is not None and img.size != (self.size[1], self.size[0]):
            from PIL import Image

            img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        return _chw(img)


class _Seeded:
    """A numpy generator per process, seeded from torch's (DataLoader seeds each worker's)."""

    _rng: np.random.Generator | None = None
    _pid: int = -1

    def rng(self) -> np.random.Generator:
        if self._rng is None or self._pid != os.getpid():
            self._rng = np.random.default_rng(torch.initial_seed() % (2**63))
            self._pid = os.getpid()
        return self._rng

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_rng", None)
        state.pop("_pid", None)
        return state


class CropViews(_Seeded):
    """``len(scales)`` random resized crops (+ flip) of one image, uint8 ``C x size x size`` each;
    ``scales`` are the crops' minimum area fractions (1.0: the whole image, flip only). With
    ``eval_view`` the tuple ends with the :class:`ResizeView` of the image (float)."""

    def __init__(
        self,
        size: int,
        channels: int,
        scales: tuple[float, ...] = (0.2, 0.2),
        eval_view: bool = False,
        use_draft: bool = True,
    ) -> None:
        if channels not in _MODES:
            raise ValueError(f"channels: must be 1 or 3 (got {channels!r})")
        self.size, self.channels = int(size), channels
        self.scales = tuple(float(s) for s in scales)
        self.eval_view, self.use_draft = eval_view, use_draft

    def _boxes(self, w: int, h: int) -> list[tuple[float, float, float, float, bool]]:
        """Crop boxes as fractions of the image: (x0, y0, width, height, flip)."""
        rng = self.rng()
        out = []
        for m in self.scales:
            area = m + (1.0 - m) * rng.random()
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rng.random())
            cw = min(1.0, math.sqrt(area * ratio * h / w))
            ch = min(1.0, math.sqrt(area / ratio * w / h))
            x0 = rng.random() * (1.0 - cw)
            y0 = rng.random() * (1.0 - ch)
            out.append((x0, y0, cw, ch, bool(rng.random() < 0.5)))
        return out

    def __call__(self, data: bytes, where: str) -> tuple[torch.Tensor, ...]:
        from PIL import Image

        s = self.size
        boxes: list[tuple[float, float, float, float, bool]] = []

        def draft(img: PILImage, swapped: bool) -> None:
            w, h = img.size[::-1] if swapped else img.size  # as displayed
            boxes.extend(self._boxes(w, h))
            if not self.use_draft:
                return
            # the reduced image must keep >= s pixels across every crop (and the eval view)
            need_w = max(math.ceil(s / b[2]) for b in boxes)
            need_h = max(math.ceil(s / b[3]) for b in boxes)
            if self.eval_view:
                need_w, need_h = max(need_w, s), max(need_h, s)
            if need_w < w or need_h < h:
                img.draft(_MODES[self.channels], (need_h, need_w) if swapped else (need_w, need_h))

        img = open_image(data, where, self.channels, draft=draft)
        w, h = img.size
        if not boxes:  # not a JPEG: draw the boxes now (same distribution)
            boxes = self._boxes(w, h)
        views: list[torch.Tensor] = []
        for x0, y0, cw, ch, flip in boxes:
            box = (x0 * w, y0 * h, (x0 + cw) * w, (y0 + ch) * h)
            v = img.resize((s, s), Image.Resampling.BILINEAR, box=box)
            if flip:
                v = v.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            views.append(_chw(v))
        if self.eval_view:
            views.append(_resize_unit(_chw(img), s))
        return tuple(views)


def _resize_unit(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``C x H x W`` -> float ``C x size x size`` in [0, 1] (bilinear, antialiased)."""
    u = x.float().div_(255.0)
    if tuple(u.shape[-2:]) != (size, size):
        u = F.interpolate(
            u.unsqueeze(0), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )[0]
    return u


class ResizeView:
    """The evaluation view: the whole image at ``size`` x ``size``, float in [0, 1] (JPEGs decoded
    at the smallest draft scale that keeps at least ``size`` pixels per side)."""

    def __init__(self, size: int, channels: int) -> None:
        self.size, self.channels = int(size), channels

    def __call__(self, data: bytes, where: str) -> torch.Tensor:
        s = self.size

        def draft(img: PILImage, swapped: bool) -> None:
            w, h = img.size
            if s < w or s < h:
                img.draft(_MODES[self.channels], (s, s))

        return _resize_unit(_chw(open_image(data, where, self.channels, draft=draft)), s)
