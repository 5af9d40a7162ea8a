"""The run lifecycle under faults: kills at seeded moments of the checkpoint commit, SIGINT/SIGTERM,
concurrent runs, folders that already hold a run, orphan temporaries, bit-flipped checkpoints and
typed ``--set`` values. Every run is a real ``fasterkd`` process (smoke profile, 2 epochs of 2 steps,
no teacher); a killed or interrupted run is resumed and compared with an uninterrupted one:
``last.pt`` and ``best.pt`` tensors bit-identical, ``eval.json`` equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasterkd.cli import main
from fasterkd.runlock import RunLock
from fasterkd.train import load_checkpoint, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
ARGS = ["train", "baseline", "--profile", "smoke", "--epochs", "2", "--seed", "1", "--device", "cpu", "--set", "loss.kd_weight=0",
        "--no-progress"]
TIMING = ("images_per_s", "epoch_s")

# a fasterkd CLI process with fault hooks: FAULT_KILL_AT=N hard-kills it (os._exit, as SIGKILL: no
# cleanup) at the N-th rename of a .pt file (the commit of a checkpoint); FAULT_SIGNAL=name:N:count
# sends itself that signal `count` times right after the N-th optimiser step
PROC = r"""
import os, signal, sys
import torch
kill_at = int(os.environ.get("FAULT_KILL_AT", "0"))
renames = [0]
real_replace = os.replace
def replace(src, dst, *a, **k):
    if str(dst).endswith(".pt"):
        renames[0] += 1
        if renames[0] == kill_at:
            os._exit(137)
    return real_replace(src, dst, *a, **k)
os.replace = replace
if os.environ.get("FAULT_SIGNAL"):
    name, after, count = os.environ["FAULT_SIGNAL"].split(":")
    steps = [0]
    real_update = torch.amp.GradScaler.update
    def update(self, *a, **k):
        real_update(self, *a, **k)
        steps[0] += 1
        if steps[0] == int(after):
            for _ in range(int(count)):
                os.kill(os.getpid(), getattr(signal, name))
    torch.amp.GradScaler.update = update
from fasterkd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def fasterkd(out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROC, *ARGS, "--out", str(out), *extra], capture_output=True,
                          text=True, env={**ENV, **(env or {})}, timeout=900)


def assert_same_tensors(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if k not in ("config", "metrics"):
                assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(run: Path, ref: Path) -> None:
    """``run`` ended exactly as the uninterrupted ``ref``: checkpoints, metrics (timings aside), eval."""
    for name in ("last.pt", "best.pt"):
        a, b = read_checkpoint(run / name), read_checkpoint(ref / name)
        assert_same_tensors(a, b, name)
        strip = [{k: v for k, v in r.items() if k not in TIMING} for r in a["metrics"]]
        assert strip == [{k: v for k, v in r.items() if k not in TIMING} for r in b["metrics"]], name
    ev, ev_ref = (json.loads((d / "eval.json").read_text()) for d in (run, ref))
    assert ev.pop("checkpoint") == str(run / "best.pt") and ev_ref.pop("checkpoint") == str(ref / "best.pt")
    assert ev == ev_ref
    assert not list(run.rglob(".*.tmp")), "orphan temporaries left"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run; its second epoch improves on the first (so both epochs write best.pt)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = fasterkd(out)
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(out / "best.pt")["epoch"] == 2, "the smoke run must improve in epoch 2"
    return out


# --------------------------------------------------------------------------------------------
# Kills during the checkpoint commit (on main: last.pt was renamed before best.pt, so a kill between
# the two left best.pt at epoch 1 while last.pt recorded epoch 2's best_miou, never repaired)
# --------------------------------------------------------------------------------------------

# the .pt renames of the run: epoch 1 (best, last), epoch 2 (best, last); 3 and 4 fall inside the
# commit of the improving epoch 2, before and between the renames; 1 before anything is committed
KILLS = [1, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", KILLS)
def test_kill_during_checkpoint_commit_then_resume_equals_uninterrupted(tmp_path, reference, kill_at):
    out = tmp_path / "run"
    r = fasterkd(out, env={"FAULT_KILL_AT": str(kill_at)})
    assert r.returncode == 137, r.stderr
    for f in out.glob("*.pt"):  # every file the kill left loads
        read_checkpoint(f)
    resumed = fasterkd(out, "--resume") if (out / "last.pt").exists() else fasterkd(out, "--overwrite")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


# --------------------------------------------------------------------------------------------
# SIGINT / SIGTERM (on main: a KeyboardInterrupt traceback or a plain death by SIGTERM, no
# checkpoint of the unfinished epoch and no resume line)
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_stops_at_step_boundary_and_resumes_bit_identical(tmp_path, reference, sig, code):
    out = tmp_path / "run"
    r = fasterkd(out, env={"FAULT_SIGNAL": f"{sig}:1:1"})  # after the first step of epoch 1
    assert r.returncode == code, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("fasterkd train:")]
    assert len(lines) == 1 and "interrupted at epoch 1 step 1" in lines[0], r.stderr
    assert "resume with fasterkd train" in lines[0] and lines[0].endswith("--resume"), lines[0]
    assert "Traceback" not in r.stderr
    ckpt = read_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["step"] == 1 and ckpt["partial"]["batch"] == 1
    assert not (out / "run.lock").exists()
    resumed = fasterkd(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)


@pytest.mark.slow
def test_second_sigint_stops_at_once(tmp_path):
    out = tmp_path / "run"
    r = fasterkd(out, env={"FAULT_SIGNAL": "SIGINT:1:2"})
    assert r.returncode == 130, r.stderr
    assert "received twice" in r.stderr and "Traceback" not in r.stderr
    assert not (out / "last.pt").exists()  # no checkpoint of the unfinished step was written


# --------------------------------------------------------------------------------------------
# One run per folder (on main: every one of these trained and exited 0, replacing the earlier run)
# --------------------------------------------------------------------------------------------


def test_second_concurrent_run_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out, command="fasterkd train baseline --out elsewhere"):
        rc = main([*ARGS, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"pid {os.getpid()}" in err and "in use by another run" in err, err
    assert not (out / "config.json").exists()


def test_stale_lock_is_taken_over_with_a_warning(tmp_path, monkeypatch):
    out = tmp_path / "run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    RunLock(out).acquire()  # this process's lock, then rewritten as the dead process's
    info = json.loads((out / "run.lock").read_text())
    (out / "run.lock").write_text(json.dumps({**info, "pid": int(dead.stdout)}))
    monkeypatch.setattr("fasterkd.engine.trainer.Trainer._fit", lambda self, resume: "trained")
    from fasterkd.train import preset, run_stage

    with pytest.warns(RuntimeWarning, match="took over the lock"):
        assert run_stage(preset("baseline", "smoke", out_dir=str(out), kd_weight=0.0)) == "trained"
    assert not (out / "run.lock").exists()


@pytest.fixture(scope="module")
def finished(reference) -> Path:
    return reference


@pytest.mark.slow
@pytest.mark.parametrize("argv", [ARGS, ["train", "head", "--profile", "smoke", "--set", "loss.kd_weight=0"]],
                         ids=["same-stage", "head-into-baseline"])
def test_folder_holding_a_run_is_refused(tmp_path, finished, argv, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "last.pt", "best.pt", "eval.json"):
        (out / name).write_bytes((finished / name).read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rc = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "already holds a run" in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    if argv[1] == "head":  # resuming it as a head run is refused too: another configuration
        assert main([*argv, "--out", str(out), "--resume"]) == 2
        assert "another configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_overwrite_replaces_the_run(tmp_path, reference):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", "last.pt", "best.pt"):
        (out / name).write_bytes((reference / name).read_bytes())
    r = fasterkd(out, "--overwrite", "--set", "seed=7")
    assert r.returncode == 0, r.stderr
    assert read_checkpoint(out / "last.pt")["config"]["seed"] == 7
    assert read_checkpoint(out / "best.pt")["config"]["seed"] == 7


def test_orphan_temporaries_are_removed_at_start(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "sub").mkdir(parents=True)
    (out / "config.json").write_text("{}")  # the run below is then refused, after the clean-up
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from fasterkd.utils import _host_tag

    orphans = [out / f".last.pt.{_host_tag()}-{int(dead.stdout)}.abcd1234.tmp",
               out / "sub" / f".best.pt.{_host_tag()}-{int(dead.stdout)}.efgh5678.tmp"]
    for p in orphans:
        p.write_bytes(b"x" * 1000)
    assert main([*ARGS, "--out", str(out)]) == 2
    assert not any(p.exists() for p in orphans)


# --------------------------------------------------------------------------------------------
# Checksums on every load (on main: a flipped bit loaded silently)
# --------------------------------------------------------------------------------------------


def _flip_tensor_byte(src: Path, dst: Path) -> None:
    """Copy ``src`` with one bit flipped inside the stored bytes of a weight tensor."""
    import zipfile

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = [n for n in zin.namelist() if "/data/" in n]
        victim = max(names, key=lambda n: zin.getinfo(n).file_size)
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename == victim:
                data = bytearray(data)
                data[len(data) // 2] ^= 0x40
                data = bytes(data)
            zout.writestr(item, data)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    from fasterkd.engine.checkpoint import build_network, checkpoint_header, model_identity
    from fasterkd.train import preset
    from fasterkd.utils import atomic_torch_save

    cfg = preset("baseline", "smoke", kd_weight=0.0)
    model = build_network(cfg)
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    atomic_torch_save({**checkpoint_header(cfg, model_identity(model, cfg), model)}, path)
    return path


@pytest.mark.parametrize("loader", ["load_checkpoint", "read_checkpoint", "init", "tutor", "teacher"])
def test_flipped_bit_is_an_error_naming_the_file(tmp_path, small_checkpoint, loader):
    bad = tmp_path / "flipped.pt"
    _flip_tensor_byte(small_checkpoint, bad)
    if loader == "load_checkpoint":
        call = lambda: load_checkpoint(bad)  # noqa: E731
    elif loader == "read_checkpoint":
        call = lambda: read_checkpoint(bad)  # noqa: E731
    else:
        from fasterkd.engine.checkpoint import initialise_from, load_teacher, load_tutor
        from fasterkd.train import build_network, preset

        cfg = preset("student" if loader == "tutor" else "baseline", "smoke", **{loader: str(bad)})
        fn = {"init": lambda: initialise_from(build_network(cfg), cfg),
              "tutor": lambda: load_tutor(cfg, torch.device("cpu")),
              "teacher": lambda: load_teacher(cfg, torch.device("cpu"))}
        call = fn[loader]
    with pytest.raises(ValueError, match="flipped.pt.*checksum mismatch"):
        call()


def test_flipped_bit_via_cli_exits_2(tmp_path, small_checkpoint, capsys):
    bad = tmp_path / "flipped.pt"
    _flip_tensor_byte(small_checkpoint, bad)
    rc = main([*ARGS, "--out", str(tmp_path / "run"), "--set", f"model.init={bad}"])
    assert rc == 2 and "flipped.pt" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Typed overrides through the CLI (on main: "False" was a truthy string; the others tracebacks)
# --------------------------------------------------------------------------------------------


class Parsed(Exception):
    """Raised by the stand-in run_stage: the test stops at the parsed config."""


def test_set_boolean_is_parsed(monkeypatch):
    def stand_in(cfg, **kw):
        raise Parsed(cfg)

    monkeypatch.setattr("fasterkd.train.run_stage", stand_in)
    with pytest.raises(Parsed) as caught:
        main([*ARGS, "--set", "loss.ohem=False", "--set", "optim.grad_clip=none", "--set", "data.crop=32x48"])
    cfg = caught.value.args[0]
    assert cfg.loss.ohem is False and cfg.optim.grad_clip is None and cfg.data.crop == (32, 48)


@pytest.mark.parametrize(("item", "words"), [
    ("optim.lr=abc", "optim.lr: expected a finite number, got 'abc'"),
    ("epochs=[1]", "epochs: expected an integer, got '[1]'"),
    ("loss.ohem=maybe", "loss.ohem: expected a boolean"),
    ("data.crop=64", "data.crop: expected 2 integers"),
])
def test_set_wrong_type_exits_2_naming_key_and_type(tmp_path, capsys, item, words):
    rc = main([*ARGS, "--out", str(tmp_path / "run"), "--set", item])
    err = capsys.readouterr().err
    assert rc == 2 and words in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("suffix", "text", "words"), [
    (".json", '{"epochs": "x"}', "epochs: expected an integer, got 'x'"),
    (".yaml", "loss.ohem: 3\n", "loss.ohem: expected a boolean"),
    (".yaml", "lr: !!python/name:os.system\n", "no !!python tags"),
])
def test_config_file_wrong_type_exits_2(tmp_path, capsys, suffix, text, words):
    cfg = tmp_path / f"c{suffix}"
    cfg.write_text(text)
    argv = [a for a in ARGS if a not in ("--epochs", "2")]  # the file's epochs, not the flag's
    rc = main([*argv, "--out", str(tmp_path / "run"), "--config", str(cfg)])
    err = capsys.readouterr().err
    assert rc == 2 and words in err, err


def test_preset_keeps_python_values():
    from fasterkd.train import preset

    cfg = preset("baseline", "smoke", teacher=Path("t.pt"), crop=[32, 48], lr=1, progress=False)
    assert cfg.guide.teacher == "t.pt" and cfg.data.crop == (32, 48) and cfg.optim.lr == 1.0
    assert isinstance(cfg.optim.lr, float) and cfg.progress is False
    with pytest.raises(ValueError, match="loss.ohem: expected a boolean"):
        preset("baseline", "smoke", **{"loss.ohem": "sometimes"})
