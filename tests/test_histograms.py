"""FA histograms (paper §4.3, Fig. 4): affinity values, counts, ConvNorm, widgets, notebook 06."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasterkd.affinity import affinity_matrix
from fasterkd.histograms import (
    PATH_LABELS,
    FAHistograms,
    compute_fa_histograms,
    convnorm_from_state,
    frames_keys,
    histogram,
    live_widget,
    load_source,
    pair_values,
    path_values,
    render_png,
    static_widget,
)
from fasterkd.losses import PathConvNorm, fa_loss

ROOT = Path(__file__).resolve().parents[1]


def _constant_map(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    v = torch.randn(c, generator=torch.Generator().manual_seed(seed))
    return v.view(1, c, 1, 1).expand(b, c, h, w).contiguous()


# ------------------------------------------------------------------------------ values and counts


def test_identical_pixel_vectors_put_all_mass_at_one():
    x = _constant_map(2, 16, 8, 12)
    v = pair_values(x, x * 3.0, max_pixels=4096)  # scale does not change a cosine
    n = 8 * 12
    assert v.pairs == 2 * n * (n - 1) // 2
    for bins in (1, 7, 50):
        for side in (v.student, v.tutor):
            counts, edges = histogram(side, bins)
            assert counts[-1] == v.pairs and counts[:-1].sum() == 0
            assert edges[0] == -1.0 and edges[-1] == 1.0


def test_counts_sum_to_the_number_of_sampled_pairs():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 8, 10, 20, generator=g), torch.randn(3, 5, 20, 40, generator=g)
    small = pair_values(s, t, max_pixels=4096)  # 800 tutor pixels: every pair, exactly
    assert small.pairs == 3 * 800 * 799 // 2
    big = pair_values(s, t, max_pixels=100)  # sampled: 100 pixels per image
    assert big.pairs == 3 * 100 * 99 // 2
    for bins in (3, 25, 100):
        for v in (small, big):
            cs, _ = histogram(v.student, bins)
            ct, _ = histogram(v.tutor, bins)
            assert cs.sum() == ct.sum() == v.pairs


def test_values_are_the_upper_triangle_of_eq4_and_average_to_eq5():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 6, 5, 7, generator=g), torch.randn(1, 9, 5, 7, generator=g)
    v = pair_values(s, t, max_pixels=35)
    n = 35
    iu = torch.triu_indices(n, n, offset=1)
    # brute-force cosine similarities, pixel i = h*W + w
    rows = t[0].flatten(1).t()
    brute = F.cosine_similarity(rows[:, None, :], rows[None, :, :], dim=-1)
    assert torch.allclose(v.tutor, brute[iu[0], iu[1]], atol=1e-6)
    assert torch.allclose(v.student, affinity_matrix(s)[0][iu[0], iu[1]], atol=1e-6)
    # same size, unit vectors: D_ii = 0, so Eq. 5 = (2 / N^2) * sum_{i<j} |D_ij|
    loss = float(fa_loss(s, t, impl="reference"))
    assert loss == pytest.approx(2.0 * float((v.tutor - v.student).abs().double().sum()) / n**2, rel=1e-5)


def test_student_is_interpolated_to_the_tutor_resolution_as_in_the_loss():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(1, 4, 4, 6, generator=g), torch.randn(1, 3, 8, 12, generator=g)
    v = pair_values(s, t, max_pixels=96)
    assert v.pairs == 96 * 95 // 2  # pairs of the tutor's 8 x 12 pixels, not the student's 4 x 6
    up = F.interpolate(F.normalize(s, dim=1), size=(8, 12), mode="bilinear", align_corners=False)
    rows = up[0].flatten(1).t()
    iu = torch.triu_indices(96, 96, offset=1)
    assert torch.allclose(v.student, (rows @ rows.t())[iu[0], iu[1]], atol=1e-6)


def test_sampling_is_seeded_and_shared_by_both_sides():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8, 32, 32, generator=g)
    a, b = pair_values(x, x, max_pixels=64, seed=5), pair_values(x, x, max_pixels=64, seed=5)
    assert torch.equal(a.student, b.student) and torch.equal(a.tutor, b.tutor)
    assert torch.equal(a.student, a.tutor)  # the same pixels are drawn for student and tutor
    c = pair_values(x, x, max_pixels=64, seed=6)
    assert not torch.equal(a.tutor, c.tutor)


def test_histogram_edges_and_bad_input():
    counts, _ = histogram(torch.tensor([-1.0, -0.99, 0.0, 0.999, 1.0, 1.0000002]), 4)
    assert counts.tolist() == [2, 0, 1, 3]  # -1 in the first bin; 1 (and rounding above it) in the last
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        histogram(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="max_pixels must be an integer >= 2"):
        pair_values(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), max_pixels=1)
    with pytest.raises(ValueError, match="one batch"):
        pair_values(torch.zeros(1, 2, 2, 2), torch.zeros(2, 2, 2, 2))


# ------------------------------------------------------------------------------ ConvNorm


def _feats(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    s = {"1/8": torch.randn(1, 6, 8, 8, generator=g), "1/16": torch.randn(1, 7, 4, 4, generator=g),
         "1/32": torch.randn(1, 8, 2, 2, generator=g)}
    t = {"1/4": torch.randn(1, 5, 16, 16, generator=g), "1/16": torch.randn(1, 4, 4, 4, generator=g),
         "1/32": torch.randn(1, 3, 2, 2, generator=g)}
    return s, t


def test_convnorm_layers_round_trip_through_a_checkpoint_state():
    cn = PathConvNorm({"1/8": 6, "1/16": 7, "1/32": 8}, {"1/4": 5, "1/16": 4, "1/32": 3})
    with torch.no_grad():
        for p in cn.parameters():
            p.copy_(torch.randn_like(p))
        for m in cn.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    state = {f"convnorm.{k}": v for k, v in cn.state_dict().items()}
    back = convnorm_from_state({**state, "other.weight": torch.zeros(1)})
    s, t = _feats()
    a = path_values(s, t, cn.eval(), max_pixels=64)
    b = path_values(s, t, back, max_pixels=64)
    for p in PATH_LABELS:
        assert torch.equal(a[p].student, b[p].student) and torch.equal(a[p].tutor, b[p].tutor)
    assert not torch.equal(a[PATH_LABELS[0]].student, path_values(s, t, None, max_pixels=64)[PATH_LABELS[0]].student)
    assert convnorm_from_state({"other.weight": torch.zeros(1)}) is None


def test_collapsed_convnorm_gives_every_affinity_one():
    """§4.3's trivial minimiser: ConvNorm layers mapping every pixel to one direction."""
    cn = PathConvNorm({"1/8": 6, "1/16": 7, "1/32": 8}, {"1/4": 5, "1/16": 4, "1/32": 3}).eval()
    with torch.no_grad():
        for m in cn.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.zero_()
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.uniform_(0.5, 1.0)
    s, t = _feats(1)
    raw = path_values(s, t, None, max_pixels=64)
    col = path_values(s, t, cn, max_pixels=64)
    for p in PATH_LABELS:
        for side in ("student", "tutor"):
            counts, _ = histogram(getattr(col[p], side), 20)
            assert counts[-1] == col[p].pairs
            assert histogram(getattr(raw[p], side), 20)[0][-1] < raw[p].pairs
        assert raw[p].pairs == col[p].pairs


def test_path_values_names_a_missing_path():
    s, t = _feats()
    del t["1/4"]
    with pytest.raises(ValueError, match="tutor features lack the '1/4' path"):
        path_values(s, t)


# ------------------------------------------------------------------------------ checkpoints and widgets


def _train_smoke_runs(run: Path) -> None:
    from fasterkd.train import preset, run_stage

    kw = dict(device="cpu", progress=False, kd_weight=0.0)
    base = run_stage(preset("baseline", "smoke", out_dir=str(run / "baseline"), **kw))
    tutor = run_stage(preset("tutor", "smoke", out_dir=str(run / "tutor"), init=str(base.best), **kw))
    for name, cn in (("student_c1", False), ("student_convnorm", True)):
        run_stage(preset("student", "smoke", out_dir=str(run / name), init=str(base.best), tutor=str(tutor.best),
                         fa_convnorm=cn, **kw))


@contextlib.contextmanager
def _cache(path: Path):
    """The synthetic data of these tests in their own folder, not in the user's cache."""
    old = os.environ.get("FASTERKD_CACHE")
    os.environ["FASTERKD_CACHE"] = str(path)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("FASTERKD_CACHE", None)
        else:
            os.environ["FASTERKD_CACHE"] = old


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fa_runs")
    with _cache(root / "cache"):
        _train_smoke_runs(root / "run")
    return root


@pytest.fixture(scope="module")
def fa(smoke_runs) -> FAHistograms:
    with _cache(smoke_runs / "cache"):
        return compute_fa_histograms(smoke_runs / "run", images=2, max_pixels=128)


def test_checkpoints_load_with_their_convnorm_layers(fa):
    assert fa.checkpoints == ["baseline", "student_c1", "student_convnorm"]
    assert [fa.has_convnorm(c) for c in fa.checkpoints] == [False, False, True]
    assert fa.images.shape[:2] == (2, 3)
    assert fa.counts("student_c1", True, PATH_LABELS[0], 10) is None
    for p in PATH_LABELS:
        raw = fa.values("student_convnorm", False, p)
        cn = fa.values("student_convnorm", True, p)
        assert raw.pairs == cn.pairs and not torch.equal(raw.student, cn.student)
        # the tutor side is the same network for every run: identical values without ConvNorm
        assert torch.equal(fa.values("baseline", False, p).tutor, raw.tutor)
    n = {row["path"]: row["pairs"] for row in fa.summary() if row["checkpoint"] == "baseline"}
    h, w = fa.images.shape[-2:]
    quarter = (h // 4) * (w // 4)
    m = min(quarter, 128)  # tutor 1/4 pixels, sampled down to max_pixels
    assert n[PATH_LABELS[0]] == 2 * m * (m - 1) // 2
    assert n[PATH_LABELS[2]] == 2 * ((h // 32) * (w // 32)) * ((h // 32) * (w // 32) - 1) // 2


def test_missing_checkpoint_names_the_notebook_that_makes_it(smoke_runs, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"student_convnorm.*05_student"):
        load_source(tmp_path / "student_convnorm" / "best.pt", "student_convnorm", made_by="05_student")
    with pytest.raises(FileNotFoundError, match="04_tutor"):
        compute_fa_histograms(tmp_path)


def test_precomputed_frames_match_live_recomputation(fa, smoke_runs):
    bins_options = (10, 25, 50)
    with _cache(smoke_runs / "cache"):  # a fresh recomputation from the networks, not the shared cache
        fresh = compute_fa_histograms(smoke_runs / "run", images=2, max_pixels=128)
    static = static_widget(fa, bins_options=bins_options)
    assert sorted(static.frames) == sorted(frames_keys(fa.checkpoints, bins_options))
    assert len(static.frames) == len(PATH_LABELS) * 3 * 2 * 3
    live = live_widget(fa, bins_options=bins_options)
    c = static.controls
    for pi, ci, cni, bi in [(0, 2, 1, 2), (1, 0, 0, 0), (2, 2, 0, 1), (0, 1, 1, 1), (2, 1, 0, 2)]:
        ctl = live.controls
        ctl.path.index, ctl.checkpoint.index, ctl.convnorm.index, ctl.bins.index = pi, ci, cni, bi
        key = live.current_key()
        assert key == (fa.checkpoints[ci], bool(cni), PATH_LABELS[pi], bins_options[bi])
        recomputed = fresh.counts(*key)
        pre = static.counts[key]
        if recomputed is None:
            assert pre is None and live.counts is None
        else:
            for a, b, l in zip(pre, recomputed, live.counts):
                assert np.array_equal(a, b) and np.array_equal(a, l)
        # the frame the browser shows for these control indices (the nested Stacks the jslinks
        # switch) is the image the live widget drew
        node = static.stack
        for i in (pi, ci, cni, bi):
            node = node.children[i]
        assert node.value == static.frames[key] == live.image.value
    # one jslink per Stack from the control of its level to the Stack's selected_index
    assert len(static.links) == 1 + 3 + 3 * 3 + 3 * 3 * 2
    levels = {id(c.path), id(c.checkpoint), id(c.convnorm), id(c.bins)}
    for link in static.links:
        (src, sname), (dst, dname) = link.source, link.target
        assert id(src) in levels and sname == "index" and dname == "selected_index"
        assert dst.selected_index == src.index


def test_widget_controls_reject_unknown_choices(fa):
    with pytest.raises(ValueError, match="checkpoint must be one of"):
        static_widget(fa, checkpoint="student_c9")
    with pytest.raises(ValueError, match="bins must be one of"):
        live_widget(fa, bins_options=(10, 20), bins=30)


def test_frames_render_both_sides_and_the_no_convnorm_message(fa):
    png = render_png(fa.counts("student_convnorm", True, PATH_LABELS[0], 25), "t")
    empty = render_png(None, "t", "student_c1")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and empty[:8] == b"\x89PNG\r\n\x1a\n" and png != empty


# ------------------------------------------------------------------------------ notebook 06


@pytest.mark.slow
def test_fa_notebook_runs_with_the_smoke_profile(smoke_runs, tmp_path):
    nb = json.loads((ROOT / "notebooks" / "06_fa_histograms.ipynb").read_text())
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(params) == 1
    assert "".join(params[0]["source"]).split("\n") == [
        'profile = "quick"', 'run_dir = "../runs/book-quick"', 'data_root = ""', 'device = "auto"']
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTERKD_CACHE": str(smoke_runs / "cache")}
    env.pop("MPLBACKEND", None)

    def run(run_dir: Path, out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "papermill", "notebooks/06_fa_histograms.ipynb", str(out),
                               "-p", "profile", "smoke", "-p", "run_dir", str(run_dir), "--cwd", "notebooks",
                               "-k", "python3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

    out = tmp_path / "out.ipynb"
    proc = run(smoke_runs / "run", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(out.read_text())
    images = sum("image/png" in o.get("data", {}) for c in done["cells"] for o in c.get("outputs", []))
    assert images >= 1  # the Fig. 4 figure
    state = done["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    models = [m["model_name"] for m in state.values()]
    assert models.count("StackModel") == 1 + 3 + 9 + 18
    assert models.count("LinkModel") == 1 + 3 + 9 + 18
    pngs = [m for m in state.values() if m["model_name"] == "ImageModel"]
    assert len(pngs) >= 3 * 3 * 2 * 4
    # a missing checkpoint stops the notebook with the chapter that trains it
    bad = run(tmp_path / "empty", tmp_path / "bad.ipynb")
    assert bad.returncode != 0 and "04_tutor" in (bad.stdout + bad.stderr)
