"""fasterkd.qualitative: Fig. 3 difference maps and panels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fasterkd import qualitative as q


def test_difference_map_classes_and_ignore():
    label = np.array([[0, 1, 2, 255], [3, 3, 4, 4]])
    base = np.array([[0, 1, 5, 7], [3, 0, 6, 4]])
    stud = np.array([[0, 2, 2, 8], [1, 0, 4, 9]])
    d = q.difference_map(torch.from_numpy(base), stud, label)
    # (0,0) same; (0,1) only baseline right; (0,2) only student right; (0,3) ignored label
    # (1,0) only baseline right; (1,1) same (both wrong); (1,2) only student right; (1,3) only baseline
    assert d.tolist() == [[0, 2, 1, 0], [2, 0, 1, 2]]
    counts = q.difference_counts(d)
    assert counts == {q.DIFF_NAMES[1]: 2, q.DIFF_NAMES[2]: 3, q.DIFF_NAMES[3]: 0}
    d3 = q.difference_map(np.array([[1]]), np.array([[2]]), np.array([[3]]))
    assert d3.tolist() == [[3]]


def test_difference_map_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(H, W\) maps of one size"):
        q.difference_map(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((3, 2)))


def test_pixel_accuracy_ignores_255():
    assert q.pixel_accuracy(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 255])) == pytest.approx(2 / 3)
    assert math.isnan(q.pixel_accuracy(np.array([1]), np.array([255])))


def test_mark_differences_tints_only_differing_pixels():
    rgb = np.full((6, 6, 3), 100, np.uint8)
    diff = np.zeros((6, 6), np.uint8)
    diff[1:5, 1:5] = 1
    out = q.mark_differences(rgb, diff)
    assert (out[0, 0] == 100).all() and (out[5, 5] == 100).all()
    assert tuple(out[1, 1]) == q.DIFF_COLOURS[1]  # outline in the class colour
    assert tuple(out[2, 2]) != (100, 100, 100) and tuple(out[2, 2]) != q.DIFF_COLOURS[1]  # tinted inside


def test_figure3_panels(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    images = torch.zeros(2, 3, 8, 16)
    labels = torch.randint(0, 19, (2, 8, 16))
    base = torch.randint(0, 19, (2, 8, 16))
    fig = q.figure3(images, labels, base, labels.clone(), names=["a.png", "b.png"])
    assert len(fig.axes) == 10
    with pytest.raises(ValueError, match="same number of images"):
        q.figure3(images, labels[:1], base, labels)
