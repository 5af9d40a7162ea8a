"""Weights of the official FasterSeg code: its state-dict names, loading them and writing them.

The official ``train/train.py`` saves ``model.state_dict()`` of ``Network_Multi_Path_Infer``
(FasterSeg spec §8). Its names differ from ours where it builds a ConvNorm as one Sequential
(``operations.ConvNorm``), wraps every cell op twice, and keeps the prediction module's parts at
the top level:

============================================  ===============================================
ours                                          official
============================================  ===============================================
``stem.0.conv.*`` / ``stem.0.bn.*``           ``stem.0.conv.0.*`` / ``stem.0.conv.1.*``
``stem.{1,2}.*``                              same
``cells.{l}-{b}.*``                           ``cells.{l}-{b}._op._op.*``
``arms32.{i}``, ``refines32.{i}``,            ``<module>.conv.0.*`` (conv), ``<module>.conv.1.*``
``arms16``, ``refines16``: ``.conv/.bn``      (BN): ``operations.ConvNorm`` is one Sequential
``heads16.*``, ``heads32.*``                  same (``seg_oprs.ConvBnRelu``: ``conv``/``bn``)
``predictor.head.*``                          ``heads8.*``
``predictor.ffm.conv_1x1.*``                  ``ffm.conv_1x1.*``
``predictor.ffm.channel_attention.{1,3}``     ``ffm.channel_attention.{1,2}.conv.weight``
============================================  ===============================================

The table was checked entry by entry against the 320 names and shapes of the official student
(``shared/reference/fasterseg/official_student_state_dict.tsv``). The official teacher is the same
class built from ``arch_0.pt`` with full widths; every module kind it holds (the three cell ops it
uses, ConvNorm, Head, FFM) appears in the student's list, so the same table names it (458
entries, spec §11). Shared cells appear under both of their names, as in the official file.

Only the bilinear prediction module exists in the official code: a pixel-shuffle student or a
tutor has modules with no official name, and exporting them fails naming the first one.

One function, :func:`_transfer`, moves tensors between the two namings in both directions and
checks every entry (presence, shape, integer-vs-float type, no extra entry); loading also checks
that the two names of a shared cell hold the same values. The first problem raises, naming the key.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fasterkd.models import OFFICIAL_STUDENT_ARCH, official_arch
from fasterkd.models.arch import ArchSpec
from fasterkd.models.student import FasterSegStudent, StudentConfig
from fasterkd.utils import atomic_torch_save

OFFICIAL_TEACHER_ARCH = "fasterseg_teacher.json"

# (pattern on our name, replacement giving the official name); the first matching rule applies
_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(p), r) for p, r in (
    (r"^stem\.0\.conv\.(.+)$", r"stem.0.conv.0.\1"),
    (r"^stem\.0\.bn\.(.+)$", r"stem.0.conv.1.\1"),
    (r"^(stem\.[12]\..+)$", r"\1"),
    (r"^cells\.(\d+-\d+)\.(.+)$", r"cells.\1._op._op.\2"),
    (r"^(arms32\.\d|refines32\.\d|arms16|refines16)\.conv\.(.+)$", r"\1.conv.0.\2"),
    (r"^(arms32\.\d|refines32\.\d|arms16|refines16)\.bn\.(.+)$", r"\1.conv.1.\2"),
    (r"^(heads16|heads32)\.(conv_3x3\.(?:conv|bn)\..+|conv_1x1\.(?:weight|bias))$", r"\1.\2"),
    (r"^predictor\.head\.(conv_3x3\.(?:conv|bn)\..+|conv_1x1\.(?:weight|bias))$", r"heads8.\1"),
    (r"^predictor\.ffm\.(conv_1x1\.(?:conv|bn)\..+)$", r"ffm.\1"),
    (r"^predictor\.ffm\.channel_attention\.1\.weight$", r"ffm.channel_attention.1.conv.weight"),
    (r"^predictor\.ffm\.channel_attention\.3\.weight$", r"ffm.channel_attention.2.conv.weight"),
))


def official_name(name: str) -> str | None:
    """The official FasterSeg state-dict name of our entry ``name``; None if it has none."""
    for pattern, replacement in _RULES:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def official_names(model: FasterSegStudent) -> dict[str, str]:
    """``{our name: official name}`` for every state-dict entry of ``model``, in our order.

    Raises ``ValueError`` naming the first entry the official network does not have (the
    pixel-shuffle module's refine, a tutor's 1/4 path) or a name two entries would share.
    """
    if not isinstance(model, FasterSegStudent):
        raise ValueError(f"official FasterSeg names exist for a FasterSegStudent, got {type(model).__name__}")
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for ours in model.state_dict():
        theirs = official_name(ours)
        if theirs is None:
            raise ValueError(
                f"{ours!r} has no counterpart in the official FasterSeg network (only the student with the "
                f"bilinear head is official; got {type(model).__name__} with head={model.config.head!r})"
            )
        if theirs in taken:
            raise ValueError(f"{ours!r} and {taken[theirs]!r} would both be called {theirs!r}")
        names[ours] = theirs
        taken[theirs] = ours
    return names


def _shared_groups(model: FasterSegStudent) -> list[list[str]]:
    """Our state-dict names that are one tensor (a cell shared by two branches), grouped."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _transfer(source: Mapping[str, Any], names: Mapping[str, str], target: Mapping[str, Tensor],
              what: str) -> dict[str, Tensor]:
    """``{t: source[names[t]]}`` for every name t of ``target``, checked entry by entry.

    ``names`` maps each target name to its source name. Raises ``ValueError`` at the first target
    entry whose source is missing, not a tensor, of another shape, or integer where float is
    expected (or the reverse), then at the first source entry no target name asks for. ``what``
    says in the message which weights are being moved.
    """
    out: dict[str, Tensor] = {}
    for t_name, expected in target.items():
        s_name = names[t_name]
        if s_name not in source:
            raise ValueError(f"{what}: missing key {s_name!r} (expected shape {tuple(expected.shape)})")
        value = source[s_name]
        if not isinstance(value, Tensor):
            raise ValueError(f"{what}: {s_name!r} is a {type(value).__name__}, expected a tensor")
        if tuple(value.shape) != tuple(expected.shape):
            raise ValueError(f"{what}: shape mismatch at {s_name!r}: {tuple(value.shape)} given, "
                             f"{tuple(expected.shape)} expected")
        if value.is_floating_point() != expected.is_floating_point():
            raise ValueError(f"{what}: {s_name!r} has dtype {value.dtype}, expected {expected.dtype}")
        out[t_name] = value
    wanted = set(names.values())
    for s_name in source:
        if s_name not in wanted:
            raise ValueError(f"{what}: unexpected key {s_name!r} (no entry of the network has this name)")
    return out


def _read_state_dict(weights: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A state dict from a mapping or a ``torch.save`` file (no pickled code runs); unwraps
    ``{"state_dict": ...}`` and strips a ``module.`` prefix that every key carries (DataParallel)."""
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"FasterSeg weights file {path} does not exist (expected the official weights*.pt)")
        try:
            weights = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - name the file whatever the unpickler says
            raise ValueError(f"{path}: not a readable state dict ({type(e).__name__}: {e})") from e
        if isinstance(weights, Mapping) and isinstance(weights.get("state_dict"), Mapping):
            weights = weights["state_dict"]
    if not isinstance(weights, Mapping):
        raise ValueError(f"FasterSeg weights must be a mapping of names to tensors, got {type(weights).__name__}")
    state = dict(weights)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_fasterseg_weights(model: FasterSegStudent, weights: Mapping[str, Any] | str | os.PathLike) -> FasterSegStudent:
    """Load a state dict saved by the official FasterSeg code into ``model`` (in place; returns it).

    ``weights``: the state dict or the path of the official ``weights*.pt``. Every entry is checked
    (see :func:`_transfer`); the two names of a shared cell must hold equal values, as in any file
    the official code writes. Nothing is loaded unless everything fits.
    """
    state = _read_state_dict(weights)
    names = official_names(model)
    what = "official FasterSeg weights do not fit this network"
    mapped = _transfer(state, names, model.state_dict(), what)
    for group in _shared_groups(model):
        first = mapped[group[0]]
        for other in group[1:]:
            if not torch.equal(mapped[other], first):
                raise ValueError(f"{what}: {names[other]!r} differs from {names[group[0]]!r}, but both name one "
                                 "shared cell (the official code writes the same tensor under both names)")
    model.load_state_dict(mapped, strict=True)
    return model


def fasterseg_state_dict(model: FasterSegStudent) -> dict[str, Tensor]:
    """``model``'s weights under the official names (the inverse of :func:`load_fasterseg_weights`).

    The result has the official file's entries (320 for the official student), shared cells under
    both names; ``torch.save`` it to get a file the official ``train.py`` loads.
    """
    names = official_names(model)
    ours = model.state_dict()
    back = {theirs: mine for mine, theirs in names.items()}
    return _transfer(ours, back, {theirs: ours[mine] for mine, theirs in names.items()}, "exporting official names")


def save_fasterseg_weights(model: FasterSegStudent, path: str | os.PathLike) -> Path:
    """Write :func:`fasterseg_state_dict` of ``model`` to ``path`` (atomically), as the official
    ``train.py`` writes ``weights*.pt``; returns the path."""
    state = {k: v.detach().cpu() for k, v in fasterseg_state_dict(model).items()}  # shared cells keep one storage
    atomic_torch_save(state, path)
    return Path(path)


def from_official_weights(weights: Mapping[str, Any] | str | os.PathLike,
                          arch: ArchSpec | str | os.PathLike | None = None) -> FasterSegStudent:
    """A bilinear-head FasterSeg network holding official weights, ready to evaluate or fine-tune.

    ``arch``: the architecture the weights were trained with (an ArchSpec or an arch JSON path, e.g.
    from ``fasterkd arch import arch_1.pt``); None picks the shipped official student (stem width 32)
    or teacher (stem width 48) by the width of ``stem.0``. The number of classes is read from the
    classifier (``heads8.conv_1x1.bias``). Any entry that does not fit raises ``ValueError``.
    """
    state = _read_state_dict(weights)
    bias = state.get("heads8.conv_1x1.bias")
    if not isinstance(bias, Tensor) or bias.dim() != 1:
        raise ValueError("not official FasterSeg weights: no classifier 'heads8.conv_1x1.bias' of shape (classes,)")
    if arch is None:
        stem = state.get("stem.0.conv.0.weight")
        widths = {32: OFFICIAL_STUDENT_ARCH, 48: OFFICIAL_TEACHER_ARCH}
        width = stem.shape[0] if isinstance(stem, Tensor) and stem.dim() == 4 else None
        if width not in widths:
            raise ValueError(f"cannot tell the arch of these weights: 'stem.0.conv.0.weight' has {width} output "
                             "channels (official student 32, teacher 48); pass arch=<arch JSON>")
        arch = official_arch(widths[width])
    elif not isinstance(arch, ArchSpec):
        arch = ArchSpec.load(arch)
    model = FasterSegStudent(StudentConfig(arch=arch, num_classes=int(bias.shape[0]), head="bilinear"))
    return load_fasterseg_weights(model, state)


__all__ = [
    "official_name",
    "official_names",
    "load_fasterseg_weights",
    "fasterseg_state_dict",
    "save_fasterseg_weights",
    "from_official_weights",
]
