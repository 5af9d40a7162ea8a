"""The tutor: the FasterSeg student plus a 1/4-resolution path (paper §3.1, Fig. 1).

The paper's text: "The 1/4 resolution path follows the 1/4 resolution stem and contains 2 basic
residual 2x layers also used in other stems. The 1/4 path then merges with the 1/8 resolution path
by interpolating output of the 1/8 resolution path to the 1/4 resolution size, refining and
adding." and "the output of the 1/8 path is fused with that of the 1/4 path" (§3.3); the tutor
predicts pred4, pred16, pred32 (Eq. 9). Fig. 1 is not in the text, so these choices are ours:

- 1/4 path input: the stem's second layer output (``conv_2x`` s2, 8 chi = 64 channels at 1/4).
- 1/4 path: ``quarter_depth`` ``conv_2x`` layers (stride 1, the stems' BasicResidual2x), the first
  8 chi -> W, the others W -> W, with W = the width of the fused 1/8 feature (the FFM output:
  128 for the official student with the bilinear head), so the sum below needs no extra
  projection and the student's prediction module applies to it unchanged.
- "output of the 1/8 path": the fused 1/8 feature (FFM output), i.e. where both branches have been
  merged into the 1/8 path, the same tensor as the student's ``"1/8"`` tap. It is upsampled
  (bilinear, align_corners=True) to 1/4, refined by a ConvNorm (``refine_kernel`` x ``refine_kernel``,
  W -> W; default 1x1) and added to the 1/4 path's output.
- pred4: the student's prediction module (Head, then bilinear x4 to the input size; or the pixel-
  shuffle module, whose own x2 makes it 1/2, then x2) on the fused 1/4 feature. The tutor thus has no
  separate 1/8 head: its Head runs at 1/4, which is what lets ``Tutor.from_student`` start from the
  baseline student's trained Head.
- Taps (Eq. 6): ``"1/4"`` = T^{1/4}, the fused 1/4 feature fed to the Head; ``"1/8"``, ``"1/16"``,
  ``"1/32"`` at the same tensors as the student's (FFM output, f16b, f32).

Why 1x1 for the refine and W = 128: with the official student this gives 3.95 M parameters used at
inference and 112.3 G conv MACs at 1024x2048, the reading closest to Table 1's "3.9M/100G"
among those that need no extra layer (a 3x3 refine: 4.09 M / 129.5 G). A 96-channel 1/4 path with
a 3x3 refine and a 1x1 projection back to 128 lands nearer the FLOPs (3.85 M / 98.5 G) but adds a
layer the text never mentions; a 64-channel one gives 3.65 M / 72.6 G. The notebook
``01_networks.ipynb`` prints the measured numbers; ``refine_kernel`` and ``quarter_channels`` let
users try the other readings.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from fasterkd.models.arch import ArchSpec
from fasterkd.models.heads import ConvNorm, upsample
from fasterkd.models.ops import init_weights, make_op
from fasterkd.models.outputs import SegOutput
from fasterkd.models.student import FasterSegStudent, StudentConfig, pad_to_multiple

QUARTER_PREFIXES = ("quarter.", "refine4.")


@dataclass
class TutorConfig:
    """quarter_depth: conv_2x layers on the 1/4 path (paper: 2); quarter_channels: None = FFM width."""

    arch: ArchSpec
    num_classes: int = 19
    head: str = "bilinear"
    quarter_depth: int = 2
    refine_kernel: int = 1
    quarter_channels: int | None = None

    def student_config(self) -> StudentConfig:
        return StudentConfig(arch=self.arch, num_classes=self.num_classes, head=self.head)

    def validate(self) -> "TutorConfig":
        if self.quarter_depth < 1:
            raise ValueError(f"TutorConfig.quarter_depth must be >= 1 (the paper uses 2), got {self.quarter_depth}")
        if self.refine_kernel not in (1, 3, 5):
            raise ValueError(f"TutorConfig.refine_kernel must be 1, 3 or 5, got {self.refine_kernel}")
        if self.quarter_channels is not None and self.quarter_channels < 1:
            raise ValueError(f"TutorConfig.quarter_channels must be positive or None, got {self.quarter_channels}")
        return self


class Tutor(FasterSegStudent):
    """Student + 1/4 path; forward returns ``SegOutput(pred4, pred16, pred32, features)``.

    Module names equal the student's for every shared part, plus ``quarter.*`` (the 1/4 path) and
    ``refine4`` (the ConvNorm on the upsampled 1/8 feature). With ``quarter_channels`` different
    from the FFM width, the sum is projected back by a 1x1 ConvNorm ``quarter_proj``.
    """

    def __init__(self, config: TutorConfig) -> None:
        super().__init__(config.validate().student_config())
        self.tutor_config = config
        fused = self.predictor.fused_channels
        width = config.quarter_channels or fused
        c_in = 8 * config.arch.stem_chi  # the stem's 1/4 output
        self.quarter = nn.ModuleList(
            [make_op("conv_2x", c_in if i == 0 else width, width, 1) for i in range(config.quarter_depth)]
        )
        self.refine4 = ConvNorm(fused, width, config.refine_kernel)
        # the Head of the prediction module expects the fused width
        self.quarter_proj = ConvNorm(width, fused, 1) if width != fused else None
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
        out = SegOutput(pred4=self.predictor.predict(t4, size)[..., :h, :w], features=taps)
        if self.training:
            pred16, pred32 = self.aux_predictions(aux, size)
            out.pred16 = pred16[..., :h, :w] if pred16 is not None else None
            out.pred32 = pred32[..., :h, :w] if pred32 is not None else None
        return out

    @classmethod
    def from_student(cls, student: FasterSegStudent, quarter_depth: int = 2, refine_kernel: int = 1,
                     quarter_channels: int | None = None) -> "Tutor":
        """A tutor initialised from a (trained) baseline student (paper §4: "initialized from the
        baseline model"): every student weight is copied, the 1/4 path is freshly initialised."""
        if not isinstance(student, FasterSegStudent) or isinstance(student, Tutor):
            raise ValueError(f"Tutor.from_student needs a FasterSegStudent, got {type(student).__name__}")
        sc = student.config
        tutor = cls(TutorConfig(arch=sc.arch, num_classes=sc.num_classes, head=sc.head, quarter_depth=quarter_depth,
                                refine_kernel=refine_kernel, quarter_channels=quarter_channels))
        tutor.load_student_weights(student.state_dict())
        return tutor.to(next(student.parameters()).device)

    def load_student_weights(self, state_dict: dict[str, Tensor]) -> None:
        """Copy a student's state dict into the shared part; the 1/4 path keeps its own weights.

        Raises ``ValueError`` naming the keys when the student does not match this tutor's arch/head.
        """
        ours = self.state_dict()
        missing = [k for k in ours if k not in state_dict and not k.startswith(QUARTER_PREFIXES + ("quarter_proj.",))]
        unexpected = [k for k in state_dict if k not in ours]
        mismatched = [f"{k}: {tuple(v.shape)} vs {tuple(ours[k].shape)}" for k, v in state_dict.items()
                      if k in ours and v.shape != ours[k].shape]
        if missing or unexpected or mismatched:
            raise ValueError(
                "student weights do not fit this tutor: "
                f"missing {missing}, unexpected {unexpected}, shape mismatches {mismatched}"
            )
        self.load_state_dict(state_dict, strict=False)


def build_tutor(arch: ArchSpec, num_classes: int = 19, head: str = "bilinear", quarter_depth: int = 2,
                refine_kernel: int = 1, quarter_channels: int | None = None) -> Tutor:
    """Plain constructor: ``Tutor(TutorConfig(...))``."""
    return Tutor(TutorConfig(arch=arch, num_classes=num_classes, head=head, quarter_depth=quarter_depth,
                             refine_kernel=refine_kernel, quarter_channels=quarter_channels))


__all__ = ["TutorConfig", "Tutor", "build_tutor"]
