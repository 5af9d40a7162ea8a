"""HRNetV2 and HRNet-OCR, the teachers (paper Sec. 3; reference ``hrnet-fa-kd.md`` section 1).

The network reproduces official HRNet-Semantic-Segmentation (``lib/models/seg_hrnet.py`` of the
``pytorch-v1.1`` branch and ``seg_hrnet_ocr.py`` of the ``HRNet-OCR`` branch) module by module,
so that every ``state_dict`` key and shape equals the official one (reference section 1.7) and an
official Cityscapes checkpoint loads with ``strict=True`` through :func:`load_hrnet_checkpoint`,
the one loader every command that takes a teacher checkpoint uses.

Reading order: the residual blocks, the multi-resolution module (parallel branches and the
exchange unit ``fuse_layers``), the OCR head, the network, then :class:`HRNetConfig` with its
presets, :func:`build_hrnet` and :func:`load_hrnet_checkpoint`.

Resolution rule (any input size works): the stem's two 3x3 stride-2 convolutions (padding 1) map
a side ``n`` to ``ceil(n / 2)`` each, so branch ``k`` (k = 0..3) has side ``ceil(n / 2**(k + 2))``
and the logits have ``ceil(H / 4) x ceil(W / 4)`` (e.g. 250x380 -> 63x95; 1024x2048 -> 256x512).
Lower branches are interpolated to branch 0's exact size before the head, so sizes that are not
multiples of 32 need no padding.

Checked against the official code (outside this repository, HRNet-Semantic-Segmentation
``pytorch-v1.1`` @ 88419ab and ``HRNet-OCR`` @ 0bbb288, run with the reference's shims): random
official weights passed through :func:`load_hrnet_checkpoint` give the same logits (and OCR
auxiliary logits) for Small-v1, Small-v2, W48 and W48-OCR at 64x96 and 70x101 inputs, max
absolute difference <= 1.5e-7 (float32 summation order).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasterkd.models.outputs import SegOutput

# ---------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (BatchNorm follows)."""
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block (expansion 1): conv3x3-BN-ReLU-conv3x3-BN, + shortcut, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """ResNet bottleneck (expansion 4): 1x1 - 3x3 - 1x1(x4), each with BN, + shortcut, ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 bn_momentum: float = 0.1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes, momentum=bn_momentum)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=bn_momentum)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + shortcut)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def make_layer(block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, num_blocks: int,
               stride: int = 1, bn_momentum: float = 0.1) -> nn.Sequential:
    """A run of ``num_blocks`` blocks; the first gets a 1x1 conv + BN shortcut if shapes change."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * block.expansion, momentum=bn_momentum),
        )
    layers = [block(inplanes, planes, stride, downsample, bn_momentum)]
    layers += [block(planes * block.expansion, planes, bn_momentum=bn_momentum) for _ in range(1, num_blocks)]
    return nn.Sequential(*layers)


class HighResolutionModule(nn.Module):
    """Parallel branches, one per resolution, followed by the multi-resolution exchange unit.

    ``fuse_layers[i][j]`` maps branch j to branch i: for j > i a 1x1 conv + BN applied at the low
    resolution and then interpolated up to branch i's size; for j < i a chain of (i - j) 3x3
    stride-2 conv + BN steps (ReLU after every step but the last, intermediate steps keep C_j);
    for j == i ``None`` (a hole that takes an index but no state-dict key, as in the official
    ModuleList). Output i = ReLU(sum over j of the mapped inputs).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], num_blocks: tuple[int, ...],
                 in_channels: tuple[int, ...], num_channels: tuple[int, ...], multi_scale_output: bool = True,
                 bn_momentum: float = 0.1, upsample_mode: str = "bilinear", align_corners: bool = False) -> None:
        super().__init__()
        n = len(num_blocks)
        if not (len(in_channels) == len(num_channels) == n):
            raise ValueError(f"HighResolutionModule: num_blocks {num_blocks}, in_channels {in_channels} and "
                             f"num_channels {num_channels} must have one entry per branch")
        self.num_branches = n
        self.multi_scale_output = multi_scale_output
        self.upsample_mode = upsample_mode
        self.align_corners = align_corners
        self.branches = nn.ModuleList(
            make_layer(block, in_channels[b], num_channels[b], num_blocks[b], bn_momentum=bn_momentum)
            for b in range(n)
        )
        self.out_channels = tuple(c * block.expansion for c in num_channels)
        self.fuse_layers = self._make_fuse_layers(bn_momentum) if n > 1 else None
        self.relu = nn.ReLU(inplace=True)

    def _make_fuse_layers(self, bn_momentum: float) -> nn.ModuleList:
        ch = self.out_channels
        n_out = self.num_branches if self.multi_scale_output else 1
        fuse_layers = []
        for i in range(n_out):
            row: list[nn.Module | None] = []
            for j in range(self.num_branches):
                if j > i:
                    row.append(nn.Sequential(nn.Conv2d(ch[j], ch[i], 1, bias=False),
                                             nn.BatchNorm2d(ch[i], momentum=bn_momentum)))
                elif j == i:
                    row.append(None)
                else:
                    steps = []
                    for k in range(i - j):
                        last = k == i - j - 1
                        out_ch = ch[i] if last else ch[j]
                        step: list[nn.Module] = [conv3x3(ch[j], out_ch, stride=2),
                                                 nn.BatchNorm2d(out_ch, momentum=bn_momentum)]
                        if not last:
                            step.append(nn.ReLU(inplace=True))
                        steps.append(nn.Sequential(*step))
                    row.append(nn.Sequential(*steps))
            fuse_layers.append(nn.ModuleList(row))
        return nn.ModuleList(fuse_layers)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if len(xs) != self.num_branches:
            raise ValueError(f"HighResolutionModule expects {self.num_branches} inputs, got {len(xs)}")
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        fused = []
        for i, row in enumerate(self.fuse_layers):
            y = xs[i]
            for j in range(self.num_branches):
                if j == i:
                    continue
                z = row[j](xs[j])
                if j > i:
                    z = _resize(z, xs[i].shape[-2:], self.upsample_mode, self.align_corners)
                y = y + z
            fused.append(self.relu(y))
        return fused


def _resize(x: Tensor, size: torch.Size | tuple[int, int], mode: str, align_corners: bool) -> Tensor:
    # align_corners is only a valid argument for the linear/cubic modes.
    ac = align_corners if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=tuple(size), mode=mode, align_corners=ac)


# ---------------------------------------------------------------------------------------------
# OCR head (Yuan et al., "Object-Contextual Representations", ECCV 2020; reference section 1.4)
# ---------------------------------------------------------------------------------------------


def bn_relu(channels: int, bn_momentum: float = 0.1) -> nn.Sequential:
    """Official ``ModuleHelper.BNReLU``: a nested Sequential, hence the ``.1.0.`` key pattern."""
    return nn.Sequential(nn.BatchNorm2d(channels, momentum=bn_momentum), nn.ReLU())


class SpatialGather(nn.Module):
    """Object region representations: f_k = sum_i softmax_i(m_ki) x_i (OCR Eq. 2). No parameters.

    ``probs`` (B, K, H, W) are soft-region logits, normalised by a softmax over the spatial
    positions of each class; ``feats`` (B, C, H, W). Returns (B, C, K, 1), the official layout.
    """

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, feats: Tensor, probs: Tensor) -> Tensor:
        b, k = probs.shape[:2]
        weights = F.softmax(self.scale * probs.reshape(b, k, -1), dim=2)  # (B, K, HW)
        context = torch.matmul(weights, feats.reshape(b, feats.shape[1], -1).transpose(1, 2))  # (B, K, C)
        return context.transpose(1, 2).unsqueeze(3)


class ObjectAttentionBlock(nn.Module):
    """Pixel-region relation and object contextual representation (OCR Eq. 3-4).

    Queries ``f_pixel(x)``, keys ``f_object(regions)``, values ``f_down(regions)``; the attention
    is a softmax over the K regions of query . key / sqrt(key_channels); ``f_up`` maps the
    context back to ``in_channels``. ``pool`` exists for parity with the official module; at the
    published scale 1 it is never applied.
    """

    def __init__(self, in_channels: int, key_channels: int, scale: int = 1, bn_momentum: float = 0.1,
                 upsample_mode: str = "bilinear", align_corners: bool = True) -> None:
        super().__init__()
        self.scale = scale
        self.key_channels = key_channels
        self.upsample_mode = upsample_mode
        self.align_corners = align_corners
        self.pool = nn.MaxPool2d(kernel_size=(scale, scale))
        self.f_pixel = nn.Sequential(
            nn.Conv2d(in_channels, key_channels, 1, bias=False), bn_relu(key_channels, bn_momentum),
            nn.Conv2d(key_channels, key_channels, 1, bias=False), bn_relu(key_channels, bn_momentum),
        )
        self.f_object = nn.Sequential(
            nn.Conv2d(in_channels, key_channels, 1, bias=False), bn_relu(key_channels, bn_momentum),
            nn.Conv2d(key_channels, key_channels, 1, bias=False), bn_relu(key_channels, bn_momentum),
        )
        self.f_down = nn.Sequential(nn.Conv2d(in_channels, key_channels, 1, bias=False),
                                    bn_relu(key_channels, bn_momentum))
        self.f_up = nn.Sequential(nn.Conv2d(key_channels, in_channels, 1, bias=False),
                                  bn_relu(in_channels, bn_momentum))

    def forward(self, x: Tensor, proxy: Tensor) -> Tensor:
        b, _, h, w = x.shape
        if self.scale > 1:
            x = self.pool(x)
        hq, wq = x.shape[-2:]
        query = self.f_pixel(x).reshape(b, self.key_channels, -1).transpose(1, 2)  # (B, HW, Ck)
        key = self.f_object(proxy).reshape(b, self.key_channels, -1)  # (B, Ck, K)
        value = self.f_down(proxy).reshape(b, self.key_channels, -1).transpose(1, 2)  # (B, K, Ck)
        attention = F.softmax(torch.matmul(query, key) * self.key_channels ** -0.5, dim=-1)
        context = torch.matmul(attention, value).transpose(1, 2).reshape(b, self.key_channels, hq, wq)
        context = self.f_up(context)
        if self.scale > 1:
            context = _resize(context, (h, w), self.upsample_mode, self.align_corners)
        return context


class SpatialOCR(nn.Module):
    """Augmented representation: conv1x1(concat(object context, pixel features)) (OCR Eq. 5)."""

    def __init__(self, in_channels: int, key_channels: int, out_channels: int, scale: int = 1,
                 dropout: float = 0.05, bn_momentum: float = 0.1, upsample_mode: str = "bilinear",
                 align_corners: bool = True) -> None:
        super().__init__()
        self.object_context_block = ObjectAttentionBlock(in_channels, key_channels, scale, bn_momentum,
                                                         upsample_mode, align_corners)
        self.conv_bn_dropout = nn.Sequential(
            nn.Conv2d(2 * in_channels, out_channels, 1, bias=False),
            bn_relu(out_channels, bn_momentum),
            nn.Dropout2d(dropout),
        )

    def forward(self, feats: Tensor, proxy: Tensor) -> Tensor:
        context = self.object_context_block(feats, proxy)
        return self.conv_bn_dropout(torch.cat([context, feats], dim=1))


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StageConfig:
    """One HRNet stage: ``num_modules`` HighResolutionModules over ``len(num_blocks)`` branches."""

    num_modules: int
    num_blocks: tuple[int, ...]
    num_channels: tuple[int, ...]
    block: str = "BASIC"


@dataclass(frozen=True)
class HRNetConfig:
    """Hyper-parameters of an HRNetV2 segmentation network (reference section 1.3).

    ``stage1_*`` describe ``layer1`` (Bottleneck blocks; ``stage1_planes`` is the bottleneck
    width, the output has 4x as many channels). ``align_corners`` and ``upsample_mode`` govern
    every interpolation (fuse layers and the head's concatenation) and must match the checkpoint:
    False for the v1.1 files, True for the HRNet-OCR files (reference section 1.7 item 7).
    ``bn_momentum`` is 0.01 in v1.1 and 0.1 in the HRNet-OCR branch (irrelevant for a frozen
    teacher). ``init`` is "kaiming" (He init, for training from scratch as fasterkd does without a
    checkpoint) or "official" (conv weights ~ N(0, 0.001^2), which the official code always
    follows with an ImageNet-pretrained load).
    """

    name: str
    stage1_blocks: int
    stage1_planes: int
    stage2: StageConfig
    stage3: StageConfig
    stage4: StageConfig
    stem_channels: int = 64
    final_conv_kernel: int = 1
    ocr: bool = False
    ocr_mid_channels: int = 512
    ocr_key_channels: int = 256
    ocr_dropout: float = 0.05
    num_classes: int = 19
    align_corners: bool = False
    upsample_mode: str = "bilinear"
    bn_momentum: float = 0.01
    init: str = "kaiming"

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.final_conv_kernel not in (1, 3):
            raise ValueError(f"final_conv_kernel must be 1 or 3, got {self.final_conv_kernel}")
        if self.init not in ("kaiming", "official"):
            raise ValueError(f"init must be 'kaiming' or 'official', got {self.init!r}")
        if self.upsample_mode not in ("bilinear", "bicubic", "nearest", "nearest-exact"):
            raise ValueError(f"upsample_mode must be bilinear, bicubic, nearest or nearest-exact, "
                             f"got {self.upsample_mode!r}")
        for k, stage in enumerate((self.stage2, self.stage3, self.stage4), start=2):
            if len(stage.num_blocks) != len(stage.num_channels) or len(stage.num_blocks) != k:
                raise ValueError(f"stage{k} of {self.name!r} must have {k} branches in num_blocks and "
                                 f"num_channels, got {stage.num_blocks} and {stage.num_channels}")
            if stage.block not in BLOCKS:
                raise ValueError(f"stage{k} block must be one of {sorted(BLOCKS)}, got {stage.block!r}")

    @property
    def head_channels(self) -> int:
        """Channels of the concatenated 1/4 feature (sum of stage-4 widths)."""
        return sum(c * BLOCKS[self.stage4.block].expansion for c in self.stage4.num_channels)


def _transition(pre: tuple[int, ...], cur: tuple[int, ...], bn_momentum: float) -> nn.ModuleList:
    """Official ``_make_transition_layer``.

    Existing branch: ``None`` when the width is unchanged, else a flat
    ``Sequential(conv3x3, BN, ReLU)``. New branch: a ``Sequential`` of stride-2
    ``Sequential(conv3x3 s2, BN, ReLU)`` steps from the previous stage's last branch (one more
    nesting level, hence keys like ``transition1.1.0.0.weight``).
    """
    layers: list[nn.Module | None] = []
    for i, c in enumerate(cur):
        if i < len(pre):
            if c != pre[i]:
                layers.append(nn.Sequential(conv3x3(pre[i], c), nn.BatchNorm2d(c, momentum=bn_momentum),
                                            nn.ReLU(inplace=True)))
            else:
                layers.append(None)
        else:
            steps = []
            for k in range(i + 1 - len(pre)):
                out_ch = c if k == i - len(pre) else pre[-1]
                steps.append(nn.Sequential(conv3x3(pre[-1], out_ch, stride=2),
                                           nn.BatchNorm2d(out_ch, momentum=bn_momentum), nn.ReLU(inplace=True)))
            layers.append(nn.Sequential(*steps))
    return nn.ModuleList(layers)


class HRNet(nn.Module):
    """HRNetV2 segmentation network, optionally with the OCR head (``config.ocr``).

    ``forward(image)`` returns a :class:`SegOutput`:

    - ``pred4``: logits at ``ceil(H/4) x ceil(W/4)`` (``last_layer`` output; with OCR the
      ``cls_head`` output, the official ``TEST.OUTPUT_INDEX = -1``);
    - ``aux``: OCR only, the soft-object-region logits of ``aux_head`` (same size), returned in
      training mode for the 0.4-weighted auxiliary loss. In eval mode they are still computed
      (the OCR head needs them) but returned as ``None``, as the ``SegOutput`` contract says for
      auxiliary outputs;
    - ``features``: ``"1/4"`` the concatenated multi-resolution feature that feeds the head
      (``head_channels`` channels), and ``"1/8"``, ``"1/16"``, ``"1/32"`` the stage-4 branch
      outputs at their native resolutions.
    """

    def __init__(self, config: HRNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        m = cfg.bn_momentum
        interp = dict(upsample_mode=cfg.upsample_mode, align_corners=cfg.align_corners)

        # Stem: two 3x3 stride-2 convs, 1/4 resolution.
        self.conv1 = nn.Conv2d(3, cfg.stem_channels, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cfg.stem_channels, momentum=m)
        self.conv2 = nn.Conv2d(cfg.stem_channels, cfg.stem_channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cfg.stem_channels, momentum=m)
        self.relu = nn.ReLU(inplace=True)

        self.layer1 = make_layer(Bottleneck, cfg.stem_channels, cfg.stage1_planes, cfg.stage1_blocks, bn_momentum=m)
        pre: tuple[int, ...] = (cfg.stage1_planes * Bottleneck.expansion,)

        stages = []
        transitions = []
        for stage_cfg in (cfg.stage2, cfg.stage3, cfg.stage4):
            block = BLOCKS[stage_cfg.block]
            cur = tuple(c * block.expansion for c in stage_cfg.num_channels)
            transitions.append(_transition(pre, cur, m))
            modules = []
            in_ch = cur
            for _ in range(stage_cfg.num_modules):
                hrm = HighResolutionModule(block, stage_cfg.num_blocks, in_ch, stage_cfg.num_channels,
                                           multi_scale_output=True, bn_momentum=m, **interp)
                in_ch = hrm.out_channels
                modules.append(hrm)
            stages.append(nn.Sequential(*modules))
            pre = in_ch
        self.transition1, self.transition2, self.transition3 = transitions
        self.stage2, self.stage3, self.stage4 = stages

        c = cfg.head_channels
        k = cfg.final_conv_kernel
        if not cfg.ocr:
            self.last_layer = nn.Sequential(
                nn.Conv2d(c, c, 1), nn.BatchNorm2d(c, momentum=m), nn.ReLU(inplace=True),
                nn.Conv2d(c, cfg.num_classes, k, padding=k // 2),
            )
        else:
            mid, key = cfg.ocr_mid_channels, cfg.ocr_key_channels
            self.conv3x3_ocr = nn.Sequential(nn.Conv2d(c, mid, 3, padding=1), nn.BatchNorm2d(mid, momentum=m),
                                             nn.ReLU(inplace=True))
            self.ocr_gather_head = SpatialGather()
            self.ocr_distri_head = SpatialOCR(mid, key, mid, scale=1, dropout=cfg.ocr_dropout, bn_momentum=m,
                                              **interp)
            self.cls_head = nn.Conv2d(mid, cfg.num_classes, 1)
            self.aux_head = nn.Sequential(
                nn.Conv2d(c, c, 1), nn.BatchNorm2d(c, momentum=m), nn.ReLU(inplace=True),
                nn.Conv2d(c, cfg.num_classes, k, padding=k // 2),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Conv2d):
                if self.config.init == "official":
                    # The official OCR model leaves its head modules at PyTorch's default init.
                    if self.config.ocr and any(s in name for s in ("cls", "aux", "ocr")):
                        continue
                    nn.init.normal_(mod.weight, std=0.001)
                else:
                    nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.BatchNorm2d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def _next_inputs(self, transition: nn.ModuleList, ys: list[Tensor]) -> list[Tensor]:
        # New branches grow from the last (lowest-resolution) branch; existing branches use their
        # own output (the HRNet-OCR branch's fix; identical for every published config).
        out = []
        for i, t in enumerate(transition):
            if t is None:
                out.append(ys[i])
            else:
                out.append(t(ys[i] if i < len(ys) else ys[-1]))
        return out

    def forward(self, image: Tensor) -> SegOutput:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"HRNet expects an image batch of shape (B, 3, H, W), got {tuple(image.shape)}")
        cfg = self.config
        x = self.relu(self.bn1(self.conv1(image)))
        x = self.relu(self.bn2(self.conv2(x)))
        x = self.layer1(x)
        ys = self.stage2(self._next_inputs(self.transition1, [x]))
        ys = self.stage3(self._next_inputs(self.transition2, ys))
        ys = self.stage4(self._next_inputs(self.transition3, ys))

        size = ys[0].shape[-2:]
        feats = torch.cat([ys[0]] + [_resize(y, size, cfg.upsample_mode, cfg.align_corners) for y in ys[1:]], 1)
        features = {"1/4": feats, "1/8": ys[1], "1/16": ys[2], "1/32": ys[3]}
        if not cfg.ocr:
            return SegOutput(pred4=self.last_layer(feats), features=features)

        aux = self.aux_head(feats)
        pixels = self.conv3x3_ocr(feats)
        regions = self.ocr_gather_head(pixels, aux)
        logits = self.cls_head(self.ocr_distri_head(pixels, regions))
        return SegOutput(pred4=logits, aux=aux if self.training else None, features=features)


# ---------------------------------------------------------------------------------------------
# Presets and constructor
# ---------------------------------------------------------------------------------------------

_W18_SMALL_V1 = HRNetConfig(
    name="hrnet-w18-small-v1", stage1_blocks=1, stage1_planes=32,
    stage2=StageConfig(1, (2, 2), (16, 32)),
    stage3=StageConfig(1, (2, 2, 2), (16, 32, 64)),
    stage4=StageConfig(1, (2, 2, 2, 2), (16, 32, 64, 128)),
)
_W18_SMALL_V2 = HRNetConfig(
    name="hrnet-w18-small-v2", stage1_blocks=2, stage1_planes=64,
    stage2=StageConfig(1, (2, 2), (18, 36)),
    stage3=StageConfig(3, (2, 2, 2), (18, 36, 72)),
    stage4=StageConfig(2, (2, 2, 2, 2), (18, 36, 72, 144)),
)
_W18 = HRNetConfig(
    name="hrnet-w18", stage1_blocks=4, stage1_planes=64,
    stage2=StageConfig(1, (4, 4), (18, 36)),
    stage3=StageConfig(4, (4, 4, 4), (18, 36, 72)),
    stage4=StageConfig(3, (4, 4, 4, 4), (18, 36, 72, 144)),
)
_W48 = HRNetConfig(
    name="hrnet-w48", stage1_blocks=4, stage1_planes=64,
    stage2=StageConfig(1, (4, 4), (48, 96)),
    stage3=StageConfig(4, (4, 4, 4), (48, 96, 192)),
    stage4=StageConfig(3, (4, 4, 4, 4), (48, 96, 192, 384)),
)
# HRNet-OCR branch: OCR head, align_corners True, BN momentum 0.1 (reference sections 1.1, 1.4).
_W48_OCR = replace(_W48, name="hrnet-w48-ocr", ocr=True, align_corners=True, bn_momentum=0.1)

HRNET_PRESETS: dict[str, HRNetConfig] = {
    c.name: c for c in (_W18_SMALL_V1, _W18_SMALL_V2, _W18, _W48, _W48_OCR)
}


def hrnet_config(name: str, **overrides: Any) -> HRNetConfig:
    """The preset ``name`` (see ``HRNET_PRESETS``) with any field overridden."""
    if name not in HRNET_PRESETS:
        raise ValueError(f"unknown HRNet model {name!r}; expected one of {sorted(HRNET_PRESETS)}")
    return replace(HRNET_PRESETS[name], **overrides)


def build_hrnet(name: str, num_classes: int = 19, align_corners: bool | None = None,
                upsample_mode: str = "bilinear", init: str = "kaiming") -> HRNet:
    """Build a preset HRNet teacher (no download: weights come from :func:`load_hrnet_checkpoint`).

    ``align_corners=None`` takes the preset's value, which matches its official checkpoints:
    False for the v1.1 files (small models, W18, W48), True for HRNet-OCR.
    """
    overrides: dict[str, Any] = dict(num_classes=num_classes, upsample_mode=upsample_mode, init=init)
    if align_corners is not None:
        overrides["align_corners"] = bool(align_corners)
    return HRNet(hrnet_config(name, **overrides))


# ---------------------------------------------------------------------------------------------
# Loading official (and fasterkd) checkpoints
# ---------------------------------------------------------------------------------------------

_SHOWN = 12  # keys listed per category in an error message


def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    more = f", ... (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else ""
    return f"{len(keys)} [{shown}{more}]"


def _unwrap(obj: Any, source: str) -> Mapping[str, Any]:
    """Peel ``{"state_dict": ...}`` (official resume files) and ``{"model": ...}`` (fasterkd)."""
    for _ in range(3):  # a wrapper inside a wrapper is possible (e.g. a resume file of a resume)
        if not isinstance(obj, Mapping):
            break
        inner = None
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), Mapping):
                inner = obj[wrapper]
                break
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(obj).__name__}")
    return obj


def _strip_official_names(state: Mapping[str, Any], source: str) -> dict[str, Tensor]:
    """Official file names -> module names (reference section 1.7 items 1-2).

    Drops ``loss.*`` (the ``FullModel`` criterion's class-weight buffer) and strips a ``module.``
    (DDP) and then a ``model.`` (``FullModel``) prefix.
    """
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise ValueError(f"{source}: state-dict keys must be strings, got {key!r}")
        if key.startswith("loss."):
            continue
        name = key
        for prefix in ("module.", "model."):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if not isinstance(value, Tensor):
            raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, expected a tensor")
        if name in out:
            raise ValueError(f"{source}: key {name!r} occurs twice after prefix stripping (e.g. with and "
                             f"without 'model.')")
        out[name] = value
    return out


def _fit_to_model(state: dict[str, Tensor], model: HRNet) -> dict[str, Tensor]:
    """Model-dependent fixes (reference section 1.4 and 1.7 item 4)."""
    # An OCR model initialised from a plain HRNet segmentation file: the official init_weights
    # renames last_layer -> aux_head (identical shapes); only then, and only in this direction.
    if model.config.ocr and any(k.startswith("last_layer.") for k in state) \
            and not any(k.startswith("aux_head.") for k in state):
        state = {("aux_head." + k[len("last_layer."):] if k.startswith("last_layer.") else k): v
                 for k, v in state.items()}
    # PyTorch 0.4 / InPlaceABN files have no BatchNorm counters: insert zeros for every BN whose
    # running statistics are present (a wholly missing BN is still reported as missing). Explicit
    # zeros also sidestep the version-2 _metadata trap of a strict load.
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in state:
            stem = key[: -len("num_batches_tracked")]
            if stem + "running_mean" in state:
                state[key] = torch.zeros_like(value, device=state[stem + "running_mean"].device)
    return state


def _read_state(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, Tensor], str]:
    """(stripped state dict, description of its source for error messages)."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path = Path(path_or_state_dict)
        source = f"checkpoint {str(path)!r}"
        if not path.is_file():
            raise FileNotFoundError(f"HRNet checkpoint {str(path)!r} does not exist (expected an official "
                                    f"HRNet-Semantic-Segmentation .pth file or a fasterkd teacher checkpoint)")
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - re-raised with the file name
            raise ValueError(f"{source} could not be read as a weights-only torch file: {exc}") from exc
    else:
        source = "HRNet state dict"
        obj = path_or_state_dict
    return _strip_official_names(_unwrap(obj, source), source), source


def detect_hrnet_preset(path_or_state_dict: str | os.PathLike | Mapping[str, Any]) -> str | None:
    """The preset whose key names and shapes a checkpoint matches exactly (counters aside), or None.

    The class count is read from the file's head. Used for the hint in loader errors, and by
    callers that want to build the right teacher for a file.
    """
    state, _ = _read_state(path_or_state_dict)
    head = state.get("cls_head.weight", state.get("last_layer.3.weight"))
    if head is None or head.dim() != 4:
        return None
    want = {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}
    for name in HRNET_PRESETS:
        with torch.device("meta"):  # no memory, no init cost
            candidate = build_hrnet(name, num_classes=head.shape[0])
        have = {k: tuple(v.shape) for k, v in candidate.state_dict().items() if not k.endswith("num_batches_tracked")}
        if have == want:
            return name
    return None


def load_hrnet_checkpoint(model: HRNet, path_or_state_dict: str | os.PathLike | Mapping[str, Any], *,
                          strict: bool = True) -> HRNet:
    """Load official HRNet/HRNet-OCR Cityscapes weights (or a fasterkd teacher checkpoint) into ``model``.

    Accepts a file path (read with ``torch.load(weights_only=True, map_location="cpu")``: no
    pickled code runs) or an in-memory state dict, optionally wrapped as ``{"state_dict": ...}``
    (official resume files) or ``{"model": ...}`` (fasterkd's trainer). Name handling follows
    reference section 1.7: the ``model.`` prefix of the official ``FullModel`` (and a ``module.``
    DDP prefix) is stripped, ``loss.*`` keys are dropped, missing BatchNorm
    ``num_batches_tracked`` counters are inserted as zeros, and for an OCR model a plain HRNet
    file's ``last_layer.*`` is renamed to ``aux_head.*`` (the official OCR init; useful only with
    ``strict=False``, since such a file has no OCR weights).

    Every shape is checked. A shape mismatch (always), or with ``strict=True`` (default) any
    missing or unexpected key, raises one ``ValueError`` that lists the missing and unexpected
    keys, the first shape mismatch with both shapes, and, when the file matches another preset,
    its name. With ``strict=False`` only the keys present in both are loaded (the official
    ImageNet-pretrained init) and the listing comes as a warning. Returns ``model``.
    """
    stripped, source = _read_state(path_or_state_dict)
    state = _fit_to_model(dict(stripped), model)

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatch = next(((k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()
                     if k in own and tuple(v.shape) != tuple(own[k].shape)), None)
    if mismatch is None and not missing and not unexpected:
        model.load_state_dict(state, strict=True)
        return model

    parts = []
    if mismatch is not None:
        key, theirs, ours = mismatch
        parts.append(f"first shape mismatch {key!r}: checkpoint {theirs} vs model {ours}")
    parts.append(f"missing keys {_describe(missing)}")
    parts.append(f"unexpected keys {_describe(unexpected)}")
    ocr_parts = ("cls_head.", "ocr_distri_head.", "conv3x3_ocr.")
    if any(k.startswith(("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")) for k in unexpected):
        parts.append("the file looks like an ImageNet classification checkpoint: load it with strict=False")
    elif model.config.ocr and not any(k.startswith(ocr_parts) for k in state):
        parts.append("the file has no OCR head: it is a plain HRNet file")
    detected = detect_hrnet_preset(stripped)
    if detected is not None:
        parts.append(f"the file matches {detected!r}: build that model "
                     f"(num_classes={stripped.get('cls_head.weight', stripped.get('last_layer.3.weight')).shape[0]})")
    message = (f"{source} does not match model {model.config.name!r} "
               f"(num_classes={model.config.num_classes}): " + "; ".join(parts))
    if strict or mismatch is not None:
        raise ValueError(message)
    warnings.warn(message + " (strict=False: loading the common keys)", stacklevel=2)
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return model


def build_hrnet_from_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Any], name: str | None = None,
                                align_corners: bool | None = None, upsample_mode: str = "bilinear") -> HRNet:
    """Build the teacher a checkpoint holds and load it strictly (via :func:`load_hrnet_checkpoint`).

    ``name=None`` detects the preset and the class count from the file's keys and shapes
    (:func:`detect_hrnet_preset`). ``align_corners=None`` takes the preset's default, which suits
    the v1.1 files and ``hrnet_ocr_cs_*``; pass it explicitly for other files (reference 1.7 item 7).
    """
    state, source = _read_state(path_or_state_dict)
    head = state.get("cls_head.weight", state.get("last_layer.3.weight"))
    if name is None:
        name = detect_hrnet_preset(state)
        if name is None:
            raise ValueError(f"{source}: its keys and shapes match none of the HRNet presets "
                             f"{sorted(HRNET_PRESETS)}; pass name= to see which keys differ")
    num_classes = int(head.shape[0]) if head is not None and head.dim() == 4 else 19
    model = build_hrnet(name, num_classes=num_classes, align_corners=align_corners, upsample_mode=upsample_mode)
    try:
        return load_hrnet_checkpoint(model, state, strict=True)
    except ValueError as exc:  # name the file, not the in-memory copy
        raise ValueError(str(exc).replace("HRNet state dict", source, 1)) from None


__all__ = [
    "BasicBlock", "Bottleneck", "HighResolutionModule", "SpatialGather", "ObjectAttentionBlock", "SpatialOCR",
    "StageConfig", "HRNetConfig", "HRNet", "HRNET_PRESETS", "hrnet_config", "build_hrnet",
    "load_hrnet_checkpoint", "detect_hrnet_preset", "build_hrnet_from_checkpoint",
]
