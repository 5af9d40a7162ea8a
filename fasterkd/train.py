"""The training engine: one trainer for every stage of the paper, presets, checkpoints, DDP, CLI.

Stages (paper §3.3 and §4.2; FasterSeg spec §6 and §9 where the paper is silent):

- ``teacher``:  an HRNet (or HRNet-OCR) trained with CE (OCR: 0.4 * aux + 1.0 * main);
- ``search``:   the teacher-guided architecture search, Eq. 7 (:mod:`fasterkd.search`);
- ``baseline``: the derived student distilled from HRNet, Eq. 8;
- ``tutor``:    the student plus a 1/4 path, initialised from the baseline, distilled from HRNet, Eq. 9;
- ``student``:  the student with a virtual 1/4 path: c * path-wise FA (Eq. 6) with the frozen tutor
  + multi-path CE + KL(tutor pred4, student pred8), Eq. 10;
- ``head``:     the baseline objective with the pixel-shuffle prediction module (paper §5, Table 3).
  Any stage takes ``head="pixel_shuffle"``; ``preset("student", head="pixel_shuffle")`` is the
  combination of both ideas (the paper's future work).

The notebooks use exactly three names::

    cfg = preset("baseline", profile="quick", teacher="runs/teacher/best.pt", out_dir="runs/baseline")
    result = run_stage(cfg)            # StageResult(out_dir, last, best, metrics, eval[, arch])
    model, cfg = load_checkpoint(result.best)

Every stage runs under ``torchrun --nproc_per_node N`` (DistributedDataParallel; rank 0 writes).
Output folder: ``last.pt``, ``best.pt``, ``metrics.csv``, ``metrics.json``, ``eval.json``,
``config.json``, TensorBoard events (when ``tensorboard`` is importable); the search adds
``arch.json``, ``arch_epoch{e}.json`` and ``history.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import fasterkd
from fasterkd.utils import atomic_path, atomic_torch_save, atomic_write_json, parse_size, pick_device, seed_everything

STAGES = ("teacher", "search", "baseline", "tutor", "student", "head")
PROFILES = ("smoke", "quick", "paper")
CHECKPOINT_FORMAT = "fasterkd-checkpoint-v1"
DEFAULT_TEACHER = "hrnet-w18-small-v1"

# --------------------------------------------------------------------------------------------
# Configuration: small dataclasses, one TrainConfig per run
# --------------------------------------------------------------------------------------------


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
    init: str | None = None


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
    pretrain_lr: float | None = None  # FasterSeg pretrains at 0.02, searches at 0.01


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
    channels_last: bool = True  # on CUDA only
    compile: bool = False
    eval_every: int = 1  # validate every N epochs (0: only the final evaluation)
    final_eval: bool = True
    progress: bool | None = None  # None: a tqdm bar when stderr is a terminal
    tensorboard: bool = True
    ddp_sync_check: bool = False  # record the max weight difference between ranks each epoch
    max_steps_per_epoch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

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
        if self.model.quarter_depth < 1:
            raise ValueError(f"quarter_depth must be >= 1, got {self.model.quarter_depth}")
        self.data.crop = parse_size(self.data.crop, "crop")
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


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def strict_json(obj: Any) -> Any:
    """``obj`` with NaN/inf floats as ``None`` (null), so the file is valid strict JSON (empty classes)."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


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


_SUBCONFIGS = {"data": DataConfig, "optim": OptimConfig, "loss": LossConfig, "model": ModelConfig,
               "guide": GuideConfig, "search": SearchConfig}

# The keyword names of preset(); the notebooks use exactly these. Values: dotted config paths.
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
    "eval_every": "eval_every",
}


def _set_path(cfg: TrainConfig, path: str, value: Any) -> None:
    obj: Any = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        if not hasattr(obj, p) or not dataclasses.is_dataclass(getattr(obj, p)):
            raise ValueError(f"unknown config section {p!r} in {path!r}")
        obj = getattr(obj, p)
    if not any(f.name == parts[-1] for f in fields(obj)):
        raise ValueError(f"unknown config field {path!r}; fields of that section: {[f.name for f in fields(obj)]}")
    current = getattr(obj, parts[-1])
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if path.endswith(("init", "arch", "teacher", "tutor")) and value is not None:
        value = str(value)
    setattr(obj, parts[-1], value)


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


def _profile_base(stage: str, profile: str) -> TrainConfig:
    """Per-profile defaults shared by the stages."""
    if profile == "smoke":
        # seconds on CPU: tiny images, one or two steps per epoch
        return TrainConfig(
            stage=stage, profile=profile, epochs=1, eval_every=1,
            data=DataConfig(crop=(64, 64), scales=(1.0,), batch_size=2, synthetic_size=(64, 128),
                            synthetic_train=4, synthetic_val=2),
            optim=OptimConfig(lr=0.01, weight_decay=5e-4, lr_decay=0.99),
            loss=LossConfig(ohem=True),
            tensorboard=False,
        )
    if profile == "quick":
        # a 2-core CPU on the synthetic scenes: 128x256 crops of 256x512 images, full-size eval
        return TrainConfig(
            stage=stage, profile=profile, epochs=4, eval_every=2,
            data=DataConfig(crop=(128, 256), scales=(0.75, 1.0, 1.25), batch_size=4,
                            synthetic_size=(256, 512), synthetic_train=48, synthetic_val=12),
            optim=OptimConfig(lr=0.02, weight_decay=5e-4, lr_decay=0.95),
            loss=LossConfig(ohem=True),
        )
    # paper §4.2 (low-resolution setting: crops 256x512 of the full 1024x2048 frames)
    return TrainConfig(
        stage=stage, profile=profile, epochs=500, eval_every=10,
        data=DataConfig(crop=(256, 512), scales=(0.75, 1.0, 1.25), batch_size=10, num_workers=6,
                        synthetic_size=(1024, 2048), synthetic_train=100, synthetic_val=20),
        optim=OptimConfig(lr=0.012, weight_decay=1e-3, lr_decay=0.99),
        loss=LossConfig(ohem=True),
    )


def preset(stage: str, profile: str = "quick", **overrides: Any) -> TrainConfig:
    """The configuration of ``stage`` under ``profile`` with keyword ``overrides``.

    Profiles: ``smoke`` (tests, seconds on CPU), ``quick`` (the book on the synthetic data on a
    2-core CPU), ``paper`` (§4.2: search 20 + 30 epochs, batch 6, lr 0.01, wd 5e-4, lambda1 1e-2,
    lambda2 1; baseline 500 epochs, batch 10, lr 0.012, decay 0.99, wd 1e-3; tutor 350 epochs,
    lr 0.0026; student 400 epochs, lr 0.003, c = 1; FasterSeg's SGD momentum 0.9, augmentation
    and OHEM where the paper is silent). Override names: :data:`OVERRIDES`.
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    cfg = _profile_base(stage, profile)
    cfg.out_dir = str(Path("runs") / f"{profile}-{stage}")
    paper = profile == "paper"
    quick = profile == "quick"
    if stage == "teacher":
        # HRNet's official Cityscapes recipe (lr 0.01, wd 5e-4, poly ~ exp decay, OHEM) at paper
        # scale; a small HRNet on the synthetic data otherwise.
        cfg.model = ModelConfig(name="hrnet-w48" if paper else DEFAULT_TEACHER)
        cfg.optim = OptimConfig(lr=0.01, weight_decay=5e-4, lr_decay=0.99) if paper else cfg.optim
        if paper:
            cfg.epochs, cfg.data.batch_size, cfg.data.crop = 484, 12, (512, 1024)
        elif quick:
            cfg.epochs = 30  # 15 epochs left the small HRNet below the student (11.9 vs 15.6 % mIoU)
    elif stage == "search":
        cfg.model = ModelConfig(name="supernet")
        cfg.loss.kd_weight = 1.0  # lambda2 of Eq. 7
        cfg.optim.grad_clip = 5.0
        cfg.data.label_downsample = 8  # supernet logits stay at 1/8 in training (spec §4.4)
        if paper:
            cfg.epochs, cfg.data.batch_size = 30, 6
            cfg.optim = OptimConfig(lr=0.01, weight_decay=5e-4, lr_decay=0.978, grad_clip=5.0)
            cfg.search = SearchConfig(pretrain_epochs=20, latency_weight=0.01, pretrain_lr=0.02)
        else:
            # a tiny space (4 layers, fch 4, three widths) and a latency table measured on this
            # device for the training crop; no absolute FPS target on a CPU (see fasterkd.search)
            tiny = dict(layers=4, fch=4, width_mult_list=[0.5, 0.75, 1.0], stem_head_widths=[[0.75, 0.75]])  # JSON form
            # lasts [2, 1] only: Eq. 6 needs the student's 1/16 path, which a [2, 0] student lacks, and
            # the measured CPU latencies of the two candidates differ by timing noise
            cfg.search = SearchConfig(pretrain_epochs=1, supernet=tiny, latency_weight=0.01, latency_table="measure",
                                      latency_input=tuple(cfg.data.crop), fps_min=None, fps_max=None,
                                      lasts=((2, 1),))
            cfg.epochs = 1 if profile == "smoke" else 3
            cfg.optim = OptimConfig(lr=0.02, weight_decay=5e-4, lr_decay=0.978, grad_clip=5.0)
            if quick:
                cfg.search.pretrain_epochs = 2
    elif stage in ("baseline", "head"):
        cfg.model = ModelConfig(name="student", head="pixel_shuffle" if stage == "head" else "bilinear")
        if quick:
            cfg.epochs = 10
    elif stage == "tutor":
        cfg.model = ModelConfig(name="tutor")
        if paper:
            cfg.epochs, cfg.optim.lr = 350, 0.0026
        elif quick:
            cfg.epochs, cfg.optim.lr = 6, 0.01
    elif stage == "student":
        cfg.model = ModelConfig(name="student")
        cfg.loss.fa_weight = 1.0
        if paper:
            cfg.epochs, cfg.optim.lr = 400, 0.003
        elif quick:
            cfg.epochs, cfg.optim.lr = 6, 0.01
    return apply_overrides(cfg, overrides)


# --------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# --------------------------------------------------------------------------------------------


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_here: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on CPU); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    started = False
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        started = True
    return DistInfo(rank=rank, world=world, local_rank=local, started_here=started)


def _resolve_device(cfg: TrainConfig) -> torch.device:
    device = pick_device(cfg.device)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


def synthetic_root(data: DataConfig) -> Path:
    """Where the embedded synthetic data of this recipe lives (written once, then reused)."""
    cache = Path(os.environ.get("FASTERKD_CACHE", Path.home() / ".cache" / "fasterkd"))
    h, w = data.synthetic_size
    return cache / f"synthetic-{h}x{w}-seed{data.synthetic_seed}"


def resolve_data_root(data: DataConfig, info: DistInfo | None = None) -> Path:
    """``data.root``, or the synthetic set written (rank 0 first) when the root is empty."""
    if data.root:
        return Path(data.root)
    from fasterkd.data.synthetic import ensure_synthetic

    root = synthetic_root(data)
    splits = {data.train_split: data.synthetic_train, data.val_split: data.synthetic_val}
    info = info or DistInfo()
    if info.main:
        ensure_synthetic(root, splits=splits, size=tuple(data.synthetic_size), seed=data.synthetic_seed)
    _barrier(info)
    return root


class SeededTrainSet(torch.utils.data.Dataset):
    """A raw dataset whose augmentation draws from a generator seeded by (seed, epoch, index).

    The randomness of sample i in epoch e is a function of (seed, e, i) only, so a resumed run, a
    run with more workers and a DDP run see exactly the same crops and flips.
    """

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_033 + i) % (2**63))
        image, label = self.transform(item["image"], item["label"], g)
        return {"image": image, "label": label, "name": item["name"]}


def synthetic_subset(ds: torch.utils.data.Dataset, data: DataConfig, split: str) -> torch.utils.data.Dataset:
    """The first ``synthetic_train``/``synthetic_val`` scenes of the shared synthetic cache.

    One cache folder serves every recipe of a size and seed, and a recipe that asks for more scenes
    grows it; without this cut a run would see however many scenes earlier runs left there.
    """
    if data.root:
        return ds
    n = data.synthetic_train if split == data.train_split else data.synthetic_val
    return ds if len(ds) <= n else torch.utils.data.Subset(ds, range(n))


def build_train_set(cfg: TrainConfig, root: Path) -> SeededTrainSet:
    from fasterkd.data import build_dataset
    from fasterkd.data.transforms import TrainTransform

    base = synthetic_subset(build_dataset(root, cfg.data.train_split, transform=None), cfg.data, cfg.data.train_split)
    if cfg.data.max_train_images:
        base = torch.utils.data.Subset(base, range(min(len(base), cfg.data.max_train_images)))
    tf = TrainTransform(crop=tuple(cfg.data.crop), scales=tuple(cfg.data.scales), flip=cfg.data.flip,
                        label_downsample=cfg.data.label_downsample)
    return SeededTrainSet(base, tf, cfg.seed)


def build_val_loader(cfg: TrainConfig, root: Path) -> torch.utils.data.DataLoader:
    from fasterkd.data import build_dataset
    from fasterkd.data.transforms import EvalTransform

    ds = synthetic_subset(build_dataset(root, cfg.data.val_split, transform=EvalTransform()), cfg.data, cfg.data.val_split)
    if cfg.data.max_val_images:
        ds = torch.utils.data.Subset(ds, range(min(len(ds), cfg.data.max_val_images)))
    return torch.utils.data.DataLoader(ds, batch_size=cfg.data.eval_batch_size, shuffle=False,
                                       num_workers=cfg.data.num_workers)


def validation_items(source: "TrainConfig | str | os.PathLike", count: int, data_root: str = "") -> list[dict[str, Any]]:
    """The first ``count`` validation items (normalised image, label, name) of a run's data.

    ``source`` is a :class:`TrainConfig` or a checkpoint whose config names the data;
    ``data_root`` (e.g. a Cityscapes root) replaces the config's when given. For the chapters that
    look at a few images of a trained run (FA histograms, Fig. 3).
    """
    from fasterkd.data import build_dataset
    from fasterkd.data.transforms import EvalTransform

    if int(count) != count or count < 1:
        raise ValueError(f"count must be a positive integer, got {count!r}")
    cfg = source if isinstance(source, TrainConfig) else TrainConfig.from_dict(_read_checkpoint(source, "cpu")["config"])
    data = copy.deepcopy(cfg.data)
    if data_root:
        data.root = str(data_root)
    ds = build_dataset(resolve_data_root(data), data.val_split, transform=EvalTransform())
    ds = synthetic_subset(ds, data, data.val_split)
    if len(ds) == 0:
        raise ValueError(f"the {data.val_split!r} split of {data.root or 'the synthetic data'} holds no images")
    return [ds[i] for i in range(min(int(count), len(ds)))]


def epoch_loader(ds: torch.utils.data.Dataset, cfg: TrainConfig, epoch: int, info: DistInfo,
                 batch_size: int | None = None, salt: int = 0) -> torch.utils.data.DataLoader:
    """The loader of one epoch: order from (seed, epoch) (DistributedSampler under DDP)."""
    if isinstance(ds, SeededTrainSet):
        ds.set_epoch(epoch)
    bs = batch_size or cfg.data.batch_size
    if len(ds) < bs * info.world:
        raise ValueError(f"the training set has {len(ds)} images, fewer than batch_size {bs} x {info.world} ranks")
    if info.enabled:
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=info.world, rank=info.rank, shuffle=True,
                                                      seed=cfg.seed + salt, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch + salt * 104729)
        sampler = torch.utils.data.RandomSampler(ds, generator=g)
    return torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, drop_last=True,
                                       num_workers=cfg.data.num_workers, persistent_workers=False)


# --------------------------------------------------------------------------------------------
# Models: building, initialising, checkpoints
# --------------------------------------------------------------------------------------------


def _arch_spec(cfg: TrainConfig, arch_dict: dict | None = None):
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
        from fasterkd.search import supernet_kwargs  # the search's one-arch student space

        return build_model("supernet", num_classes=m.num_classes, **supernet_kwargs(cfg))
    kw = {"quarter_depth": m.quarter_depth} if m.name == "tutor" else {}
    return build_model(m.name, arch=_arch_spec(cfg, arch_dict), head=m.head, num_classes=m.num_classes, **kw)


def model_identity(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this model: name, arch, head, shapes."""
    ident: dict[str, Any] = {"name": cfg.model.name, "head": cfg.model.head, "num_classes": cfg.model.num_classes}
    arch = getattr(getattr(model, "config", None), "arch", None)
    if arch is not None and hasattr(arch, "to_dict"):
        ident["arch"] = arch.to_dict()
    if cfg.model.name == "tutor":
        ident["quarter_depth"] = cfg.model.quarter_depth
    if cfg.model.name == "supernet":
        ident["supernet"] = _jsonable(dict(cfg.search.supernet))
    return ident


def _read_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} not found")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling failure with the file name
        raise ValueError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a fasterkd checkpoint (no format {CHECKPOINT_FORMAT!r})")
    return ckpt


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[nn.Module, TrainConfig]:
    """Rebuild the model of a fasterkd checkpoint from its saved config; returns ``(model, cfg)``.

    The model is in eval mode on ``device``. Loading uses ``torch.load(weights_only=True)``.
    """
    ckpt = _read_checkpoint(path, "cpu")
    cfg = TrainConfig.from_dict(ckpt["config"])
    model = build_network(cfg, ckpt["identity"].get("arch"))
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not fit the model its config describes: {e}") from e
    return model.to(pick_device(device)).eval(), cfg


def _check_identity(saved: dict[str, Any], current: dict[str, Any], path: str, what: str) -> None:
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs {what} {current.get(k)!r}"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        short = [d if len(d) < 300 else d[:300] + "..." for d in diffs]
        raise ValueError(f"{path} holds another model than this {what}: " + "; ".join(short))


def load_teacher(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The frozen HRNet teacher: a fasterkd ``teacher`` checkpoint or an official HRNet file."""
    from fasterkd.models import HRNET_NAMES, build_model
    from fasterkd.models.hrnet import load_hrnet_checkpoint

    path = cfg.guide.teacher
    ckpt = None
    with contextlib.suppress(ValueError):
        ckpt = _read_checkpoint(path)
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
    model, tcfg = load_checkpoint(cfg.guide.tutor)
    if tcfg.model.name != "tutor":
        raise ValueError(f"tutor={cfg.guide.tutor!r} is a {tcfg.model.name!r} checkpoint; expected a tutor run")
    return freeze(model.to(device))


def freeze(model: nn.Module) -> nn.Module:
    """Teachers and tutors: eval mode (BN statistics fixed), no gradients."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def initialise_from(model: nn.Module, cfg: TrainConfig) -> list[str]:
    """Start ``model`` from ``cfg.model.init`` (the baseline student, paper §4.2).

    Same network: every weight must fit (else ``ValueError``). A tutor takes the student's shared
    weights (its 1/4 path starts fresh). Another head (pixel shuffle from a bilinear baseline):
    all weights but the prediction module's. Returns the names left at their initialisation.
    """
    path = cfg.model.init
    ckpt = _read_checkpoint(path)
    src_cfg = TrainConfig.from_dict(ckpt["config"])
    if src_cfg.model.name not in ("student", "tutor"):
        raise ValueError(f"init={path!r} is a {src_cfg.model.name!r} checkpoint; expected a student run")
    state = ckpt["model"]
    ours = model.state_dict()
    src_arch = ckpt["identity"].get("arch")
    cur_arch = getattr(model.config, "arch").to_dict()
    if src_arch != cur_arch:
        raise ValueError(f"init={path!r} was trained with another architecture than arch={cfg.model.arch!r}")
    mismatched = [k for k, v in state.items() if k in ours and ours[k].shape != v.shape]
    loadable = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    same_head = src_cfg.model.head == cfg.model.head
    unexpected = [k for k in state if k not in ours]
    if same_head and (mismatched or unexpected) and cfg.model.name == src_cfg.model.name:
        raise ValueError(f"init={path!r} does not fit: mismatched {mismatched[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(loadable, strict=False)
    return sorted(k for k in ours if k not in loadable)


# --------------------------------------------------------------------------------------------
# Objectives (Eq. 8-10); each returns (total, {term: value})
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the terms and the checkpoint."""


def _seg(cfg: TrainConfig, main: Tensor, p16: Tensor | None, p32: Tensor | None, label: Tensor) -> Tensor:
    from fasterkd.losses import multipath_ce

    lc = cfg.loss
    return multipath_ce(main, p16, p32, label, aux_weight=lc.aux_weight, ohem=lc.ohem, ohem_thresh=lc.ohem_thresh,
                        min_kept=lc.ohem_min_kept)


def _kl(cfg: TrainConfig, student: Tensor, teacher: Tensor, label: Tensor) -> Tensor:
    from fasterkd.losses import kl_distill

    return kl_distill(student.float(), teacher.float(), temperature=cfg.loss.kd_temperature,
                      reduction=cfg.loss.kd_reduction, target=label)


class Objective(nn.Module):
    """The loss of a stage; holds the frozen guides and any trainable loss layers (ConvNorm)."""

    def __init__(self, cfg: TrainConfig, teacher: nn.Module | None = None, tutor: nn.Module | None = None,
                 convnorm: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # guides are kept out of the module tree: they are never saved, trained or put in train mode
        self._guides = {"teacher": teacher, "tutor": tutor}
        self.convnorm = convnorm

    def forward(self, model: nn.Module, image: Tensor, label: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, stage = self.cfg, self.cfg.stage
        out = model(image)
        terms: dict[str, Tensor] = {}
        teacher, tutor = self._guides["teacher"], self._guides["tutor"]
        if stage == "teacher":
            from fasterkd.losses import cross_entropy, ohem_cross_entropy

            ce = (lambda x: ohem_cross_entropy(x, label, cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept)) \
                if cfg.loss.ohem else (lambda x: cross_entropy(x, label))
            terms["ce"] = ce(out.pred4)
            if out.aux is not None:
                terms["ocr_aux"] = cfg.loss.ocr_aux_weight * ce(out.aux)
        elif stage in ("baseline", "head", "tutor") or (stage == "student" and tutor is None):
            main = out.pred4 if cfg.model.name == "tutor" else out.pred8
            terms["ce"] = _seg(cfg, main, out.pred16, out.pred32, label)  # Eq. 8 / Eq. 9 CE terms
            if teacher is not None and cfg.loss.kd_weight > 0:
                with torch.no_grad():
                    t = teacher(image).main
                terms["kl"] = cfg.loss.kd_weight * _kl(cfg, main, t, label)
        elif stage == "student":
            from fasterkd.losses import path_fa_loss

            terms["ce"] = _seg(cfg, out.pred8, out.pred16, out.pred32, label)
            with torch.no_grad():
                t_out = tutor(image)
            if cfg.loss.kd_weight > 0:
                terms["kl"] = cfg.loss.kd_weight * _kl(cfg, out.pred8, t_out.pred4, label)
            if cfg.loss.fa_weight > 0:
                s_feats = {k: v.float() for k, v in out.features.items()}
                t_feats = {k: v.float() for k, v in t_out.features.items()}
                terms["fa"] = cfg.loss.fa_weight * path_fa_loss(s_feats, t_feats, lam=cfg.loss.fa_lambda,
                                                                convnorm=self.convnorm)
        else:
            raise ValueError(f"stage {stage!r} has no training objective here (the search runs in fasterkd.search)")
        total = sum(terms.values())
        return total, terms


def build_convnorm(model: nn.Module, tutor: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The §4.3 ConvNorm layers, sized from one small eval-mode forward of both networks."""
    from fasterkd.losses import PATH_PAIRS, PathConvNorm

    x = torch.zeros(1, 3, 64, 64, device=device)
    was = model.training
    model.eval()
    with torch.no_grad():
        s = model(x).features
        t = tutor(x).features
    model.train(was)
    s_ch = {sk: s[sk].shape[1] for sk, _ in PATH_PAIRS}
    t_ch = {tk: t[tk].shape[1] for _, tk in PATH_PAIRS}
    return PathConvNorm(s_ch, t_ch).to(device)


# --------------------------------------------------------------------------------------------
# Checkpoint state
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
_RESUMABLE_DIFFS = {"out_dir", "device", "epochs", "progress", "tensorboard", "eval_every", "final_eval",
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
    a, b = _flat(saved), _flat(cfg.to_dict())
    diffs = [f"{k} (checkpoint {a.get(k)!r}, now {b.get(k)!r})" for k in sorted(set(a) | set(b))
             if k not in _RESUMABLE_DIFFS and a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {path}: it was written by another configuration: " + "; ".join(diffs))


# --------------------------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------------------------


class MetricsLog:
    """Per-epoch rows to metrics.csv / metrics.json (atomically) and TensorBoard (optional)."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool, rows: list[dict[str, Any]] | None = None):
        self.out_dir, self.enabled = out_dir, enabled
        self.rows: list[dict[str, Any]] = list(rows or [])
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                SummaryWriter = None
            if SummaryWriter is not None:
                self.writer = SummaryWriter(log_dir=str(out_dir / "tb"))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        epoch = row["epoch"]
        for k, v in row.items():
            if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                self.scalar(f"epoch/{k}", v, epoch)
        atomic_write_json(self.out_dir / "metrics.json", self.rows)
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        with atomic_path(self.out_dir / "metrics.csv") as tmp:
            tmp.write_text(buf.getvalue())

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def _progress(total: int, desc: str, enabled: bool | None, main: bool):
    show = (sys.stderr.isatty() if enabled is None else enabled) and main
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class StageResult:
    """What ``run_stage`` returns: paths of the run's files, the metrics and the final evaluation."""

    out_dir: Path
    last: Path
    best: Path
    metrics: list[dict[str, Any]]
    eval: dict[str, Any]
    arch: Path | None = None


def autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def ddp_max_weight_diff(model: nn.Module, info: DistInfo) -> float:
    """Largest |w_rank - w_rank0| over all parameters (0.0 when the replicas agree).

    BN running statistics are left out: each rank updates them from its own batch and DDP
    broadcasts rank 0's (the ones rank 0 saves) at the start of the next forward.
    """
    if not info.enabled:
        return 0.0
    flat = torch.cat([t.detach().float().flatten().cpu() for t in _unwrap(model).parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = torch.tensor([(flat - ref).abs().max().item()])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff.item())


def run_evaluation(model: nn.Module, loader, device: torch.device) -> dict[str, Any]:
    """:func:`fasterkd.evaluate.evaluate` of the unwrapped model (it restores the training flag and
    returns plain Python numbers)."""
    from fasterkd.evaluate import evaluate

    return evaluate(_unwrap(model), loader, device)


def run_stage(cfg: TrainConfig, resume: bool | str | os.PathLike = False) -> StageResult:
    """Train one stage end to end (see the module docstring); returns a :class:`StageResult`.

    ``resume=True`` continues from ``out_dir/last.pt`` (a path: from that checkpoint); the next
    epochs are bit-identical on CPU to a run that never stopped.
    """
    cfg = copy.deepcopy(cfg).validate()
    if cfg.stage == "search":
        from fasterkd.search import run_search

        return run_search(cfg, resume=resume)
    return Trainer(cfg).fit(resume)


class Trainer:
    """One training run of a stage (teacher, baseline, tutor, student, head)."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.device = _resolve_device(cfg)
        self.info = init_distributed(self.device)
        self.out = Path(cfg.out_dir)
        self._check_stage_inputs()

    def _check_stage_inputs(self) -> None:
        cfg, st = self.cfg, self.cfg.stage
        from fasterkd.models import HRNET_NAMES

        if st == "teacher" and cfg.model.name not in HRNET_NAMES:
            raise ValueError(f"the teacher stage trains an HRNet ({HRNET_NAMES}), got model {cfg.model.name!r}")
        if st in ("baseline", "tutor", "head", "student") and cfg.model.name not in ("student", "tutor"):
            raise ValueError(f"stage {st!r} trains a student or tutor, got model {cfg.model.name!r}")
        if st in ("baseline", "tutor", "head") and cfg.guide.teacher is None and cfg.loss.kd_weight > 0:
            raise ValueError(f"stage {st!r} distils from HRNet: give teacher=<checkpoint> (a teacher run or an "
                             "official HRNet file), or kd_weight=0 to train without it")
        if st == "student" and cfg.guide.tutor is None:
            raise ValueError("stage 'student' distils from the tutor (Eq. 10): give tutor=<checkpoint of a tutor run>")
        if st == "student" and cfg.loss.fa_weight > 0:
            lasts = sorted(_arch_spec(cfg).lasts)
            if lasts != [1, 2]:
                raise ValueError(f"arch={cfg.model.arch or 'official'!r} has branches ending at {lasts} (0: 1/8, "
                                 "1: 1/16, 2: 1/32); the FA loss (Eq. 6) needs a student with a 1/16 and a 1/32 "
                                 "branch, [2, 1]: search with search.lasts=[[2, 1]], or fa_weight=0")

    # -- set-up ------------------------------------------------------------------------------

    def _build(self) -> None:
        cfg, dev = self.cfg, self.device
        seed_everything(cfg.seed)  # the same initial weights on every rank, the same draws on every run
        model = build_network(cfg)
        self.init_fresh: list[str] = []
        if cfg.model.init is not None:
            self.init_fresh = initialise_from(model, cfg)
        self.identity = model_identity(model, cfg)
        model.to(dev)
        if dev.type == "cuda" and cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.info.enabled and dev.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = model
        teacher = load_teacher(cfg, dev) if cfg.guide.teacher is not None and cfg.stage != "teacher" else None
        tutor = load_tutor(cfg, dev) if cfg.stage == "student" else None
        convnorm = build_convnorm(model, tutor, cfg, dev) if tutor is not None and cfg.loss.fa_convnorm else None
        self.objective = Objective(cfg, teacher, tutor, convnorm).to(dev)
        params = list(model.parameters()) + list(self.objective.parameters())
        self.optimizer = torch.optim.SGD(params, lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                         weight_decay=cfg.optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, gamma=cfg.optim.lr_decay)
        self.amp_dtype = autocast_dtype(cfg, dev)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.ddp_model = model
        if self.info.enabled:
            ids = [dev.index] if dev.type == "cuda" else None
            # find_unused_parameters: FasterSeg's FFM channel attention is built (official weights,
            # parameter counts) but never run, so its weights get no gradient
            self.ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)
        self.step_model = torch.compile(self.ddp_model) if cfg.compile else self.ddp_model

    def _state(self, epoch: int, step: int, best: float, rows: list[dict]) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "fasterkd_version": fasterkd.__version__,
            "torch_version": str(torch.__version__),
            "stage": self.cfg.stage,
            "config": self.cfg.to_dict(),
            "identity": self.identity,
            "model": {k: v.detach().cpu() for k, v in _unwrap(self.model).state_dict().items()},
            "objective": self.objective.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": epoch,  # epochs completed
            "step": step,
            "best_miou": best,
            "metrics": rows,
        }

    def _resume(self, resume: bool | str | os.PathLike) -> tuple[int, int, float, list[dict]]:
        path = self.out / "last.pt" if resume is True else Path(resume)
        ckpt = _read_checkpoint(path, "cpu")
        check_resume_config(ckpt["config"], self.cfg, str(path))
        _check_identity(ckpt["identity"], self.identity, str(path), "run")
        _unwrap(self.model).load_state_dict(ckpt["model"])
        self.objective.load_state_dict(ckpt["objective"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        return int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["best_miou"]), list(ckpt["metrics"])

    # -- the loop ----------------------------------------------------------------------------

    def fit(self, resume: bool | str | os.PathLike = False) -> StageResult:
        cfg, info, dev = self.cfg, self.info, self.device
        try:
            root = resolve_data_root(cfg.data, info)
            train_set = build_train_set(cfg, root)
            val_loader = build_val_loader(cfg, root)
            self._build()
            start, step, best, rows = 0, 0, -1.0, []
            if resume:
                start, step, best, rows = self._resume(resume)
            if info.main:
                self.out.mkdir(parents=True, exist_ok=True)
                atomic_write_json(self.out / "config.json", cfg.to_dict())
            log = MetricsLog(self.out, info.main, cfg.tensorboard, rows)
            last, best_path = self.out / "last.pt", self.out / "best.pt"
            for epoch in range(start, cfg.epochs):
                row, step = self._train_epoch(train_set, epoch, step, log, last)
                self.scheduler.step()
                if cfg.eval_every and ((epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs):
                    ev = run_evaluation(self.ddp_model, val_loader, dev)
                    row.update(val_miou=ev["miou"], val_pixel_acc=ev["pixel_acc"])
                if cfg.ddp_sync_check:
                    row["ddp_max_weight_diff"] = ddp_max_weight_diff(self.model, info)
                log.add(row)
                score = row.get("val_miou", -1.0)
                improved = score > best or not best_path.exists()
                best = max(best, score)
                if info.main:
                    state = self._state(epoch + 1, step, best, log.rows)
                    atomic_torch_save(state, last)
                    if improved:
                        atomic_torch_save(state, best_path)
                _barrier(info)
            log.close()
            final: dict[str, Any] = {}
            if cfg.final_eval:
                # the final full-resolution evaluation of the best checkpoint (spec §9.5)
                if best_path.exists():
                    _unwrap(self.model).load_state_dict(_read_checkpoint(best_path)["model"])
                final = run_evaluation(self.ddp_model, val_loader, dev)
                final["checkpoint"] = str(best_path)
                if info.main:
                    atomic_write_json(self.out / "eval.json", strict_json(final))
            return StageResult(self.out, last, best_path, log.rows, final)
        finally:
            if info.started_here and dist.is_initialized():
                dist.destroy_process_group()

    def _train_epoch(self, train_set, epoch: int, step: int, log: MetricsLog, last: Path) -> tuple[dict, int]:
        cfg, dev = self.cfg, self.device
        loader = epoch_loader(train_set, cfg, epoch, self.info)
        n_steps = len(loader) if cfg.max_steps_per_epoch is None else min(len(loader), cfg.max_steps_per_epoch)
        self.ddp_model.train()
        sums: dict[str, float] = {}
        images, t0 = 0, time.perf_counter()
        bar = _progress(n_steps, f"{cfg.stage} {epoch + 1}/{cfg.epochs}", cfg.progress, self.info.main)
        lr = self.optimizer.param_groups[0]["lr"]
        for i, batch in enumerate(loader):
            if i >= n_steps:
                break
            image = batch["image"].to(dev, non_blocking=True)
            label = batch["label"].to(dev, non_blocking=True)
            if dev.type == "cuda" and cfg.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.autocast(dev.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss, terms = self.objective(self.step_model, image, label)
            values = {k: float(v.detach()) for k, v in terms.items()}
            total = float(loss.detach())
            if not math.isfinite(total):
                good = str(last) if last.exists() else "none yet (it fails in the first epoch)"
                raise NonFiniteLossError(
                    f"non-finite loss {total} at step {step} (epoch {epoch + 1}, batch {i}); terms "
                    f"{ {k: round(v, 6) if math.isfinite(v) else v for k, v in values.items()} }; "
                    f"last good checkpoint: {good}")
            self.scaler.scale(loss).backward()
            if cfg.optim.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            step += 1
            images += image.shape[0] * self.info.world
            for k, v in {"loss": total, **values}.items():
                sums[k] = sums.get(k, 0.0) + v
            log.scalar("step/loss", total, step)
            if bar is not None:
                bar.set_postfix(loss=f"{total:.3f}", img_s=f"{images / (time.perf_counter() - t0):.1f}")
                bar.update(1)
        if bar is not None:
            bar.close()
        dt = time.perf_counter() - t0
        done = max(1, min(n_steps, len(loader)))
        means = {k: v / done for k, v in sums.items()}
        if self.info.enabled:  # the epoch's mean loss over all ranks
            t = torch.tensor([means[k] for k in sorted(means)], dtype=torch.float64)
            dist.all_reduce(t)
            means = {k: float(v) / self.info.world for k, v in zip(sorted(means), t)}
        row = {"epoch": epoch + 1, "lr": lr, **means, "images_per_s": images / dt, "epoch_s": dt}
        return row, step


# --------------------------------------------------------------------------------------------
# Command line: train, search, eval, predict, export
# --------------------------------------------------------------------------------------------

EPILOG_TRAIN = """examples (the quick chain; a search's arch.json is the student of every later stage):
  fasterkd train teacher  --profile quick --out runs/teacher
  fasterkd search         --profile quick --teacher runs/teacher/best.pt --out runs/search
  fasterkd train baseline --profile quick --teacher runs/teacher/best.pt --arch runs/search/arch.json --out runs/baseline
  fasterkd train tutor    --profile quick --teacher runs/teacher/best.pt --arch runs/search/arch.json --init runs/baseline/best.pt --out runs/tutor
  fasterkd train student  --profile quick --tutor runs/tutor/best.pt --arch runs/search/arch.json --init runs/baseline/best.pt --fa-weight 1 --out runs/student
  fasterkd train head     --profile quick --teacher runs/teacher/best.pt --arch runs/search/arch.json --init runs/baseline/best.pt --out runs/head
  fasterkd train baseline --config my.yaml --resume          # continue a killed run (YAML/JSON: preset names or dotted paths)
  fasterkd train baseline --profile smoke --set optim.lr=0.005 --set loss.ohem=false
  torchrun --nproc_per_node 4 -m fasterkd train baseline --profile paper --data-root data/cityscapes --teacher hrnet_w48.pth
"""
EPILOG_SEARCH = """examples:
  fasterkd search --profile quick --teacher runs/teacher/best.pt --out runs/search
  fasterkd search --profile paper --data-root data/cityscapes --teacher hrnet_w48.pth --latency-table official
  fasterkd latency-table --out lut.json --input 512x1024 && fasterkd search --latency-table lut.json
"""
EPILOG_EVAL = """examples:
  fasterkd eval runs/student/best.pt --json runs/student/val.json
  fasterkd eval runs/student/best.pt --data-root data/cityscapes --split val --device cuda
"""
EPILOG_PREDICT = """examples:
  fasterkd predict runs/student/best.pt frame1.png frame2.jpg --out predictions/
"""
EPILOG_EXPORT = """examples:
  fasterkd export runs/student/best.pt --format onnx --out student.onnx --input 1024x2048
"""


def _load_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"--config {str(path)!r} not found")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text) or {}
    else:
        data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"--config {path}: expected a mapping of option names to values")
    return data


def config_from_args(stage: str, args: argparse.Namespace) -> TrainConfig:
    """Profile preset <- config file (preset override names or dotted paths) <- command-line flags."""
    file_opts = _load_config_file(args.config) if args.config else {}
    profile = args.profile or file_opts.pop("profile", None) or "quick"
    file_opts.pop("profile", None)
    file_opts.pop("stage", None)
    flags = {name: getattr(args, name) for name in OVERRIDES if getattr(args, name, None) is not None}
    for dotted in args.set or []:
        if "=" not in dotted:
            raise ValueError(f"--set expects KEY=VALUE, got {dotted!r}")
        k, v = dotted.split("=", 1)
        try:
            flags[k] = json.loads(v)
        except json.JSONDecodeError:
            flags[k] = v
    if "crop" in flags and isinstance(flags["crop"], str):
        flags["crop"] = parse_size(flags["crop"], "--crop")
    return preset(stage, profile, **{**file_opts, **flags})


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=None, help="YAML/JSON file of options (preset names or dotted paths)")
    p.add_argument("--profile", choices=PROFILES, default=None, help="smoke | quick (default) | paper")
    p.add_argument("--data-root", dest="data_root", default=None, help="Cityscapes-layout root; '' = synthetic")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1")
    p.add_argument("--out", dest="out_dir", default=None, help="output folder")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--crop", default=None, help="training crop HxW")
    p.add_argument("--teacher", default=None, help="HRNet teacher checkpoint (teacher run or official file)")
    p.add_argument("--teacher-model", dest="teacher_model", default=None, help="HRNet name of an official file")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default=None)
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--workers", dest="num_workers", type=int, default=None)
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field, e.g. --set optim.lr=0.005")
    p.add_argument("--resume", nargs="?", const=True, default=False, help="continue from OUT/last.pt (or a given checkpoint)")


def _print_result(result: StageResult) -> None:
    ev = result.eval
    if ev and "miou" in ev:
        print(f"final mIoU {ev['miou']:.4f}, pixel acc {ev['pixel_acc']:.4f} on {ev['images']} images")
    elif ev:  # the search: the derived student of the last epoch
        miou = ev.get("val_miou")
        print(f"derived branches {ev['lasts']}: LUT latency {ev['latency_ms']:.3f} ms ({ev['fps']:.1f} FPS), "
              f"supernet mIoU {'n/a' if miou is None else f'{miou:.4f}'}")
    print(f"wrote {result.out_dir} (last.pt, best.pt, metrics.csv, eval.json)")
    if result.arch is not None:
        print(f"derived arch: {result.arch}")


def _cmd_train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args.stage, args)
    _print_result(run_stage(cfg, resume=args.resume))
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    cfg = config_from_args("search", args)
    _print_result(run_stage(cfg, resume=args.resume))
    return 0


def inference_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """A checkpoint's model as image -> SegOutput: a search's supernet is seen through its validated
    head at the widest widths (:class:`fasterkd.search.SupernetView`)."""
    if cfg.model.name == "supernet":
        from fasterkd.search import SupernetView

        return SupernetView(model).eval()
    return model


def _eval_loader(cfg: TrainConfig, args: argparse.Namespace):
    from fasterkd.data import build_dataset
    from fasterkd.data.transforms import EvalTransform

    if args.data_root is not None:
        cfg.data.root = args.data_root
    root = resolve_data_root(cfg.data)
    split = args.split or cfg.data.val_split
    ds = synthetic_subset(build_dataset(root, split, transform=EvalTransform()), cfg.data, split)
    if args.max_images:
        ds = torch.utils.data.Subset(ds, range(min(len(ds), args.max_images)))
    return torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False)


def _cmd_eval(args: argparse.Namespace) -> int:
    from fasterkd.data.cityscapes import CLASS_NAMES

    device = pick_device(args.device)
    model, cfg = load_checkpoint(args.checkpoint, device)
    result = run_evaluation(inference_model(model, cfg), _eval_loader(cfg, args), device)
    result["checkpoint"] = str(args.checkpoint)
    result = strict_json(result)  # an IoU of a class absent from the split is null
    if args.json:
        atomic_write_json(args.json, result)
    print(f"mIoU {result['miou']:.4f}  pixel acc {result['pixel_acc']:.4f}  ({result['images']} images)")
    for name, iou in zip(CLASS_NAMES, result["iou"]):
        print(f"  {name:14s} {iou:.4f}" if iou is not None and iou == iou else f"  {name:14s} n/a")
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _read_image(path: Path) -> Tensor:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} not found")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def predict_images(model: nn.Module, paths: list[Path], out: Path, device: torch.device, alpha: float = 0.5) -> list[Path]:
    """Write ``<stem>_pred.png`` (colour-coded train ids) and ``<stem>_overlay.png`` per image."""
    from PIL import Image

    from fasterkd.data.cityscapes import colorize
    from fasterkd.data.transforms import normalize

    written = []
    model.eval()
    for path in paths:
        rgb = _read_image(Path(path))
        x = normalize(rgb.float().div(255.0)).unsqueeze(0).to(device)
        with torch.no_grad():
            logits = model(x).main
        logits = F.interpolate(logits.float(), size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        pred = logits.argmax(1)[0].cpu()
        colour = np.asarray(colorize(pred.numpy()), dtype=np.uint8)
        overlay = (alpha * colour + (1 - alpha) * rgb.permute(1, 2, 0).numpy()).astype(np.uint8)
        for suffix, arr in (("pred", colour), ("overlay", overlay)):
            target = out / f"{Path(path).stem}_{suffix}.png"
            with atomic_path(target) as tmp:
                Image.fromarray(arr).save(tmp, format="PNG")
            written.append(target)
    return written


def _cmd_predict(args: argparse.Namespace) -> int:
    device = pick_device(args.device)
    model, cfg = load_checkpoint(args.checkpoint, device)
    written = predict_images(inference_model(model, cfg), [Path(p) for p in args.images], Path(args.out), device)
    print(f"wrote {len(written)} files to {args.out}")
    return 0


class _MainLogits(nn.Module):
    """Export wrapper: image -> main logits (ONNX graphs return tensors, not dataclasses)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return self.model(image).main


def export_onnx(model: nn.Module, out: Path, input_size: tuple[int, int], opset: int = 17,
                check: bool = True) -> dict[str, Any]:
    """Export the eval-mode model to ONNX and compare with onnxruntime on a random input."""
    wrapper = _MainLogits(model.eval().cpu()).eval()
    x = torch.randn(1, 3, *input_size, generator=torch.Generator().manual_seed(0))
    import warnings

    with atomic_path(out) as tmp, warnings.catch_warnings():
        # the tracer's notes on shape checks: the graph is fixed to input_size, as the check below uses
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(wrapper, (x,), str(tmp), input_names=["image"], output_names=["logits"],
                          opset_version=opset, dynamo=False)
    info: dict[str, Any] = {"path": str(out), "input": list(input_size)}
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            ref = wrapper(x).numpy()
        info["max_abs_diff"] = float(np.abs(got - ref).max())
        info["output_shape"] = list(got.shape)
    return info


def _cmd_export(args: argparse.Namespace) -> int:
    if args.format != "onnx":
        raise ValueError(f"--format must be onnx, got {args.format!r}")
    model, cfg = load_checkpoint(args.checkpoint, "cpu")
    model = inference_model(model, cfg)
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".onnx")
    info = export_onnx(model, out, parse_size(args.input, "--input"), opset=args.opset)
    print(f"wrote {out}; onnxruntime vs torch max abs difference {info['max_abs_diff']:.3e} "
          f"(output {info['output_shape']})")
    return 0


def add_train_commands(sub: "argparse._SubParsersAction") -> None:
    """Register ``train``, ``search``, ``eval``, ``predict`` and ``export`` on the fasterkd CLI."""
    fmt = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser("train", help="train one stage (teacher, baseline, tutor, student, head)",
                           epilog=EPILOG_TRAIN, formatter_class=fmt)
    train.add_argument("stage", choices=[s for s in STAGES if s != "search"])
    _add_common(train)
    train.add_argument("--tutor", default=None, help="tutor checkpoint (student stage)")
    train.add_argument("--init", default=None, help="baseline student checkpoint to start from")
    train.add_argument("--arch", default=None, help="arch JSON (e.g. a search's arch.json)")
    train.add_argument("--head", choices=["bilinear", "pixel_shuffle"], default=None)
    train.add_argument("--fa-weight", dest="fa_weight", type=float, default=None, help="c of Eq. 10")
    train.add_argument("--fa-convnorm", dest="fa_convnorm", action="store_true", default=None)
    train.add_argument("--quarter-depth", dest="quarter_depth", type=int, default=None)
    train.add_argument("--kd-weight", dest="kd_weight", type=float, default=None)
    train.set_defaults(func=_cmd_train)

    search = sub.add_parser("search", help="teacher-guided architecture search (Eq. 7)", epilog=EPILOG_SEARCH,
                            formatter_class=fmt)
    _add_common(search)
    search.add_argument("--pretrain-epochs", dest="pretrain_epochs", type=int, default=None)
    search.add_argument("--latency-table", dest="latency_table", default=None, help="official or a JSON table")
    search.add_argument("--latency-weight", dest="latency_weight", type=float, default=None, help="lambda1 of Eq. 7")
    search.add_argument("--kd-weight", dest="kd_weight", type=float, default=None,
                        help="lambda2 of Eq. 7 (0: FasterSeg's objective without HRNet)")
    search.set_defaults(func=_cmd_search)

    ev = sub.add_parser("eval", help="mIoU and per-class IoU at full resolution", epilog=EPILOG_EVAL,
                        formatter_class=fmt)
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--data-root", dest="data_root", default=None, help="default: the checkpoint's data")
    ev.add_argument("--split", default=None)
    ev.add_argument("--device", default="auto")
    ev.add_argument("--max-images", dest="max_images", type=int, default=None)
    ev.add_argument("--json", type=Path, default=None, help="write the result here")
    ev.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("predict", help="colour-coded predictions and overlays of images", epilog=EPILOG_PREDICT,
                        formatter_class=fmt)
    pr.add_argument("checkpoint", type=Path)
    pr.add_argument("images", nargs="+")
    pr.add_argument("--out", required=True)
    pr.add_argument("--device", default="auto")
    pr.set_defaults(func=_cmd_predict)

    ex = sub.add_parser("export", help="export a checkpoint to ONNX (checked with onnxruntime)", epilog=EPILOG_EXPORT,
                        formatter_class=fmt)
    ex.add_argument("checkpoint", type=Path)
    ex.add_argument("--format", default="onnx", choices=["onnx"])
    ex.add_argument("--out", default=None)
    ex.add_argument("--input", default="256x512", help="input size HxW of the exported graph")
    ex.add_argument("--opset", type=int, default=17)
    ex.set_defaults(func=_cmd_export)


__all__ = ["TrainConfig", "DataConfig", "OptimConfig", "LossConfig", "ModelConfig", "GuideConfig", "SearchConfig",
           "STAGES", "PROFILES", "OVERRIDES", "preset", "run_stage", "load_checkpoint", "StageResult",
           "NonFiniteLossError", "add_train_commands", "export_onnx", "predict_images"]
