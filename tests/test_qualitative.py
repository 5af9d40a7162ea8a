"""fasterkd.qualitative: the §5 head-cost sweep, Fig. 3 difference maps, run artifacts."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize("C,N", [(128, 19), (64, 19), (256, 150)])
def test_head_cost_matches_section5_formulas(C, N):
    H, W = 16, 32
    rows = {r["head"]: r for r in q.head_cost_sweep([C], [N], H, W)}
    for head, r in rows.items():
        # §5 counts convolution weights and their MACs: our modules match them exactly
        assert r["conv_params"] == r["params_formula"], head
        assert r["macs"] == r["macs_formula"], head
    # what the formula leaves out: the classifier bias and the BatchNorms (2 per channel)
    assert rows["bilinear"]["params_inference"] - rows["bilinear"]["conv_params"] == N + 2 * C + 2 * C
    assert rows["pixel_shuffle"]["params_inference"] - rows["pixel_shuffle"]["conv_params"] == N + 2 * (C // 2) + 2 * (2 * C) + 2 * (C // 2)


def test_pixel_shuffle_saves_macs_only_above_the_crossover():
    from fasterkd.paper import ps_crossover_channels

    N = 19
    cross = ps_crossover_channels(N)  # 138
    rows = q.head_cost_sweep([128, 160], [N], 8, 8)
    macs = {(r["head"], r["C"]): r["macs"] for r in rows}
    assert 128 < cross < 160
    assert macs[("pixel_shuffle", 128)] > macs[("bilinear", 128)]
    assert macs[("pixel_shuffle", 160)] < macs[("bilinear", 160)]


def test_run_summary_reads_eval_and_config(tmp_path):
    run = tmp_path / "student_c0"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"miou": 0.25, "iou": [0.5, None], "pixel_acc": 0.75}))
    (run / "config.json").write_text(json.dumps({"loss": {"fa_weight": 0.0}}))
    s = q.run_summary(run)
    assert s.name == "student_c0" and s.miou_percent == pytest.approx(25.0)
    assert s.iou[0] == 0.5 and math.isnan(s.iou[1])
    assert s.config["loss"]["fa_weight"] == 0.0
    (run / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match="eval.json"):
        q.run_summary(run)


def test_upstream_names_the_notebook_of_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="03_teacher_baseline"):
        q.upstream(tmp_path, need=("baseline",))
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "arch.json").write_text("{}")
    got = q.upstream(tmp_path, need=())
    assert got["arch"].endswith("search/arch.json") and got["baseline"] is None


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


def _fake_run(path, miou, seed=12345, epochs=4):
    path.mkdir(parents=True)
    (path / "eval.json").write_text(json.dumps({"miou": miou, "iou": [], "pixel_acc": 0.5}))
    cfg = {"seed": seed, "epochs": epochs, "data": {"root": "", "synthetic_train": 48}}
    (path / "config.json").write_text(json.dumps(cfg))


def test_seed_spread_and_noise_note(tmp_path):
    _fake_run(tmp_path / "student_c1", 0.20)
    runs = [q.run_summary(tmp_path / "student_c1")]
    assert q.seed_spread(tmp_path) is None
    assert "not measured" in q.noise_note(runs, "quick", tmp_path)
    _fake_run(tmp_path / q.RESEED_RUN, 0.17, seed=12346)
    assert q.seed_spread(tmp_path) == pytest.approx(3.0)
    note = q.noise_note(runs, "quick", tmp_path)
    assert "3.0 points" in note and "4 epoch(s) on 48 synthetic training scenes" in note


def test_train_like_changes_only_the_named_knob(tmp_path, monkeypatch):
    from fasterkd.train import preset, run_stage

    monkeypatch.setenv("FASTERKD_CACHE", str(tmp_path / "cache"))
    cfg = preset("baseline", "smoke", out_dir=str(tmp_path / "base"), device="cpu", kd_weight=0.0, epochs=2, lr=0.003)
    run_stage(cfg)
    s = q.train_like(tmp_path / "base", "base_seed", device="cpu", seed=cfg.seed + 1)
    a = json.loads((tmp_path / "base" / "config.json").read_text())
    b = s.config
    assert b["seed"] == a["seed"] + 1 and b["out_dir"] == str(tmp_path / "base_seed")
    assert b["epochs"] == 2 and b["optim"]["lr"] == 0.003  # the source run's recipe, not today's preset
    diff = {k for k in a if a[k] != b[k]}
    assert diff == {"seed", "out_dir", "progress"}
    assert (tmp_path / "base_seed" / "best.pt").is_file() and 0.0 <= s.miou <= 1.0
    with pytest.raises(FileNotFoundError, match="has not been trained"):
        q.train_like(tmp_path / "nope", "x")
