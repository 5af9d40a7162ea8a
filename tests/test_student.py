"""The derived FasterSeg student: layer-by-layer match with spec §8.4, official counts (§11, §14),
named outputs, odd input sizes, and the build_model factory.

Large inputs (1024x2048, 1000x1500) run on the meta device: shapes and counts without compute.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fasterkd.cost import count_macs, inference_parameters, model_cost
from fasterkd.models import build_model, official_arch, resolve_arch
from fasterkd.models.arch import ArchSpec, BranchSpec
from fasterkd.models.student import (
    FasterSegStudent,
    StudentConfig,
    cell_table,
)

pytestmark = pytest.mark.usefixtures("one_thread")

# spec §8.4: (layer, branch, op, C_in, C_out, stride); branch 0 ends at 1/32, branch 1 at 1/16
SPEC_84 = [
    (0, "s", "conv_2x", 64, 32, 1), (1, "s", "conv_2x", 32, 32, 1), (2, "s", "conv_2x_downup", 32, 32, 1),
    (3, 0, "conv_downup", 32, 128, 2), (4, 0, "conv_2x_downup", 128, 64, 1), (5, 0, "conv_2x_downup", 64, 64, 1),
    (6, 0, "conv_2x_downup", 64, 64, 1), (7, 0, "conv_2x_downup", 64, 128, 2), (8, 0, "conv_2x_downup", 128, 128, 1),
    (9, 0, "conv_2x_downup", 128, 256, 1),
    (3, 1, "conv_2x_downup", 32, 32, 1), (4, 1, "conv_2x", 32, 32, 1), (5, 1, "conv_2x", 32, 64, 2),
    (6, 1, "conv_2x_downup", 64, 64, 1), (7, 1, "conv_2x_downup", 64, 192, 1), (8, 1, "conv_2x_downup", 192, 128, 1),
]
# spec §11 student parameter breakdown (thop, all leaf modules)
SPEC_BREAKDOWN = {
    "stem": 130_464, "cells": 2_742_656, "predictor.head": 150_163, "arms32": 41_344, "refines32": 276_864,
    "arms16": 8_320, "refines16": 55_424, "predictor.ffm": 49_408, "heads32": 595_219, "heads16": 335_827,
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def student() -> FasterSegStudent:
    return build_model("student")


def meta_student(head: str = "bilinear") -> nn.Module:
    with torch.device("meta"):
        return build_model("student", head=head).eval()


def test_official_student_matches_spec_84_layer_by_layer(student: FasterSegStudent) -> None:
    table = cell_table(official_arch())
    rows = {(r.layer, r.branch): r for rows in table for r in rows}
    for layer, branch, op, c_in, c_out, stride in SPEC_84:
        for b in ((0, 1) if branch == "s" else (branch,)):
            r = rows[(layer, b)]
            assert (r.op, r.c_in, r.c_out, r.stride) == (op, c_in, c_out, stride), (layer, b)
            assert (r.owner == 0) == (branch == "s" or b == 0)
    assert [len(t) for t in table] == [10, 9]  # branch depths 10 and 9
    # 16 distinct cells; shared ones are one module registered under both official names
    assert len({id(m) for m in student.cells.values()}) == 16 and len(student.cells) == 19
    for layer in range(3):
        assert student.cells[f"{layer}-0"] is student.cells[f"{layer}-1"]
    assert student.cells["3-0"] is not student.cells["3-1"]
    # stem 3 -> 32 -> 64 -> 64 and the head's channels (spec §8.4)
    assert [student.stem[0].conv.out_channels, student.stem[1].conv2.out_channels, student.stem[2].conv2.out_channels] == [32, 64, 64]
    assert [m.conv.weight.shape[:2] for m in student.arms32] == [(128, 256), (64, 128)]
    assert [m.conv.weight.shape[:2] for m in student.refines32] == [(128, 192), (64, 96)]
    assert student.arms16.conv.weight.shape[:2] == (64, 128) and student.refines16.conv.weight.shape[:2] == (64, 96)
    assert student.heads16.conv_3x3.conv.weight.shape[:2] == (192, 192)
    assert student.heads32.conv_3x3.conv.weight.shape[:2] == (256, 256)


def test_official_student_parameter_counts(student: FasterSegStudent) -> None:
    assert n_params(student) == 4_385_689  # thop count: aux heads and the unused FFM attention included
    aux = n_params(student.heads16) + n_params(student.heads32)
    assert aux == 931_046
    assert n_params(student) - aux == 3_454_643
    attention = n_params(student.predictor.ffm.channel_attention)
    assert attention == 32_768
    assert n_params(student) - aux - attention == 3_421_875
    for name, expected in SPEC_BREAKDOWN.items():
        assert n_params(student.get_submodule(name)) == expected, name
    convs = {id(m) for m in student.modules() if isinstance(m, nn.Conv2d)}
    bns = {id(m) for m in student.modules() if isinstance(m, nn.BatchNorm2d)}
    assert (len(convs), len(bns)) == (51, 46)  # spec §11 layer counts


def test_cost_of_official_student_at_1024x2048() -> None:
    model = meta_student()
    # the 3,421,875 used at inference: no aux heads (not run in eval), no FFM attention (never run)
    assert inference_parameters(model, (1024, 2048)) == 3_421_875
    assert count_macs(model, (1024, 2048)) == 27_770_486_784  # spec §11: 27.771 G conv MACs
    cost = model_cost(model, (1024, 2048))
    assert cost["params"] == 4_385_689 and cost["params_inference"] == 3_421_875
    assert cost["macs"] == 27_770_486_784 and cost["flops"] >= 2 * cost["macs"]


def test_pixel_shuffle_student_cost_against_table_3() -> None:
    """Table 3: 3.4 M / 27 G (original) vs 3.3 M / 27 G (dep. sep. conv & PS); we measure 3.31 M / 27.79 G."""
    ps, bl = meta_student("pixel_shuffle"), meta_student("bilinear")
    p_ps, p_bl = inference_parameters(ps, (1024, 2048)), inference_parameters(bl, (1024, 2048))
    m_ps, m_bl = count_macs(ps, (1024, 2048)), count_macs(bl, (1024, 2048))
    assert p_ps == 3_308_531 and round(p_ps / 1e6, 1) == 3.3
    assert p_bl - p_ps == 113_344  # "0.1 MB fewer parameters"
    assert m_ps == 27_791_458_304 and int(m_ps / 1e9) == int(m_bl / 1e9) == 27


def test_train_and_eval_outputs(student: FasterSegStudent) -> None:
    x = torch.randn(2, 3, 64, 128)
    student.train()
    out = student(x)
    assert out.pred8.shape == out.pred16.shape == out.pred32.shape == (2, 19, 64, 128)
    assert out.pred4 is None and out.main is out.pred8
    # taps of the path-wise FA loss (Eq. 6): fused 1/8 (FFM output), f16b, f32 at native resolution
    assert {k: tuple(v.shape) for k, v in out.features.items()} == {
        "1/8": (2, 128, 8, 16), "1/16": (2, 128, 4, 8), "1/32": (2, 256, 2, 4)}
    out.pred8.mean().backward()  # the graph reaches the stem
    assert student.stem[0].conv.weight.grad is not None
    student.zero_grad(set_to_none=True)
    # eval computes only pred8: the aux heads never run
    called = []
    hooks = [student.get_submodule(n).register_forward_hook(lambda *a, n=n: called.append(n)) for n in ("heads16", "heads32")]
    student.eval()
    with torch.no_grad():
        out = student(x)
    for h in hooks:
        h.remove()
    assert called == [] and out.pred16 is None and out.pred32 is None and out.pred8.shape == (2, 19, 64, 128)


def test_any_input_size_pads_and_crops(student: FasterSegStudent) -> None:
    # 1000x1500 (not a multiple of 32) on the meta device: outputs have the input's size
    with torch.device("meta"):
        big = build_model("student").eval()
        for head in ("bilinear", "pixel_shuffle"):
            model = big if head == "bilinear" else build_model("student", head=head).eval()
            out = model(torch.empty(1, 3, 1000, 1500))
            assert out.pred8.shape == (1, 19, 1000, 1500)
            assert out.features["1/8"].shape[-2:] == (128, 188)  # padded to 1024x1504
        big.train()
        out = big(torch.empty(1, 3, 1000, 1500))
        assert out.pred16.shape == out.pred32.shape == (1, 19, 1000, 1500)
    # on real numbers: an odd size equals the zero-padded input's prediction cropped back
    student.eval()
    x = torch.randn(1, 3, 70, 100)
    padded = torch.zeros(1, 3, 96, 128)
    padded[..., :70, :100] = x
    with torch.no_grad():
        assert torch.allclose(student(x).pred8, student(padded).pred8[..., :70, :100])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        student(torch.randn(3, 64, 64))


def test_pixel_shuffle_student_outputs() -> None:
    model = build_model("student", head="pixel_shuffle").train()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.pred8.shape == out.pred16.shape == out.pred32.shape == (2, 19, 64, 96)
    assert out.features["1/8"].shape == (2, 64, 8, 12)  # FFM reduced to C/2


def small_arch(lasts: tuple[int, ...]) -> ArchSpec:
    branches = {
        2: BranchSpec(2, ["conv", "conv_downup", "conv_2x", "conv_2x_downup"], [0, 0, 1, 2], [0, 1, 1, 0], [2, 2, 2]),
        1: BranchSpec(1, ["conv", "conv_downup", "conv"], [0, 0, 1], [0, 1, 0], [2, 3]),
        0: BranchSpec(0, ["conv", "conv_2x"], [0, 0], [0, 0], [2]),
    }
    return ArchSpec(fch=4, stem_chi=2, head_chi=2, branches=[branches[l] for l in lasts], name="tiny").validate()


@pytest.mark.parametrize("lasts", [(2, 1), (2, 0), (1,), (0,), (2,)])
def test_other_branch_choices(lasts: tuple[int, ...]) -> None:
    model = FasterSegStudent(StudentConfig(small_arch(lasts), num_classes=5)).train()
    out = model(torch.randn(2, 3, 40, 72))  # batch 2: BatchNorm needs > 1 value at the 1x1 zoomed 1/32
    assert out.pred8.shape == (2, 5, 40, 72)
    assert (out.pred32 is None) == (2 not in lasts)
    assert (out.pred16 is None) == (not {1, 2} & set(lasts))
    assert ("1/16" in out.features) == (1 in lasts) and ("1/32" in out.features) == (2 in lasts)
    if len(lasts) == 2:  # layer 0 agrees in op, stride and width; layer 1 differs (width or op)
        assert model.cells["0-0"] is model.cells["0-1"] and model.cells["1-0"] is not model.cells["1-1"]
        assert len({id(m) for m in model.cells.values()}) == len(model.cells) - 1


def test_config_errors() -> None:
    arch = official_arch()
    with pytest.raises(ValueError, match="head must be one of"):
        FasterSegStudent(StudentConfig(arch, head="nearest"))
    with pytest.raises(ValueError, match="distinct rates"):
        FasterSegStudent(StudentConfig(ArchSpec(branches=[arch.branches[0], arch.branches[0]])))
    with pytest.raises(ValueError, match="arch must be an ArchSpec"):
        FasterSegStudent(StudentConfig({"fch": 12}))  # type: ignore[arg-type]


def test_build_model_factory(tmp_path) -> None:
    arch = official_arch()
    assert arch.lasts == [2, 1] and arch.name == "fasterseg-student"
    path = tmp_path / "student.json"
    arch.save(path)
    assert resolve_arch(path).to_dict() == arch.to_dict() == resolve_arch(None).to_dict()
    assert json.loads(path.read_text())["branches"][0]["ops"][3] == "conv_downup"
    with torch.device("meta"):
        assert n_params(build_model("student", arch=path)) == 4_385_689
        assert isinstance(build_model("tutor", arch=arch, quarter_depth=3), FasterSegStudent)
        assert n_params(build_model("hrnet-w18-small-v1")) == 1_540_819
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        build_model("resnet")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        build_model("student", arch=tmp_path / "nope.json")
    with pytest.raises(ValueError, match="takes no extra options"):
        build_model("student", quarter_depth=2)
    with pytest.raises(ValueError, match="arch and head do not apply"):
        build_model("hrnet-w18", head="pixel_shuffle")
