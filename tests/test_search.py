"""The teacher-guided search (Eq. 7): phases, arch updates, latency weight rule, files, resume."""

from __future__ import annotations

import json

import pytest
import torch

from fasterkd.models.arch import ArchSpec
from fasterkd.engine.checkpoint import STUDENT_SPACE, supernet_kwargs
from fasterkd.engine.search import SupernetView
from fasterkd.train import load_checkpoint, preset, run_stage


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTERKD_CACHE", str(tmp_path_factory.getbasetemp() / "fasterkd-cache"))


@pytest.fixture(scope="module")
def search_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    # kd_weight=0: FasterSeg's objective without the HRNet term (the CLI chain test covers Eq. 7 in full)
    cfg = preset("search", "smoke", out_dir=str(out / "run"), device="cpu", progress=False, epochs=2, kd_weight=0.0,
                 **{"search.lasts": ((2, 0), (2, 1))})  # both of FasterSeg's candidates (smoke keeps [2, 1])
    with pytest.MonkeyPatch.context() as mp:  # the same cache as _cache, without leaking past this module
        mp.setenv("FASTERKD_CACHE", str(tmp_path_factory.getbasetemp() / "fasterkd-cache"))
        return cfg, run_stage(cfg)


def test_supernet_space_is_the_one_arch_student_space():
    cfg = preset("search", "paper")
    kw = supernet_kwargs(cfg)
    assert kw["prun_modes"] == ("arch_ratio",) and kw["stem_head_widths"] == ((8 / 12, 8 / 12),)
    assert STUDENT_SPACE["prun_modes"] == ("arch_ratio",)
    small = supernet_kwargs(preset("search", "smoke"))
    assert small["layers"] == 4 and small["fch"] == 4 and small["width_mult_list"] == (0.5, 0.75, 1.0)


def test_search_writes_arch_files_and_history(search_run):
    cfg, result = search_run
    out = result.out_dir
    rows = result.metrics
    assert [r["phase"] for r in rows] == ["pretrain", "search", "search"]
    for e in (2, 3):  # one derived arch per search epoch
        spec = ArchSpec.load(out / f"arch_epoch{e}.json")
        assert sorted(spec.lasts) in ([0, 2], [1, 2]) and spec.fch == 4
    assert result.arch == out / "arch.json"
    assert ArchSpec.load(result.arch).to_dict() == ArchSpec.load(out / "arch_epoch3.json").to_dict()
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [2, 3]
    for h in history:
        assert set(h["softmax"]) == {"alpha_0_0", "alpha_0_1", "alpha_0_2", "beta_0_1", "beta_0_2",
                                     "ratio_0_0", "ratio_0_1", "ratio_0_2"}
        for row in h["softmax"]["alpha_0_0"]:
            assert sum(row) == pytest.approx(1.0, abs=1e-6) and len(row) == 5
        assert {c["lasts"][1] for c in h["candidates"]} == {0, 1}
        assert h["fps"] == pytest.approx(1000.0 / h["latency_ms"])
    assert (out / "latency_table.json").is_file()
    assert json.loads((out / "eval.json").read_text())["lasts"] == history[-1]["lasts"]


def test_latency_weight_follows_the_fps_rule(search_run):
    _, result = search_run
    history = json.loads((result.out_dir / "history.json").read_text())
    weight = 0.01
    for h in history:
        lo, hi = h["fps_range"]
        fps = [c["fps"] for c in h["candidates"]]
        if any(f >= hi for f in fps):
            weight /= 2
        elif any(f <= lo for f in fps):
            weight *= 2
        assert h["latency_weight_next"] == pytest.approx(weight)
    searched = [r for r in result.metrics if r["phase"] == "search"]
    assert searched[0]["latency_weight"] == 0.01
    assert searched[1]["latency_weight"] == pytest.approx(history[0]["latency_weight_next"])


def test_arch_parameters_move_only_in_the_search_phase(search_run):
    _, result = search_run
    ckpt = torch.load(result.last, map_location="cpu", weights_only=True)
    arch = {k: v for k, v in ckpt["model"].items() if k.split("_")[0] in ("alpha", "beta", "ratio")}
    assert len(arch) == 8
    assert any(not torch.allclose(v, torch.full_like(v, 1e-3)) for v in arch.values())
    # the pretrain epoch makes no architecture step; the search epochs do (with the latency term)
    assert "arch_seg" not in result.metrics[0] and "latency_ms" not in result.metrics[0]
    assert all(r["arch_seg"] > 0 and r["latency_ms"] > 0 for r in result.metrics[1:])


def test_search_checkpoint_rebuilds_the_supernet(search_run):
    _, result = search_run
    net, cfg = load_checkpoint(result.last)
    assert cfg.stage == "search" and type(net).__name__ == "Supernet"
    view = SupernetView(net).eval()
    with torch.no_grad():
        out = view(torch.randn(1, 3, 40, 72))
    assert out.main.shape == (1, 19, 40, 72)


def test_search_resume_is_bit_exact(search_run, tmp_path):
    # a fixed latency table (the measured one is timing noise) so two runs can be compared
    lut = str(search_run[1].out_dir / "latency_table.json")

    def cfg(out, epochs):
        return preset("search", "smoke", out_dir=str(out), device="cpu", progress=False, epochs=epochs, kd_weight=0.0,
                      latency_table=lut)

    straight = run_stage(cfg(tmp_path / "a", 2))
    run_stage(cfg(tmp_path / "b", 1))
    resumed = run_stage(cfg(tmp_path / "b", 2), resume=True)
    a = torch.load(straight.last, map_location="cpu", weights_only=True)
    b = torch.load(resumed.last, map_location="cpu", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3 and a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["latency_weight"] == b["latency_weight"] and a["history"] == b["history"]
    assert ArchSpec.load(straight.arch).to_dict() == ArchSpec.load(resumed.arch).to_dict()


def test_two_gloo_ranks_search_in_step(tmp_path):
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fasterkd", "search", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--epochs", "2",
           "--kd-weight", "0", "--no-progress", "--set", "data.synthetic_train=8", "--set", "ddp_sync_check=true",
           "--batch-size", "4"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert [r["phase"] for r in rows] == ["pretrain", "search", "search"]
    # weights and architecture parameters stay identical on both ranks through both kinds of step
    assert all(r["ddp_max_weight_diff"] == 0.0 for r in rows)
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 3  # 8 images in two halves of 4, global batch 4 = 2 ranks x 2: one step per epoch
    assert [(r["steps"], r["images_per_step"]) for r in rows] == [(1, 4.0)] * 3  # the global batch per weight step
    assert ArchSpec.load(out / "arch.json").fch == 4


@pytest.mark.slow
def test_measuring_the_latency_table_leaves_the_seeded_stream_alone(tmp_path_factory):
    # the smoke table is timed on this CPU (noise); measuring it used to draw from the seeded
    # generators, so a run that measured its table and one that found it cached diverged
    base = tmp_path_factory.mktemp("lut_rng")
    common = dict(device="cpu", progress=False, epochs=1, kd_weight=0.0, tensorboard=False)
    measured = run_stage(preset("search", "smoke", out_dir=str(base / "measured"), **common))
    (base / "cached").mkdir()
    (base / "cached" / "latency_table.json").write_bytes((base / "measured" / "latency_table.json").read_bytes())
    cached = run_stage(preset("search", "smoke", out_dir=str(base / "cached"), **common))
    assert measured.arch.read_text() == cached.arch.read_text()
    a = torch.load(measured.out_dir / "last.pt", weights_only=True)["model"]
    b = torch.load(cached.out_dir / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_rank_search_steps_take_the_global_batch_and_the_search_crop(tmp_path, monkeypatch):
    # the one-rank twin of the 2-rank search above: 8 images, halves of 4, global batch 4
    import fasterkd.engine.search as search_mod

    shapes: list[tuple] = []
    real = search_mod.epoch_batches

    def recorded(*args, **kw):
        for b in real(*args, **kw):
            shapes.append((kw.get("salt", 0), tuple(b["image"].shape), tuple(b["label"].shape)))
            yield b

    monkeypatch.setattr(search_mod, "epoch_batches", recorded)
    cfg = preset("search", "smoke", out_dir=str(tmp_path / "one"), device="cpu", progress=False, epochs=1,
                 kd_weight=0.0, batch_size=4, **{"data.synthetic_train": 8, "search.crop": (64, 128)})
    rows = run_stage(cfg).metrics
    assert [(r["phase"], r["steps"], r["images_per_step"]) for r in rows] == [("pretrain", 1, 4.0), ("search", 1, 4.0)]
    # pretrain at data.crop (64x64), both halves of the search at search.crop; labels at 1/8
    assert shapes == [(0, (4, 3, 64, 64), (4, 8, 8)), (0, (4, 3, 64, 128), (4, 8, 16)), (1, (4, 3, 64, 128), (4, 8, 16))]


def test_paper_search_reads_data_as_fasterseg():
    s = preset("search", "paper")
    assert (s.data.downsample, s.data.crop, s.search.crop, s.data.batch_size) == (2, (256, 512), (224, 448), 6)
    assert s.optim.lr == 0.01 and s.search.pretrain_lr is None  # the paper's 0.01 for both phases
    assert preset("search", "paper", pretrain_lr=0.02).search.pretrain_lr == 0.02  # FasterSeg's code value
    assert s.iters_per_epoch == "fasterseg" and s.validate() is s
