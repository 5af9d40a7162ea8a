"""fasterkd.runs: the run registry, upstream checks, chapter(), run summaries and costs, seeds."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from fasterkd import runs as reg
from fasterkd.cost import model_cost
from fasterkd.models import build_model

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = {p.stem: p for p in (ROOT / "notebooks").glob("*.ipynb")}


def _code(stem: str) -> str:
    nb = json.loads(NOTEBOOKS[stem].read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


# ------------------------------------------------------------------------------ the registry


def test_every_run_is_written_by_a_notebook_that_names_it():
    for run in reg.RUNS.values():
        assert run.chapter in NOTEBOOKS, f"{run.name}: no notebooks/{run.chapter}.ipynb"
        code = _code(run.chapter)
        named = f'"{run.name}"' in code or (run.name == reg.RESEED_RUN and "RESEED_RUN" in code)
        assert named, f"notebooks/{run.chapter}.ipynb does not write {run.name!r}"
    assert set(reg.PIPELINE) <= set(NOTEBOOKS)
    assert list(reg.RUNS) == sorted(reg.RUNS, key=lambda n: reg.RUNS[n].chapter)  # the book's order


def test_each_chapter_needs_only_runs_of_earlier_chapters():
    from fasterkd.histograms import STUDENT_RUNS

    seen = 0
    for stem in NOTEBOOKS:
        for node in ast.walk(ast.parse(_code(stem))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "chapter":
                need = next((k.value for k in node.keywords if k.arg == "need"), None)
                if need is None:
                    continue
                names = [e.value for e in need.elts if isinstance(e, ast.Constant)]
                if any(isinstance(e, ast.Starred) for e in need.elts):
                    names += list(STUDENT_RUNS)  # chapter 6: need=("tutor", *STUDENT_RUNS)
                for name in names:
                    assert reg.chapter_of(name) < stem, f"{stem} needs {name}, written later by {reg.chapter_of(name)}"
                seen += 1
    assert seen >= 8  # chapters 3-10 check their upstream runs


def test_table1_runs_come_from_the_registry():
    from fasterkd import viz

    assert viz.TABLE1_RUNS == (("baseline", "Baseline student net", "baseline"),
                               ("tutor", "Tutor net w. 1/4-path", "tutor"),
                               ("student", "Student net (w. virtual 1/4-path)", "student_c1"))
    with pytest.raises(KeyError, match="not in fasterkd.runs.RUNS"):
        reg.chapter_of("student_c9")


def test_upstream_lists_every_missing_run_with_its_chapter(tmp_path):
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / "best.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        reg.upstream(tmp_path, need=("teacher", "search", "tutor"))
    msg = str(e.value)
    assert "02_search" in msg and "04_tutor" in msg
    assert "search/arch.json" in msg and "tutor/best.pt" in msg and "teacher/best.pt" not in msg
    got = reg.upstream(tmp_path, need=("teacher",))
    assert got["teacher"] == str(tmp_path / "teacher" / "best.pt") and got["arch"] is None
    assert set(got) == {"teacher", "arch", "baseline", "tutor", "student_c1", "student_convnorm"}


# ------------------------------------------------------------------------------ chapter()


def _book_run(tmp_path: Path) -> Path:
    run = tmp_path / "machine" / "runs" / "book-smoke"
    for name in ("baseline", "student_c1"):
        (run / name).mkdir(parents=True)
        (run / name / "best.pt").write_bytes(b"")
    (run / "search").mkdir()
    (run / "search" / "arch.json").write_text("{}")
    return run


def test_chapter_banner_shows_paths_relative_to_the_run_folder(tmp_path):
    run = _book_run(tmp_path)
    ch = reg.chapter("10_qualitative", "smoke", run, device="cpu", need=("baseline", "student_c1"), show=False)
    text = ch.banner()
    assert text.startswith("Profile **smoke**, data: the embedded synthetic street scenes")
    assert "device: cpu (" in text
    assert "Student arch: `search/arch.json`." in text
    assert "Reads `baseline/best.pt`, `student_c1/best.pt` of the run folder." in text
    assert str(tmp_path) not in text and "machine" not in text
    assert ch.device == torch.device("cpu") and ch.options == {"data_root": "", "device": "cpu"}
    assert ch.up["baseline"] == str(run / "baseline" / "best.pt") and ch.up["tutor"] is None
    assert ch.path("tutor") == run / "tutor" and ch.relative(run / "search" / "arch.json") == "search/arch.json"
    out = ch.out_dir()
    assert out == run / "10_qualitative" and out.is_dir()
    cityscapes = reg.chapter("00_data", "paper", run, data_root=str(tmp_path / "data" / "cityscapes"),
                             device="cpu", show=False)
    assert "data: Cityscapes (`cityscapes` folder)" in cityscapes.banner() and "Student arch" not in cityscapes.banner()
    assert str(tmp_path) not in cityscapes.banner()


def test_chapter_prints_its_banner_and_rejects_bad_input(tmp_path, capsys):
    run = _book_run(tmp_path)
    reg.chapter("03_teacher_baseline", "quick", run, device="cpu", need=("search",))
    assert "Reads `search/arch.json` of the run folder." in capsys.readouterr().out
    with pytest.raises(ValueError, match="profile must be one of"):
        reg.chapter("03_teacher_baseline", "fast", run)
    with pytest.raises(FileNotFoundError, match="04_tutor"):
        reg.chapter("05_student", "smoke", run, device="cpu", need=("tutor",))


# ------------------------------------------------------------------------------ run summaries and costs


def _config_run(folder: Path, stage: str = "baseline", **overrides) -> Path:
    from fasterkd.train import preset

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(preset(stage, "smoke", out_dir=str(folder), **overrides).to_dict()))
    return folder


def test_run_cost_counts_the_network_of_the_run(tmp_path):
    bilinear = reg.run_cost(_config_run(tmp_path / "baseline"), "1024x2048")
    # the official FasterSeg student (arch None): chapter 1's numbers
    assert bilinear["params_inference"] == 3_421_875 and bilinear["params"] == 4_385_689
    assert bilinear["macs"] / 1e9 == pytest.approx(27.77, abs=0.01)
    ps = reg.run_cost(_config_run(tmp_path / "head_ps", "head", head="pixel_shuffle"), (1024, 2048))
    assert bilinear["params_inference"] - ps["params_inference"] == 113_344
    with torch.device("meta"):
        assert ps == model_cost(build_model("student", head="pixel_shuffle"), (1024, 2048))
    with pytest.raises(FileNotFoundError, match="has not been trained"):
        reg.run_cost(tmp_path / "nope")


def test_run_summary_reads_eval_and_config(tmp_path):
    run = tmp_path / "student_c0"
    run.mkdir()
    (run / "eval.json").write_text(json.dumps({"miou": 0.25, "iou": [0.5, None], "pixel_acc": 0.75}))
    (run / "config.json").write_text(json.dumps({"loss": {"fa_weight": 0.0}}))
    s = reg.run_summary(run)
    assert s.name == "student_c0" and s.miou_percent == pytest.approx(25.0)
    assert s.iou[0] == 0.5 and math.isnan(s.iou[1])
    assert s.config["loss"]["fa_weight"] == 0.0
    (run / "eval.json").unlink()
    with pytest.raises(FileNotFoundError, match="eval.json"):
        reg.run_summary(run)


def test_upstream_names_the_notebook_of_a_missing_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="03_teacher_baseline"):
        reg.upstream(tmp_path, need=("baseline",))
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / "arch.json").write_text("{}")
    got = reg.upstream(tmp_path, need=())
    assert got["arch"].endswith("search/arch.json") and got["baseline"] is None


def _fake_run(path, miou, seed=12345, epochs=4):
    path.mkdir(parents=True)
    (path / "eval.json").write_text(json.dumps({"miou": miou, "iou": [], "pixel_acc": 0.5}))
    cfg = {"seed": seed, "epochs": epochs, "data": {"root": "", "synthetic_train": 48}}
    (path / "config.json").write_text(json.dumps(cfg))


def test_seed_spread_and_noise_note(tmp_path):
    _fake_run(tmp_path / "student_c1", 0.20)
    runs = [reg.run_summary(tmp_path / "student_c1")]
    assert reg.seed_spread(tmp_path) is None
    assert "not measured" in reg.noise_note(runs, "quick", tmp_path)
    _fake_run(tmp_path / reg.RESEED_RUN, 0.17, seed=12346)
    assert reg.seed_spread(tmp_path) == pytest.approx(3.0)
    note = reg.noise_note(runs, "quick", tmp_path)
    assert "3.0 points" in note and "4 epoch(s) on 48 synthetic training scenes" in note


def test_train_like_changes_only_the_named_knob(tmp_path, monkeypatch):
    from fasterkd.train import preset, run_stage

    monkeypatch.setenv("FASTERKD_CACHE", str(tmp_path / "cache"))
    cfg = preset("baseline", "smoke", out_dir=str(tmp_path / "base"), device="cpu", kd_weight=0.0, epochs=2, lr=0.003)
    run_stage(cfg)
    s = reg.train_like(tmp_path / "base", "base_seed", device="cpu", seed=cfg.seed + 1)
    a = json.loads((tmp_path / "base" / "config.json").read_text())
    b = s.config
    assert b["seed"] == a["seed"] + 1 and b["out_dir"] == str(tmp_path / "base_seed")
    assert b["epochs"] == 2 and b["optim"]["lr"] == 0.003  # the source run's recipe, not today's preset
    diff = {k for k in a if a[k] != b[k]}
    assert diff == {"seed", "out_dir", "progress"}
    assert (tmp_path / "base_seed" / "best.pt").is_file() and 0.0 <= s.miou <= 1.0
    with pytest.raises(FileNotFoundError, match="has not been trained"):
        reg.train_like(tmp_path / "nope", "x")
