"""Paper Fig. 3, the qualitative comparison: input, label, baseline, student, with the pixels where
the two predictions differ marked (green: the student is right there, red: the baseline is,
yellow: neither). :func:`figure3` draws it from :func:`predict` on :func:`validation_batch`;
:func:`difference_map` and :func:`difference_counts` give the numbers behind the colours.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from fasterkd.data.cityscapes import IGNORE_INDEX

#: RGB of the difference classes of :func:`difference_map`
DIFF_COLOURS = {1: (0, 200, 0), 2: (230, 0, 0), 3: (255, 210, 0)}
DIFF_NAMES = {1: "only the student is right", 2: "only the baseline is right", 3: "differ, both wrong"}


def difference_map(baseline: Tensor | np.ndarray, student: Tensor | np.ndarray,
                   label: Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Per pixel: 0 same prediction (or ignored label), 1 only the student right, 2 only the baseline
    right, 3 the predictions differ and both are wrong. All inputs are (H, W) train-id maps."""
    b, s, y = (np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t) for t in (baseline, student, label))
    if not (b.shape == s.shape == y.shape) or b.ndim != 2:
        raise ValueError(f"baseline, student and label must be (H, W) maps of one size, got {b.shape}, {s.shape}, {y.shape}")
    valid = y != ignore_index
    differ = (b != s) & valid
    out = np.zeros(y.shape, dtype=np.uint8)
    out[differ & (s == y)] = 1
    out[differ & (b == y)] = 2
    out[differ & (s != y) & (b != y)] = 3
    return out


def difference_counts(diff: np.ndarray) -> dict[str, int]:
    """Pixels of each difference class of :func:`difference_map` (keys from :data:`DIFF_NAMES`)."""
    return {DIFF_NAMES[k]: int((diff == k).sum()) for k in DIFF_NAMES}


def pixel_accuracy(pred: Tensor | np.ndarray, label: Tensor | np.ndarray, ignore_index: int = IGNORE_INDEX) -> float:
    """Share of labelled pixels predicted right (NaN when no pixel is labelled)."""
    p, y = (np.asarray(t.detach().cpu() if isinstance(t, Tensor) else t) for t in (pred, label))
    valid = y != ignore_index
    return float((p[valid] == y[valid]).mean()) if valid.any() else float("nan")


def predict(model: nn.Module, images: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Train-id predictions (B, H, W) of ``model`` for normalised ``images``, at ``size`` (default: the images')."""
    import torch.nn.functional as F

    from fasterkd.evaluate import predict_logits

    model.eval()
    with torch.no_grad():
        logits = predict_logits(model, images)
        size = size or tuple(images.shape[-2:])
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1).cpu()


def validation_batch(checkpoint: str | os.PathLike, count: int, data_root: str = "") -> tuple[Tensor, Tensor, list[str]]:
    """The first ``count`` validation images (normalised), labels and names of the data a checkpoint trained on."""
    from fasterkd.train import validation_items

    items = validation_items(checkpoint, count, data_root)
    return (torch.stack([it["image"] for it in items]), torch.stack([it["label"] for it in items]),
            [str(it["name"]) for it in items])


def _outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a boolean mask (4-neighbourhood), for marking regions on a panel."""
    m = mask.astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def mark_differences(rgb: np.ndarray, diff: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """``rgb`` (H, W, 3 uint8) with the difference classes tinted and outlined in their colours."""
    out = rgb.astype(np.float32).copy()
    for k, colour in DIFF_COLOURS.items():
        m = diff == k
        out[m] = (1 - alpha) * out[m] + alpha * np.array(colour, np.float32)
        out[_outline(m)] = colour
    return out.clip(0, 255).astype(np.uint8)


def figure3(images: Tensor, labels: Tensor, baseline: Tensor, student: Tensor,
            names: Sequence[str] | None = None, titles: tuple[str, str] = ("baseline", "student")):
    """Paper Fig. 3: per row input, label, baseline, student, and the student with the pixels where
    the two predictions differ marked (:data:`DIFF_COLOURS`). Returns the matplotlib figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from fasterkd.data.cityscapes import colorize
    from fasterkd.data.transforms import denormalize

    n = images.shape[0]
    if not (labels.shape[0] == baseline.shape[0] == student.shape[0] == n):
        raise ValueError("images, labels and both predictions must hold the same number of images")
    h, w = images.shape[-2:]
    # 3 inches per panel across; each row as tall as its panels plus a title line, then the legend
    fig, axes = plt.subplots(n, 5, figsize=(15, n * (3.0 * h / w + 0.45) + 0.7), squeeze=False)
    cols = ["input", "label", titles[0], titles[1], f"{titles[1]}: differences marked"]
    for i in range(n):
        rgb = (denormalize(images[i]).clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        diff = difference_map(baseline[i], student[i], labels[i])
        panels = [rgb, colorize(labels[i]), colorize(baseline[i]), colorize(student[i]),
                  mark_differences(colorize(student[i]), diff)]
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=10)
        if names:
            axes[i][0].set_ylabel(Path(names[i]).name, fontsize=8)
    handles = [Patch(color=np.array(c) / 255, label=DIFF_NAMES[k]) for k, c in DIFF_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    return fig


__all__ = [
    "DIFF_COLOURS", "DIFF_NAMES", "difference_map", "difference_counts", "pixel_accuracy", "predict",
    "validation_batch", "mark_differences", "figure3",
]
