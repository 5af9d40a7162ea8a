"""The trainer: presets, config round trip, bit-exact resume, NaN stop, checkpoint refusal, 2-rank DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasterkd import train
from fasterkd.train import OVERRIDES, NonFiniteLossError, TrainConfig, load_checkpoint, preset, run_stage

NOTEBOOK_OVERRIDES = ("data_root", "out_dir", "device", "seed", "epochs", "teacher", "teacher_model", "tutor", "init",
                      "arch", "head", "fa_weight", "fa_convnorm", "quarter_depth")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    # the embedded synthetic data is written once per session into a temporary cache
    monkeypatch.setenv("FASTERKD_CACHE", str(tmp_path_factory.getbasetemp() / "fasterkd-cache"))


# a small derived arch (fch 4, two branches) keeps the student runs of these tests fast
TINY_ARCH = {"format": "fasterkd-arch", "version": 1, "fch": 4, "stem_chi": 8, "head_chi": 8, "name": "tiny-test",
             "branches": [{"last": 2, "ops": ["conv", "conv_downup", "conv", "conv"], "path": [0, 0, 1, 2],
                           "downs": [0, 1, 1, 0], "chis": [8, 8, 8]},
                          {"last": 1, "ops": ["conv", "conv", "skip"], "path": [0, 0, 1], "downs": [0, 1, 0],
                           "chis": [8, 8]}]}


@pytest.fixture(scope="module")
def tiny_arch(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("arch") / "tiny.json"
    path.write_text(json.dumps(TINY_ARCH))
    return str(path)


def smoke(stage: str, out: Path, **kw) -> TrainConfig:
    return preset(stage, "smoke", out_dir=str(out), device="cpu", progress=False, **kw)


# ------------------------------------------------------------------------------ presets


def test_override_names_cover_the_notebooks_and_unknown_names_fail():
    assert set(NOTEBOOK_OVERRIDES) <= set(OVERRIDES)
    cfg = preset("student", "quick", fa_weight=0.5, fa_convnorm=True, quarter_depth=3, head="pixel_shuffle",
                 teacher_model="hrnet-w18", seed=7, epochs=3, device="cpu", data_root="", out_dir="x")
    assert (cfg.loss.fa_weight, cfg.loss.fa_convnorm, cfg.model.quarter_depth, cfg.model.head) == (0.5, True, 3, "pixel_shuffle")
    assert (cfg.guide.teacher_model, cfg.seed, cfg.epochs, cfg.out_dir) == ("hrnet-w18", 7, 3, "x")
    assert preset("baseline", "quick", **{"optim.lr": 0.5}).optim.lr == 0.5
    with pytest.raises(ValueError, match="valid names are .*fa_weight"):
        preset("student", "quick", c=1.0)
    with pytest.raises(ValueError, match="unknown config field 'optim.lrr'"):
        preset("student", "quick", **{"optim.lrr": 1})
    with pytest.raises(ValueError, match="stage must be one of"):
        preset("distill")
    with pytest.raises(ValueError, match="profile must be one of"):
        preset("baseline", "huge")


def test_paper_presets_hold_section_4_2():
    s = preset("search", "paper")
    assert (s.search.pretrain_epochs, s.epochs, s.data.batch_size, s.optim.lr, s.optim.weight_decay) == (20, 30, 6, 0.01, 5e-4)
    assert (s.search.latency_weight, s.loss.kd_weight, s.search.latency_table) == (0.01, 1.0, "official")
    assert (s.search.fps_min, s.search.fps_max, s.optim.momentum) == (155.0, 175.0, 0.9)
    b = preset("baseline", "paper")
    assert (b.epochs, b.data.batch_size, b.optim.lr, b.optim.lr_decay, b.optim.weight_decay) == (500, 10, 0.012, 0.99, 1e-3)
    assert b.data.crop == (256, 512) and b.loss.ohem and b.loss.aux_weight == 0.2
    t = preset("tutor", "paper")
    assert (t.epochs, t.optim.lr, t.model.name) == (350, 0.0026, "tutor")
    st = preset("student", "paper")
    assert (st.epochs, st.optim.lr, st.loss.fa_weight, st.loss.fa_lambda) == (400, 0.003, 1.0, 0.8)
    assert preset("head", "paper").model.head == "pixel_shuffle"


def test_config_round_trips_through_json():
    cfg = preset("search", "quick", fa_weight=0.25, crop=(96, 160))
    back = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    with pytest.raises(ValueError, match="unknown keys \\['bogus'\\]"):
        TrainConfig.from_dict({**cfg.to_dict(), "bogus": 1})


def test_stages_name_their_missing_inputs(tmp_path):
    with pytest.raises(ValueError, match="give teacher="):
        run_stage(smoke("baseline", tmp_path / "b"))
    with pytest.raises(ValueError, match="give tutor="):
        run_stage(smoke("student", tmp_path / "s"))
    with pytest.raises(FileNotFoundError, match="init='nope.pt'"):
        run_stage(smoke("student", tmp_path / "s", init="nope.pt"))
    # a [2, 0] student has no 1/16 path for Eq. 6
    no16 = {**TINY_ARCH, "branches": [TINY_ARCH["branches"][0], {"last": 0, "ops": ["conv", "conv"], "path": [0, 0],
                                                                 "downs": [0, 0], "chis": [8]}]}
    arch = tmp_path / "no16.json"
    arch.write_text(json.dumps(no16))
    with pytest.raises(ValueError, match=r"branches ending at \[0, 2\].*Eq. 6.*search.lasts=\[\[2, 1\]\]"):
        run_stage(smoke("student", tmp_path / "s", arch=str(arch), tutor=str(arch)))


# ------------------------------------------------------------------------------ resume, NaN, refusal


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_resume_is_bit_exact_on_cpu(tmp_path, tiny_arch):
    kw = dict(kd_weight=0.0, arch=tiny_arch, **{"data.scales": (0.75, 1.0, 1.25)})
    straight = run_stage(smoke("baseline", tmp_path / "a", epochs=2, **kw))
    run_stage(smoke("baseline", tmp_path / "b", epochs=1, **kw))
    resumed = run_stage(smoke("baseline", tmp_path / "b", epochs=2, **kw), resume=True)
    a, b = _weights(straight.last), _weights(resumed.last)
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] > 2
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s["momentum_buffer"], t["momentum_buffer"])
    assert [r["loss"] for r in straight.metrics] == [r["loss"] for r in resumed.metrics]
    # a run that starts over from scratch differs from one continued from epoch 1 weights
    assert a["model"] and a["fasterkd_version"] and a["config"]["stage"] == "baseline"


def test_non_finite_loss_stops_the_run_naming_step_terms_and_checkpoint(tmp_path, monkeypatch, tiny_arch):
    real = train.Objective.forward
    calls = {"n": 0}

    def poisoned(self, model, image, label):
        total, terms = real(self, model, image, label)
        if (tmp_path / "nan" / "last.pt").exists() and not calls["n"]:  # first step of epoch 2
            calls["n"] += 1
            terms["ce"] = terms["ce"] * float("nan")
            total = sum(terms.values())
        return total, terms

    monkeypatch.setattr(train.Objective, "forward", poisoned)
    with pytest.raises(NonFiniteLossError) as info:
        run_stage(smoke("baseline", tmp_path / "nan", epochs=2, kd_weight=0.0, arch=tiny_arch))
    msg = str(info.value)
    steps = _weights(tmp_path / "nan" / "last.pt")["step"]
    assert f"at step {steps} (epoch 2, batch 0)" in msg and "'ce': nan" in msg
    assert str(tmp_path / "nan" / "last.pt") in msg
    assert _weights(tmp_path / "nan" / "last.pt")["epoch"] == 1  # the good checkpoint is intact


def test_checkpoints_of_other_models_or_configs_are_refused(tmp_path, tiny_arch):
    base = run_stage(smoke("baseline", tmp_path / "base", kd_weight=0.0, arch=tiny_arch))
    # resuming with another head / another stage recipe
    with pytest.raises(ValueError, match="another configuration: .*model.head"):
        run_stage(smoke("baseline", tmp_path / "base", kd_weight=0.0, head="pixel_shuffle", epochs=2, arch=tiny_arch),
                  resume=True)
    # starting from a baseline of another architecture
    with pytest.raises(ValueError, match="another architecture"):
        run_stage(smoke("tutor", tmp_path / "t2", kd_weight=0.0, init=str(base.best)))
    # a student checkpoint is not a tutor
    with pytest.raises(ValueError, match="expected a tutor run"):
        run_stage(smoke("student", tmp_path / "st", tutor=str(base.best)))
    # not a fasterkd checkpoint at all
    junk = tmp_path / "junk.pt"
    torch.save({"weights": torch.zeros(2)}, junk)
    with pytest.raises(ValueError, match="not a fasterkd checkpoint"):
        load_checkpoint(junk)
    with pytest.raises(ValueError, match="not a fasterkd checkpoint"):
        run_stage(smoke("tutor", tmp_path / "t", kd_weight=0.0, init=str(junk)))
    # the rebuilt model equals the trained one
    model, cfg = load_checkpoint(base.best)
    assert cfg.stage == "baseline" and not model.training
    saved = _weights(base.best)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------ DDP


def test_two_gloo_ranks_hold_identical_weights_and_the_loss_falls(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTERKD_CACHE": os.environ["FASTERKD_CACHE"]}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fasterkd", "train", "baseline", "--profile", "smoke", "--device", "cpu", "--out", str(out),
           "--epochs", "4", "--kd-weight", "0", "--lr", "0.05", "--no-progress", "--batch-size", "4",
           "--set", "ddp_sync_check=true", "--set", "eval_every=0", "--set", "final_eval=false",
           "--set", "loss.ohem=false"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "metrics.json").read_text())
    assert len(rows) == 4
    assert all(r["ddp_max_weight_diff"] == 0.0 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    ckpt = _weights(out / "last.pt")
    assert ckpt["step"] == 4  # 4 images, global batch 4 = 2 ranks x 2: one step per epoch
    # the optimiser saw the global batch at every step (counted on the ranks, summed over them)
    assert [(r["steps"], r["images_per_step"]) for r in rows] == [(1, 4.0)] * 4
    assert not any(k.startswith("module.") for k in ckpt["model"])


def test_one_rank_sees_the_same_images_per_step_as_two_at_the_same_global_batch(tmp_path, tiny_arch):
    # the one-rank twin of the 2-rank run above: global batch 4 -> 4 images per optimiser step
    res = run_stage(smoke("baseline", tmp_path / "one", kd_weight=0.0, arch=tiny_arch, batch_size=4, eval_every=0,
                          final_eval=False))
    assert [(r["steps"], r["images_per_step"]) for r in res.metrics] == [(1, 4.0)]
    # batch 2 (smoke's): two steps of 2 over the 4 images
    res = run_stage(smoke("baseline", tmp_path / "two", kd_weight=0.0, arch=tiny_arch, eval_every=0, final_eval=False))
    assert [(r["steps"], r["images_per_step"]) for r in res.metrics] == [(2, 2.0)]


def test_resume_is_bit_exact_with_fixed_length_epochs(tmp_path, tiny_arch):
    # 4 images at batch 2 is a pass of 2 steps; 3 steps per epoch runs into a second, reshuffled pass
    kw = dict(kd_weight=0.0, arch=tiny_arch, iters_per_epoch=3, eval_every=0, final_eval=False)
    straight = run_stage(smoke("baseline", tmp_path / "a", epochs=2, **kw))
    run_stage(smoke("baseline", tmp_path / "b", epochs=1, **kw))
    resumed = run_stage(smoke("baseline", tmp_path / "b", epochs=2, **kw), resume=True)
    a, b = _weights(straight.last), _weights(resumed.last)
    assert a["step"] == b["step"] == 6 and [r["steps"] for r in straight.metrics] == [3, 3]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["loss"] for r in straight.metrics] == [r["loss"] for r in resumed.metrics]
    # the learning rate decays once per such epoch
    lrs = [r["lr"] for r in straight.metrics]
    assert lrs[1] == pytest.approx(lrs[0] * smoke("baseline", tmp_path).optim.lr_decay)


def test_metrics_csv_json_and_tensorboard_per_epoch(tmp_path, tiny_arch):
    pytest.importorskip("tensorboard")
    result = run_stage(smoke("baseline", tmp_path / "m", epochs=2, kd_weight=0.0, arch=tiny_arch, tensorboard=True))
    rows = json.loads((result.out_dir / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2] and rows == result.metrics
    assert all({"loss", "ce", "lr", "val_miou", "epoch_s", "images_per_s"} <= set(r) for r in rows)
    assert rows[1]["lr"] == pytest.approx(rows[0]["lr"] * 0.99)  # the smoke decay per epoch
    import csv

    with open(result.out_dir / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    assert [float(r["loss"]) for r in table] == [r["loss"] for r in rows]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(result.out_dir / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx([r["loss"] for r in rows])
    assert len(events.Scalars("step/loss")) == _weights(result.last)["step"]
    ev = json.loads((result.out_dir / "eval.json").read_text())
    assert ev["checkpoint"] == str(result.best) and len(ev["iou"]) == 19


def test_mixed_precision_only_on_cuda():
    cfg = preset("baseline", "smoke")
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert train.autocast_dtype(cfg, cpu) is None  # CPU runs stay in float32 (bit-exact resume)
    assert train.autocast_dtype(preset("baseline", "smoke", amp="fp16"), cuda) == torch.float16
    assert train.autocast_dtype(preset("baseline", "smoke", amp="bf16"), cuda) == torch.bfloat16
    assert train.autocast_dtype(preset("baseline", "smoke", amp="off"), cuda) is None
    with pytest.raises(ValueError, match="amp must be auto, bf16, fp16 or off"):
        preset("baseline", "smoke", amp="fp8").validate()


def test_a_recipe_sees_only_its_own_scenes_of_a_grown_synthetic_cache(tmp_path, monkeypatch):
    """The cache of one size/seed is shared; a recipe reads its first synthetic_train/val scenes only."""
    from fasterkd.data.synthetic import ensure_synthetic
    from fasterkd.data.loaders import build_train_set, build_val_loader, resolve_data_root

    monkeypatch.setenv("FASTERKD_CACHE", str(tmp_path / "cache"))
    cfg = preset("baseline", "smoke", out_dir=str(tmp_path / "run"), device="cpu")
    root = resolve_data_root(cfg.data)
    ensure_synthetic(root, {"train": 9, "val": 5}, size=tuple(cfg.data.synthetic_size), seed=cfg.data.synthetic_seed)
    train = build_train_set(cfg)
    assert len(train) == cfg.data.synthetic_train == 4
    assert [train.base[i]["name"] for i in range(4)] == [f"synth_{cfg.data.synthetic_seed}_{i:06d}" for i in range(4)]
    assert len(build_val_loader(cfg).dataset) == cfg.data.synthetic_val


def test_eval_every_zero_keeps_the_last_epoch_as_best(tmp_path, tiny_arch):
    # no epoch is scored, so best.pt must follow the latest weights (it stayed at epoch 1 before)
    from fasterkd.engine.checkpoint import read_checkpoint

    res = run_stage(smoke("baseline", tmp_path / "run", kd_weight=0.0, arch=tiny_arch, epochs=3, eval_every=0))
    assert read_checkpoint(res.best)["epoch"] == 3 == read_checkpoint(res.last)["epoch"]
    assert res.eval["checkpoint"] == str(res.best)


def test_the_final_evaluation_is_the_best_epochs_own_and_equals_a_fresh_one(tmp_path, tiny_arch, monkeypatch):
    # the best checkpoint's weights were evaluated at their epoch: the final evaluation reuses
    # that result (one evaluation fewer per run) and it equals evaluating best.pt afresh
    from fasterkd.engine import trainer
    from fasterkd.inference import evaluate_checkpoint

    calls = []
    real = trainer.run_evaluation
    monkeypatch.setattr(trainer, "run_evaluation", lambda *a: calls.append(1) or real(*a))
    res = run_stage(smoke("baseline", tmp_path / "run", kd_weight=0.0, arch=tiny_arch, epochs=3, eval_every=1))
    assert len(calls) == 3  # one per epoch, none repeated at the end
    fresh = evaluate_checkpoint(res.best, device="cpu", backend="torch")
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert saved["miou"] == fresh["miou"] and saved["iou"] == fresh["iou"]
    assert saved["pixel_acc"] == fresh["pixel_acc"] and saved["checkpoint"] == str(res.best)
    # an unscored run (eval_every=0) still evaluates its best checkpoint at the end
    calls.clear()
    res = run_stage(smoke("baseline", tmp_path / "r0", kd_weight=0.0, arch=tiny_arch, epochs=2, eval_every=0))
    assert len(calls) == 1
