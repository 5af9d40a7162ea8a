"""Prediction modules of the FasterSeg student: the official bilinear one and the paper's pixel shuffle.

Building blocks first (:class:`ConvNorm`, :class:`Head`, :class:`FeatureFusion`), then the two
prediction modules selected by name with :func:`make_predictor`:

- ``"bilinear"``: :class:`BilinearPredictor`, FasterSeg's own (spec §8.3 steps 6-8): FFM C -> C,
  Head at the feature's resolution, bilinear upsampling (x8 in the student) with
  ``align_corners=True``.
- ``"pixel_shuffle"``: :class:`PixelShufflePredictor`, the paper's module (§5, Fig. 5): FFM reduced
  to C/2, a grouped 5x5 "refine" conv C/2 -> 2C (groups C/2, i.e. a depth-wise conv with channel
  multiplier 4), PixelShuffle(2) to C/2 x 2H x 2W, the Head at 2H x 2W, then bilinear x4.

Both take the concatenated branch features ``z`` (C channels at 1/8) and return the logits at the
requested output size together with the fused feature (the FFM output), which the student exposes
as its 1/8 path feature for the FA loss (paper Eq. 6).

Module and parameter names follow the official FasterSeg ones (``conv``/``bn`` inside ConvNorm,
``conv_3x3``/``conv_1x1`` inside Head, ``conv_1x1``/``channel_attention`` inside FeatureFusion), so the
official weights map onto them by a prefix change only (see ``student.load_fasterseg_weights``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

HEAD_NAMES = ("bilinear", "pixel_shuffle")


class ConvNorm(nn.Sequential):
    """conv k x k (no bias, padding k // 2) -> BatchNorm -> ReLU (spec §8.3 "ConvNorm")."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)


def head_mid_channels(c_in: int) -> int:
    """Width of the Head's 3x3 layer: the input width up to 256, else half of it (spec §8.3 step 7)."""
    return c_in if c_in <= 256 else c_in // 2


class Head(nn.Module):
    """ConvNorm 3x3 (c_in -> mid) then a 1x1 classifier with bias (spec §8.3 step 7)."""

    def __init__(self, c_in: int, num_classes: int) -> None:
        super().__init__()
        mid = head_mid_channels(c_in)
        self.conv_3x3 = ConvNorm(c_in, mid, 3)
        self.conv_1x1 = nn.Conv2d(mid, num_classes, 1, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_1x1(self.conv_3x3(x))


class FeatureFusion(nn.Module):
    """FasterSeg's Feature Fusion Module: a 1x1 ConvNorm (spec §8.3 step 6).

    ``channel_attention`` (global pool -> 1x1 -> ReLU -> 1x1 -> sigmoid, no bias, no BN) is built but
    never run, exactly as in the official code: the released weights contain it and the published
    parameter counts (4,385,689 for the student) include it. ``cost.inference_parameters`` leaves it
    out because it takes no part in a forward pass.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv_1x1 = ConvNorm(c_in, c_out, 1)
        self.channel_attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(c_out, c_out, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 1, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_1x1(x)


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize with ``align_corners=True``, as every FasterSeg upsampling site (spec §8.3)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class BilinearPredictor(nn.Module):
    """FasterSeg's prediction module: FFM (C -> C), Head (C -> N), bilinear upsampling.

    Cost (paper §5, convolution weights only): 10 C^2 + N C parameters and 10 C^2 HW + N C HW
    multiply-accumulates for a C x H x W input. Left out by that formula: the Head's classifier
    bias (N), the two BatchNorms (2 C each) and the unused FFM attention (2 C^2).
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.ffm = FeatureFusion(channels, channels)
        self.head = Head(channels, num_classes)

    @property
    def fused_channels(self) -> int:
        return self.ffm.conv_1x1.conv.out_channels

    def fuse(self, z: Tensor) -> Tensor:
        return self.ffm(z)

    def predict(self, fused: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits from the fused feature, upsampled to ``size`` (x8 in the student, x4 in the tutor)."""
        return upsample(self.head(fused), size)

    def forward(self, z: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        fused = self.fuse(z)
        return self.predict(fused, size), fused


class PixelShufflePredictor(nn.Module):
    """The paper's pixel-shuffle prediction module (§5, Fig. 5).

    FFM C -> C/2 (1x1 ConvNorm), "refine" = grouped 5x5 ConvNorm C/2 -> 2C with groups C/2 (each
    input channel feeds 4 outputs: the depth-wise half of a depth-wise separable conv; the Head's
    1x1 classifier is its point-wise half), PixelShuffle(2): 2C x H x W -> C/2 x 2H x 2W, Head
    (3x3 C/2 -> C/2, 1x1 C/2 -> N) at 2H x 2W, then bilinear upsampling (x4 in the student).

    Cost (paper §5, convolution weights only): (11/4) C^2 + N C/2 + 50 C parameters and
    9.5 C^2 HW + 2 C N HW + 50 C HW multiply-accumulates. Left out by that formula: the classifier
    bias (N), the BatchNorms of FFM, refine and Head (2 * C/2, 2 * 2C, 2 * C/2) and the unused FFM
    attention (2 (C/2)^2).
    """

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        if channels % 2:
            raise ValueError(f"PixelShufflePredictor: channels must be even (FFM reduces to C/2), got {channels}")
        half = channels // 2
        self.ffm = FeatureFusion(channels, half)
        self.refine = ConvNorm(half, 2 * channels, kernel=5, groups=half)
        self.shuffle = nn.PixelShuffle(2)
        self.head = Head(half, num_classes)

    @property
    def fused_channels(self) -> int:
        return self.ffm.conv_1x1.conv.out_channels

    def fuse(self, z: Tensor) -> Tensor:
        return self.ffm(z)

    def predict(self, fused: Tensor, size: tuple[int, int]) -> Tensor:
        """Logits from the fused feature: refine, shuffle to 2x resolution, Head, upsample to ``size``."""
        return upsample(self.head(self.shuffle(self.refine(fused))), size)

    def forward(self, z: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        fused = self.fuse(z)
        return self.predict(fused, size), fused


def make_predictor(name: str, channels: int, num_classes: int) -> BilinearPredictor | PixelShufflePredictor:
    """The prediction module called ``name`` ("bilinear" or "pixel_shuffle") for C = ``channels``."""
    if name == "bilinear":
        return BilinearPredictor(channels, num_classes)
    if name == "pixel_shuffle":
        return PixelShufflePredictor(channels, num_classes)
    raise ValueError(f"head must be one of {HEAD_NAMES}, got {name!r}")


__all__ = [
    "HEAD_NAMES",
    "ConvNorm",
    "Head",
    "FeatureFusion",
    "BilinearPredictor",
    "PixelShufflePredictor",
    "make_predictor",
    "head_mid_channels",
    "upsample",
]
