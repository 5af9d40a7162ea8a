"""The derived FasterSeg student: stem, cells on two branches, aggregation, prediction module.

Faithful to the official inference network (``train/model_seg.py``, FasterSeg spec §8):

- stem (§8.1): ConvNorm 3x3 s2, then two ``conv_2x`` s2 layers, 3 -> 4chi -> 8chi -> 8chi channels;
- cells (§8.2): per branch and layer one plain op; branches share leading layers while op,
  stride and width agree, and a shared cell is registered under both names ``cells["{l}-{b}"]``
  (so the state dict holds duplicated keys, as the released weights do);
- aggregation (§8.3): ARMs (1x1) and refines (3x3) merge each branch down to 1/8, the branch
  features are concatenated (``z``), then the prediction module (``heads.make_predictor``: FFM,
  Head, bilinear x8, or the paper's pixel-shuffle module) gives the logits at the input size;
- auxiliary heads ``heads16``/``heads32`` (training only).

Feature taps for the path-wise FA loss (paper Eq. 6, "the output of the 1/n resolution path after
passing to ConvNorm layers"): ``"1/8"`` is the fused 1/8 feature (the FFM output that the head
reads; the 1/8 path is where both branches meet, so its output is the fusion of them);
``"1/16"`` is ``f16b``, the final feature of the branch that ends at 1/16; ``"1/32"`` is ``f32``,
the final feature of the branch that ends at 1/32. The tutor (``tutor.py``) exposes the same
tensors under the same keys, plus its fused 1/4 feature, so S^{1/8} <-> T^{1/4},
S^{1/16} <-> T^{1/16} and S^{1/32} <-> T^{1/32} are taken at corresponding places. A branch
missing from an arch (e.g. lasts [2, 0]) has no tap.

Any input size works: the image is zero-padded (bottom/right) to a multiple of 32 (the zoomed
ops halve the size twice per rate, spec §12 item 19) and the logits are cropped back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fasterkd.models.arch import ArchSpec
from fasterkd.models.heads import HEAD_NAMES, ConvNorm, Head, make_predictor, upsample
from fasterkd.models.ops import init_weights, make_op
from fasterkd.models.outputs import SegOutput

PAD_MULTIPLE = 32
RATES = (8, 16, 32)


# --------------------------------------------------------------------------- layer table


@dataclass(frozen=True)
class CellInfo:
    """One layer of one branch: op, rate index it works at, channels, stride, shared owner."""

    layer: int
    branch: int
    op: str
    rate: int  # rate index of the input: 0 = 1/8, 1 = 1/16, 2 = 1/32
    c_in: int
    c_out: int
    stride: int
    owner: int  # branch whose module this layer uses (== branch unless shared with an earlier one)

    @property
    def key(self) -> str:
        return f"{self.layer}-{self.branch}"


def cell_table(arch: ArchSpec) -> list[list[CellInfo]]:
    """Per branch, the layers of a derived network with channels and sharing (spec §8.2).

    C_in = s * stem_chi for layer 0, else s * chi[l-1]; C_out = s * (1 + down) * chi[l] for inner
    layers and s * head_chi for a branch's last layer (s = 8 * 2^path). A layer of branch b is
    shared with an earlier branch b' when every layer up to and including it has the same op,
    stride and output width in both (the official merge rule).
    """
    arch.validate()
    table: list[list[CellInfo]] = []
    for b, branch in enumerate(arch.branches):
        rows = []
        n = len(branch.ops)
        for l in range(n):
            s = 8 * 2 ** branch.path[l]
            c_in = s * (arch.stem_chi if l == 0 else branch.chis[l - 1])
            c_out = s * arch.head_chi if l == n - 1 else s * (1 + branch.downs[l]) * branch.chis[l]
            rows.append(CellInfo(l, b, branch.ops[l], branch.path[l], c_in, c_out, 2 if branch.downs[l] else 1, b))
        table.append(rows)
    for b in range(1, len(table)):
        for b2 in range(b):
            # prefix sharing with the earliest matching branch
            l = 0
            while (
                l < len(table[b]) and l < len(table[b2])
                and (table[b][l].op, table[b][l].stride, table[b][l].c_in, table[b][l].c_out)
                == (table[b2][l].op, table[b2][l].stride, table[b2][l].c_in, table[b2][l].c_out)
            ):
                l += 1
            if l and table[b][0].owner == b:
                for k in range(l):
                    r = table[b][k]
                    table[b][k] = CellInfo(r.layer, r.branch, r.op, r.rate, r.c_in, r.c_out, r.stride, table[b2][k].owner)
    return table


# --------------------------------------------------------------------------- the network


@dataclass
class StudentConfig:
    """arch: the derived architecture; head: "bilinear" (FasterSeg) or "pixel_shuffle" (paper §5)."""

    arch: ArchSpec
    num_classes: int = 19
    head: str = "bilinear"

    def validate(self) -> "StudentConfig":
        if not isinstance(self.arch, ArchSpec):
            raise ValueError(f"StudentConfig.arch must be an ArchSpec, got {type(self.arch).__name__}")
        self.arch.validate()
        lasts = self.arch.lasts
        if len(set(lasts)) != len(lasts) or not set(lasts) <= {0, 1, 2}:
            raise ValueError(f"arch branches must end at distinct rates among 0, 1, 2 (1/8, 1/16, 1/32), got lasts={lasts}")
        if self.head not in HEAD_NAMES:
            raise ValueError(f"StudentConfig.head must be one of {HEAD_NAMES}, got {self.head!r}")
        if self.num_classes < 1:
            raise ValueError(f"StudentConfig.num_classes must be positive, got {self.num_classes}")
        return self


def pad_to_multiple(x: Tensor, multiple: int = PAD_MULTIPLE) -> Tensor:
    """Zero-pad the bottom/right of an image batch so H and W are multiples of ``multiple``.

    Zeros are the mean colour after ImageNet normalisation, so the padding looks like grey.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


class FasterSegStudent(nn.Module):
    """FasterSeg's derived inference network (spec §8), returning a :class:`SegOutput`."""

    def __init__(self, config: StudentConfig) -> None:
        super().__init__()
        self.config = config.validate()
        arch, n_cls = config.arch, config.num_classes
        chi = arch.stem_chi
        f = arch.head_chi  # spec's F: head width, so 8F/16F/32F channels at 1/8, 1/16, 1/32
        self.stem = nn.ModuleList([
            ConvNorm(3, 4 * chi, 3, stride=2),
            make_op("conv_2x", 4 * chi, 8 * chi, 2),
            make_op("conv_2x", 8 * chi, 8 * chi, 2),
        ])
        self.table = cell_table(arch)
        self.cells = nn.ModuleDict()
        for rows in self.table:
            for r in rows:
                if r.owner == r.branch:
                    self.cells[r.key] = make_op(r.op, r.c_in, r.c_out, r.stride)
                else:  # the same module under a second name, like the official state dict
                    self.cells[r.key] = self.cells[f"{r.layer}-{r.owner}"]

        lasts = arch.lasts
        self.branch_of = {last: b for b, last in enumerate(lasts)}
        ch8 = {last: self._latest_channels(b, 0) for b, last in enumerate(lasts)}
        if 2 in lasts:
            ch_16 = self._latest_channels(self.branch_of[2], 1)
            self.arms32 = nn.ModuleList([ConvNorm(32 * f, 16 * f, 1), ConvNorm(16 * f, 8 * f, 1)])
            self.refines32 = nn.ModuleList([ConvNorm(16 * f + ch_16, 16 * f, 3), ConvNorm(8 * f + ch8[2], 8 * f, 3)])
            self.heads32 = Head(32 * f, n_cls)
        if 1 in lasts:
            self.arms16 = ConvNorm(16 * f, 8 * f, 1)
            self.refines16 = ConvNorm(8 * f + ch8[1], 8 * f, 3)
        if 1 in lasts or 2 in lasts:
            c16 = (self._latest_channels(self.branch_of[2], 1) if 2 in lasts else 0) + (16 * f if 1 in lasts else 0)
            self.heads16 = Head(c16, n_cls)
        self.agg_channels = 8 * f * len(lasts)
        self.predictor = make_predictor(config.head, self.agg_channels, n_cls)
        init_weights(self)  # Kaiming-normal convs, BN 1/0 (spec §1)

    def _latest_channels(self, b: int, rate: int) -> int:
        """Channels of branch b's latest feature at ``rate`` (its last layer output there, or the stem)."""
        ch = 8 * self.config.arch.stem_chi
        for r in self.table[b]:
            out_rate = r.rate + (r.stride == 2)
            if out_rate == rate:
                ch = r.c_out
        return ch

    # ----------------------------------------------------------------- forward pieces

    def run_stem(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Stem output at 1/8 and the second stem layer's 1/4 output (the tutor's 1/4 path input)."""
        x2 = self.stem[0](x)
        x4 = self.stem[1](x2)
        return self.stem[2](x4), x4

    def run_cells(self, x8: Tensor) -> list[dict[int, Tensor]]:
        """Per branch, the latest feature at each rate index (initialised with the stem output)."""
        traces: list[list[Tensor]] = []
        latest: list[dict[int, Tensor]] = []
        for b, rows in enumerate(self.table):
            outs: list[Tensor] = []
            feats = {0: x8}
            h = x8
            for r in rows:
                if r.owner != b:  # shared with an earlier branch: reuse its output
                    h = traces[r.owner][r.layer]
                else:
                    h = self.cells[r.key](h)
                outs.append(h)
                feats[r.rate + (r.stride == 2)] = h
            traces.append(outs)
            latest.append(feats)
        return latest

    def aggregate(self, latest: list[dict[int, Tensor]]) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Merge every branch down to 1/8 (spec §8.3 steps 1-5); returns z, taps, aux inputs."""
        parts: list[Tensor] = []
        taps: dict[str, Tensor] = {}
        aux: dict[str, Tensor] = {}
        for b, last in enumerate(self.config.arch.lasts):
            feats = latest[b]
            if last == 2:
                f32, f16a, f8a = feats[2], feats[1], feats[0]
                a = self.arms32[0](f32)
                y = self.refines32[0](torch.cat([upsample(a, f16a.shape[-2:]), f16a], 1))
                c = self.arms32[1](y)
                parts.append(self.refines32[1](torch.cat([upsample(c, f8a.shape[-2:]), f8a], 1)))
                taps["1/32"] = f32
                aux["f32"], aux["f16a"] = f32, f16a
            elif last == 1:
                f16b, f8b = feats[1], feats[0]
                d = self.arms16(f16b)
                parts.append(self.refines16(torch.cat([upsample(d, f8b.shape[-2:]), f8b], 1)))
                taps["1/16"] = f16b
                aux["f16b"] = f16b
            else:
                parts.append(feats[0])
        return torch.cat(parts, 1), taps, aux

    def aux_predictions(self, aux: dict[str, Tensor], size: tuple[int, int]) -> tuple[Tensor | None, Tensor | None]:
        """pred16 (heads16 on [f16a, f16b]) and pred32 (heads32 on f32), upsampled to ``size``."""
        pred32 = upsample(self.heads32(aux["f32"]), size) if "f32" in aux else None
        in16 = [aux[k] for k in ("f16a", "f16b") if k in aux]
        pred16 = upsample(self.heads16(torch.cat(in16, 1)), size) if in16 else None
        return pred16, pred32

    def forward(self, image: Tensor) -> SegOutput:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"FasterSegStudent expects an image batch of shape (N, 3, H, W), got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        x = pad_to_multiple(image)
        size = tuple(x.shape[-2:])
        x8, _ = self.run_stem(x)
        z, taps, aux = self.aggregate(self.run_cells(x8))
        logits, fused = self.predictor(z, size)
        taps["1/8"] = fused
        out = SegOutput(pred8=logits[..., :h, :w], features=taps)
        if self.training:
            pred16, pred32 = self.aux_predictions(aux, size)
            out.pred16 = pred16[..., :h, :w] if pred16 is not None else None
            out.pred32 = pred32[..., :h, :w] if pred32 is not None else None
        return out


def build_student(arch: ArchSpec, num_classes: int = 19, head: str = "bilinear") -> FasterSegStudent:
    """Plain constructor: ``FasterSegStudent(StudentConfig(arch, num_classes, head))``."""
    return FasterSegStudent(StudentConfig(arch=arch, num_classes=num_classes, head=head))


__all__ = [
    "StudentConfig",
    "FasterSegStudent",
    "CellInfo",
    "cell_table",
    "pad_to_multiple",
    "build_student",
]
