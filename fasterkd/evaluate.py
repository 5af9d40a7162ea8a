"""Evaluation: a confusion matrix over a split, per-class IoU, mIoU and pixel accuracy.

mIoU is the mean IoU over the classes whose union (ground truth or prediction) is not empty, as
cityscapesScripts' pixel-level evaluation and FasterSeg compute it; pixels labelled 255 are
ignored. Predictions are made at the label's full resolution (1024x2048 for Cityscapes): logits
are resized bilinearly (``align_corners=False``) to the label before the arg-max.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = 255
NUM_CLASSES = 19


class ConfusionMatrix:
    """``(num_classes, num_classes)`` counts, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int = NUM_CLASSES, ignore_index: int = IGNORE_INDEX) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: Tensor, label: Tensor) -> None:
        """Add predicted and true train ids of the same shape (any leading dims)."""
        if pred.shape != label.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != label shape {tuple(label.shape)}")
        pred, label = pred.reshape(-1).long().cpu(), label.reshape(-1).long().cpu()
        valid = label != self.ignore_index
        bad = valid & ((label < 0) | (label >= self.num_classes))
        if bad.any():
            raise ValueError(f"label holds ids outside 0..{self.num_classes - 1} and {self.ignore_index}: "
                             f"{sorted(set(label[bad].tolist()))[:5]}")
        pred, label = pred[valid], label[valid]
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"prediction holds ids outside 0..{self.num_classes - 1}")
        idx = label * self.num_classes + pred
        self.matrix += torch.bincount(idx, minlength=self.num_classes ** 2).view(self.num_classes, self.num_classes)

    def merge(self, other: "ConfusionMatrix") -> None:
        self.matrix += other.matrix

    def iou(self) -> np.ndarray:
        """Per-class IoU; NaN where the class is in neither the labels nor the predictions."""
        m = self.matrix.double()
        tp = m.diag()
        union = m.sum(0) + m.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        return iou.numpy()

    def miou(self) -> float:
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def pixel_accuracy(self) -> float:
        total = int(self.matrix.sum())
        return float(self.matrix.diag().sum()) / total if total else float("nan")

    def summary(self) -> dict[str, Any]:
        iou = self.iou()
        return {
            "miou": self.miou(),
            "iou": [float(v) for v in iou],
            "pixel_acc": self.pixel_accuracy(),
            "pixels": int(self.matrix.sum()),
        }


def predict_logits(model: nn.Module, image: Tensor) -> Tensor:
    """The model's inference logits (``SegOutput.main``) for a normalised (B, 3, H, W) batch."""
    out = model(image)
    return out.main if hasattr(out, "main") else out


def check_max_images(max_images: int | None, name: str = "max_images") -> int | None:
    """``max_images`` is None (every image) or an integer >= 1; 0 or a negative count is an error."""
    if max_images is None:
        return None
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise ValueError(f"{name} must be None (every image) or an integer >= 1, got {max_images!r}")
    return max_images


def _describe_loader(loader: Any) -> str:
    """The dataset behind a loader, for an error message (its repr names root and split)."""
    ds = getattr(loader, "dataset", loader)
    while hasattr(ds, "dataset") and not hasattr(ds, "root"):  # torch Subset and friends
        ds = ds.dataset
    return repr(ds) if hasattr(ds, "root") else type(ds).__name__


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict[str, Any]], device: str | torch.device = "cpu",
             num_classes: int = NUM_CLASSES, max_images: int | None = None,
             allow_empty: bool = False) -> dict[str, Any]:
    """mIoU, per-class IoU and pixel accuracy of ``model`` over ``loader`` at the labels' resolution.

    ``loader`` yields dataset items ``{"image", "label", ...}`` (batched). The model runs in eval
    mode; its training flag is restored afterwards. ``max_images`` is None or >= 1.

    A loader that yields no image, or whose labels are all ignore (255), has nothing to score: a
    ``ValueError`` naming the dataset, unless ``allow_empty`` (then mIoU and pixel accuracy are NaN).
    """
    check_max_images(max_images)
    device = torch.device(device)
    cm = ConfusionMatrix(num_classes)
    was = model.training
    model.eval()
    images = 0
    try:
        for batch in loader:
            image, label = batch["image"].to(device), batch["label"].to(device)
            if label.dim() == 2:
                image, label = image.unsqueeze(0), label.unsqueeze(0)
            logits = predict_logits(model, image).float()
            if logits.shape[-2:] != label.shape[-2:]:
                logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
            cm.update(logits.argmax(1), label)
            images += label.shape[0]
            if max_images is not None and images >= max_images:
                break
    finally:
        model.train(was)
    if not allow_empty and (images == 0 or int(cm.matrix.sum()) == 0):
        what = "no image" if images == 0 else f"{images} images whose labels are all ignore ({IGNORE_INDEX})"
        raise ValueError(f"nothing to evaluate: {_describe_loader(loader)} gave {what}; mIoU is undefined")
    result = cm.summary()
    result["images"] = images
    result["confusion"] = cm.matrix.tolist()
    return result
