"""Networks and their checkpoints: building the network a config describes, the checkpoint format
(one header for every stage, the search's included), reading and loading checkpoints, starting a
student from the baseline (``initialise_from``), the frozen teacher and tutor, the RNG state and the
check that a resumed run is the same run.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import fasterkd
from fasterkd.config import TrainConfig
from fasterkd.utils import atomic_torch_save, atomic_torch_save_all, jsonable, load_verified, pick_device, read_checksums

CHECKPOINT_FORMAT = "fasterkd-checkpoint-v1"

# the student search space of FasterSeg (spec §4): widths 8/12 at the stem and head, Gumbel widths
STUDENT_SPACE: dict[str, Any] = {"stem_head_widths": ((8 / 12, 8 / 12),), "prun_modes": ("arch_ratio",)}


# --------------------------------------------------------------------------------------------
# Building networks
# --------------------------------------------------------------------------------------------


def supernet_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    """SupernetConfig fields: the one-arch student space updated with ``cfg.search.supernet``."""
    kw = dict(STUDENT_SPACE)
    kw.update(cfg.search.supernet)
    for k in ("width_mult_list",):
        if k in kw:
            kw[k] = tuple(kw[k])
    for k in ("stem_head_widths",):
        kw[k] = tuple(tuple(v) for v in kw[k])
    kw["prun_modes"] = tuple(kw["prun_modes"])
    return kw


def arch_spec(cfg: TrainConfig, arch_dict: dict | None = None):
    """The student architecture: a checkpoint's ``arch_dict``, else ``cfg.model.arch`` (None: official)."""
    from fasterkd.models import resolve_arch
    from fasterkd.models.arch import ArchSpec

    if arch_dict is not None:
        return ArchSpec.from_dict(arch_dict, where="checkpoint arch")
    return resolve_arch(cfg.model.arch)


def build_network(cfg: TrainConfig, arch_dict: dict | None = None) -> nn.Module:
    """The network ``cfg.model`` describes (freshly initialised)."""
    from fasterkd.models import HRNET_NAMES, build_model

    m = cfg.model
    if m.name in HRNET_NAMES:
        return build_model(m.name, num_classes=m.num_classes)
    if m.name == "supernet":
        return build_model("supernet", num_classes=m.num_classes, **supernet_kwargs(cfg))
    kw = tutor_design(m) if m.name == "tutor" else {}
    return build_model(m.name, arch=arch_spec(cfg, arch_dict), head=m.head, num_classes=m.num_classes, **kw)


def tutor_design(m) -> dict[str, Any]:
    """The tutor's 1/4-path options of a :class:`~fasterkd.config.ModelConfig` (TutorConfig fields)."""
    widths = None if m.quarter_widths is None else tuple(int(w) for w in m.quarter_widths)
    return {"quarter_depth": m.quarter_depth, "quarter_widths": widths, "refine_kernel": m.refine_kernel,
            "head_resolution": m.head_resolution}


def model_identity(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this model: name, arch, head, shapes."""
    ident: dict[str, Any] = {"name": cfg.model.name, "head": cfg.model.head, "num_classes": cfg.model.num_classes}
    arch = getattr(getattr(model, "config", None), "arch", None)
    if arch is not None and hasattr(arch, "to_dict"):
        ident["arch"] = arch.to_dict()
    if cfg.model.name == "tutor":
        ident.update(jsonable(tutor_design(cfg.model)))
    if cfg.model.name == "supernet":
        ident["supernet"] = jsonable(dict(cfg.search.supernet))
    return ident


def check_identity(saved: dict[str, Any], current: dict[str, Any], path: str, what: str) -> None:
    """Refuse a checkpoint of another model than ``current`` (names the differing fields)."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs {what} {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        short = [d if len(d) < 300 else d[:300] + "..." for d in diffs]
        raise ValueError(f"{path} holds another model than this {what}: " + "; ".join(short))


# --------------------------------------------------------------------------------------------
# The checkpoint format
# --------------------------------------------------------------------------------------------


def checkpoint_header(cfg: TrainConfig, identity: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The part every checkpoint shares (trainer and search): format, versions, config, model.

    The stage's own state (optimisers, scheduler, RNG, epoch, metrics) follows it in the same dict.
    """
    return {
        "format": CHECKPOINT_FORMAT,
        "fasterkd_version": fasterkd.__version__,
        "torch_version": str(torch.__version__),
        "stage": cfg.stage,
        "config": cfg.to_dict(),
        "identity": identity,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def save_epoch(state: dict[str, Any], last: Path, best: Path, improved: bool) -> None:
    """Write ``last`` (and ``best`` when the epoch improved on it) as one commit.

    Both files are written to temporaries first (a full disk changes neither), then ``best`` is
    renamed before ``last``: a kill between the two renames leaves ``best`` one epoch ahead of
    ``last``, and the resumed run, which redoes that epoch bit for bit from ``last``, rewrites both.
    ``best`` can never be older than the ``best_miou`` that ``last`` records.
    """
    items = [(state, best)] if improved else []
    atomic_torch_save_all(items + [(state, last)])


def save_interrupted(state: dict[str, Any], last: Path) -> None:
    """Write the ``last`` of a run stopped between two steps (``state["partial"]`` says where)."""
    atomic_torch_save_all([(state, last)])


class NotFasterkdCheckpoint(ValueError):
    """A loadable file that is not a fasterkd checkpoint (e.g. an official HRNet state dict)."""


def read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The dict of a fasterkd checkpoint, loaded with ``weights_only`` and its tensor checksums
    verified (:func:`fasterkd.utils.load_verified`: a flipped bit is a ``ValueError`` naming the
    file). Checkpoints written before checksums were recorded load with a warning; any other file
    is a clear error."""
    path = Path(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = load_verified(path, map_location=device)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise NotFasterkdCheckpoint(f"{path}: not a fasterkd checkpoint (no format {CHECKPOINT_FORMAT!r})")
    for w in caught:  # the no-checksum warning only matters for a fasterkd checkpoint
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return upgrade_saved(ckpt)


def legacy_tutor_design(quarter_depth: int) -> dict[str, Any]:
    """The tutor every checkpoint saved before ModelConfig held its design was built as: a uniform
    128-wide 1/4 path, a 1x1 refine, the Head at 1/4."""
    return {"quarter_widths": [128] * int(quarter_depth), "refine_kernel": 1, "head_resolution": "1/4"}


def upgrade_saved(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint written before a config field existed, read as what it was built as.

    The one such case that changes the network: a tutor saved without ``quarter_widths``,
    ``refine_kernel`` and ``head_resolution`` (in its config's ``model`` and in its identity) gets
    :func:`legacy_tutor_design`, not today's defaults. Other absent fields take their defaults
    (``TrainConfig.from_dict``), which are the behaviour of the code that wrote them.
    """
    model = ckpt.get("config", {}).get("model", {})
    if model.get("name") == "tutor":
        legacy = legacy_tutor_design(model.get("quarter_depth", 2))
        absent = [k for k in legacy if k not in model]
        for k in absent:
            model[k] = legacy[k]
        ident = ckpt.get("identity", {})
        for k in absent:
            ident.setdefault(k, legacy[k])
        ident.setdefault("quarter_depth", model.get("quarter_depth", 2))
    return ckpt


def has_checksums(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint written by fasterkd's checksummed writer."""
    try:
        return read_checksums(path) is not None
    except (OSError, ValueError):
        return False


def run_config(source: TrainConfig | str | os.PathLike) -> TrainConfig:
    """``source`` itself, or the config saved in the checkpoint ``source`` names."""
    if isinstance(source, TrainConfig):
        return source
    return TrainConfig.from_dict(read_checkpoint(source, "cpu")["config"])


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a fasterkd checkpoint from its saved config; returns ``(model, cfg)``.

    The model is in eval mode on ``device``. Loading uses ``torch.load(weights_only=True)``.
    """
    ckpt = read_checkpoint(path, "cpu")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_network(cfg, ckpt["identity"].get("arch"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model its config describes: {e}") from e
    return model.to(pick_device(device)).eval(), cfg


# --------------------------------------------------------------------------------------------
# Guides and initialisation
# --------------------------------------------------------------------------------------------


def freeze(model: nn.Module) -> nn.Module:
    """Teachers and tutors: eval mode (BN statistics fixed), no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_teacher(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The frozen HRNet teacher: a fasterkd ``teacher`` checkpoint or an official HRNet file."""
    from fasterkd.models import HRNET_NAMES, build_model
    from fasterkd.models.hrnet import load_hrnet_checkpoint

    path = cfg.guide.teacher
    ckpt = None
    if has_checksums(path):  # fasterkd's own file: a damaged one is an error, never an official file
        ckpt = read_checkpoint(path)
    else:
        with contextlib.suppress(ValueError):
            ckpt = read_checkpoint(path)
    if ckpt is not None:
        model, tcfg = load_checkpoint(path)
        if tcfg.model.name not in HRNET_NAMES:
            raise ValueError(f"teacher={path!r} is a {tcfg.model.name!r} checkpoint; expected an HRNet teacher")
    else:
        if cfg.guide.teacher_model not in HRNET_NAMES:
            raise ValueError(f"teacher_model must be one of {HRNET_NAMES}, got {cfg.guide.teacher_model!r}")
        model = build_model(cfg.guide.teacher_model, num_classes=cfg.model.num_classes)
        load_hrnet_checkpoint(model, path)
    return freeze(model.to(device))


def load_tutor(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The frozen tutor of the student stage (Eq. 10): a ``tutor`` run's checkpoint."""
    model, tcfg = load_checkpoint(cfg.guide.tutor)
    if tcfg.model.name != "tutor":
        raise ValueError(f"tutor={cfg.guide.tutor!r} is a {tcfg.model.name!r} checkpoint; expected a tutor run")
    return freeze(model.to(device))


def _init_source(path: str, model: nn.Module) -> tuple[dict[str, torch.Tensor], str, str]:
    """``(state dict, model name, head)`` of an ``init`` file: a fasterkd student/tutor checkpoint,
    or an official FasterSeg weights file (read in ``model``'s architecture; a bilinear student)."""
    from fasterkd.models.official import from_official_weights

    try:
        ckpt = read_checkpoint(path)
    except ValueError as not_ours:
        try:
            official = from_official_weights(path, arch=model.config.arch)
        except ValueError as e:
            raise ValueError(f"init={path!r}: {not_ours}; nor official FasterSeg weights of arch={model.config.arch.name!r} "
                             f"({e})") from e
        return official.state_dict(), "student", "bilinear"
    src_cfg = TrainConfig.from_dict(ckpt["config"])
    if src_cfg.model.name not in ("student", "tutor"):
        raise ValueError(f"init={path!r} is a {src_cfg.model.name!r} checkpoint; expected a student run")
    if ckpt["identity"].get("arch") != model.config.arch.to_dict():
        raise ValueError(f"init={path!r} was trained with another architecture than arch={model.config.arch.name!r}")
    return ckpt["model"], src_cfg.model.name, src_cfg.model.head


def initialise_from(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Start ``model`` from ``cfg.model.init`` (the baseline student, paper §4.2), a fasterkd
    checkpoint or an official FasterSeg weights file (``weights*.pt`` of the same arch).

    Same network: every weight must fit (else ``ValueError``). A tutor takes the student's shared
    weights (its 1/4 path starts fresh). Another head (pixel shuffle from a bilinear baseline):
    all weights but the prediction module's. Returns the names left at their initialisation.
    """
    path = cfg.model.init
    state, src_name, src_head = _init_source(path, model)
    ours = model.state_dict()
    mismatched = [k for k, v in state.items() if k in ours and ours[k].shape != v.shape]
    loadable = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    same_head = src_head == cfg.model.head
    unexpected = [k for k in state if k not in ours]
    if same_head and (mismatched or unexpected) and cfg.model.name == src_name:
        raise ValueError(f"init={path!r} does not fit: mismatched {mismatched[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(loadable, strict=False)
    return sorted(k for k in ours if k not in loadable)


# --------------------------------------------------------------------------------------------
# Official FasterSeg weights in and out
# --------------------------------------------------------------------------------------------


def import_official_weights(weights: str | os.PathLike, out: str | os.PathLike,
                            arch: str | os.PathLike | None = None, profile: str = "paper") -> Path:
    """Write ``out``: a fasterkd checkpoint (a ``baseline`` run of ``profile``, epoch 0) holding an
    official FasterSeg ``weights*.pt`` (:func:`fasterkd.models.official.from_official_weights`).

    ``arch``: the arch JSON the weights were trained with; None: the shipped official student or
    teacher, told by the stem width (a teacher's arch is written beside ``out`` as
    ``arch.json`` so later stages can name it). ``fasterkd eval``, ``--init`` and ``weights export``
    read the result like any run's checkpoint.
    """
    from fasterkd.config import preset
    from fasterkd.models import official_arch
    from fasterkd.models.official import from_official_weights

    out = Path(out)
    model = from_official_weights(weights, arch)
    cfg = preset("baseline", profile, out_dir=str(out.parent))
    cfg.model.num_classes = model.config.num_classes
    if arch is not None:
        cfg.model.arch = str(Path(arch).resolve())
    elif model.config.arch.to_dict() != official_arch().to_dict():
        out.parent.mkdir(parents=True, exist_ok=True)
        model.config.arch.save(out.parent / "arch.json")
        cfg.model.arch = str((out.parent / "arch.json").resolve())
    state = {**checkpoint_header(cfg, model_identity(model, cfg), model), "epoch": 0, "step": 0,
             "best_miou": -1.0, "metrics": [], "imported_from": str(weights)}
    atomic_torch_save(state, out)
    return out


def export_official_weights(checkpoint: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a fasterkd student checkpoint's weights under the official FasterSeg names to ``out``
    (:func:`fasterkd.models.official.save_fasterseg_weights`). A network the official code does not
    have (a tutor, a pixel-shuffle head, a supernet, an HRNet) is refused, naming the first key."""
    from fasterkd.models.official import save_fasterseg_weights

    model, _ = load_checkpoint(checkpoint)
    try:
        return save_fasterseg_weights(model, out)
    except ValueError as e:
        raise ValueError(f"{checkpoint}: cannot be written as official FasterSeg weights: {e}") from e


# --------------------------------------------------------------------------------------------
# Resuming: the RNG state and the check that it is the same run
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, in weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": list(_to_lists(random.getstate())),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _to_lists(x: Any) -> Any:
    return [_to_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _to_tuples(x: Any) -> Any:
    return tuple(_to_tuples(v) for v in x) if isinstance(x, (tuple, list)) else x


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), n[2], n[3], n[4]))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# keys of the config that may differ between a run and its resumption
RESUMABLE_DIFFS = {"out_dir", "device", "epochs", "progress", "tensorboard", "eval_every", "final_eval",
                   "compile", "data.num_workers", "data.root"}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "supernet":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, path: str) -> None:
    """Refuse to resume from a checkpoint of another stage, model or recipe (names the fields)."""
    # fields the saved config lacks (written before they existed) compare at their defaults
    a, b = _flat(TrainConfig.from_dict(saved).to_dict()), _flat(cfg.to_dict())
    diffs = [f"{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})" for k in sorted(set(a) | set(b))
             if k not in RESUMABLE_DIFFS and a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was written by another configuration: " + "; ".join(diffs))
