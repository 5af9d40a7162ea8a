"""The configuration of a run: :class:`TrainConfig` and its sections, the stage and profile names,
the override names of :func:`preset`, and the presets themselves as two tables (one row per
profile, one recipe per stage).

Stages (paper §3.3 and §4.2; FasterSeg spec §6 and §9 where the paper is silent): ``teacher``
(HRNet, CE), ``search`` (Eq. 7), ``baseline`` (Eq. 8), ``tutor`` (Eq. 9), ``student`` (Eq. 10)
and ``head`` (the baseline with the pixel-shuffle prediction module, paper §5).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fasterkd.overrides import coerce_override, field_types, read_config_file
from fasterkd.utils import jsonable, parse_size

STAGES = ("teacher", "search", "baseline", "tutor", "student", "head")
PROFILES = ("smoke", "quick", "paper", "study")
DEFAULT_TEACHER = "hrnet-w18-small-v1"


@dataclass
class DataConfig:
    """Where the images come from and how they are augmented (FasterSeg spec §9.4).

    ``root=""`` selects the embedded synthetic street scenes, written on first use to
    ``$FASTERKD_CACHE`` (default ``~/.cache/fasterkd``) with ``synthetic_*`` as their recipe.
    """

    root: str = ""
    train_split: str = "train"
    val_split: str = "val"
    crop: tuple[int, int] = (128, 256)
    scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    flip: bool = True
    label_downsample: int = 1
    # every frame (image and label) shrunk by this factor before scaling and cropping: FasterSeg's
    # search reads Cityscapes at 512x1024 (``down_sampling = 2``; image area-averaged, label nearest)
    downsample: int = 1
    # the GLOBAL batch: each of N ranks (torchrun) loads batch_size // N images per step
    batch_size: int = 4
    eval_batch_size: int = 1
    num_workers: int = 0
    synthetic_size: tuple[int, int] = (256, 512)
    synthetic_train: int = 48
    synthetic_val: int = 12
    synthetic_seed: int = 0
    max_train_images: int | None = None  # a prefix of the training split (small runs)
    max_val_images: int | None = None


@dataclass
class OptimConfig:
    """SGD with momentum 0.9 and an exponential per-epoch decay (paper §4.2, spec §9.3)."""

    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.99
    grad_clip: float | None = None  # global-norm clipping (FasterSeg clips at 5 in the search)


@dataclass
class LossConfig:
    """Weights of the terms of Eq. 7-10. ``fa_weight`` is the c of Eq. 10 (0 allowed)."""

    ohem: bool = True
    ohem_thresh: float = 0.7
    ohem_min_kept: int | None = None  # None: batch*H*W // 16 of the label (FasterSeg)
    aux_weight: float = 0.2  # the lambda of Eq. 2/8/9/10
    kd_weight: float = 1.0  # the KL term (lambda2 of Eq. 7 in the search)
    kd_reduction: str = "elementwise_mean"
    kd_temperature: float = 1.0
    fa_weight: float = 1.0
    fa_lambda: float = 0.8  # the lambda of Eq. 6
    fa_q: int = 1  # the norm of Eq. 5: 1 as in the paper; 2 = squared FA loss (exact Gram path)
    fa_convnorm: bool = False  # §4.3 ablation: 1x1 conv + BN on both sides before the affinity
    ocr_aux_weight: float = 0.4  # HRNet-OCR's soft-object-region loss weight (official 0.4)


@dataclass
class ModelConfig:
    """The trained network. ``init``: checkpoint to start from (baseline student; None = scratch)."""

    name: str = "student"
    arch: str | None = None  # arch JSON path; None = the official FasterSeg student
    head: str = "bilinear"
    num_classes: int = 19
    quarter_depth: int = 2
    # the tutor's 1/4 path (fasterkd.models.tutor.TutorConfig; defaults = its defaults). Tutor
    # checkpoints saved before these fields existed load as the earlier design: (128, 128), 1x1.
    quarter_widths: tuple[int, ...] | None = None
    refine_kernel: int = 3
    head_resolution: str = "1/4"
    init: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.quarter_widths, list):  # from JSON
            self.quarter_widths = tuple(self.quarter_widths)


@dataclass
class GuideConfig:
    """Frozen networks that guide training: the HRNet teacher and the tutor (Eq. 8-10)."""

    teacher: str | None = None  # checkpoint: a fasterkd `teacher` run or an official HRNet file
    teacher_model: str = DEFAULT_TEACHER
    tutor: str | None = None  # checkpoint of a `tutor` run


@dataclass
class SearchConfig:
    """Teacher-guided search, Eq. 7 (spec §5.3, §6). ``epochs`` of TrainConfig = search epochs."""

    pretrain_epochs: int = 1
    supernet: dict[str, Any] = field(default_factory=dict)  # SupernetConfig fields
    arch_lr: float = 3e-4
    arch_betas: tuple[float, float] = (0.5, 0.999)
    latency_weight: float = 0.01  # lambda1 (initial; adapted to the FPS range each epoch)
    latency_table: str = "official"  # "official" or a JSON written by `fasterkd latency-table`
    latency_input: tuple[int, int] = (1024, 2048)
    fps_min: float | None = 155.0  # None: relative to the first derivation (tiny spaces on a CPU)
    fps_max: float | None = 175.0
    target_ms: float = 8.3
    lasts: tuple[tuple[int, ...], ...] = ((2, 0), (2, 1))
    split_fraction: float = 0.5
    # None: optim.lr (the paper's 0.01 for the whole search); FasterSeg's code pretrains at 0.02
    pretrain_lr: float | None = None
    crop: tuple[int, int] | None = None  # the crop of the search epochs; None: data.crop (the pretrain's)

    def __post_init__(self) -> None:
        if isinstance(self.crop, list):  # from JSON
            self.crop = tuple(self.crop)


@dataclass
class TrainConfig:
    """Everything one run needs; saved as ``config.json`` and inside every checkpoint."""

    stage: str = "baseline"
    profile: str = "quick"
    out_dir: str = "runs/baseline"
    device: str = "auto"
    seed: int = 12345
    epochs: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    guide: GuideConfig = field(default_factory=GuideConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    amp: str = "auto"  # auto (bf16 on CUDA when supported) | bf16 | fp16 | off
    channels_last: bool = True  # on CUDA only (on CPU: no clear gain, benchmarks/train_step.py)
    compile: bool = False
    eval_every: int = 1  # validate every N epochs (0: only the final evaluation)
    final_eval: bool = True
    progress: bool | None = None  # None: a tqdm bar when stderr is a terminal
    tensorboard: bool = True
    ddp_sync_check: bool = False  # record the max weight difference between ranks each epoch
    max_steps_per_epoch: int | None = None
    # What an epoch is. None: one pass over the training split (len // batch_size steps), cut to
    # max_steps_per_epoch. An int: that many optimiser steps, the loader cycling through reshuffled
    # passes (order from seed, epoch and pass), FasterSeg's fixed-length epoch (niters_per_epoch);
    # max_steps_per_epoch still caps it (steps = min of the two: a cap for short test runs).
    # "fasterseg" (search only): max(len(train split) // 2 // batch_size, 400), FasterSeg's search
    # epoch. The learning-rate decay steps once per epoch either way.
    iters_per_epoch: int | str | None = None

    def to_dict(self) -> dict[str, Any]:
        return jsonable(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        return _from_dict(cls, d, "config")

    def validate(self) -> "TrainConfig":
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.profile not in PROFILES:
            raise ValueError(f"profile must be one of {PROFILES}, got {self.profile!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.amp not in ("auto", "bf16", "fp16", "off"):
            raise ValueError(f"amp must be auto, bf16, fp16 or off, got {self.amp!r}")
        if self.model.head not in ("bilinear", "pixel_shuffle"):
            raise ValueError(f"head must be 'bilinear' or 'pixel_shuffle', got {self.model.head!r}")
        if self.loss.fa_weight < 0:
            raise ValueError(f"fa_weight (c of Eq. 10) must be >= 0, got {self.loss.fa_weight}")
        if self.loss.fa_q not in (1, 2):
            raise ValueError(f"fa_q (the norm of Eq. 5) must be 1 or 2, got {self.loss.fa_q!r}")
        if self.model.quarter_depth < 1:
            raise ValueError(f"quarter_depth must be >= 1, got {self.model.quarter_depth}")
        self.data.crop = parse_size(self.data.crop, "crop")
        if self.search.crop is not None:
            self.search.crop = parse_size(self.search.crop, "search.crop")
        check_epoch_fields(self)
        self.data.synthetic_size = parse_size(self.data.synthetic_size, "synthetic_size")
        for name in ("init", "arch"):
            p = getattr(self.model, name)
            if p is not None and not Path(p).is_file():
                raise FileNotFoundError(f"{name}={p!r}: file not found")
        for name in ("teacher", "tutor"):
            p = getattr(self.guide, name)
            if p is not None and not Path(p).is_file():
                raise FileNotFoundError(f"{name}={p!r}: checkpoint not found")
        if self.data.root and not Path(self.data.root).is_dir():
            raise FileNotFoundError(f"data_root={self.data.root!r}: no such directory")
        return self


ITERS_PER_EPOCH_RULES = ("fasterseg",)


def check_epoch_fields(cfg: "TrainConfig") -> None:
    """iters_per_epoch, downsample and batch_size: clear errors naming the field (the tutor's fields
    are checked by TutorConfig.validate when the network is built)."""
    ipe = cfg.iters_per_epoch
    if isinstance(ipe, str):
        if ipe not in ITERS_PER_EPOCH_RULES:
            raise ValueError(f"iters_per_epoch must be None, a positive int or one of {ITERS_PER_EPOCH_RULES}, "
                             f"got {ipe!r}")
        if cfg.stage != "search":
            raise ValueError(f"iters_per_epoch={ipe!r} (FasterSeg's search epoch) applies to the search stage "
                             f"only; stage {cfg.stage!r} takes None or a positive int (FasterSeg trains 1000)")
    elif ipe is not None and (isinstance(ipe, bool) or not isinstance(ipe, int) or ipe < 1):
        raise ValueError(f"iters_per_epoch must be None, a positive int or one of {ITERS_PER_EPOCH_RULES}, got {ipe!r}")
    if isinstance(cfg.data.downsample, bool) or not isinstance(cfg.data.downsample, int) or cfg.data.downsample < 1:
        raise ValueError(f"data.downsample must be an int >= 1 (1: full-size frames), got {cfg.data.downsample!r}")
    if isinstance(cfg.data.batch_size, bool) or not isinstance(cfg.data.batch_size, int) or cfg.data.batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (the global batch), got {cfg.data.batch_size!r}")
    if isinstance(cfg.model.quarter_widths, list):
        cfg.model.quarter_widths = tuple(cfg.model.quarter_widths)


_SUBCONFIGS = {"data": DataConfig, "optim": OptimConfig, "loss": LossConfig, "model": ModelConfig,
               "guide": GuideConfig, "search": SearchConfig}


def _from_dict(cls: type, d: dict[str, Any], where: str) -> Any:
    """Rebuild a (nested) config dataclass from a dict; unknown keys are an error naming them."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be a mapping, got {type(d).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys are {sorted(known)}")
    kwargs = {}
    for name, value in d.items():
        default = getattr(cls(), name) if name not in ("data",) else None
        sub = _SUBCONFIGS.get(name) if cls is TrainConfig else None
        if sub is not None:
            kwargs[name] = _from_dict(sub, value, f"{where}.{name}")
        elif isinstance(default, tuple) and isinstance(value, list):
            kwargs[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------
# Overrides: the keyword names of preset() (the notebooks use exactly these) -> dotted paths
# --------------------------------------------------------------------------------------------

OVERRIDES: dict[str, str] = {
    "data_root": "data.root",
    "out_dir": "out_dir",
    "device": "device",
    "seed": "seed",
    "epochs": "epochs",
    "teacher": "guide.teacher",
    "teacher_model": "guide.teacher_model",
    "tutor": "guide.tutor",
    "init": "model.init",
    "arch": "model.arch",
    "head": "model.head",
    "fa_weight": "loss.fa_weight",
    "fa_convnorm": "loss.fa_convnorm",
    "fa_q": "loss.fa_q",
    "quarter_depth": "model.quarter_depth",
    # a few more everyday knobs
    "batch_size": "data.batch_size",
    "crop": "data.crop",
    "lr": "optim.lr",
    "kd_weight": "loss.kd_weight",
    "amp": "amp",
    "compile": "compile",
    "num_workers": "data.num_workers",
    "progress": "progress",
    "pretrain_epochs": "search.pretrain_epochs",
    "latency_table": "search.latency_table",
    "latency_weight": "search.latency_weight",
    "max_steps_per_epoch": "max_steps_per_epoch",
    "iters_per_epoch": "iters_per_epoch",
    "downsample": "data.downsample",
    "pretrain_lr": "search.pretrain_lr",
    "quarter_widths": "model.quarter_widths",
    "refine_kernel": "model.refine_kernel",
    "head_resolution": "model.head_resolution",
    "eval_every": "eval_every",
}


def _section(cfg: TrainConfig, path: str) -> tuple[Any, str]:
    """The dataclass that holds the field ``path`` names, and the field's name."""
    obj: Any = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise ValueError(f"unknown config section {p!r} in {path!r}")
        obj = getattr(obj, p)
    if not any(f.name == parts[-1] for f in fields(obj)):
        raise ValueError(f"unknown config field {path!r}; fields of that section: {[f.name for f in fields(obj)]}")
    return obj, parts[-1]


@functools.lru_cache(maxsize=None)
def _types_of(cls: type) -> dict[str, Any]:
    return field_types(cls)


def _set_path(cfg: TrainConfig, path: str, value: Any) -> None:
    """Set the field ``path`` to ``value`` parsed/checked against the field's type (a string from
    ``--set`` is parsed; a wrong type is a ``ValueError`` naming ``path`` and the expected type)."""
    obj, name = _section(cfg, path)
    value = coerce_override(path, value, _types_of(type(obj))[name])
    current = getattr(obj, name)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if path.endswith(("init", "arch", "teacher", "tutor")) and value is not None:
        value = str(value)
    setattr(obj, name, value)


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """Apply ``preset`` keyword overrides (names of :data:`OVERRIDES`, or dotted paths like
    ``"optim.lr"``). An unknown name raises ``ValueError`` listing the valid ones."""
    for name, value in overrides.items():
        if name in OVERRIDES:
            _set_path(cfg, OVERRIDES[name], value)
        elif "." in name or (name in {f.name for f in fields(TrainConfig)} and name not in _SUBCONFIGS):
            _set_path(cfg, name, value)  # a dotted path or a top-level field (e.g. ddp_sync_check)
        else:
            raise ValueError(f"unknown override {name!r}; valid names are {sorted(OVERRIDES)} "
                             "or a config path such as 'optim.lr' or 'ddp_sync_check'")
    return cfg


# --------------------------------------------------------------------------------------------
# Presets: profile defaults, then the stage's recipe ("*": every profile, then the profile's own)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SameAs:
    """A preset value copied from another field of the same preset (e.g. the profile's crop)."""

    path: str


PROFILE_DEFAULTS: dict[str, dict[str, Any]] = {
    # seconds on CPU: tiny images, one or two steps per epoch
    "smoke": {"epochs": 1, "eval_every": 1, "data.crop": (64, 64), "data.scales": (1.0,), "data.batch_size": 2,
              "data.synthetic_size": (64, 128), "data.synthetic_train": 4, "data.synthetic_val": 2,
              "optim.lr": 0.01, "optim.weight_decay": 5e-4, "optim.lr_decay": 0.99, "tensorboard": False},
    # a 2-core CPU on the synthetic scenes: 128x256 crops of 256x512 images, full-size eval
    "quick": {"epochs": 4, "eval_every": 2, "data.crop": (128, 256), "data.scales": (0.75, 1.0, 1.25),
              "data.batch_size": 4, "data.synthetic_size": (256, 512), "data.synthetic_train": 48,
              "data.synthetic_val": 12, "optim.lr": 0.02, "optim.weight_decay": 5e-4, "optim.lr_decay": 0.95},
    # paper §4.2 (low-resolution setting: crops 256x512 of the full 1024x2048 frames)
    "paper": {"epochs": 500, "eval_every": 10, "data.crop": (256, 512), "data.scales": (0.75, 1.0, 1.25),
              "data.batch_size": 10, "data.num_workers": 6, "data.synthetic_size": (1024, 2048),
              "data.synthetic_train": 100, "data.synthetic_val": 20, "optim.lr": 0.012,
              "optim.weight_decay": 1e-3, "optim.lr_decay": 0.99,
              # FasterSeg's training epoch (train/config_train.py: niters_per_epoch = 1000)
              "iters_per_epoch": 1000},
}

# The search on a CPU: a tiny space (4 layers, fch 4, three widths) and a latency table measured on
# this device for the training crop; no absolute FPS target. Lasts [2, 1] only: Eq. 6 needs the
# student's 1/16 path, which a [2, 0] student lacks, and the measured CPU latencies of the two
# candidates differ by timing noise.
_TINY_SEARCH: dict[str, Any] = {
    "search.pretrain_epochs": 1,
    "search.supernet": {"layers": 4, "fch": 4, "width_mult_list": [0.5, 0.75, 1.0],
                        "stem_head_widths": [[0.75, 0.75]]},  # JSON form
    "search.latency_weight": 0.01, "search.latency_table": "measure", "search.latency_input": SameAs("data.crop"),
    "search.fps_min": None, "search.fps_max": None, "search.lasts": ((2, 1),),
    "optim.lr": 0.02, "optim.weight_decay": 5e-4, "optim.lr_decay": 0.978, "optim.grad_clip": 5.0,
}

STAGE_RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    # HRNet's official Cityscapes recipe (lr 0.01, wd 5e-4, poly ~ exp decay, OHEM) at paper scale;
    # a small HRNet on the synthetic data otherwise
    "teacher": {
        "*": {"model.name": DEFAULT_TEACHER},
        # HRNet counts an epoch as one pass (484 x 2975 // 12 ~ 120k iterations): iters_per_epoch None
        "paper": {"model.name": "hrnet-w48", "optim.lr": 0.01, "optim.weight_decay": 5e-4, "optim.lr_decay": 0.99,
                  "epochs": 484, "data.batch_size": 12, "data.crop": (512, 1024), "iters_per_epoch": None},
        # 15 epochs left the small HRNet below the student (11.9 vs 15.6 % mIoU), 30 barely above it
        # (18.6 vs ~15); a teacher that teaches: 96 scenes (the students keep the first 48 of the same
        # cache) and 48 epochs reached 23.8 % against a mean baseline of 14.8 (6 seeds, 1 thread); 60
        # epochs reached 24.6 %, at 80 s more of the 20-minute book
        "quick": {"epochs": 48, "data.synthetic_train": 96, "optim.lr_decay": 0.96, "eval_every": 8},
    },
    "search": {
        # lambda2 of Eq. 7; supernet logits stay at 1/8 in training (spec §4.4)
        "*": {"model.name": "supernet", "loss.kd_weight": 1.0, "optim.grad_clip": 5.0, "data.label_downsample": 8},
        # paper §4.2 where it speaks (batch 6, lr 0.01 for pretrain and search); FasterSeg's
        # search/config_search.py where it is silent: frames downsampled x2, crops 256x512 (pretrain)
        # and 224x448 (search), an epoch of max(train // 2 // batch, 400) iterations.
        # pretrain_lr=0.02 gives FasterSeg's code value for the pretrain epochs.
        "paper": {"epochs": 30, "data.batch_size": 6, "optim.lr": 0.01, "optim.weight_decay": 5e-4,
                  "optim.lr_decay": 0.978, "search.pretrain_epochs": 20, "search.latency_weight": 0.01,
                  "search.pretrain_lr": None, "data.downsample": 2, "data.crop": (256, 512),
                  "search.crop": (224, 448), "iters_per_epoch": "fasterseg"},
        "quick": {**_TINY_SEARCH, "epochs": 3, "search.pretrain_epochs": 2},
        "smoke": {**_TINY_SEARCH, "epochs": 1},
    },
    "baseline": {"*": {"model.name": "student", "model.head": "bilinear"}, "quick": {"epochs": 10}},
    # quick: the head is fine-tuned from the baseline as long as the students are (6 epochs)
    "head": {"*": {"model.name": "student", "model.head": "pixel_shuffle"}, "quick": {"epochs": 6}},
    "tutor": {
        "*": {"model.name": "tutor"},
        "paper": {"epochs": 350, "optim.lr": 0.0026},
        "quick": {"epochs": 6, "optim.lr": 0.01},
    },
    "student": {
        "*": {"model.name": "student", "loss.fa_weight": 1.0},
        "paper": {"epochs": 400, "optim.lr": 0.003},
        "quick": {"epochs": 6, "optim.lr": 0.01},
    },
}


# `study` (the embedded study's long profile): quick's data and student schedules, a 72-epoch
# teacher (25.7 % mIoU in exploration, still rising)
PROFILE_DEFAULTS["study"] = dict(PROFILE_DEFAULTS["quick"])
for _recipe in STAGE_RECIPES.values():
    if "quick" in _recipe:
        _recipe["study"] = dict(_recipe["quick"])
STAGE_RECIPES["teacher"]["study"]["epochs"] = 72


def preset(stage: str, profile: str = "quick", **overrides: Any) -> TrainConfig:
    """The configuration of ``stage`` under ``profile`` with keyword ``overrides``.

    Profiles: ``smoke`` (tests, seconds on CPU), ``quick`` (the book on the synthetic data on a
    2-core CPU), ``paper`` (§4.2: search 20 + 30 epochs, batch 6, lr 0.01, wd 5e-4, lambda1 1e-2,
    lambda2 1; baseline 500 epochs, batch 10, lr 0.012, decay 0.99, wd 1e-3; tutor 350 epochs,
    lr 0.0026; student 400 epochs, lr 0.003, c = 1; FasterSeg's SGD momentum 0.9, augmentation
    and OHEM where the paper is silent; FasterSeg's epochs of 1000 iterations for the training
    stages and max(train // 2 // batch, 400) for the search, whose frames are downsampled x2 and
    cropped 256x512 (pretrain) / 224x448 (search)). ``batch_size`` is the global batch at every
    world size. Override names: :data:`OVERRIDES`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    cfg = TrainConfig(stage=stage, profile=profile, out_dir=str(Path("runs") / f"{profile}-{stage}"))
    recipe = STAGE_RECIPES[stage]
    for table in (PROFILE_DEFAULTS[profile], recipe.get("*", {}), recipe.get(profile, {})):
        for path, value in table.items():
            if isinstance(value, SameAs):
                obj, name = _section(cfg, value.path)
                value = getattr(obj, name)
            _set_path(cfg, path, copy.deepcopy(value))  # a copy: no two configs share a table's dict
    return apply_overrides(cfg, overrides)


def load_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON file of preset override names or dotted paths (the CLI's ``--config``), read
    safely by :func:`fasterkd.overrides.read_config_file`; values are type-checked when applied."""
    return read_config_file(path)


def layered_config(stage: str, profile: str | None, config_file: Path | None, flags: dict[str, Any]) -> TrainConfig:
    """Profile preset <- config file (preset override names or dotted paths) <- ``flags``."""
    file_opts = load_config_file(config_file) if config_file else {}
    profile = profile or file_opts.pop("profile", None) or "quick"
    file_opts.pop("profile", None)
    file_opts.pop("stage", None)
    return preset(stage, profile, **{**file_opts, **flags})
