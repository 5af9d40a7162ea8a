"""Named outputs shared by every network in fasterkd.

Resolution convention: ``pred*`` logits are returned at the resolution the network's own
forward produces (FasterSeg student and tutor: the input size, after their final upsampling;
HRNet teacher: 1/4 of the input, like the official code). Consumers never assume a size: the
losses and the evaluator resize logits to the label size. ``features`` hold the per-path feature
maps at their native resolution, keyed ``"1/4"``, ``"1/8"``, ``"1/16"``, ``"1/32"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class SegOutput:
    pred8: Tensor | None = None  # main logits of the student (1/8 path + head)
    pred4: Tensor | None = None  # main logits of the tutor (1/4 path) and of the HRNet teacher
    pred16: Tensor | None = None  # auxiliary 1/16 logits (training only)
    pred32: Tensor | None = None  # auxiliary 1/32 logits (training only)
    aux: Tensor | None = None  # HRNet-OCR's soft-object-region logits (training only)
    features: dict[str, Tensor] = field(default_factory=dict)

    @property
    def main(self) -> Tensor:
        """The prediction used at inference: pred4 for tutor/teacher, pred8 for the student."""
        if self.pred4 is not None:
            return self.pred4
        if self.pred8 is not None:
            return self.pred8
        raise ValueError("SegOutput holds neither pred4 nor pred8")
