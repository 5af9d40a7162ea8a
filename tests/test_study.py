"""fasterkd.study: per-class group gains (claim 5), the paper's differences, the summary table and
the forest plot (asserted on its artists)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from fasterkd import paper
from fasterkd.data.cityscapes import CLASS_NAMES
from fasterkd.stats import paired_difference
from fasterkd.study import (
    LARGE_CLASSES,
    SMALL_CLASSES,
    class_group_gains,
    class_indices,
    forest_plot,
    iou_matrix,
    paper_differences,
    summary_table,
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------------------------
# paper differences, class names, eval.json rows
# --------------------------------------------------------------------------------------------


def test_paper_differences_come_from_the_tables():
    low = paper_differences("256x512")
    assert low == pytest.approx({"tutor - baseline": 3.5, "FA c=1 - c=0": 1.3,
                                 "from baseline - from scratch": 2.3, "pixel shuffle - bilinear": 1.9})
    # the text's pixel-shuffle gain is the same number as Table 3's difference
    assert low["pixel shuffle - bilinear"] == pytest.approx(paper.GAIN_PS["256x512"])
    high = paper_differences("512x1024")  # Table 2 has no 512x1024 column
    assert high == pytest.approx({"tutor - baseline": 1.9, "pixel shuffle - bilinear": 1.4})
    with pytest.raises(ValueError, match="size must be one of"):
        paper_differences("1024x2048")


def test_class_indices_resolve_names():
    assert class_indices(("pole", "sky", "bicycle")) == (5, 10, 18)
    assert [CLASS_NAMES[i] for i in class_indices(SMALL_CLASSES)] == list(SMALL_CLASSES)
    assert class_indices(LARGE_CLASSES) == (0, 2, 10)
    with pytest.raises(ValueError, match="unknown class 'lamp'"):
        class_indices(["pole", "lamp"])
    with pytest.raises(ValueError, match="single string"):
        class_indices("pole")
    with pytest.raises(ValueError, match="each class may appear once"):
        class_indices(["sky", "sky"])


def test_iou_matrix_reads_eval_rows_in_points_with_nan_for_absent():
    ev0 = {"miou": 0.4, "iou": [0.5] * 18 + [None]}
    ev1 = {"miou": 0.4, "iou": [0.25] * 17 + [float("nan"), 0.75]}
    m = iou_matrix([ev0, ev1])
    assert m.shape == (2, 19)
    assert m[0, 0] == 50.0 and m[1, 0] == 25.0 and m[1, 18] == 75.0
    assert math.isnan(m[0, 18]) and math.isnan(m[1, 17])
    assert iou_matrix([ev0], scale=1.0)[0, 0] == 0.5
    with pytest.raises(ValueError, match=r"evals\[1\]: expected 19 IoUs, got 3"):
        iou_matrix([ev0, {"iou": [0.1, 0.2, 0.3]}])
    with pytest.raises(ValueError, match=r"evals\[0\]: no 'iou' entry"):
        iou_matrix([{"miou": 0.3}])
    with pytest.raises(ValueError, match="no runs"):
        iou_matrix([])


# --------------------------------------------------------------------------------------------
# claim 5: class group gains, hand-computed
# --------------------------------------------------------------------------------------------


def _group_case():
    """Three seeds. Small-class gains average [2, 3, 4] per seed (spread inside the group, summing
    to zero), large-class gains [1, 1, 1]; other classes gain 50 and must not enter. Traffic light
    is undefined in seed 1 of run a and gains 100 elsewhere, so it must be left out."""
    rng = np.random.default_rng(0)
    b = rng.uniform(20.0, 60.0, size=(3, 19))
    gain = np.full((3, 19), 50.0)
    small = list(class_indices(SMALL_CLASSES))
    tl = CLASS_NAMES.index("traffic light")
    kept = [c for c in small if c != tl]  # 5 classes: pole, traffic sign, person, rider, bicycle
    offsets = np.array([-1.0, 1.0, -2.0, 2.0, 0.0])
    for i, g in enumerate([2.0, 3.0, 4.0]):
        gain[i, kept] = g + offsets
    gain[:, tl] = 100.0
    gain[:, list(class_indices(LARGE_CLASSES))] = 1.0
    a = b + gain
    a[1, tl] = np.nan
    return a, b


def test_class_group_gains_hand_computed():
    a, b = _group_case()
    g = class_group_gains(a, b, claim="FA gain", seeds=[0, 1, 2])
    assert g.small_classes == ("pole", "traffic sign", "person", "rider", "bicycle")
    assert g.large_classes == ("road", "building", "sky")
    assert g.excluded == ("traffic light",)
    assert g.small.differences == pytest.approx((2.0, 3.0, 4.0))
    assert g.large.differences == pytest.approx((1.0, 1.0, 1.0))
    # contrast d = [1, 2, 3]: 2 +- 4.302653 / sqrt(3)
    assert g.contrast.differences == pytest.approx((1.0, 2.0, 3.0))
    assert g.contrast.lo == pytest.approx(-0.48414, abs=1e-5) and g.contrast.hi == pytest.approx(4.48414, abs=1e-5)
    assert not g.contrast.resolved and g.small.resolved and g.large.resolved
    assert g.small.unit == "IoU points" and g.small.seeds == (0, 1, 2)
    assert [r.claim for r in g.results] == ["FA gain: thin and small classes", "FA gain: large classes",
                                           "FA gain: thin and small minus large"]
    # the group gain is the mean of the group's classes, not of the runs' means of all classes
    assert g.small.a == pytest.approx(tuple(a[:, list(class_indices(g.small_classes))].mean(axis=1)))


def test_class_group_gains_bootstrap_and_custom_groups():
    a, b = _group_case()
    g = class_group_gains(a, b, small=["pole", "rider"], large=["sky"], method="bootstrap", seed=3)
    # pole and rider carry offsets -1 and +2 around [2, 3, 4]: mean offset +0.5
    assert g.small.differences == pytest.approx((2.5, 3.5, 4.5))
    assert g.contrast.method == "bootstrap" and g.excluded == ()
    assert g.small.lo <= g.small.mean <= g.small.hi


@pytest.mark.parametrize("change,match", [
    (lambda a, b: (a[:, :18], b[:, :18]), r"iou_a: expected a seeds x 19 array"),
    (lambda a, b: (a, b[:2]), "must pair up seed by seed"),
    (lambda a, b: (a, np.where(np.arange(19) == 3, np.inf, b)), "iou_b: infinite IoU values"),
])
def test_class_group_gains_rejects_bad_arrays(change, match):
    a, b = change(*_group_case())
    with pytest.raises(ValueError, match=match):
        class_group_gains(a, b)


def test_class_group_gains_needs_a_defined_class_per_group():
    a, b = _group_case()
    b[0, list(class_indices(LARGE_CLASSES))] = np.nan
    with pytest.raises(ValueError, match=r"large classes \['road', 'building', 'sky'\]: none has an IoU"):
        class_group_gains(a, b)
    with pytest.raises(ValueError, match=r"small and large share classes: \['sky'\]"):
        class_group_gains(*_group_case(), small=["pole", "sky"])


# --------------------------------------------------------------------------------------------
# summary table and forest plot
# --------------------------------------------------------------------------------------------


def _claims():
    return [
        paired_difference([15.0, 16.0, 17.0], [14.0, 14.0, 14.0], claim="tutor - baseline"),   # +2 [-0.5, 4.5]
        paired_difference([1.5, 2.0, 2.5], [0.0, 0.0, 0.0], claim="FA c=1 - c=0", paper=9.9),  # resolved
        paired_difference([80.0, 70.0, 90.0], [10.0, 20.0, 10.0], claim="ConvNorm: S_ij near 1",
                          unit="percentage points"),
        paired_difference([0.0, 0.0, 0.0], [1.5, 2.0, 2.5], claim="pixel shuffle - bilinear"),  # resolved < 0
    ]


def test_summary_table_rows():
    rows = summary_table(_claims(), paper={"tutor - baseline": 3.5, "FA c=1 - c=0": 1.3})
    assert [r["claim"] for r in rows] == ["tutor - baseline", "FA c=1 - c=0", "ConvNorm: S_ij near 1",
                                          "pixel shuffle - bilinear"]
    first = rows[0]
    assert set(first) == {"claim", "unit", "n", "mean", "lo", "hi", "method", "confidence (%)", "resolved", "paper",
                          "verdict"}
    assert (first["n"], first["mean"], first["method"], first["resolved"], first["paper"]) == (3, 2.0, "t", False, 3.5)
    assert first["lo"] == pytest.approx(-0.48414, abs=1e-5) and first["confidence (%)"] == 95.0
    assert rows[1]["paper"] == 1.3  # the mapping overrides the result's own 9.9
    assert rows[2]["paper"] is None and rows[2]["unit"] == "percentage points"
    assert rows[2]["mean"] == pytest.approx(200 / 3)
    assert [r["resolved"] for r in rows] == [False, True, True, True]
    assert rows[3]["verdict"].startswith("resolved: -2.0 [-3.2, -0.8]")
    assert summary_table(_claims())[1]["paper"] == 9.9


@pytest.mark.parametrize("call,match", [
    (lambda: summary_table([]), "no claims"),
    (lambda: summary_table(_claims() + _claims()[:1]), r"repeated: \['tutor - baseline'\]"),
    (lambda: summary_table(_claims(), paper={"tutor vs baseline": 3.5}), "no result for claim 'tutor vs baseline'"),
    (lambda: summary_table(_claims(), paper={"tutor - baseline": math.nan}), "expected a finite number"),
    (lambda: summary_table([{"claim": "x"}]), r"results\[0\]: expected a fasterkd.stats.PairedDifference"),
])
def test_summary_table_rejects_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _by_gid(ax, gid):
    return [a for a in ax.get_children() if a.get_gid() == gid]


def _rows_top_down(ax):
    ticks = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels()]
    return [text for _, text in sorted(ticks, reverse=True)]


def test_forest_plot_one_panel_per_unit_with_rows_markers_and_labels():
    claims = _claims()
    fig = forest_plot(claims, paper={"tutor - baseline": 3.5}, title="embedded study")
    fig.canvas.draw()
    assert len(fig.axes) == 2  # mIoU points, percentage points (in order of first appearance)
    miou, share = fig.axes
    assert miou.get_xlabel() == "paired difference (mIoU points)"
    assert share.get_xlabel() == "paired difference (percentage points)"
    assert _rows_top_down(miou) == ["tutor - baseline", "FA c=1 - c=0", "pixel shuffle - bilinear"]
    assert _rows_top_down(share) == ["ConvNorm: S_ij near 1"]

    # one interval and one mean per row, at the row's height, spanning [lo, hi]
    intervals = _by_gid(miou, "interval")
    assert len(intervals) == 3 and len(_by_gid(share, "interval")) == 1
    by_claim = {r.claim: r for r in claims}
    ys = dict(zip(_rows_top_down(miou), [2, 1, 0]))
    for line, name in zip(intervals, ["tutor - baseline", "FA c=1 - c=0", "pixel shuffle - bilinear"]):
        r = by_claim[name]
        assert list(line.get_xdata()) == pytest.approx([r.lo, r.hi])
        assert list(line.get_ydata()) == [ys[name]] * 2
    means = _by_gid(miou, "mean")
    assert [m.get_xdata()[0] for m in means] == pytest.approx([2.0, 2.0, -2.0])
    # open marker where the interval includes 0 (tutor), filled where resolved
    assert [m.get_markerfacecolor() == "white" for m in means] == [True, False, False]

    # paper diamonds: tutor (from the mapping, 3.5) and FA (the result's own 9.9); none for the others
    papers = _by_gid(miou, "paper")
    assert [(p.get_xdata()[0], p.get_ydata()[0]) for p in papers] == [(3.5, 2), (9.9, 1)]
    assert _by_gid(share, "paper") == []
    assert miou.get_xlim()[1] > 9.9 > 0 > miou.get_xlim()[0]

    # the zero line and the numbers beside each row
    for ax in (miou, share):
        zero = _by_gid(ax, "zero")
        assert len(zero) == 1 and list(zero[0].get_xdata()) == [0, 0]
    texts = [t.get_text() for t in _by_gid(miou, "row_text")]
    assert texts == ["+2.0 [-0.5, +4.5], n=3; paper +3.5", "+2.0 [+0.8, +3.2], n=3; paper +9.9",
                     "-2.0 [-3.2, -0.8], n=3"]
    assert [t.get_text() for t in _by_gid(share, "row_text")] == ["+66.7 [+28.7, +104.6], n=3"]

    # one legend for the figure: both marker kinds, the paper, and the title
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["ours: mean and 95 % interval (Student-t interval), resolved",
                      "ours: mean and 95 % interval (Student-t interval), cannot tell (includes 0)", "paper"]
    assert legend.get_title().get_text() == "embedded study"


def test_forest_plot_on_a_given_axes_and_without_paper_numbers():
    claims = [r for r in _claims() if r.unit == "mIoU points" and r.paper is None]
    fig, ax = plt.subplots()
    out = forest_plot(claims, ax=ax)
    assert out is fig and fig.axes == [ax]
    assert _by_gid(ax, "paper") == []
    assert len(_by_gid(ax, "interval")) == len(claims) == 2
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "paper" not in labels and len(labels) == 2
    assert all("paper" not in t.get_text() for t in _by_gid(ax, "row_text"))


def test_forest_plot_with_bootstrap_rows_and_class_groups():
    g = class_group_gains(*_group_case(), method="bootstrap")
    fig = forest_plot(g.results)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "paired difference (IoU points)"
    assert _rows_top_down(ax) == [r.claim for r in g.results]
    assert "(percentile bootstrap)" in fig.legends[0].get_texts()[0].get_text()


def test_forest_plot_rejects_mixed_units_on_one_axes():
    _, ax = plt.subplots()
    with pytest.raises(ValueError, match="one axes can show one unit"):
        forest_plot(_claims(), ax=ax)
    with pytest.raises(ValueError, match="no result for claim"):
        forest_plot(_claims(), paper={"unknown": 1.0})
