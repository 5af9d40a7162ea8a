"""fasterkd.viz: the numbers the pipeline notebooks show, read back from run folders written here."""

from __future__ import annotations

import json
import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from fasterkd import paper, viz
from fasterkd.data.cityscapes import CLASS_NAMES
from fasterkd.train import preset


def _run(folder, miou, stage="baseline", rows=None, iou=None, arch=None):
    folder.mkdir(parents=True)
    iou = iou if iou is not None else [miou] * 19
    (folder / "eval.json").write_text(json.dumps({"miou": miou, "iou": iou, "pixel_acc": 0.5}))
    (folder / "metrics.json").write_text(json.dumps(rows or [{"epoch": 1, "loss": 2.0, "val_miou": miou}]))
    cfg = preset(stage, "smoke", out_dir=str(folder))
    cfg.model.arch = arch
    (folder / "config.json").write_text(json.dumps(cfg.to_dict()))
    return folder


def test_read_metrics_csv_numbers_and_blank_cells(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,phase,loss,val_miou\n1,pretrain,2.5,\n2,search,1.25,0.125\n")
    rows = viz.read_metrics(tmp_path)
    assert rows == [{"epoch": 1, "phase": "pretrain", "loss": 2.5, "val_miou": None},
                    {"epoch": 2, "phase": "search", "loss": 1.25, "val_miou": 0.125}]
    assert viz.series(rows, "val_miou") == ([2], [0.125])
    assert viz.series(rows, "loss") == ([1, 2], [2.5, 1.25])
    # metrics.json wins over the CSV when both exist
    (tmp_path / "metrics.json").write_text(json.dumps([{"epoch": 7, "loss": 0.5}]))
    assert viz.read_metrics(tmp_path) == [{"epoch": 7, "loss": 0.5}]


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json or metrics.csv"):
        viz.read_metrics(tmp_path)
    with pytest.raises(FileNotFoundError, match="eval.json"):
        viz.read_eval(tmp_path)
    (tmp_path / "eval.json").write_text(json.dumps({"iou": []}))
    with pytest.raises(ValueError, match="'miou'"):
        viz.read_eval(tmp_path)
    with pytest.raises(FileNotFoundError, match="history.json"):
        viz.read_history(tmp_path)


def test_per_class_iou_percent_and_absent_classes():
    iou = [0.5] * 19
    iou[3], iou[18] = None, float("nan")
    rows = viz.per_class_iou({"a": {"miou": 0.5, "iou": iou}, "b": {"miou": 0.1, "iou": [0.1] * 19}})
    assert [r["class"] for r in rows] == list(CLASS_NAMES)
    assert rows[0]["a"] == 50.0 and rows[3]["a"] is None and rows[18]["a"] is None
    assert rows[3]["b"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="expected 19 IoUs, got 18"):
        viz.per_class_iou({"bad": {"miou": 0, "iou": [0.0] * 18}})
    table = viz.markdown_table(rows, digits=1)
    assert table.splitlines()[0] == "| class | a | b |"
    assert "| wall |  | 10.0 |" in table


def test_table1_rows_and_gain(tmp_path):
    for sub, miou in (("baseline", 0.20), ("tutor", 0.25), ("student_c1", 0.2275)):
        _run(tmp_path / sub, miou, stage="tutor" if sub == "tutor" else "baseline")
    rows = viz.table1(tmp_path, cost=False)
    assert [r["source"] for r in rows] == ["ours (baseline)", paper.reference_label(), "ours (tutor)",
                                          paper.reference_label(), "ours (student_c1)", paper.reference_label()]
    assert [r["mIoU (%)"] for r in rows] == pytest.approx([20.0, 60.1, 25.0, 63.6, 22.75, 62.2])
    assert [r["params (M)"] for r in rows[1::2]] == ["3.4", "3.9", "3.4"]
    assert [r["GMACs"] for r in rows[1::2]] == ["27", "100", "27"]
    assert viz.gain(rows, "Baseline student net", "Student net (w. virtual 1/4-path)") == pytest.approx(2.75)
    assert viz.gain(rows, "Baseline student net", "Student net (w. virtual 1/4-path)", "paper") == pytest.approx(2.1)
    with pytest.raises(KeyError, match="no 'ours' row"):
        viz.gain(rows, "Baseline student net", "nope")
    high = viz.table1(tmp_path, cost=False, paper_size="512x1024")
    assert [r["mIoU (%)"] for r in high[1::2]] == [71.1, 73.0, 72.3]


def test_table1_costs_of_the_official_student_and_tutor(tmp_path):
    # arch None = the official FasterSeg student: 3,421,875 parameters at inference, 27.77 G MACs (chapter 1)
    _run(tmp_path / "baseline", 0.1)
    _run(tmp_path / "tutor", 0.1, stage="tutor")
    rows = viz.table1(tmp_path, runs=viz.TABLE1_RUNS[:2])
    assert rows[0]["params (M)"] == pytest.approx(3.421875)
    assert rows[0]["GMACs"] == pytest.approx(27.77, abs=0.01)
    assert rows[2]["params (M)"] == pytest.approx(3.865267)  # the 1/4 path adds 443,392 parameters
    assert rows[2]["GMACs"] == pytest.approx(100.49, abs=0.01)  # Table 1: 3.9 M, 100 G


def test_markdown_table_formatting():
    text = viz.markdown_table([{"x": 1.23456, "y": None}, {"x": float("nan"), "y": "s", "z": 3}], digits=2)
    assert text.splitlines() == ["| x | y | z |", "|---|---|---|", "| 1.23 |  |  |", "|  | s | 3 |"]
    with pytest.raises(ValueError, match="no rows"):
        viz.markdown_table([])


def _history():
    a0 = [[0.2] * 5, [0.6, 0.1, 0.1, 0.1, 0.1]]
    return [
        {"epoch": 3, "lasts": [2, 1], "latency_ms": 2.0, "fps": 500.0, "objective": 0.1, "val_miou": 0.05,
         "latency_weight_next": 0.01, "softmax": {"alpha_0_0": a0, "beta_0_1": [[0.5, 0.5]], "ratio_0_0": [[1 / 3] * 3]}},
        {"epoch": 4, "lasts": [2, 1], "latency_ms": 1.5, "fps": 666.7, "objective": 0.2, "val_miou": None,
         "latency_weight_next": 0.02, "softmax": {"alpha_0_0": [[0.0, 1.0, 0, 0, 0]] * 2, "beta_0_1": [[0.9, 0.1]],
                                                  "ratio_0_0": [[0.2, 0.3, 0.5]]}},
    ]


def test_arch_history_means_and_plot(tmp_path):
    hist = _history()
    (tmp_path / "history.json").write_text(json.dumps(hist))
    assert viz.read_history(tmp_path) == hist
    epochs, probs = viz.mean_softmax(hist, "alpha_0_0")
    assert epochs == [3, 4]
    np.testing.assert_allclose(probs, [[0.4, 0.15, 0.15, 0.15, 0.15], [0.0, 1.0, 0.0, 0.0, 0.0]])
    assert viz.choice_names("alpha_0_0", 5) == ["skip", "conv", "conv_downup", "conv_2x", "conv_2x_downup"]
    assert viz.choice_names("beta_0_1", 2) == list(viz.BETA_CHOICES)
    fig = viz.plot_arch_history(hist, width_mults=[0.5, 0.75, 1.0])
    ax = next(a for a in fig.axes if a.get_title().startswith("gamma"))
    assert [line.get_label() for line in ax.get_lines()] == ["width x0.5", "width x0.75", "width x1"]
    np.testing.assert_allclose(ax.get_lines()[2].get_ydata(), [1 / 3, 0.5])
    rel = viz.plot_arch_history(hist, relative=True)
    ax = next(a for a in rel.axes if a.get_title().startswith("beta"))
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), [0.0, 0.4])  # down: 0.5 -> 0.9
    assert viz.max_departure(hist) == pytest.approx(0.8)  # alpha 'conv' 1.0 vs 1/5
    table = viz.search_table(hist)
    assert table[0]["branches end at"] == "1/32 & 1/16"
    assert table[0]["val mIoU (%)"] == pytest.approx(5.0) and table[1]["val mIoU (%)"] is None
    assert table[1]["lambda1 next"] == 0.02


def test_plot_curves_scales_miou_to_percent(tmp_path):
    rows = [{"epoch": 1, "loss": 3.0}, {"epoch": 2, "loss": 2.0, "val_miou": 0.25}]
    _run(tmp_path / "r", 0.25, rows=rows)
    fig = viz.plot_curves({"run": tmp_path / "r"}, keys=("loss", "val_miou"))
    loss, miou = (ax.get_lines()[0] for ax in fig.axes)
    assert list(loss.get_xdata()) == [1, 2] and list(loss.get_ydata()) == [3.0, 2.0]
    assert list(miou.get_xdata()) == [2] and list(miou.get_ydata()) == [25.0]
    assert not math.isnan(miou.get_ydata()[0])
