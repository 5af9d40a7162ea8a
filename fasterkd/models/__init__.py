"""Networks of the paper and one factory by name.

``build_model(name, arch=None, head="bilinear", num_classes=19, **kw)``:

- ``"student"``: the derived FasterSeg student (:mod:`fasterkd.models.student`);
- ``"tutor"``: the student plus a 1/4 path (:mod:`fasterkd.models.tutor`; kw: ``quarter_depth``,
  ``quarter_widths``, ``refine_kernel``, ``head_resolution``);
- ``"supernet"``: the FasterSeg search space (:mod:`fasterkd.models.supernet`; kw go to
  ``SupernetConfig``);
- ``"hrnet-w18-small-v1"``, ``"hrnet-w18-small-v2"``, ``"hrnet-w18"``, ``"hrnet-w48"``,
  ``"hrnet-w48-ocr"``: the teachers (:func:`fasterkd.models.hrnet.build_hrnet`).

``arch`` (student/tutor) is an :class:`ArchSpec`, a path to an arch JSON, or None for the shipped
official FasterSeg student (``archs/fasterseg_student.json``, imported from ``arch_1.pt``).
Submodules are imported on use, so importing this package stays light.
"""

from __future__ import annotations

import importlib.resources
import json
import os
from typing import Any

from torch import nn

from fasterkd.models.arch import ArchSpec

STUDENT_NAMES = ("student", "tutor")
HRNET_NAMES = ("hrnet-w18-small-v1", "hrnet-w18-small-v2", "hrnet-w18", "hrnet-w48", "hrnet-w48-ocr")
MODEL_NAMES = STUDENT_NAMES + ("supernet",) + HRNET_NAMES
OFFICIAL_STUDENT_ARCH = "fasterseg_student.json"


def official_arch(name: str = OFFICIAL_STUDENT_ARCH) -> ArchSpec:
    """A shipped arch JSON from ``fasterkd/models/archs`` (default: the official FasterSeg student)."""
    resource = importlib.resources.files("fasterkd.models").joinpath("archs", name)
    if not resource.is_file():
        raise FileNotFoundError(f"shipped arch {name!r} not found in fasterkd/models/archs")
    return ArchSpec.from_dict(json.loads(resource.read_text()), where=f"fasterkd/models/archs/{name}")


def resolve_arch(arch: ArchSpec | str | os.PathLike | None) -> ArchSpec:
    """``arch`` as an ArchSpec: itself, loaded from a JSON path, or the official student for None."""
    if arch is None:
        return official_arch()
    if isinstance(arch, ArchSpec):
        return arch.validate()
    if isinstance(arch, (str, os.PathLike)):
        return ArchSpec.load(arch)
    raise ValueError(f"arch must be an ArchSpec, a path to an arch JSON or None, got {type(arch).__name__}")


def build_model(name: str, arch: ArchSpec | str | os.PathLike | None = None, head: str = "bilinear",
                num_classes: int = 19, **kw: Any) -> nn.Module:
    """Build the network called ``name`` (see the module docstring) with freshly initialised weights."""
    if name == "student":
        from fasterkd.models.student import FasterSegStudent, StudentConfig

        if kw:
            raise ValueError(f"build_model('student') takes no extra options, got {sorted(kw)}")
        return FasterSegStudent(StudentConfig(arch=resolve_arch(arch), num_classes=num_classes, head=head))
    elif name == "tutor":
        from fasterkd.models.tutor import Tutor, TutorConfig

        allowed = {"quarter_depth", "quarter_widths", "refine_kernel", "head_resolution"}
        if set(kw) - allowed:
            raise ValueError(f"build_model('tutor') options are {sorted(allowed)}, got {sorted(set(kw) - allowed)}")
        return Tutor(TutorConfig(arch=resolve_arch(arch), num_classes=num_classes, head=head, **kw))
    elif name == "supernet":
        from fasterkd.models.supernet import Supernet, SupernetConfig

        if arch is not None or head != "bilinear":
            raise ValueError(f"build_model('supernet') builds the search space: arch and head do not apply (got arch={arch!r}, head={head!r})")
        return Supernet(SupernetConfig(num_classes=num_classes, **kw))
    elif name in HRNET_NAMES:
        from fasterkd.models.hrnet import build_hrnet

        if arch is not None or head != "bilinear":
            raise ValueError(f"{name} is an HRNet teacher: arch and head do not apply (got arch={arch!r}, head={head!r})")
        return build_hrnet(name, num_classes=num_classes, **kw)
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)}")


__all__ = ["build_model", "official_arch", "resolve_arch", "MODEL_NAMES", "HRNET_NAMES", "STUDENT_NAMES"]
