"""Datasets: Cityscapes and the synthetic street scenes, read by one loader (same layout).

``build_dataset(root, split, transform)`` gives a :class:`CityscapesDataset`;
``check_dataset(root, split)`` reads every item through it and counts pixels per train id
(``fasterkd data check``). The figure helpers are the ones the book's data notebook uses.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from fasterkd.data.cityscapes import (
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    PALETTE,
    CityscapesDataset,
    colorize,
    find_pairs,
    labelids_to_trainids,
)

__all__ = [
    "CLASS_NAMES", "IGNORE_INDEX", "NUM_CLASSES", "PALETTE", "CityscapesDataset", "build_dataset", "check_dataset",
    "class_frequency_figure", "colorize", "find_pairs", "gallery_figure", "labelids_to_trainids", "legend_figure",
    "sample_root",
]


def build_dataset(root: str | os.PathLike, split: str, transform: Callable | None = None) -> CityscapesDataset:
    """The dataset of ``root``/``split`` in the Cityscapes layout (real or synthetic)."""
    return CityscapesDataset(root, split, transform=transform)


def check_dataset(root: str | os.PathLike, split: str = "val") -> dict:
    """Read every frame of a split (no augmentation) and count its pixels per train id.

    Returns ``{"images": N, "pixels_per_class": [19 ints], "ignored": N}``. Every file is
    decoded and every image/label size pair checked, so a broken dataset fails here with the
    path of the first bad file. A split whose labels are all ignore (255) is a ``ValueError``
    (evaluation would have no pixel to score); single all-ignore frames give a warning.
    """
    ds = build_dataset(root, split)
    counts = np.zeros(256, dtype=np.int64)
    empty = []
    for i in range(len(ds)):
        _, label = ds.load(i)
        frame = np.bincount(label.ravel(), minlength=256)
        if frame[:NUM_CLASSES].sum() == 0:
            empty.append(ds.name(i))
        counts += frame
    if counts[:NUM_CLASSES].sum() == 0:
        raise ValueError(f"every label pixel of split {split!r} in {str(root)!r} is ignore (255): nothing to train on "
                         "or evaluate (labels in another id scheme, or 16-bit/colour-coded labels?)")
    if empty:
        warnings.warn(f"{len(empty)} of {len(ds)} labels of split {split!r} in {str(root)!r} are all ignore (255), "
                      f"e.g. {empty[0]}", stacklevel=2)
    return {
        "images": len(ds),
        "pixels_per_class": [int(c) for c in counts[:NUM_CLASSES]],
        "ignored": int(counts[NUM_CLASSES:].sum()),  # labels are mapped so every other id is 255
    }


def gallery_figure(items: Sequence[tuple[np.ndarray, np.ndarray]], titles: Sequence[str] | None = None,
                   alpha: float | None = None, width: float = 12.0):
    """A matplotlib figure: one row per (rgb uint8 HxWx3, train ids HxW) pair, image beside its colour-coded label.

    With ``alpha`` the label is drawn over the image instead (one column).
    """
    import matplotlib.pyplot as plt

    if not items:
        raise ValueError("items must hold at least one (image, label) pair")
    cols = 1 if alpha is not None else 2
    h, w = items[0][1].shape
    fig, axes = plt.subplots(len(items), cols, figsize=(width, width / cols * h / w * len(items) + 0.3 * len(items)), squeeze=False)
    for r, (rgb, label) in enumerate(items):
        colour = colorize(label)
        if alpha is not None:
            panels = [(alpha * colour + (1 - alpha) * np.asarray(rgb)).astype(np.uint8)]
        else:
            panels = [np.asarray(rgb), colour]
        for c, panel in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_axis_off()
            if titles is not None and c == 0:
                ax.set_title(titles[r], fontsize=9, loc="left")
    fig.tight_layout()
    return fig


def class_frequency_figure(stats: dict, title: str = "", log: bool = True):
    """Bar chart of the pixel share of each train id, bars in the official colours (from :func:`check_dataset`)."""
    import matplotlib.pyplot as plt

    counts = np.asarray(stats["pixels_per_class"], dtype=np.float64)
    total = counts.sum() + stats.get("ignored", 0)
    if total <= 0:
        raise ValueError("stats hold no pixels")
    share = 100.0 * counts / total
    fig, ax = plt.subplots(figsize=(10, 3.2))
    ax.bar(range(NUM_CLASSES), share, color=PALETTE / 255.0, edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(NUM_CLASSES), CLASS_NAMES, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("pixels (%)")
    if log:
        ax.set_yscale("log")
    ax.set_title(title or f"{stats['images']} images, {100.0 * stats.get('ignored', 0) / total:.2f} % ignored", fontsize=10)
    fig.tight_layout()
    return fig


def legend_figure():
    """The 19 classes and their colours as a one-row legend."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    # drawn in an (invisible) axes: Jupyter's inline backend does not display a figure without axes
    fig, ax = plt.subplots(figsize=(10, 1.0))
    ax.set_axis_off()
    handles = [Patch(facecolor=PALETTE[i] / 255.0, edgecolor="black", label=name) for i, name in enumerate(CLASS_NAMES)]
    ax.legend(handles=handles, loc="center", ncol=10, fontsize=8, frameon=False)
    return fig


def sample_root() -> Path | None:
    """The shipped real Cityscapes frame (``../shared/data/cityscapes-sample`` beside the repo), if present."""
    here = Path(__file__).resolve().parents[2]
    for cand in (here.parent / "shared" / "data" / "cityscapes-sample", here / "shared" / "data" / "cityscapes-sample"):
        if (cand / "leftImg8bit").is_dir():
            return cand
    return None
