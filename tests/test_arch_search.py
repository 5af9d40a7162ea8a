"""Derivation of discrete archs (spec §7), the objective (§5.3) and the official arch import (§8.4-8.5)."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from fasterkd.cli import main
from fasterkd.models.arch import PRIMITIVES, ArchSpec
from fasterkd.models.arch_search import derive_arch, import_official_arch, load_official_arch, objective, select_lasts
from fasterkd.models.student import cell_table
from fasterkd.models.supernet import Supernet, SupernetConfig

REF = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "fasterseg"
ARCHS = Path(__file__).resolve().parents[1] / "fasterkd" / "models" / "archs"
needs_ref = pytest.mark.skipif(not (REF / "arch_1.pt").is_file(), reason="official arch files not available")


def ops_idx(branch) -> list[int]:
    return [PRIMITIVES.index(o) for o in branch.ops]


def distinct_cells(spec: ArchSpec) -> int:
    return sum(r.owner == b for b, rows in enumerate(cell_table(spec)) for r in rows)


def shared_layers(spec: ArchSpec) -> int:
    return sum(r.owner != r.branch for rows in cell_table(spec) for r in rows)


@needs_ref
def test_import_student_reproduces_spec_8_4() -> None:
    spec = import_official_arch(REF / "arch_1.pt")
    assert spec.lasts == [2, 1] and (spec.fch, spec.stem_chi, spec.head_chi) == (12, 8, 8)
    b32, b16 = spec.branches
    assert ops_idx(b32) == [3, 3, 4, 2, 4, 4, 4, 4, 4, 4]
    assert b32.path == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    assert [c / 12 for c in b32.chis] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3, 1 / 3])
    assert ops_idx(b16) == [3, 3, 4, 4, 3, 3, 4, 4, 4]
    assert b16.path == [0, 0, 0, 0, 0, 0, 1, 1, 1]
    assert [c / 12 for c in b16.chis] == pytest.approx([1 / 3] * 7 + [1.0])
    # stride-2 cells at layer 3 and 7 (1/32 branch) and 5 (1/16 branch); 16 distinct cells, 3 shared
    assert [i for i, d in enumerate(b32.downs) if d] == [3, 7] and [i for i, d in enumerate(b16.downs) if d] == [5]
    assert distinct_cells(spec) == 16 and shared_layers(spec) == 3
    assert (len(b32.ops), len(b16.ops)) == (10, 9)
    # the layer table of spec §8.4: channels per layer
    rows = cell_table(spec)
    assert [(r.c_in, r.c_out) for r in rows[0]] == [(64, 32), (32, 32), (32, 32), (32, 128), (128, 64), (64, 64),
                                                    (64, 64), (64, 128), (128, 128), (128, 256)]
    assert [(r.c_in, r.c_out) for r in rows[1][3:]] == [(32, 32), (32, 32), (32, 64), (64, 64), (64, 192), (192, 128)]
    # the unused 1/8-only derivation has 9 layers
    assert len(import_official_arch(REF / "arch_1.pt", lasts="0").branches[0].ops) == 9
    # and it is exactly the committed arch file
    assert spec.to_dict() == ArchSpec.load(ARCHS / "fasterseg_student.json").to_dict()


@needs_ref
def test_import_teacher_reproduces_spec_8_5() -> None:
    spec = import_official_arch(REF / "arch_0.pt")
    assert spec.lasts == [2, 1] and (spec.stem_chi, spec.head_chi) == (12, 12)
    b32, b16 = spec.branches
    z, z2, c2 = "conv_downup", "conv_2x_downup", "conv_2x"
    assert b32.ops == [z, z2, z2, z2, z2, z2, z2, z, z2, z2, z2, z2, z2, z2, c2, c2]
    assert b16.ops == [z, z2, z2, z2, z2, c2, z2, z] + [z2] * 8
    assert [i for i, d in enumerate(b32.downs) if d] == [5, 13] and [i for i, d in enumerate(b16.downs) if d] == [4]
    assert all(c == 12 for c in b32.chis + b16.chis)
    assert distinct_cells(spec) == 28 and shared_layers(spec) == 4
    assert spec.to_dict() == ArchSpec.load(ARCHS / "fasterseg_teacher.json").to_dict()


@needs_ref
def test_official_file_contents_and_branch_choice() -> None:
    d = load_official_arch(REF / "arch_1.pt")
    assert d["alpha_1_0"].shape == (16, 5) and d["ratio_1_2"].shape == (14, 5) and d["alpha_1_0"].device.type == "cpu"
    assert d["mIoU02"] == pytest.approx(0.027548, abs=1e-6) and d["latency12"] == pytest.approx(6.413977, abs=1e-6)
    assert objective(d["mIoU02"], d["latency02"]) == pytest.approx(0.028097, abs=1e-6)
    assert objective(d["mIoU12"], d["latency12"]) == pytest.approx(0.063471, abs=1e-6)
    assert select_lasts(d["mIoU02"], d["latency02"], d["mIoU12"], d["latency12"]) == [2, 1]
    t = load_official_arch(REF / "arch_0.pt")
    assert t["ratio_0_0"].shape == (15, 1) and torch.all(t["ratio_0_0"] == 0.001)


def test_objective_values() -> None:
    assert objective(0.7, 8.3) == pytest.approx(0.7)
    assert objective(0.5, 2 * 8.3) == pytest.approx(0.5 * 2**-0.07) == pytest.approx(0.5 * 0.95264, abs=1e-5)
    assert objective(0.5, 8.3 / 2) == pytest.approx(0.5 * 2**0.07)  # faster than the target: rewarded
    assert select_lasts(0.6, 5.0, 0.5, 5.0) == [2, 0]
    with pytest.raises(ValueError, match="positive"):
        objective(0.5, 0.0)


@needs_ref
def test_quirk_fixes_change_only_what_they_should() -> None:
    d = load_official_arch(REF / "arch_1.pt")
    alphas = [d[f"alpha_1_{j}"] for j in range(3)]
    before = [a.clone() for a in alphas]
    kw = dict(lasts=[2, 1], stem_head_width=(8 / 12, 8 / 12), ignore_skip=False)
    betas = [d["beta_1_1"], d["beta_1_2"]]
    ratios = [d[f"ratio_1_{j}"] for j in range(3)]
    fixed = derive_arch(alphas, betas, ratios, official_quirks=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(alphas, before))  # inputs are not modified
    # quirk 10: the 1/16-only path downsamples at the layer the beta row belongs to (one later)
    assert [i for i, x in enumerate(fixed.branches[1].downs) if x] == [6]
    # the 1/32 rule had the right offsets: same path as the official derivation
    assert fixed.branches[0].path == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_json_round_trip(tmp_path: Path) -> None:
    spec = ArchSpec.load(ARCHS / "fasterseg_student.json")
    spec.save(tmp_path / "a.json")
    again = ArchSpec.load(tmp_path / "a.json")
    assert again == spec and again.to_dict() == spec.to_dict()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


@needs_ref
def test_cli_arch_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "student.json"
    assert main(["arch", "import", str(REF / "arch_1.pt"), "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((ARCHS / "fasterseg_student.json").read_text())
    assert main(["arch", "import", str(REF / "arch_1.pt"), "--out", str(out), "--lasts", "2,0"]) == 0
    assert ArchSpec.load(out).lasts == [2, 0]
    assert main(["arch", "import", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["arch", "import", str(REF / "arch_1.pt"), "--out", str(out), "--lasts", "2,3"]) == 2


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_import_refuses_pickled_code(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"alpha_1_0": _Evil()}, protocol=2))
    with pytest.raises(ValueError, match="cannot be read"):
        import_official_arch(path)


def test_derive_from_a_tiny_supernet_builds_a_student() -> None:
    from fasterkd.models.student import build_student

    torch.manual_seed(0)
    with torch.device("meta"):
        net = Supernet(SupernetConfig(layers=6, fch=4, width_mult_list=(0.5, 0.75, 1.0),
                                      stem_head_widths=((0.75, 0.75),), prun_modes=("arch_ratio",)))
    for p in net.arch_parameters():  # random logits, real tensors
        name = next(n for n, q in net.named_parameters() if q is p)
        setattr(net, name, torch.nn.Parameter(torch.randn(p.shape)))
    for lasts in ([2, 1], [2, 0], [2, 1, 0]):
        spec = net.derive(0, lasts)
        assert spec.lasts == lasts and spec.fch == 4 and spec.stem_chi == 3
        assert "skip" not in [op for b in spec.branches for op in b.ops]
    student = build_student(net.derive(0, [2, 1])).eval()
    with torch.no_grad():
        out = student(torch.randn(1, 3, 64, 96))
    assert out.main.shape == (1, 19, 64, 96)


def test_derive_bad_input() -> None:
    a = [torch.zeros(6, 5), torch.zeros(5, 5), torch.zeros(4, 5)]
    b = [torch.zeros(4, 2), torch.zeros(3, 2)]
    r = [torch.zeros(5, 3), torch.zeros(5, 3), torch.zeros(4, 3)]
    with pytest.raises(ValueError, match="lasts"):
        derive_arch(a, b, r, lasts=[3], fch=4, width_mult_list=(0.5, 0.75, 1.0), stem_head_width=(1.0, 1.0))
    with pytest.raises(ValueError, match="beta_1"):
        derive_arch(a, [torch.zeros(5, 2), b[1]], r, lasts=[2], fch=4, width_mult_list=(0.5, 0.75, 1.0))
    with pytest.raises(ValueError, match="integer channel multiplier"):
        derive_arch(a, b, r, lasts=[2, 1], fch=4, width_mult_list=(1 / 3, 2 / 3, 1.0), stem_head_width=(1.0, 1.0))


def test_summary_lists_spec_8_4_layers() -> None:
    text = ArchSpec.load(ARCHS / "fasterseg_student.json").summary()
    assert "   3 conv_downup      1/8   32 ->  128  stride 2" in text
    assert "   8 conv_2x_downup  1/16  192 ->  128  stride 1" in text
    assert text.count("\n") == 1 + 2 + 10 + 9 - 1
