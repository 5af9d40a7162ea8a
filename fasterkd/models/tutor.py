"""The tutor: the FasterSeg student plus a 1/4-resolution path (paper §3.1, Fig. 1).

The paper's text: "The 1/4 resolution path follows the 1/4 resolution stem and contains 2 basic
residual 2x layers also used in other stems. The 1/4 path then merges with the 1/8 resolution path
by interpolating output of the 1/8 resolution path to the 1/4 resolution size, refining and
adding." and "the output of the 1/8 path is fused with that of the 1/4 path" (§3.3); the tutor
predicts pred4, pred16, pred32 (Eq. 9); Table 1 gives it 3.9 M parameters and 100 G FLOPs at
1024x2048. Fig. 1 is not in the text, so the widths are ours, chosen to meet both Table 1 numbers:

- 1/4 path input: the stem's second layer output (``conv_2x`` s2, 8 chi = 64 channels at 1/4).
- 1/4 path: ``quarter_depth`` ``conv_2x`` layers (stride 1, the stems' BasicResidual2x) with output
  widths ``quarter_widths``. Default: every layer but the last keeps the stem's 1/4 width (64, as
  the stem's own 64 -> 64 layer) and the last widens to the fused 1/8 width (128, as the stem's
  32 -> 64 layer widens), so the sum needs no projection and the student's Head applies to it.
- "output of the 1/8 path": the fused 1/8 feature (FFM output), where both branches have been
  merged into the 1/8 path; the same tensor as the student's ``"1/8"`` tap. It is upsampled
  (bilinear, align_corners=True) to 1/4, "refined" by a ``refine_kernel`` x ``refine_kernel``
  ConvNorm (default 3x3: FasterSeg's refine modules and the paper's "go through a 3x3 Conv") and
  added to the 1/4 path's output.
- pred4: the student's prediction module on the fused 1/4 feature (``head_resolution="1/4"``: the
  Head runs at 1/4, then bilinear x4; the pixel-shuffle module: x2 inside, then x2), so
  ``Tutor.from_student`` starts from the baseline's trained Head. ``head_resolution="1/8"``
  resizes the sum to 1/8 first (an option for the cost comparison; the text merges at 1/4).
- Taps (Eq. 6): ``"1/4"`` = T^{1/4}, the fused 1/4 feature; ``"1/8"``, ``"1/16"``, ``"1/32"`` at the
  student's tensors (FFM output, f16b, f32).

With the official student the default costs 3,865,267 parameters used at inference and 100.48 G
conv MACs at 1024x2048 (Table 1: 3.9 M / 100 G). :func:`tutor_design_table` measures it beside the
other readings (uniform 128-wide path with a 1x1 refine: 3.96 M / 112.3 G, the earlier default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from fasterkd.models.arch import ArchSpec
from fasterkd.models.heads import ConvNorm, upsample
from fasterkd.models.ops import init_weights, make_op
from fasterkd.models.outputs import SegOutput
from fasterkd.models.student import FasterSegStudent, StudentConfig, pad_to_multiple

QUARTER_PREFIXES = ("quarter.", "refine4.", "quarter_proj.")
HEAD_RESOLUTIONS = ("1/4", "1/8")
TABLE_1_TUTOR = (3.9e6, 100e9)  # paper Table 1: parameters, FLOPs (counted as conv MACs, like the student's 27 G)


@dataclass
class TutorConfig:
    """The 1/4 path: ``quarter_depth`` conv_2x layers (paper: 2) of widths ``quarter_widths`` (None:
    the stem's 1/4 width, the last one the fused 1/8 width), a ``refine_kernel`` refine of the
    upsampled 1/8 feature, and the Head at ``head_resolution``."""

    arch: ArchSpec
    num_classes: int = 19
    head: str = "bilinear"
    quarter_depth: int = 2
    quarter_widths: tuple[int, ...] | None = None
    refine_kernel: int = 3
    head_resolution: str = "1/4"

    def student_config(self) -> StudentConfig:
        return StudentConfig(arch=self.arch, num_classes=self.num_classes, head=self.head)

    def validate(self) -> "TutorConfig":
        if self.quarter_depth < 1:
            raise ValueError(f"TutorConfig.quarter_depth must be >= 1 (the paper uses 2), got {self.quarter_depth}")
        if self.quarter_widths is not None:
            widths = tuple(self.quarter_widths)
            if len(widths) != self.quarter_depth or any(not isinstance(w, int) or w < 1 for w in widths):
                raise ValueError(f"TutorConfig.quarter_widths must be {self.quarter_depth} positive ints (one per "
                                 f"layer, quarter_depth={self.quarter_depth}) or None, got {self.quarter_widths!r}")
            self.quarter_widths = widths
        if self.refine_kernel not in (1, 3, 5):
            raise ValueError(f"TutorConfig.refine_kernel must be 1, 3 or 5, got {self.refine_kernel}")
        if self.head_resolution not in HEAD_RESOLUTIONS:
            raise ValueError(f"TutorConfig.head_resolution must be one of {HEAD_RESOLUTIONS}, got {self.head_resolution!r}")
        return self

    def widths(self, stem_quarter: int, fused: int) -> tuple[int, ...]:
        """Output width of each 1/4-path layer (the default rule applied when ``quarter_widths`` is None)."""
        if self.quarter_widths is not None:
            return tuple(self.quarter_widths)
        return (stem_quarter,) * (self.quarter_depth - 1) + (fused,)


class Tutor(FasterSegStudent):
    """Student + 1/4 path; forward returns ``SegOutput(pred4, pred16, pred32, features)``.

    Module names equal the student's for every shared part, plus ``quarter.*`` (the 1/4 path) and
    ``refine4`` (the ConvNorm on the upsampled 1/8 feature). When the last 1/4-path width differs
    from the fused width, a 1x1 ConvNorm ``quarter_proj`` maps the sum back to it for the Head.
    """

    def __init__(self, config: TutorConfig) -> None:
        super().__init__(config.validate().student_config())
        self.tutor_config = config
        fused = self.predictor.fused_channels
        c_in = 8 * config.arch.stem_chi  # the stem's 1/4 output
        widths = config.widths(c_in, fused)
        self.quarter = nn.ModuleList(
            [make_op("conv_2x", c_in if i == 0 else widths[i - 1], w, 1) for i, w in enumerate(widths)]
        )
        self.refine4 = ConvNorm(fused, widths[-1], config.refine_kernel)
        self.quarter_proj = ConvNorm(widths[-1], fused, 1) if widths[-1] != fused else None
        init_weights(self)

    def forward(self, image: Tensor) -> SegOutput:
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"Tutor expects an image batch of shape (N, 3, H, W), got {tuple(image.shape)}")
        h, w = image.shape[-2:]
        x = pad_to_multiple(image)
        size = tuple(x.shape[-2:])
        x8, x4 = self.run_stem(x)
        z, taps, aux = self.aggregate(self.run_cells(x8))
        fused8 = self.predictor.fuse(z)
        q = x4
        for layer in self.quarter:
            q = layer(q)
        t4 = q + self.refine4(upsample(fused8, q.shape[-2:]))
        if self.quarter_proj is not None:
            t4 = self.quarter_proj(t4)
        taps["1/8"] = fused8
        taps["1/4"] = t4
        head_in = t4 if self.tutor_config.head_resolution == "1/4" else upsample(t4, fused8.shape[-2:])
        out = SegOutput(pred4=self.predictor.predict(head_in, size)[..., :h, :w], features=taps)
        if self.training:
            pred16, pred32 = self.aux_predictions(aux, size)
            out.pred16 = pred16[..., :h, :w] if pred16 is not None else None
            out.pred32 = pred32[..., :h, :w] if pred32 is not None else None
        return out

    @classmethod
    def from_student(cls, student: FasterSegStudent, **options: Any) -> "Tutor":
        """A tutor initialised from a (trained) baseline student (paper §4: "initialized from the
        baseline model"): every student weight is copied, the 1/4 path is freshly initialised.
        ``options``: the 1/4-path fields of :class:`TutorConfig`."""
        if not isinstance(student, FasterSegStudent) or isinstance(student, Tutor):
            raise ValueError(f"Tutor.from_student needs a FasterSegStudent, got {type(student).__name__}")
        sc = student.config
        tutor = cls(TutorConfig(arch=sc.arch, num_classes=sc.num_classes, head=sc.head, **options))
        tutor.load_student_weights(student.state_dict())
        return tutor.to(next(student.parameters()).device)

    def load_student_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Copy a student's state dict into the shared part; the 1/4 path keeps its own weights.

        Raises ``ValueError`` naming the keys when the student does not match this tutor's arch/head.
        """
        ours = self.state_dict()
        missing = [k for k in ours if k not in state_dict and not k.startswith(QUARTER_PREFIXES)]
        unexpected = [k for k in state_dict if k not in ours]
        mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state_dict.items()
                      if k in ours and v.shape != ours[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                "student weights do not fit this tutor: "
                f"missing {missing}, unexpected {unexpected}, shape mismatches {mismatched}"
            )
        self.load_state_dict(state_dict, strict=False)


def build_tutor(arch: ArchSpec, num_classes: int = 19, head: str = "bilinear", **options: Any) -> Tutor:
    """Plain constructor: ``Tutor(TutorConfig(arch, num_classes, head, **options))``."""
    return Tutor(TutorConfig(arch=arch, num_classes=num_classes, head=head, **options))


# --------------------------------------------------------------------------- Table 1 readings

# (name, 1/4-path options, what the paper's text says about it); widths for the official student
TUTOR_DESIGNS: tuple[tuple[str, dict[str, Any], str], ...] = (
    ("64-128, 3x3 refine (default)", dict(quarter_widths=(64, 128), refine_kernel=3),
     "as the text: two conv_2x after the 1/4 stem, 3x3 refine, add, Head at 1/4"),
    ("64-128, 1x1 refine", dict(quarter_widths=(64, 128), refine_kernel=1), "as the text"),
    ("128-128, 1x1 refine", dict(quarter_widths=(128, 128), refine_kernel=1), "as the text (earlier default)"),
    ("128-128, 3x3 refine", dict(quarter_widths=(128, 128), refine_kernel=3), "as the text"),
    ("64-64 + 1x1 projection, 3x3 refine", dict(quarter_widths=(64, 64), refine_kernel=3),
     "adds a projection layer the text does not mention"),
    ("96-96 + 1x1 projection, 3x3 refine", dict(quarter_widths=(96, 96), refine_kernel=3),
     "adds a projection layer the text does not mention"),
    ("112-112 + 1x1 projection, 1x1 refine", dict(quarter_widths=(112, 112), refine_kernel=1),
     "adds a projection layer; 112 is no FasterSeg width (1/4 widths: 32..96)"),
    ("128-128, 1x1 refine, Head at 1/8", dict(quarter_widths=(128, 128), refine_kernel=1, head_resolution="1/8"),
     "the text merges and predicts at 1/4"),
    ("64-128, 3x3 refine, Head at 1/8", dict(quarter_widths=(64, 128), refine_kernel=3, head_resolution="1/8"),
     "the text merges and predicts at 1/4"),
)


__all__ = ["TutorConfig", "Tutor", "build_tutor", "TUTOR_DESIGNS", "HEAD_RESOLUTIONS"]
