"""The FasterSeg search space: a multi-resolution supernet co-searching a teacher and a student.

Reads top-down (FasterSeg spec §4): the mixed operation and the cell (§4.2), the supernet with its
per-arch stems (§4.1), cell grid over 1/8, 1/16, 1/32 (§4.2), architecture parameters alpha /
beta / gamma (§4.3), per-arch refine stacks and five heads (§4.4), then :class:`SupernetConfig`.

Architecture parameters of arch ``k`` (0 = teacher, 1 = student), named exactly as the official
``arch_{k}.pt`` files (``L`` = ``layers``, ``W`` = number of widths searched by that arch):

==============  ==========  ===================================================================
name            shape       meaning
==============  ==========  ===================================================================
``alpha_k_0``   (L, 5)      op logits of the 1/8 cells, row = layer i
``alpha_k_1``   (L-1, 5)    op logits of the 1/16 cells, row = i - 1
``alpha_k_2``   (L-2, 5)    op logits of the 1/32 cells, row = i - 2
``beta_k_1``    (L-2, 2)    input logits of the 1/16 cells of layers 2.., [from down, from keep]
``beta_k_2``    (L-3, 2)    input logits of the 1/32 cells of layers 3..
``ratio_k_0``   (L-1, W)    width logits of the 1/8 node made at layer m = row
``ratio_k_1``   (L-1, W)    width logits of the 1/16 node made at layer m = row
``ratio_k_2``   (L-2, W)    width logits of the 1/32 node made at layer m = row + 1
==============  ==========  ===================================================================

alpha and beta are plain softmaxes; gamma (``arch_ratio`` mode) is a hard Gumbel-softmax sample
(temperature 1) with the straight-through estimator: the forward value is one-hot, so every mixed
op's output is multiplied by 1.0 while the gradient reaches the ratio logits (spec §4.3).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasterkd.models.arch import PRIMITIVES
from fasterkd.models.heads import ConvNorm, Head
from fasterkd.models.ops import Conv2x, init_weights, make_op, scaled_channels

if TYPE_CHECKING:
    from fasterkd.models.arch import ArchSpec

OUTPUT_NAMES = ("8s", "16s", "32s", "8s_32s", "16s_32s")
PRUN_MODES = ("max", "min", "random", "arch_ratio")


@dataclass
class SupernetConfig:
    """The search space. Defaults are the official one (spec §1, §4); shrink layers/fch for a CPU."""

    layers: int = 16
    fch: int = 12
    width_mult_list: tuple[float, ...] = (4 / 12, 6 / 12, 8 / 12, 10 / 12, 1.0)
    stem_head_widths: tuple[tuple[float, float], ...] = ((1.0, 1.0), (8 / 12, 8 / 12))
    prun_modes: tuple[str, ...] = ("max", "arch_ratio")
    num_classes: int = 19
    arch_init: float = 1e-3  # every arch logit starts here (uniform after softmax)

    def validate(self) -> "SupernetConfig":
        if self.layers < 4:
            raise ValueError(f"layers must be >= 4 (beta_k_2 has layers - 3 rows), got {self.layers}")
        if self.fch < 1:
            raise ValueError(f"fch must be positive, got {self.fch}")
        if not self.width_mult_list or any(not 0 < w <= 1 for w in self.width_mult_list):
            raise ValueError(f"width_mult_list must hold ratios in (0, 1], got {self.width_mult_list}")
        if len(self.prun_modes) != len(self.stem_head_widths):
            raise ValueError(
                f"prun_modes ({len(self.prun_modes)}) and stem_head_widths ({len(self.stem_head_widths)}) "
                "need one entry per architecture"
            )
        for mode in self.prun_modes:
            if mode not in PRUN_MODES:
                raise ValueError(f"prun_modes: unknown mode {mode!r}; expected one of {PRUN_MODES}")
        for _, head in self.stem_head_widths:
            if not any(math.isclose(head, w) for w in self.width_mult_list):
                raise ValueError(f"head width {head} must be one of width_mult_list {self.width_mult_list}")
        return self

    def num_filters(self, scale: int, ratio: float) -> int:
        """Channels of a feature at downsample rate ``scale`` and width ratio (spec §1)."""
        return scaled_channels(scale * self.fch, ratio)

    def num_widths(self, arch: int) -> int:
        """Width choices searched by ``arch``: all of them in ``arch_ratio`` mode, else one."""
        return len(self.width_mult_list) if self.prun_modes[arch] == "arch_ratio" else 1


# --------------------------------------------------------------------------------------------
# mixed op and cell (spec §4.2)
# --------------------------------------------------------------------------------------------


@dataclass
class Width:
    """A node's width: the ratio used to slice channels and the straight-through scalar (spec §4.3)."""

    ratio: float
    score: Tensor | float = 1.0


class MixedOp(nn.Module):
    """All five slimmable ops on one edge; output = sum_k softmax(alpha)_k op_k(x) * s_in * s_out."""

    def __init__(self, c_in: int, c_out: int, stride: int, width_mult_list: Sequence[float]) -> None:
        super().__init__()
        self._ops = nn.ModuleList(
            make_op(name, c_in, c_out, stride, slimmable=True, width_mult_list=width_mult_list)
            for name in PRIMITIVES
        )

    def forward(self, x: Tensor, weights: Tensor, w_in: Width, w_out: Width) -> Tensor:
        out = 0
        for k, op in enumerate(self._ops):
            op.set_ratio((w_in.ratio, w_out.ratio))
            out = out + weights[k] * op(x)
        return out * w_in.score * w_out.score


class Cell(nn.Module):
    """One grid cell at rate s: a same-rate mixed op C -> C and optionally a stride-2 one C -> 2C.

    Both are weighted by the same alpha row (spec §4.2).
    """

    def __init__(self, c: int, down: bool, width_mult_list: Sequence[float]) -> None:
        super().__init__()
        self._op = MixedOp(c, c, 1, width_mult_list)
        self.downsample = MixedOp(c, 2 * c, 2, width_mult_list) if down else None

    def forward(
        self, x: Tensor, weights: Tensor, w_in: Width, w_out: Width, w_down: Width | None
    ) -> tuple[Tensor, Tensor | None]:
        out = self._op(x, weights, w_in, w_out)
        down = self.downsample(x, weights, w_in, w_down) if self.downsample is not None else None
        return out, down


def cell_grid(layers: int) -> list[tuple[int, int, bool]]:
    """(layer i, rate index j, has a down op) of every cell in construction order (spec §4.2)."""
    grid = []
    for i in range(layers):
        for j in range(min(i + 1, 3)):
            grid.append((i, j, j < 2 and i < layers - 1))
    return grid


# --------------------------------------------------------------------------------------------
# the supernet
# --------------------------------------------------------------------------------------------


class Supernet(nn.Module):
    """FasterSeg's supernet (spec §4): shared cells, per-arch stems, refines, heads and arch params."""

    def __init__(self, cfg: SupernetConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = (cfg or SupernetConfig()).validate()
        L, n = cfg.layers, len(cfg.stem_head_widths)

        # per-arch stems (not slimmable): 3 -> 2*nf(2) (s2) -> 2*nf(4) (s2) -> nf(8) (s2), §4.1
        self.stem = nn.ModuleList()
        for stem_w, _ in cfg.stem_head_widths:
            c2, c4, c8 = 2 * cfg.num_filters(2, stem_w), 2 * cfg.num_filters(4, stem_w), cfg.num_filters(8, stem_w)
            self.stem.append(nn.Sequential(ConvNorm(3, c2, 3, 2), Conv2x(c2, c4, 2), Conv2x(c4, c8, 2)))

        self.grid = cell_grid(L)
        self.cells = nn.ModuleList(
            Cell(cfg.fch * 8 * 2**j, down, cfg.width_mult_list) for (_, j, down) in self.grid
        )

        # per-arch refine stacks and the five heads (§4.4), F = fch * head width
        self.arms32, self.refines32, self.arms16, self.refines16 = (nn.ModuleList() for _ in range(4))
        self.heads = nn.ModuleList()
        for _, head_w in cfg.stem_head_widths:
            f8, f16, f32 = (cfg.num_filters(s, head_w) for s in (8, 16, 32))
            self.arms32.append(nn.ModuleList([ConvNorm(f32, f16, 1), ConvNorm(f16, f8, 1)]))
            self.refines32.append(nn.ModuleList([ConvNorm(2 * f16, f16, 3), ConvNorm(2 * f8, f8, 3)]))
            self.arms16.append(ConvNorm(f16, f8, 1))
            self.refines16.append(ConvNorm(2 * f8, f8, 3))
            self.heads.append(nn.ModuleDict({
                "8s": Head(f8, cfg.num_classes),
                "16s": Head(f8, cfg.num_classes),
                "32s": Head(f8, cfg.num_classes),
                "8s_32s": Head(2 * f8, cfg.num_classes),
                "16s_32s": Head(2 * f8, cfg.num_classes),
            }))
        init_weights(self)

        # architecture parameters (§4.3), raw logits
        self._arch_names: list[list[str]] = []
        for k in range(n):
            w = cfg.num_widths(k)
            shapes = {
                f"alpha_{k}_0": (L, len(PRIMITIVES)),
                f"alpha_{k}_1": (L - 1, len(PRIMITIVES)),
                f"alpha_{k}_2": (L - 2, len(PRIMITIVES)),
                f"beta_{k}_1": (L - 2, 2),
                f"beta_{k}_2": (L - 3, 2),
                f"ratio_{k}_0": (L - 1, w),
                f"ratio_{k}_1": (L - 1, w),
                f"ratio_{k}_2": (L - 2, w),
            }
            for name, shape in shapes.items():
                self.register_parameter(name, nn.Parameter(torch.full(shape, cfg.arch_init)))
            self._arch_names.append(list(shapes))

    # -- parameter groups --------------------------------------------------------------------

    def arch_parameters(self, arch: int | None = None) -> list[nn.Parameter]:
        """alpha/beta/ratio logits of one arch (or of all, teacher first)."""
        archs = range(len(self._arch_names)) if arch is None else [self._check_arch(arch)]
        return [getattr(self, name) for k in archs for name in self._arch_names[k]]

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter (stems, cells, refines, heads)."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.parameters() if id(p) not in arch]

    def arch_tensors(self, arch: int) -> dict[str, Tensor]:
        """The arch's raw logits keyed as in the official ``arch_{k}.pt`` (detached copies)."""
        return {name: getattr(self, name).detach().clone() for name in self._arch_names[self._check_arch(arch)]}

    def _check_arch(self, arch: int) -> int:
        if not 0 <= arch < len(self._arch_names):
            raise ValueError(f"arch must be in 0..{len(self._arch_names) - 1}, got {arch}")
        return arch

    def _logits(self, arch: int, kind: str) -> list[Tensor]:
        return [getattr(self, f"{kind}_{arch}_{j}") for j in (0, 1, 2) if hasattr(self, f"{kind}_{arch}_{j}")]

    # -- widths ------------------------------------------------------------------------------

    def sample_widths(self, arch: int, mode: str) -> list[list[Width]]:
        """One :class:`Width` per node and rate (rows as the ratio tensors), for a width mode (§4.3)."""
        if mode not in PRUN_MODES:
            raise ValueError(f"mode must be one of {PRUN_MODES}, got {mode!r}")
        wl = self.cfg.width_mult_list
        nodes = []
        for logits in self._logits(arch, "ratio"):
            row = []
            for r in range(logits.shape[0]):
                if mode == "max":
                    row.append(Width(wl[-1]))
                elif mode == "min":
                    row.append(Width(wl[0]))
                elif mode == "random":
                    row.append(Width(random.choice(wl)))
                else:
                    one_hot = F.gumbel_softmax(F.log_softmax(logits[r], dim=-1), tau=1.0, hard=True)
                    idx = int(one_hot.argmax())
                    ratio = wl[idx] if logits.shape[1] == len(wl) else wl[-1]
                    row.append(Width(ratio, one_hot[idx]))
            nodes.append(row)
        return nodes

    def cell_widths(self, arch: int, widths: list[list[Width]], i: int, j: int) -> tuple[Width, Width, Width | None]:
        """(w_in, w_out, w_down) of cell (layer i, rate j): the bookkeeping table of spec §4.3."""
        L = self.cfg.layers
        stem_w, head_w = self.cfg.stem_head_widths[arch]
        r0, r1, r2 = widths
        if i == L - 1:  # last layer: head width out, no down op
            return (r0[L - 2] if j == 0 else r1[L - 2] if j == 1 else r2[L - 3]), Width(head_w), None
        if j == 0:
            return (Width(stem_w) if i == 0 else r0[i - 1]), r0[i], r1[i]
        if j == 1:
            return r1[i - 1], r1[i], r2[i - 1]
        return r2[i - 2], r2[i - 1], None

    # -- forward -----------------------------------------------------------------------------

    def forward(self, x: Tensor, arch: int = 1, mode: str | None = None) -> dict[str, Tensor]:
        """Logits of the five supernet heads (spec §4.4), keyed ``"8s", "16s", "32s", "8s_32s", "16s_32s"``.

        Train mode: logits at 1/8 of the input. Eval mode: bilinearly upsampled to the input size
        (align_corners=True, the official x8). ``mode`` is the width mode (default: the arch's
        own, ``max`` for the teacher, ``arch_ratio`` for the student). H and W must be multiples
        of 32 (zoomed ops halve the 1/32 features).
        """
        arch = self._check_arch(arch)
        mode = mode or self.cfg.prun_modes[arch]
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2] % 32 or x.shape[3] % 32:
            raise ValueError(f"Supernet expects images (N, 3, H, W) with H, W multiples of 32, got {tuple(x.shape)}")
        alphas = [F.softmax(a, dim=-1) for a in self._logits(arch, "alpha")]
        betas = [None] + [F.softmax(b, dim=-1) for b in self._logits(arch, "beta")]
        widths = self.sample_widths(arch, mode)

        outs: list[Tensor | None] = [self.stem[arch](x), None, None]  # latest `out` per rate
        downs: list[Tensor | None] = [None, None, None]  # latest `down` per rate (feeds rate + 1)
        for (i, j, _), cell in zip(self.grid, self.cells):
            if j == 0:  # new outputs of this layer must not feed other cells of the same layer
                prev_outs, prev_downs = list(outs), list(downs)
            w_in, w_out, w_down = self.cell_widths(arch, widths, i, j)
            a = alphas[j][i - j]
            if j == 0:
                o, d = cell(prev_outs[0], a, w_in, w_out, w_down)
            elif i == j:
                o, d = cell(prev_downs[j - 1], a, w_in, w_out, w_down)
            else:
                b = betas[j][i - j - 1]
                o1, d1 = cell(prev_downs[j - 1], a, w_in, w_out, w_down)
                o2, d2 = cell(prev_outs[j], a, w_in, w_out, w_down)
                o = b[0] * o1 + b[1] * o2
                d = None if d1 is None else b[0] * d1 + b[1] * d2
            outs[j], downs[j] = o, d

        f8, f16, f32 = outs
        o8 = f8
        o16 = self.refines16[arch](torch.cat([_up(self.arms16[arch](f16), f8), f8], dim=1))
        t = self.refines32[arch][0](torch.cat([_up(self.arms32[arch][0](f32), f16), f16], dim=1))
        o32 = self.refines32[arch][1](torch.cat([_up(self.arms32[arch][1](t), f8), f8], dim=1))
        heads = self.heads[arch]
        preds = {
            "8s": heads["8s"](o8),
            "16s": heads["16s"](o16),
            "32s": heads["32s"](o32),
            "8s_32s": heads["8s_32s"](torch.cat([o8, o32], dim=1)),
            "16s_32s": heads["16s_32s"](torch.cat([o16, o32], dim=1)),
        }
        if not self.training:
            preds = {k: F.interpolate(v, size=x.shape[-2:], mode="bilinear", align_corners=True) for k, v in preds.items()}
        return preds

    # -- derivation (implemented in arch_search.py; the LUT latency of a supernet: models/latency.py) ----

    def derive(self, arch: int, lasts: Sequence[int] = (2, 1), ignore_skip: bool | None = None) -> "ArchSpec":
        """The discrete architecture of ``arch`` for the final rates ``lasts`` (spec §7)."""
        from fasterkd.models.arch_search import derive_arch

        arch = self._check_arch(arch)
        t = self.arch_tensors(arch)
        stem_w, head_w = self.cfg.stem_head_widths[arch]
        return derive_arch(
            [t[f"alpha_{arch}_{j}"] for j in range(3)],
            [t[f"beta_{arch}_{j}"] for j in (1, 2)],
            [t[f"ratio_{arch}_{j}"] for j in range(3)],
            lasts=list(lasts),
            fch=self.cfg.fch,
            width_mult_list=self.cfg.width_mult_list,
            stem_head_width=(stem_w, head_w),
            ignore_skip=(self.cfg.prun_modes[arch] != "arch_ratio") if ignore_skip is None else ignore_skip,
        )


def _up(x: Tensor, ref: Tensor) -> Tensor:
    # bilinear x2 with align_corners=True, written as "resize to the finer feature" (spec §4.4)
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)
