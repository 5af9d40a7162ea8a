"""The data of a run: its root (a Cityscapes-layout folder, or the synthetic scenes written once to a
cache), the split cut to this run's share, and the loaders of training and validation.

:func:`open_split` is the one way from a :class:`~fasterkd.config.DataConfig` to a dataset; the
trainer, the search, the evaluation command and the chapters that look at a few images all use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch

from fasterkd.config import DataConfig, TrainConfig
from fasterkd.distributed import DistInfo, barrier


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
    barrier(info)
    return root


def synthetic_subset(ds: torch.utils.data.Dataset, data: DataConfig, split: str) -> torch.utils.data.Dataset:
    """The first ``synthetic_train``/``synthetic_val`` scenes of the shared synthetic cache.

    One cache folder serves every recipe of a size and seed, and a recipe that asks for more scenes
    grows it; without this cut a run would see however many scenes earlier runs left there.
    """
    if data.root:
        return ds
    n = data.synthetic_train if split == data.train_split else data.synthetic_val
    return ds if len(ds) <= n else torch.utils.data.Subset(ds, range(n))


def open_split(data: DataConfig, split: str, transform: Callable | None = None, *, info: DistInfo | None = None,
               max_images: int | None = None) -> torch.utils.data.Dataset:
    """``split`` of the run's data: root (or synthetic cache), this recipe's scenes, the first ``max_images``."""
    from fasterkd.data import build_dataset

    ds = synthetic_subset(build_dataset(resolve_data_root(data, info), split, transform=transform), data, split)
    if max_images:
        ds = torch.utils.data.Subset(ds, range(min(len(ds), max_images)))
    return ds


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


def build_train_set(cfg: TrainConfig, info: DistInfo | None = None) -> SeededTrainSet:
    """The training split with the run's seeded augmentation (spec §9.4)."""
    from fasterkd.data.transforms import TrainTransform

    d = cfg.data
    base = open_split(d, d.train_split, info=info, max_images=d.max_train_images)
    tf = TrainTransform(crop=tuple(d.crop), scales=tuple(d.scales), flip=d.flip, label_downsample=d.label_downsample)
    return SeededTrainSet(base, tf, cfg.seed)


def build_val_loader(cfg: TrainConfig, info: DistInfo | None = None) -> torch.utils.data.DataLoader:
    """The validation split at full resolution, in order."""
    from fasterkd.data.transforms import EvalTransform

    d = cfg.data
    ds = open_split(d, d.val_split, EvalTransform(), info=info, max_images=d.max_val_images)
    return torch.utils.data.DataLoader(ds, batch_size=d.eval_batch_size, shuffle=False, num_workers=d.num_workers)


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
