"""fasterkd.study_runs: the study's seeds and paired arms, the claims measured from evaluations
(a hand-computed case), the read-back of finished runs, and (slow) the smoke study end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
import torch

from fasterkd import study_runs as sr
from fasterkd.config import preset
from fasterkd.data.cityscapes import CLASS_NAMES, NUM_CLASSES
from fasterkd.study import SMALL_CLASSES, forest_plot, paper_differences, summary_table


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _differing(a, b) -> set[str]:
    fa, fb = _flat(a.to_dict()), _flat(b.to_dict())
    return {k for k in fa if fa[k] != fb[k]}


# ------------------------------------------------------------------------------ design


def test_seeds_are_fixed_per_profile_and_the_book_has_three():
    assert len(sr.study_seeds("quick")) >= 3 and len(sr.study_seeds("smoke")) >= 2
    assert len(sr.study_seeds("study")) > len(sr.study_seeds("quick"))
    assert len(set(sr.study_seeds("study"))) == len(sr.study_seeds("study"))
    with pytest.raises(ValueError, match="profile must be one of"):
        sr.study_seeds("nope")


def test_teacher_presets_give_the_teacher_more_scenes_and_epochs_than_the_students():
    quick, study = preset("teacher", "quick"), preset("teacher", "study")
    assert (quick.epochs, quick.data.synthetic_train, quick.optim.lr_decay, quick.eval_every) == (48, 96, 0.96, 8)
    assert study.epochs == 72 and study.data.synthetic_train == 96
    for stage in ("baseline", "tutor", "student", "head"):  # study: quick's student schedules and data
        q, s = preset(stage, "quick"), preset(stage, "study")
        assert q.data.synthetic_train == 48 and q.epochs < quick.epochs
        assert _differing(q, s) == {"profile", "out_dir"}


def test_each_pair_differs_in_its_knob_only(tmp_path):
    cfgs = sr.arm_configs("smoke", 12346, tmp_path, teacher="t.pt", arch=None)
    assert list(cfgs) == list(sr.ARMS)
    assert {c.seed for c in cfgs.values()} == {12346}
    assert all(c.out_dir == str(tmp_path / "study" / "12346" / arm) for arm, c in cfgs.items())
    assert _differing(cfgs["student_c1"], cfgs["student_c0"]) == {"loss.fa_weight", "out_dir"}
    assert _differing(cfgs["student_c1"], cfgs["student_scratch"]) == {"model.init", "out_dir"}
    assert _differing(cfgs["student_c1"], cfgs["student_convnorm"]) == {"loss.fa_convnorm", "out_dir"}
    assert _differing(cfgs["head_ps"], cfgs["head_bilinear"]) == {"model.head", "out_dir"}
    base = str(tmp_path / "study" / "12346" / "baseline" / "best.pt")
    assert cfgs["tutor"].model.init == base == cfgs["student_c1"].model.init == cfgs["head_ps"].model.init
    assert cfgs["student_c1"].guide.tutor == str(tmp_path / "study" / "12346" / "tutor" / "best.pt")


def test_pinned_threads_restores_the_count_and_rejects_nonsense():
    before = torch.get_num_threads()
    with sr.pinned_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        with sr.pinned_threads(0):
            pass


def test_finished_reads_back_only_the_same_config(tmp_path):
    cfg = preset("baseline", "smoke", out_dir=str(tmp_path / "run"), seed=7)
    out = tmp_path / "run"
    out.mkdir()
    assert sr.finished(cfg) is None  # nothing there
    (out / "config.json").write_text(json.dumps({**cfg.to_dict(), "device": "cuda"}))
    (out / "eval.json").write_text(json.dumps({"miou": 0.25}))
    (out / "best.pt").write_bytes(b"")
    assert sr.finished(cfg) == {"miou": 0.25}  # the device does not change what was trained
    other = preset("baseline", "smoke", out_dir=str(out), seed=8)
    assert sr.finished(other) is None


# ------------------------------------------------------------------------------ the claims, by hand


def _eval(miou: float, small: float, large: float) -> dict:
    iou = [0.5] * NUM_CLASSES
    for i, name in enumerate(CLASS_NAMES):
        if name in SMALL_CLASSES:
            iou[i] = small
        elif name in ("road", "building", "sky"):
            iou[i] = large
    return {"miou": miou, "iou": iou}


def test_measure_gives_the_hand_computed_intervals():
    # tutor - baseline per seed: +2, +3, +4 points -> mean 3, sd 1, half-width t(0.975, 2) / sqrt(3)
    base = {12345: 0.10, 12346: 0.11, 12347: 0.12}
    per_seed = {}
    for k, (s, b) in enumerate(base.items()):
        arms = {arm: _eval(b, 0.1, 0.8) for arm in sr.ARMS}
        arms["tutor"] = _eval(b + 0.01 * (k + 2), 0.1, 0.8)
        arms["student_c1"] = _eval(b, 0.1 + 0.01 * (k + 2), 0.8)  # the gain falls on the small classes
        per_seed[s] = arms
    shares = {12345: (90.0, 10.0), 12346: (80.0, 20.0), 12347: (70.0, 30.0)}  # +80, +60, +40
    results, notes = sr.measure(per_seed, shares)
    by = {r.claim: r for r in results}
    hw = 4.30265273 * 1.0 / math.sqrt(3)
    t1 = by["tutor - baseline"]
    assert t1.differences == pytest.approx((2.0, 3.0, 4.0)) and t1.seeds == (12345, 12346, 12347)
    assert (t1.lo, t1.hi) == pytest.approx((3.0 - hw, 3.0 + hw), abs=1e-6) and t1.resolved
    assert t1.paper == pytest.approx(paper_differences()["tutor - baseline"])
    assert by["FA c=1 - c=0"].mean == pytest.approx(0.0) and not by["FA c=1 - c=0"].resolved
    cn = by[sr.CONVNORM_CLAIM]
    assert cn.unit == sr.SHARE_UNIT and cn.mean == pytest.approx(60.0)
    assert (cn.lo, cn.hi) == pytest.approx((60.0 - 20 * hw, 60.0 + 20 * hw), abs=1e-5)
    small = by["FA c=1 - c=0: thin and small classes"]
    assert small.differences == pytest.approx((2.0, 3.0, 4.0)) and small.resolved
    assert by["FA c=1 - c=0: large classes"].mean == pytest.approx(0.0)
    assert notes == []
    lines = sr.conclusions(results)
    assert lines[0].startswith("tutor - baseline: resolved: +3.0 [+0.5, +5.5]")
    assert lines[1].startswith("FA c=1 - c=0: the study cannot tell: +0.0")


def test_measure_notes_an_unmeasurable_class_claim_and_needs_two_seeds():
    per_seed = {s: {arm: {"miou": 0.1, "iou": [None] * NUM_CLASSES} for arm in sr.ARMS} for s in (1, 2)}
    results, notes = sr.measure(per_seed)
    assert [r.claim for r in results] == [c for c, _, _ in sr.MIOU_CLAIMS]
    assert len(notes) == 1 and "claim 5" in notes[0]
    with pytest.raises(ValueError, match="at least 2 seeds"):
        sr.measure({1: per_seed[1]})
    with pytest.raises(ValueError, match="shares: seeds"):
        sr.measure(per_seed, {1: (1.0, 2.0)})


# ------------------------------------------------------------------------------ smoke, end to end


@pytest.mark.slow
def test_smoke_study_trains_every_arm_and_builds_the_forest_plot(tmp_path):
    from fasterkd.train import run_stage

    teacher = run_stage(preset("teacher", "smoke", out_dir=str(tmp_path / "teacher"), device="cpu", progress=False))
    before = torch.get_num_threads()
    out = sr.run_study("smoke", tmp_path, str(teacher.best), device="cpu", threads=1, workers=2)
    assert torch.get_num_threads() == before
    seeds = sr.study_seeds("smoke")
    assert out["threads"] == 1 and out["workers"] == 2 and tuple(out["seeds"]) == seeds
    # a seed trained in a spawned worker equals the same seed trained in this process
    here = sr.train_seed(sr.arm_configs("smoke", seeds[1], tmp_path, str(teacher.best), device="cpu",
                                        folder=tmp_path / "in-process"), threads=1)
    there = [json.loads((sr.seed_dir(tmp_path, seeds[1]) / a / "eval.json").read_text()) for a in sr.ARMS]
    assert [here[a]["miou"] for a in sr.ARMS] == [e["miou"] for e in there]
    claims = [r.claim for r in out["results"]]
    assert claims[:5] == [c for c, _, _ in sr.MIOU_CLAIMS] + [sr.CONVNORM_CLAIM]
    assert any(c.startswith("FA c=1 - c=0: thin and small") for c in claims) or out["notes"]
    for r in out["results"]:
        assert r.n == len(seeds) and math.isfinite(r.lo) and math.isfinite(r.hi) and r.lo <= r.mean <= r.hi
    rows = summary_table(out["results"], paper_differences())
    assert [row["claim"] for row in rows] == claims
    fig = forest_plot(out["results"], paper_differences())
    means = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == "mean"]
    papers = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == "paper"]
    assert len(means) == len(claims) and len(papers) == len(paper_differences())
    plt.close(fig)
    saved = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert saved["threads"] == 1 and [c["claim"] for c in saved["claims"]] == claims
    best = tmp_path / "study" / str(seeds[0]) / "head_bilinear" / "best.pt"
    stamp = best.stat().st_mtime_ns
    again = sr.run_study("smoke", tmp_path, str(teacher.best), device="cpu", threads=1)  # read back
    assert best.stat().st_mtime_ns == stamp
    assert [r.differences for r in again["results"]] == [r.differences for r in out["results"]]
    # an arm interrupted before its final evaluation (a killed book) is retrained, not refused as
    # "a folder holding another run"
    arm = tmp_path / "study" / str(seeds[0]) / "head_ps"
    (arm / "eval.json").unlink()
    third = sr.run_study("smoke", tmp_path, str(teacher.best), device="cpu", threads=1)
    assert (arm / "eval.json").is_file()
    assert [r.differences for r in third["results"]] == [r.differences for r in out["results"]]


def _fake_finished(cfg) -> None:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    (out / "eval.json").write_text(json.dumps({"miou": 0.25}))
    (out / "best.pt").write_bytes(b"")


def test_the_default_seed_reads_the_chapters_runs_only_when_every_arm_matches(tmp_path, monkeypatch):
    assert sr.chapter_arms("smoke", 12345, tmp_path, teacher="t.pt") is None  # no chapter runs yet
    chapters = sr.arm_configs("smoke", 12345, tmp_path, teacher="t.pt", folder=tmp_path)
    for cfg in chapters.values():
        _fake_finished(cfg)
    got = sr.chapter_arms("smoke", 12345, tmp_path, teacher="t.pt")
    assert got is not None and all(c.out_dir == str(tmp_path / arm) for arm, c in got.items())
    assert got["student_c1"].model.init == str(tmp_path / "baseline" / "best.pt")
    assert sr.chapter_arms("smoke", 12346, tmp_path, teacher="t.pt") is None  # another seed: not these runs
    # one chapter run trained otherwise: none of them is read, so no pair mixes the two folders
    _fake_finished(preset("head", "smoke", out_dir=str(tmp_path / "head_bilinear"), seed=12345, head="bilinear",
                          init=str(tmp_path / "baseline" / "best.pt"), epochs=3))
    assert sr.chapter_arms("smoke", 12345, tmp_path, teacher="t.pt") is None
    _fake_finished(chapters["head_bilinear"])

    trained = {}

    def fake_train_seed(configs, threads):
        folders = {Path(c.out_dir).parent for c in configs.values()}
        assert len(folders) == 1
        trained[configs["baseline"].seed] = folders.pop()
        return {arm: _eval(0.3 if arm == "student_c1" else 0.2, 0.1, 0.6) for arm in sr.ARMS}

    monkeypatch.setattr(sr, "train_seed", fake_train_seed)
    monkeypatch.setattr(sr, "convnorm_shares", lambda folder, **kw: (10.0, 5.0))
    sr.run_study("smoke", tmp_path, "t.pt", device="cpu", threads=1, workers=1)
    assert trained == {12345: tmp_path, 12346: tmp_path / "study" / "12346"}
    saved = json.loads((tmp_path / "study" / "summary.json").read_text())
    assert saved["folders"] == {"12345": ".", "12346": "study/12346"}


def test_summary_markdown_sorts_the_claims_by_their_intervals():
    summary = {"profile": "quick", "seeds": [1, 2, 3], "claims": [
        {"claim": "tutor - baseline", "unit": "points", "mean": 1.84, "lo": 0.03, "hi": 3.65, "resolved": True,
         "paper": 1.5},
        {"claim": "FA c=1 - c=0", "unit": "points", "mean": -0.07, "lo": -0.79, "hi": 0.65, "resolved": False,
         "paper": None}]}
    text = sr.summary_markdown(summary)
    assert "profile `quick`, 3 paired seeds" in text
    assert "- **resolved** (the interval excludes zero): tutor - baseline: +1.84 points [+0.03, +3.65] (the paper: +1.5)." in text
    assert "- **the study cannot tell**: FA c=1 - c=0: -0.07 points [-0.79, +0.65]." in text
    assert "has not run chapter 11" in sr.summary_markdown(None)


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for a reaper)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_seed_workers_end_when_the_process_that_started_them_is_killed(tmp_path):
    """A killed book must not leave its study workers training: SIGKILL the pool's owner, and its
    spawned workers (busy in a long task) end within seconds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "owner.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})\n"
        "from fasterkd import study_runs\n"
        "if __name__ == '__main__':\n"  # spawned workers import this file again
        "    pool = study_runs.seed_pool(2)\n"
        "    futures = [pool.submit(time.sleep, 600) for _ in range(2)]\n"
        "    print(*pool._processes, flush=True)\n"
        "    time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(3.0)  # the workers import the package and start their watchers
        assert all(_alive(p) for p in pids)
        os.kill(owner.pid, signal.SIGKILL)
        owner.wait(10)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in pids), "seed workers outlived the process that started them"
    finally:
        owner.kill()
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
