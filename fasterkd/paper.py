"""The paper's published numbers, as labelled reference constants (never results of ours).

Yang, Xue, Qi, Xin, "Improving Efficient Semantic Segmentation Networks by Enhancing Multi-scale
Feature Representation via Resolution Path Based Knowledge Distillation and Pixel Shuffle",
ISVC 2021 (LNCS 13018, pp. 325-336). Every constant names the table or section it comes from.
All mIoUs are Cityscapes *val* (evaluated at 1024x2048) unless the name says ``test``; the two
input sizes are the training crops (paper §4.2): ``"256x512"`` (low) and ``"512x1024"`` (high).
Parameter/FLOP strings are kept as printed ("FLOPs" in the paper are multiply-accumulates at
1024x2048, see ``fasterkd.cost``).

The notebooks show these beside the numbers we measure, in rows labelled
``"paper (Cityscapes, ...)"`` (:func:`reference_label`).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

INPUT_SIZES = ("256x512", "512x1024")
EVAL_SIZE = "1024x2048"  # §4.2: inference on the original resolution
DATASET = "Cityscapes"


@dataclass(frozen=True)
class PaperRow:
    """One published row: mIoU (%) per training input size, and the cost as printed."""

    name: str
    miou: Mapping[str, float]
    cost: str | None
    source: str


def _row(name: str, low: float | None, high: float | None, cost: str | None, source: str) -> PaperRow:
    miou = {k: v for k, v in zip(INPUT_SIZES, (low, high)) if v is not None}
    return PaperRow(name, MappingProxyType(miou), cost, source)


# Table 1: tutor/student with virtual 1/4 path, Cityscapes val (mIoU %), params/FLOPs at 1024x2048
TABLE1: Mapping[str, PaperRow] = MappingProxyType({
    "baseline": _row("Baseline student net", 60.1, 71.1, "3.4M/27G", "Table 1"),
    "tutor": _row("Tutor net w. 1/4-path", 63.6, 73.0, "3.9M/100G", "Table 1"),
    "student": _row("Student net (w. virtual 1/4-path)", 62.2, 72.3, "3.4M/27G", "Table 1"),
})

# Table 2: ablations on the low input size (256x512), Cityscapes val (mIoU %)
TABLE2: Mapping[str, PaperRow] = MappingProxyType({
    "baseline": _row("Baseline student net", 60.1, None, None, "Table 2"),
    "scratch": _row("Student net (w. virtual 1/4-path) from scratch", 59.9, None, None, "Table 2"),
    "c0": _row("Student net (w. virtual 1/4-path) c = 0", 60.9, None, None, "Table 2"),
    "c1": _row("Student net (w. virtual 1/4-path) c = 1", 62.2, None, None, "Table 2"),
})

# Table 3: bilinear (original FasterSeg student) vs depth-wise separable conv + pixel shuffle
TABLE3: Mapping[str, PaperRow] = MappingProxyType({
    "bilinear": _row("Original net", 60.1, 71.1, "3.4 MB/27 GB", "Table 3"),
    "pixel_shuffle": _row("Our net with dep. sep. conv & PS", 62.0, 72.5, "3.3 MB/27 GB", "Table 3"),
})

# §4.2 text: Cityscapes *test* mIoU (%)
TEST_MIOU: Mapping[str, Mapping[str, float]] = MappingProxyType({
    "baseline": MappingProxyType({"256x512": 57.7, "512x1024": 69.3}),
    "student": MappingProxyType({"256x512": 60.2, "512x1024": 69.7}),
})

# Costs in numbers (Table 1 / §1): parameters and multiply-accumulates at 1024x2048
STUDENT_PARAMS = 3.4e6  # Table 1, §1 ("3.4M parameters and 27G FLOPs")
STUDENT_MACS = 27e9
TUTOR_PARAMS = 3.9e6  # Table 1
TUTOR_MACS = 100e9
PS_STUDENT_PARAMS = 3.3e6  # Table 3 ("3.3 MB"; 0.1 M fewer than the original, §5)

# §3.2 / §4: hyper-parameters stated in the text
FA_LAMBDA = 0.8  # λ of Eq. 6
FA_P, FA_Q = 2, 1  # norms of Eq. 4 / Eq. 5
FA_C = 1.0  # c of Eq. 10 in Table 1
QUARTER_PATH_LAYERS = 2  # §3.1 / §4.2: "only 2 layers in the 1/4 resolution path"

# §4.2 / §6: the gains the text quotes (percentage points of mIoU, val)
GAIN_FA = MappingProxyType({"256x512": 2.1, "512x1024": 1.2})  # §6 (Table 1: student - baseline)
GAIN_PS = MappingProxyType({"256x512": 1.9, "512x1024": 1.4})  # abstract, §5, §6 (Table 3)

# §4.3: the qualitative claims the ablation chapter discusses
CLAIM_CONVNORM = ("adding ConvNorm layers to both student and tutor before computing the FA loss forces the "
                  "entries of the affinity matrices all close to 1 (§4.3, Fig. 4)")
CLAIM_LARGE_C = "enlarging the coefficient c in FA loss will help the model converge faster but might cause overfitting (§4.3)"


def reference_label(size: str = "256x512", what: str = "val") -> str:
    """The label of a reference row: ``"paper (Cityscapes, 256x512 crops, val)"``."""
    if size not in INPUT_SIZES:
        raise ValueError(f"size must be one of {INPUT_SIZES}, got {size!r}")
    return f"paper ({DATASET}, {size} crops, {what})"


# --------------------------------------------------------------------------------------------
# §5: the cost formulas of the two prediction modules (C channels into the FFM at H x W, N classes)
# --------------------------------------------------------------------------------------------


def bilinear_head_formula(C: int, N: int, H: int, W: int) -> tuple[float, float]:
    """§5: FasterSeg's FFM + Head: ``10 C^2 + N C`` parameters, ``10 C^2 HW + N C HW`` operations."""
    return 10 * C * C + N * C, (10 * C * C + N * C) * H * W


def pixel_shuffle_head_formula(C: int, N: int, H: int, W: int) -> tuple[float, float]:
    """§5: the pixel-shuffle module: ``(11/4) C^2 + N C / 2 + 50 C`` parameters and
    ``9.5 C^2 HW + 2 C N HW + 50 C HW`` operations."""
    return 11 / 4 * C * C + N * C / 2 + 50 * C, (9.5 * C * C + 2 * C * N + 50 * C) * H * W


def ps_crossover_channels(N: int) -> float:
    """The C above which the §5 formulas give the pixel-shuffle module fewer operations:
    ``10 C^2 + N C > 9.5 C^2 + 2 C N + 50 C`` iff ``C > 2 (N + 50)``."""
    return 2.0 * (N + 50)


__all__ = [
    "PaperRow", "TABLE1", "TABLE2", "TABLE3", "TEST_MIOU", "INPUT_SIZES", "EVAL_SIZE", "DATASET",
    "STUDENT_PARAMS", "STUDENT_MACS", "TUTOR_PARAMS", "TUTOR_MACS", "PS_STUDENT_PARAMS", "FA_LAMBDA",
    "FA_P", "FA_Q", "FA_C", "QUARTER_PATH_LAYERS", "GAIN_FA", "GAIN_PS", "CLAIM_CONVNORM", "CLAIM_LARGE_C",
    "reference_label", "bilinear_head_formula", "pixel_shuffle_head_formula", "ps_crossover_channels",
]
