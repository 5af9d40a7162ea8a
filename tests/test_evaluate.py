"""Evaluation: the confusion matrix against a brute-force count, and evaluate() on tiny models."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fasterkd.evaluate import ConfusionMatrix, evaluate
from fasterkd.models.outputs import SegOutput


def brute_force(preds: list[np.ndarray], labels: list[np.ndarray], n: int = 19) -> dict:
    """Per-pixel Python count: IoU over pixels not labelled 255, nan where the union is empty."""
    tp, fp, fn = [0] * n, [0] * n, [0] * n
    correct = total = 0
    for pred, label in zip(preds, labels):
        for p, t in zip(pred.ravel().tolist(), label.ravel().tolist()):
            if t == 255:
                continue
            total += 1
            if p == t:
                tp[t] += 1
                correct += 1
            else:
                fp[p] += 1
                fn[t] += 1
    iou = [tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else math.nan for c in range(n)]
    valid = [v for v in iou if not math.isnan(v)]
    return {"iou": iou, "miou": sum(valid) / len(valid), "pixel_acc": correct / total, "pixels": total}


def random_batch(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    # classes 0..11 only in labels, 0..9 and 15 in predictions: 12-14 and 16-18 are empty (nan),
    # 10 and 11 are never predicted (IoU 0), 15 is predicted but never true (IoU 0)
    label = rng.integers(0, 12, shape)
    label[rng.random(shape) < 0.2] = 255
    pred = np.where(rng.random(shape) < 0.6, np.minimum(label, 9), rng.integers(0, 10, shape))
    pred[rng.random(shape) < 0.05] = 15
    return pred, label


def test_confusion_matrix_matches_a_brute_force_count():
    rng = np.random.default_rng(0)
    batches = [random_batch(rng, (2, 17, 23)) for _ in range(3)]
    cm = ConfusionMatrix(19)
    for pred, label in batches:
        cm.update(torch.from_numpy(pred), torch.from_numpy(label))
    ref = brute_force([p for p, _ in batches], [t for _, t in batches])
    # the matrix itself: rows = truth, columns = prediction, ignored pixels left out
    m = np.zeros((19, 19), dtype=np.int64)
    for pred, label in batches:
        for p, t in zip(pred.ravel(), label.ravel()):
            if t != 255:
                m[t, p] += 1
    assert np.array_equal(cm.matrix.numpy(), m)
    iou = cm.iou()
    assert np.array_equal(np.isnan(iou), np.isnan(ref["iou"]))
    assert np.isnan(iou[[12, 13, 14, 16, 17, 18]]).all() and iou[10] == iou[11] == iou[15] == 0.0
    np.testing.assert_allclose(iou[~np.isnan(iou)], np.array(ref["iou"])[~np.isnan(iou)], rtol=0, atol=1e-12)
    assert cm.miou() == pytest.approx(ref["miou"], abs=1e-12)  # mean over the 13 non-empty unions
    assert cm.pixel_accuracy() == pytest.approx(ref["pixel_acc"], abs=1e-12)
    s = cm.summary()
    assert s["pixels"] == ref["pixels"] and len(s["iou"]) == 19 and s["miou"] == pytest.approx(ref["miou"])


def test_merge_equals_one_matrix_and_empty_matrix_is_nan():
    rng = np.random.default_rng(1)
    (p1, t1), (p2, t2) = random_batch(rng, (9, 11)), random_batch(rng, (9, 11))
    a, b, both = ConfusionMatrix(), ConfusionMatrix(), ConfusionMatrix()
    a.update(torch.from_numpy(p1), torch.from_numpy(t1))
    b.update(torch.from_numpy(p2), torch.from_numpy(t2))
    both.update(torch.from_numpy(np.stack([p1, p2])), torch.from_numpy(np.stack([t1, t2])))
    a.merge(b)
    assert torch.equal(a.matrix, both.matrix)
    empty = ConfusionMatrix()
    empty.update(torch.zeros(4, dtype=torch.long), torch.full((4,), 255))
    assert math.isnan(empty.miou()) and math.isnan(empty.pixel_accuracy()) and np.isnan(empty.iou()).all()


def test_confusion_matrix_rejects_bad_input():
    cm = ConfusionMatrix(19)
    with pytest.raises(ValueError, match=r"prediction shape \(2, 3\) != label shape \(3, 2\)"):
        cm.update(torch.zeros(2, 3), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="label holds ids outside 0..18 and 255"):
        cm.update(torch.zeros(3, dtype=torch.long), torch.tensor([0, 19, 255]))
    with pytest.raises(ValueError, match="prediction holds ids outside 0..18"):
        cm.update(torch.tensor([0, 19, 0]), torch.tensor([0, 1, 255]))
    assert int(cm.matrix.sum()) == 0  # a rejected batch adds nothing
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        ConfusionMatrix(0)


class Oracle(nn.Module):
    """Reads the class from the image's first channel (x = class / 18); logits at ``1/stride`` of the input."""

    def __init__(self, stride: int = 1, constant: int | None = None) -> None:
        super().__init__()
        self.stride, self.constant = stride, constant
        self.scale = nn.Parameter(torch.ones(()))
        self.modes: list[bool] = []

    def forward(self, image: torch.Tensor) -> SegOutput:
        self.modes.append(self.training)
        x = image[:, :1, :: self.stride, :: self.stride] * 18
        classes = torch.arange(19, dtype=image.dtype).view(1, 19, 1, 1)
        target = torch.full_like(x, float(self.constant)) if self.constant is not None else x
        return SegOutput(pred8=-self.scale * (classes - target) ** 2, features={})


def make_loader(rng: np.random.Generator, n: int = 5, size=(30, 50), batch_size: int = 2):
    items = []
    for i in range(n):
        label = torch.from_numpy(rng.integers(0, 7, size)).long()  # classes 0..6 only
        label[torch.from_numpy(rng.random(size) < 0.1)] = 255
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(i))
        image[0] = label.clamp(max=18).float() / 18
        items.append({"image": image, "label": label, "name": f"img{i}"})
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False), items


def test_evaluate_perfect_model_constant_model_and_resizing():
    rng = np.random.default_rng(2)
    loader, items = make_loader(rng)
    model = Oracle().train()
    res = evaluate(model, loader, device="cpu")
    assert model.training and model.modes and not any(model.modes)  # eval inside, training flag restored
    assert res["images"] == 5 and res["miou"] == 1.0 and res["pixel_acc"] == 1.0
    assert res["iou"][:7] == [1.0] * 7 and all(math.isnan(v) for v in res["iou"][7:])
    valid = sum(int((it["label"] != 255).sum()) for it in items)
    assert res["pixels"] == valid and np.array(res["confusion"]).sum() == valid

    # logits at 1/4 of the label size, one class everywhere: resized to the label before the arg-max
    const = evaluate(Oracle(stride=4, constant=3), loader)
    ref = brute_force([np.full(it["label"].shape, 3) for it in items], [it["label"].numpy() for it in items])
    assert const["miou"] == pytest.approx(ref["miou"]) and const["pixel_acc"] == pytest.approx(ref["pixel_acc"])
    assert const["iou"][3] == pytest.approx(ref["iou"][3]) and const["iou"][0] == 0.0
    assert const["miou"] == pytest.approx(const["iou"][3] / 7)  # 7 non-empty unions, one non-zero


def test_evaluate_max_images_and_unbatched_items():
    rng = np.random.default_rng(3)
    loader, items = make_loader(rng, n=6, batch_size=2)
    res = evaluate(Oracle(), loader, max_images=3)
    assert res["images"] == 4  # whole batches: stops after the batch that reaches 3
    single = evaluate(Oracle(), [items[0]])  # a (3, H, W) item without batch dimension
    assert single["images"] == 1 and single["pixel_acc"] == 1.0
