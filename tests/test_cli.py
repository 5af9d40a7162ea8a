"""The ``fasterkd`` command: cost of the official student, arch import/show, one-line errors with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fasterkd import cli

ROOT = Path(__file__).resolve().parents[1]
ARCH_1 = ROOT.parent / "shared" / "reference" / "fasterseg" / "arch_1.pt"
needs_arch = pytest.mark.skipif(not ARCH_1.is_file(), reason="../shared/reference/fasterseg/arch_1.pt is not beside the repo")

# FasterSeg spec §8.4/§11: the official student's counts at 1024x2048
OFFICIAL = {"params": 4_385_689, "params_inference": 3_421_875, "macs": 27_770_486_784}


def run_json(capsys, argv: list[str]) -> dict:
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cost_of_the_official_student_at_1024x2048(capsys):
    res = run_json(capsys, ["cost", "--model", "student", "--head", "bilinear", "--input", "1024x2048", "--json"])
    assert {k: res[k] for k in OFFICIAL} == OFFICIAL
    assert res["flops"] == 2 * res["macs"]  # the student has no matmul outside its convolutions


def test_cost_table_output_is_readable(capsys):
    assert cli.main(["cost", "--model", "student", "--input", "256x512"]) == 0
    out = capsys.readouterr().out
    assert "params             4,385,689" in out and "params_inference" in out


@needs_arch
def test_arch_import_then_show_then_cost(tmp_path, capsys):
    out = tmp_path / "student.json"
    assert cli.main(["arch", "import", str(ARCH_1), "--out", str(out)]) == 0
    assert f"wrote {out}: branches [2, 1], 19 layers" in capsys.readouterr().out
    written = json.loads(out.read_text())
    packaged = json.loads((ROOT / "fasterkd" / "models" / "archs" / "fasterseg_student.json").read_text())
    assert written == packaged  # the shipped student JSON is exactly what the importer makes
    shown = run_json(capsys, ["arch", "show", str(out)])
    assert shown["branches"] == written["branches"] and shown["fch"] == 12
    assert [b["last"] for b in shown["branches"]] == [2, 1]  # to 1/32 and 1/16
    # the imported file builds the same network: all sizes are multiples of 32, so MACs scale by 16
    small = run_json(capsys, ["cost", "--model", "student", "--arch", str(out), "--input", "256x512", "--json"])
    assert small["params"] == OFFICIAL["params"] and small["params_inference"] == OFFICIAL["params_inference"]
    assert 16 * small["macs"] == OFFICIAL["macs"]


@pytest.mark.parametrize("bad", ["1024", "1024x", "axb", "0x512", "1024x2048x3"])
def test_bad_input_is_one_line_naming_the_flag_and_exit_2(bad, capsys):
    assert cli.main(["cost", "--model", "student", "--input", bad]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fasterkd cost: error: --input must")
    assert repr(bad) in err or "positive" in err
    assert captured.out == ""


def test_errors_from_the_installed_command(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("FASTERKD_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "fasterkd", "cost", "--input", "1024"], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "fasterkd cost: error: --input must look like HxW (e.g. 256x512), got '1024'"
    missing = tmp_path / "nope.json"
    proc = subprocess.run([sys.executable, "-m", "fasterkd", "arch", "show", str(missing)], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and str(missing) in proc.stderr
