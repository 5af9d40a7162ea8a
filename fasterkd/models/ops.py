"""The five FasterSeg candidate operations, plain and slimmable (FasterSeg spec §2-3).

Primitive order (the column of alpha): 0 ``skip``, 1 ``conv``, 2 ``conv_downup``, 3 ``conv_2x``,
4 ``conv_2x_downup`` (paper: skip connection, 3x3 conv, zoomed 3x3 conv, 3x3 conv x2, zoomed 3x3
conv x2). Despite their official class names (``BasicResidual*``) none of the ops adds a residual.

=======================  ==========================  ===========================================
name                     class                       submodules (stable names, official ones)
=======================  ==========================  ===========================================
``conv``                 :class:`Conv`               ``conv1``, ``bn1``, ``relu``
``conv_2x``              :class:`Conv2x`             ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``relu``
``conv_downup``          :class:`ZoomedConv`         ``conv1``, ``bn1``, ``relu``
``conv_2x_downup``       :class:`ZoomedConv2x`       ``conv1``, ``bn1``, ``conv2``, ``bn2``, ``relu``
``skip``                 :class:`FactorizedReduce`   stride 2: ``conv1``, ``conv2``, ``bn``, ``relu``;
                                                     stride 1 with a width change: ``conv1``, ``bn``,
                                                     ``relu``; plain stride 1, same width: none
=======================  ==========================  ===========================================

The names are those of the official ``operations.py``, so a derived network's official state dict
maps onto these modules by a prefix change only. In the slimmable variants ``conv*`` are
:class:`USConv2d` (same parameter names as ``nn.Conv2d``) and ``bn*`` are :class:`USBatchNorm2d`,
whose private per-width BatchNorms live in ``bn*.bn.{k}`` as in the official ``slimmable_ops.py``.

Every 3x3 conv has padding 1 and no bias. Only the first conv of an op carries the stride.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasterkd.models.arch import PRIMITIVES  # one definition of the op order

WIDTH_MULT_LIST = (4 / 12, 6 / 12, 8 / 12, 10 / 12, 1.0)
OP_CLASS_NAMES = {  # the official class name of each op (used in latency-table keys, spec §5.1)
    "skip": "FactorizedReduce",
    "conv": "BasicResidual1x",
    "conv_downup": "BasicResidual_downup_1x",
    "conv_2x": "BasicResidual2x",
    "conv_2x_downup": "BasicResidual_downup_2x",
}


# --------------------------------------------------------------------------------------------
# widths
# --------------------------------------------------------------------------------------------


def make_divisible(v: float, divisor: int = 8, min_value: int = 1) -> int:
    """The official slimmable rounding (spec §3): nearest multiple of ``divisor``, not below 90% of v."""
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def scaled_channels(c_max: int, ratio: float) -> int:
    """Channels of a node with maximal width ``c_max`` at width ratio ``ratio``: ``round(c_max * ratio)``.

    This is the official ``num_filters`` rounding (spec §1). In the official search space (Fch 12,
    ratios 4..12/12) it equals the official slimmable rounding :func:`make_divisible` for every
    node (all products are multiples of 8), so we use it in the supernet too: then a small space
    (e.g. Fch 4) has the same widths in the supernet, the derived net and the latency table.
    """
    if not 0.0 < ratio <= 1.0 + 1e-9:
        raise ValueError(f"width ratio must be in (0, 1], got {ratio}")
    return max(1, int(round(c_max * ratio)))


def ratio_index(ratio: float, width_mult_list: Sequence[float]) -> int:
    """Index of ``ratio`` in ``width_mult_list`` (float tolerance); ValueError if absent."""
    for k, w in enumerate(width_mult_list):
        if math.isclose(w, ratio, rel_tol=1e-6, abs_tol=1e-9):
            return k
    raise ValueError(f"width ratio {ratio} is not in width_mult_list {tuple(width_mult_list)}")


# --------------------------------------------------------------------------------------------
# slimmable layers (spec §3)
# --------------------------------------------------------------------------------------------


class USConv2d(nn.Conv2d):
    """A conv allocated at its maximal widths that runs on the top-left slice of its weight.

    ``set_channels(c_in, c_out)`` (called by the op's ``set_ratio``) selects the first ``c_in``
    input and the first ``c_out`` output channels; by default the full weight is used.
    """

    def __init__(self, c_in_max: int, c_out_max: int, kernel: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__(c_in_max, c_out_max, kernel, stride, padding, bias=False)
        self.active_in = c_in_max
        self.active_out = c_out_max

    def set_channels(self, c_in: int, c_out: int) -> None:
        if not (1 <= c_in <= self.in_channels and 1 <= c_out <= self.out_channels):
            raise ValueError(
                f"USConv2d: active channels ({c_in}, {c_out}) outside the allocated "
                f"({self.in_channels}, {self.out_channels})"
            )
        self.active_in, self.active_out = c_in, c_out

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.active_in:
            raise ValueError(f"USConv2d expected {self.active_in} input channels, got {x.shape[1]}")
        weight = self.weight[: self.active_out, : self.active_in]
        return F.conv2d(x, weight, None, self.stride, self.padding, self.dilation, self.groups)


class USBatchNorm2d(nn.BatchNorm2d):
    """One independent BatchNorm2d per width of ``width_mult_list`` (spec §3).

    ``set_ratio(r)`` picks the private BN ``bn[k]`` with ``width_mult_list[k] == r``. Like the
    official wrapper it is itself a BatchNorm2d of the maximal width whose affine weight and bias
    are never used: they are kept so that parameter counts and state dicts equal the official
    supernet's (spec §4.5: 252,057,316 parameters).
    """

    def __init__(self, c_max: int, width_mult_list: Sequence[float] = WIDTH_MULT_LIST) -> None:
        super().__init__(c_max)
        self.width_mult_list = tuple(float(w) for w in width_mult_list)
        self.bn = nn.ModuleList(nn.BatchNorm2d(scaled_channels(c_max, w)) for w in self.width_mult_list)
        self.index = len(self.width_mult_list) - 1 if math.isclose(self.width_mult_list[-1], 1.0) else 0

    def set_ratio(self, ratio: float) -> None:
        self.index = ratio_index(ratio, self.width_mult_list)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn[self.index](x)


# --------------------------------------------------------------------------------------------
# the five operations
# --------------------------------------------------------------------------------------------


def _check(name: str, c_in: int, c_out: int, stride: int) -> None:
    if c_in < 1 or c_out < 1:
        raise ValueError(f"{name}: channel counts must be positive, got c_in={c_in}, c_out={c_out}")
    if stride not in (1, 2):
        raise ValueError(f"{name}: stride must be 1 or 2, got {stride}")


class _Op(nn.Module):
    """Shared bookkeeping: widths, ``set_ratio`` and the conv/BN factories (plain or slimmable)."""

    def __init__(
        self, c_in: int, c_out: int, stride: int, slimmable: bool, width_mult_list: Sequence[float]
    ) -> None:
        super().__init__()
        _check(type(self).__name__, c_in, c_out, stride)
        self.c_in, self.c_out, self.stride = c_in, c_out, stride
        self.slimmable = slimmable
        self.width_mult_list = tuple(float(w) for w in width_mult_list)
        self.ratio = (1.0, 1.0)

    def _conv(self, c_in: int, c_out: int, kernel: int, stride: int) -> nn.Conv2d:
        if self.slimmable:
            return USConv2d(c_in, c_out, kernel, stride, kernel // 2)
        return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False)

    def _bn(self, c: int) -> nn.Module:
        return USBatchNorm2d(c, self.width_mult_list) if self.slimmable else nn.BatchNorm2d(c)

    def set_ratio(self, ratio: tuple[float, float]) -> None:
        """Set the (input, output) width ratios (slimmable ops only; spec §3)."""
        if not self.slimmable:
            raise ValueError(f"{type(self).__name__}.set_ratio needs slimmable=True")
        r_in, r_out = (float(r) for r in ratio)
        ratio_index(r_out, self.width_mult_list)  # the output width must have a private BN
        self.ratio = (r_in, r_out)
        self._apply_ratio(scaled_channels(self.c_in, r_in), scaled_channels(self.c_out, r_out), r_out)

    def _apply_ratio(self, c_in: int, c_out: int, r_out: float) -> None:
        # conv -> BN (-> conv -> BN) ops: first conv (c_in -> c_out), second conv (c_out -> c_out)
        self.conv1.set_channels(c_in, c_out)
        self.bn1.set_ratio(r_out)
        if hasattr(self, "conv2"):
            self.conv2.set_channels(c_out, c_out)
            self.bn2.set_ratio(r_out)


class Conv(_Op):
    """``conv`` (official BasicResidual1x): conv3x3(stride) -> BN -> ReLU (spec §2.1)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, slimmable: bool = False,
                 width_mult_list: Sequence[float] = WIDTH_MULT_LIST) -> None:
        super().__init__(c_in, c_out, stride, slimmable, width_mult_list)
        self.conv1 = self._conv(c_in, c_out, 3, stride)
        self.bn1 = self._bn(c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.bn1(self.conv1(x)))


class Conv2x(_Op):
    """``conv_2x`` (BasicResidual2x): conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN -> ReLU (§2.2)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, slimmable: bool = False,
                 width_mult_list: Sequence[float] = WIDTH_MULT_LIST) -> None:
        super().__init__(c_in, c_out, stride, slimmable, width_mult_list)
        self.conv1 = self._conv(c_in, c_out, 3, stride)
        self.bn1 = self._bn(c_out)
        self.conv2 = self._conv(c_out, c_out, 3, 1)
        self.bn2 = self._bn(c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)))


def _zoom_out(x: Tensor) -> Tensor:
    # integer halves of the size, bilinear, align_corners=True (spec §2.3)
    h, w = x.shape[-2:]
    if h < 2 or w < 2:
        raise ValueError(f"zoomed conv needs a feature map of at least 2x2, got {h}x{w}")
    return F.interpolate(x, size=(h // 2, w // 2), mode="bilinear", align_corners=True)


def _zoom_in(x: Tensor, size: tuple[int, int]) -> Tensor:
    # back to the op's input size; equals the official x2 scale factor for even sizes and keeps the
    # input size for odd ones (the official op then fails: spec §12.19)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


class ZoomedConv(_Op):
    """``conv_downup`` (BasicResidual_downup_1x, "zoomed conv", spec §2.3).

    bilinear down to (H//2, W//2) -> conv3x3 (stride 1) -> BN -> [stride 1: bilinear up to (H, W)]
    -> ReLU. With stride 2 the output stays at (H//2, W//2): the zoom is the downsampling.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, slimmable: bool = False,
                 width_mult_list: Sequence[float] = WIDTH_MULT_LIST) -> None:
        super().__init__(c_in, c_out, stride, slimmable, width_mult_list)
        self.conv1 = self._conv(c_in, c_out, 3, 1)
        self.bn1 = self._bn(c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn1(self.conv1(_zoom_out(x)))
        if self.stride == 1:
            y = _zoom_in(y, x.shape[-2:])
        return self.relu(y)


class ZoomedConv2x(_Op):
    """``conv_2x_downup`` (BasicResidual_downup_2x, "zoomed conv x2", spec §2.4).

    bilinear down x0.5 -> conv3x3 -> BN -> ReLU -> conv3x3 -> BN -> [stride 1: bilinear up] -> ReLU.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, slimmable: bool = False,
                 width_mult_list: Sequence[float] = WIDTH_MULT_LIST) -> None:
        super().__init__(c_in, c_out, stride, slimmable, width_mult_list)
        self.conv1 = self._conv(c_in, c_out, 3, 1)
        self.bn1 = self._bn(c_out)
        self.conv2 = self._conv(c_out, c_out, 3, 1)
        self.bn2 = self._bn(c_out)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(_zoom_out(x))))
        y = self.bn2(self.conv2(y))
        if self.stride == 1:
            y = _zoom_in(y, x.shape[-2:])
        return self.relu(y)


class FactorizedReduce(_Op):
    """``skip`` (FactorizedReduce, spec §2.5).

    - stride 2: two 1x1 stride-2 convs, the second on the input shifted by one pixel
      (``x[:, :, 1:, 1:]``), concatenated -> BN -> ReLU. The halves have ``c_out // 2`` and
      ``c_out - c_out // 2`` channels (equal halves for the even widths of the official space; odd
      widths are allowed). The shifted input is zero-padded back to (H, W) at the bottom/right:
      identical to the official op for even sizes, and defined for odd ones.
    - stride 1, slimmable (supernet) or with ``c_in != c_out``: 1x1 conv -> BN -> ReLU.
      (Official derived nets use the identity and never change width here; a projection is the
      only meaningful op when the widths differ.)
    - stride 1, plain, ``c_in == c_out``: identity (no parameters), as in official derived nets.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1, slimmable: bool = False,
                 width_mult_list: Sequence[float] = WIDTH_MULT_LIST) -> None:
        super().__init__(c_in, c_out, stride, slimmable, width_mult_list)
        self.identity = stride == 1 and not slimmable and c_in == c_out
        if stride == 2:
            if c_out < 2:
                raise ValueError(f"FactorizedReduce with stride 2 needs c_out >= 2, got {c_out}")
            self.conv1 = self._conv(c_in, c_out // 2, 1, 2)
            self.conv2 = self._conv(c_in, c_out - c_out // 2, 1, 2)
            self.bn = self._bn(c_out)
            self.relu = nn.ReLU(inplace=True)
        elif not self.identity:
            self.conv1 = self._conv(c_in, c_out, 1, 1)
            self.bn = self._bn(c_out)
            self.relu = nn.ReLU(inplace=True)

    def _apply_ratio(self, c_in: int, c_out: int, r_out: float) -> None:
        if self.stride == 2:
            self.conv1.set_channels(c_in, c_out // 2)
            self.conv2.set_channels(c_in, c_out - c_out // 2)
        else:
            self.conv1.set_channels(c_in, c_out)
        self.bn.set_ratio(r_out)

    def forward(self, x: Tensor) -> Tensor:
        if self.identity:
            return x
        if self.stride == 2:
            shifted = F.pad(x[:, :, 1:, 1:], (0, 1, 0, 1))
            y = torch.cat([self.conv1(x), self.conv2(shifted)], dim=1)
        else:
            y = self.conv1(x)
        return self.relu(self.bn(y))


OPS: dict[str, type[_Op]] = {
    "skip": FactorizedReduce,
    "conv": Conv,
    "conv_downup": ZoomedConv,
    "conv_2x": Conv2x,
    "conv_2x_downup": ZoomedConv2x,
}


def make_op(
    name: str,
    c_in: int,
    c_out: int,
    stride: int,
    slimmable: bool = False,
    width_mult_list: Sequence[float] = WIDTH_MULT_LIST,
) -> nn.Module:
    """Build the FasterSeg operation ``name`` (one of :data:`PRIMITIVES`) mapping c_in -> c_out.

    ``slimmable=True`` allocates the maximal widths ``(c_in, c_out)`` and lets ``set_ratio`` pick
    the active widths from ``width_mult_list`` (spec §3).
    """
    if name not in OPS:
        raise ValueError(f"unknown op {name!r}; expected one of {PRIMITIVES}")
    return OPS[name](c_in, c_out, stride, slimmable=slimmable, width_mult_list=width_mult_list)


def init_weights(module: nn.Module) -> None:
    """FasterSeg's initialisation (spec §1): Kaiming-normal (fan_in, relu) convs, BN weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
