"""FasterSeg's data augmentation, written with torch (fasterseg-spec.md §9.4).

Training: random scale (a set, FasterSeg's {0.75, 1.0, 1.25}, or a (min, max) range; image
bilinear, label nearest), pad to the crop (label with 255; image, by default, with 0 *after*
normalisation, i.e. the mean colour, as FasterSeg does, or black as HRNet does) with the padding
centred, random crop, horizontal flip with p = 0.5, ImageNet normalisation, optional label
downsampling (the search trains on labels at 1/8). Evaluation: normalisation only.

All randomness is drawn from a ``torch.Generator`` passed per call (or the global torch RNG when
none is given), so a trainer that seeds one generator per (seed, epoch, sample) gets bit-exact
resumes, any number of workers and DDP runs with the same crops.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fasterkd.data.cityscapes import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_float_image(image: Tensor, name: str = "image") -> Tensor:
    """uint8 (3, H, W) in 0..255 or float (3, H, W) in 0..1 -> float32 in 0..1."""
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a (3, H, W) RGB tensor, got {shape}")
    if image.dtype == torch.uint8:
        return image.float().div_(255.0)
    return image.float()


def normalize(image: Tensor) -> Tensor:
    """ImageNet normalisation of RGB in 0..1 (uint8 0..255 is accepted): (x - mean) / std; (3,H,W) or (B,3,H,W)."""
    if image.dtype == torch.uint8:
        image = image.float() / 255.0
    shape = (3, 1, 1) if image.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(shape)
    return (image - mean) / std


def denormalize(image: Tensor) -> Tensor:
    """Inverse of :func:`normalize`: back to RGB in 0..1 (not clamped)."""
    shape = (3, 1, 1) if image.dim() == 3 else (1, 3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(shape)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(shape)
    return image * std + mean


def _check_label(label: Tensor, image: Tensor) -> Tensor:
    if not isinstance(label, Tensor) or label.dim() != 2:
        raise ValueError(f"label must be a (H, W) tensor of train ids, got {tuple(label.shape) if isinstance(label, Tensor) else type(label).__name__}")
    if tuple(label.shape) != tuple(image.shape[-2:]):
        raise ValueError(f"label is {tuple(label.shape)} but the image is {tuple(image.shape[-2:])}; expected the same HxW")
    return label.long()


def shrink(image: Tensor, label: Tensor, factor: int) -> tuple[Tensor, Tensor]:
    """Image and label shrunk by an integer ``factor`` (FasterSeg's search ``down_sampling``): the
    image area-averaged (for factor 2 the same as its bilinear half-size resize), the label by
    nearest neighbour so every pixel keeps a train id (or 255) of the original."""
    if factor == 1:
        return image, label
    h, w = image.shape[-2:]
    size = (max(1, h // factor), max(1, w // factor))
    img = F.interpolate(image[None], size=size, mode="area")[0]
    lab = F.interpolate(label[None, None].float(), size=size, mode="nearest")[0, 0].long()
    return img, lab


def _check_downsample(downsample: int) -> int:
    if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1:
        raise ValueError(f"downsample must be an int >= 1 (1: full-size frames), got {downsample!r}")
    return downsample


def _generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if isinstance(generator, int):
        return torch.Generator().manual_seed(generator)
    return generator


class TrainTransform:
    """FasterSeg training augmentation (spec §9.4): ``transform(image, label, generator)``.

    Args:
        crop: output (h, w), e.g. (512, 1024) for the paper's "high" setting.
        scales: the set of scales, one drawn uniformly (FasterSeg: 0.75, 1.0, 1.25).
        scale_range: (min, max); when given, the scale is drawn uniformly from it instead.
        flip: horizontal flip with p = 0.5.
        label_downsample: label returned at (h // f, w // f), nearest (the search uses 8).
        pad_image: ``"mean"`` pads the image with 0 after normalisation (FasterSeg), ``"black"``
            with 0 before normalisation (HRNet). The label is always padded with 255.
        downsample: frames shrunk by this factor first (:func:`shrink`; FasterSeg's search: 2).

    Returns ``(image float32 (3, h, w) normalised, label int64 (h // f, w // f))``.
    """

    def __init__(self, crop: Sequence[int] = (512, 1024), scales: Sequence[float] = (0.75, 1.0, 1.25),
                 flip: bool = True, label_downsample: int = 1, scale_range: Sequence[float] | None = None,
                 pad_image: str = "mean", downsample: int = 1) -> None:
        if len(crop) != 2 or min(int(c) for c in crop) <= 0:
            raise ValueError(f"crop must be a positive (h, w) pair, got {crop!r}")
        if scale_range is not None:
            if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
                raise ValueError(f"scale_range must be (min, max) with 0 < min <= max, got {scale_range!r}")
        elif not scales or min(scales) <= 0:
            raise ValueError(f"scales must be a non-empty set of positive numbers, got {scales!r}")
        if int(label_downsample) < 1 or crop[0] % int(label_downsample) or crop[1] % int(label_downsample):
            raise ValueError(f"label_downsample must be a positive integer dividing the crop {tuple(crop)}, got {label_downsample!r}")
        if pad_image not in ("mean", "black"):
            raise ValueError(f"pad_image must be 'mean' (FasterSeg) or 'black' (HRNet), got {pad_image!r}")
        self.crop = (int(crop[0]), int(crop[1]))
        self.scales = tuple(float(s) for s in scales)
        self.scale_range = None if scale_range is None else (float(scale_range[0]), float(scale_range[1]))
        self.flip = bool(flip)
        self.label_downsample = int(label_downsample)
        self.pad_image = pad_image
        self.downsample = _check_downsample(downsample)

    def sample_scale(self, generator: torch.Generator | None) -> float:
        if self.scale_range is not None:
            lo, hi = self.scale_range
            return lo + (hi - lo) * float(torch.rand((), generator=generator))
        return self.scales[int(torch.randint(len(self.scales), (), generator=generator))]

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator | int | None = None) -> tuple[Tensor, Tensor]:
        g = _generator(generator)
        img = _as_float_image(image)
        lab = _check_label(label, img)
        # draw every random number first, in a fixed order, whatever the image size
        scale = self.sample_scale(g)
        do_flip = self.flip and bool(torch.rand((), generator=g) < 0.5)
        u_y, u_x = (float(v) for v in torch.rand(2, generator=g))

        img, lab = shrink(img, lab, self.downsample)
        h, w = img.shape[-2:]
        nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
        if (nh, nw) != (h, w):
            img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
            lab = F.interpolate(lab[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        img = normalize(img) if self.pad_image == "mean" else img

        ch, cw = self.crop
        pad_h, pad_w = max(ch - nh, 0), max(cw - nw, 0)
        if pad_h or pad_w:  # centred padding, as FasterSeg
            pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
            img = F.pad(img, pads, value=0.0)
            lab = F.pad(lab, pads, value=IGNORE_INDEX)
        hh, ww = img.shape[-2:]
        y0 = min(int(u_y * (hh - ch + 1)), hh - ch)
        x0 = min(int(u_x * (ww - cw + 1)), ww - cw)
        img = img[:, y0 : y0 + ch, x0 : x0 + cw]
        lab = lab[y0 : y0 + ch, x0 : x0 + cw]
        if do_flip:
            img, lab = img.flip(-1), lab.flip(-1)
        if self.pad_image == "black":
            img = normalize(img)
        if self.label_downsample > 1:
            f = self.label_downsample
            lab = F.interpolate(lab[None, None].float(), size=(ch // f, cw // f), mode="nearest")[0, 0].long()
        return img.contiguous(), lab.contiguous()

    def __repr__(self) -> str:
        scales = f"scale_range={self.scale_range}" if self.scale_range else f"scales={self.scales}"
        down = f", downsample={self.downsample}" if self.downsample != 1 else ""
        return (f"TrainTransform(crop={self.crop}, {scales}, flip={self.flip}, "
                f"label_downsample={self.label_downsample}, pad_image={self.pad_image!r}{down})")


class EvalTransform:
    """Evaluation: full resolution (or shrunk by ``downsample``, as FasterSeg validates its search),
    normalisation only (spec §9.5): ``transform(image, label)``."""

    def __init__(self, downsample: int = 1) -> None:
        self.downsample = _check_downsample(downsample)

    def __call__(self, image: Tensor, label: Tensor, generator: torch.Generator | int | None = None) -> tuple[Tensor, Tensor]:
        img = _as_float_image(image)
        img, lab = shrink(img, _check_label(label, img), self.downsample)
        return normalize(img), lab

    def __repr__(self) -> str:
        return "EvalTransform()" if self.downsample == 1 else f"EvalTransform(downsample={self.downsample})"
