"""The data of a run: its root (a Cityscapes-layout folder, or the synthetic scenes written once to a
cache), the split cut to this run's share, and the loaders of training and validation.

:func:`open_split` is the one way from a :class:`~fasterkd.config.DataConfig` to a dataset; the
trainer, the search, the evaluation command and the chapters that look at a few images all use it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

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
    """A raw dataset whose augmentation draws from a generator seeded by (seed, epoch, pass, index).

    The randomness of sample i in pass p of epoch e is a function of (seed, e, p, i) only, so a
    resumed run, a run with more workers and a DDP run see exactly the same crops and flips. Pass
    0 is every epoch's first pass over the data (the only one when ``iters_per_epoch`` is None).
    """

    def __init__(self, base: torch.utils.data.Dataset, transform: Callable, seed: int) -> None:
        self.base, self.transform, self.seed, self.epoch, self.repeat = base, transform, seed, 0, 0

    def __len__(self) -> int:
        return len(self.base)

    def set_epoch(self, epoch: int, repeat: int = 0) -> None:
        self.epoch, self.repeat = epoch, repeat

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.base[i]
        key = (self.seed * 1_000_003 + self.epoch) * 1_000_033 + i
        if self.repeat:  # later passes of a fixed-length epoch draw fresh crops
            key = key * 1_000_037 + self.repeat
        g = torch.Generator().manual_seed(key % (2**63))
        image, label = self.transform(item["image"], item["label"], g)
        return {"image": image, "label": label, "name": item["name"]}


def train_transform(cfg: TrainConfig, crop: tuple[int, int] | None = None) -> Callable:
    """The training augmentation of ``cfg`` (spec §9.4), cropping to ``crop`` (default ``data.crop``)."""
    from fasterkd.data.transforms import TrainTransform

    d = cfg.data
    return TrainTransform(crop=tuple(crop or d.crop), scales=tuple(d.scales), flip=d.flip,
                          label_downsample=d.label_downsample, downsample=d.downsample)


def build_train_set(cfg: TrainConfig, info: DistInfo | None = None) -> SeededTrainSet:
    """The training split with the run's seeded augmentation (spec §9.4)."""
    d = cfg.data
    base = open_split(d, d.train_split, info=info, max_images=d.max_train_images)
    return SeededTrainSet(base, train_transform(cfg), cfg.seed)


def build_val_loader(cfg: TrainConfig, info: DistInfo | None = None) -> torch.utils.data.DataLoader:
    """The validation split in order, at full resolution (shrunk by ``data.downsample``, as
    FasterSeg validates its search at 512x1024)."""
    from fasterkd.data.transforms import EvalTransform

    d = cfg.data
    ds = open_split(d, d.val_split, EvalTransform(downsample=d.downsample), info=info, max_images=d.max_val_images)
    return torch.utils.data.DataLoader(ds, batch_size=d.eval_batch_size, shuffle=False, num_workers=d.num_workers)


def rank_batch(batch_size: int, info: DistInfo) -> int:
    """The images each rank loads per step: ``batch_size`` is the global batch of one optimiser step."""
    world = info.world
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (the global batch), got {batch_size!r}")
    if batch_size % world:
        raise ValueError(f"batch_size={batch_size} is the global batch and must divide evenly over the world size "
                         f"{world} (ranks); give a multiple of {world}, e.g. {world * max(1, batch_size // world)}")
    return batch_size // world


# the sampler seed of pass p > 0 of an epoch (pass 0 keeps the one-pass seeds)
_PASS_SEED = 15_485_863


def epoch_loader(ds: torch.utils.data.Dataset, cfg: TrainConfig, epoch: int, info: DistInfo,
                 batch_size: int | None = None, salt: int = 0, repeat: int = 0) -> torch.utils.data.DataLoader:
    """One pass of epoch ``epoch``: order from (seed, epoch, pass ``repeat``) (DistributedSampler
    under DDP). ``batch_size`` (default ``data.batch_size``) is global: each rank loads its share."""
    if isinstance(ds, SeededTrainSet):
        ds.set_epoch(epoch, repeat)
    bs = batch_size or cfg.data.batch_size
    per_rank = rank_batch(bs, info)
    if len(ds) < bs:
        raise ValueError(f"the training set has {len(ds)} images, fewer than batch_size {bs} "
                         f"(the global batch over {info.world} ranks)")
    if info.enabled:
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=info.world, rank=info.rank, shuffle=True,
                                                      seed=cfg.seed + salt + repeat * _PASS_SEED, drop_last=True)
        sampler.set_epoch(epoch)
    else:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch + salt * 104729 + repeat * _PASS_SEED)
        sampler = torch.utils.data.RandomSampler(ds, generator=g)
    return torch.utils.data.DataLoader(ds, batch_size=per_rank, sampler=sampler, drop_last=True,
                                       num_workers=cfg.data.num_workers, persistent_workers=False)


def steps_per_epoch(cfg: TrainConfig, ds: torch.utils.data.Dataset, info: DistInfo, split_images: int | None = None,
                    batch_size: int | None = None) -> int:
    """Optimiser steps of one epoch of ``ds`` (see ``TrainConfig.iters_per_epoch``).

    None: one pass (``len(ds) // batch_size`` global batches); an int: that many; ``"fasterseg"``:
    ``max(split_images // 2 // batch_size, 400)`` (``split_images``: the whole training split, whose
    half the search trains its weights on). ``max_steps_per_epoch`` caps the result.
    """
    bs = batch_size or cfg.data.batch_size
    rank_batch(bs, info)
    ipe = cfg.iters_per_epoch
    if ipe is None:
        n = len(ds) // bs
    elif ipe == "fasterseg":
        n = max((len(ds) if split_images is None else split_images) // 2 // bs, 400)
    else:
        n = int(ipe)
    if cfg.max_steps_per_epoch is not None:
        n = min(n, cfg.max_steps_per_epoch)
    return n


def epoch_batches(ds: torch.utils.data.Dataset, cfg: TrainConfig, epoch: int, info: DistInfo, steps: int,
                  salt: int = 0) -> Iterator[dict[str, Any]]:
    """``steps`` batches of epoch ``epoch``: its passes over ``ds`` in turn (pass p reshuffled from
    (seed, epoch, p)), as many as the steps need; one pass when ``iters_per_epoch`` is None."""
    done, repeat = 0, 0
    while done < steps:
        loader = epoch_loader(ds, cfg, epoch, info, salt=salt, repeat=repeat)  # >= 1 batch: it checks the size
        for batch in loader:
            yield batch
            done += 1
            if done >= steps:
                return
        repeat += 1
