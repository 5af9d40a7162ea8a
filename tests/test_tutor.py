"""The tutor (paper §3.1): student + 1/4 path; outputs, FA taps, initialisation from the student, cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasterkd.cost import count_macs, inference_parameters
from fasterkd.models import build_model, official_arch
from fasterkd.models.student import FasterSegStudent
from fasterkd.cost import tutor_design_table
from fasterkd.models.tutor import Tutor, TutorConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tutor() -> Tutor:
    return build_model("tutor")


def test_structure(tutor: Tutor) -> None:
    # 1/4 path: two conv_2x (BasicResidual2x) layers on the stem's 64-channel 1/4 output: 64 -> 64
    # (the stem's own width), then 64 -> 128 (the fused 1/8 width); a 3x3 refine of the 1/8 feature
    assert len(tutor.quarter) == 2 and tutor.tutor_config.refine_kernel == 3
    assert tutor.quarter[0].conv1.weight.shape == (64, 64, 3, 3) and tutor.quarter[0].conv1.stride == (1, 1)
    assert tutor.quarter[1].conv1.weight.shape == (128, 64, 3, 3) and tutor.quarter[1].conv2.weight.shape == (128, 128, 3, 3)
    assert tutor.refine4.conv.weight.shape == (128, 128, 3, 3) and tutor.quarter_proj is None
    student = build_model("student")
    extra = n_params(tutor) - n_params(student)
    assert extra == n_params(tutor.quarter) + n_params(tutor.refine4) == 73_984 + 221_696 + 147_712
    assert n_params(build_model("tutor", quarter_depth=3)) - n_params(tutor) == 73_984  # one more conv_2x 64->64


def test_train_outputs_and_taps(tutor: Tutor) -> None:
    tutor.train()
    out = tutor(torch.randn(2, 3, 64, 128))
    assert out.pred4.shape == out.pred16.shape == out.pred32.shape == (2, 19, 64, 128)
    assert out.pred8 is None and out.main is out.pred4
    assert {k: tuple(v.shape) for k, v in out.features.items()} == {
        "1/4": (2, 128, 16, 32), "1/8": (2, 128, 8, 16), "1/16": (2, 128, 4, 8), "1/32": (2, 256, 2, 4)}
    (out.pred4.mean() + out.pred16.mean() + out.pred32.mean()).backward()
    assert tutor.quarter[0].conv1.weight.grad is not None and tutor.refine4.conv.weight.grad is not None
    tutor.zero_grad(set_to_none=True)


def test_eval_computes_only_pred4(tutor: Tutor) -> None:
    tutor.eval()
    with torch.no_grad():
        out = tutor(torch.randn(1, 3, 70, 100))  # odd size: padded to 96x128, cropped back
    assert out.pred4.shape == (1, 19, 70, 100) and out.pred16 is None and out.pred32 is None
    with torch.device("meta"):
        big = build_model("tutor").eval()
        assert big(torch.empty(1, 3, 1000, 1500)).pred4.shape == (1, 19, 1000, 1500)


def test_fused_quarter_feature_is_path_plus_refined_upsampled_1_8(tutor: Tutor) -> None:
    tutor.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = tutor(x)
        _, x4 = tutor.run_stem(x)
        q = tutor.quarter[1](tutor.quarter[0](x4))
        up = nn.functional.interpolate(out.features["1/8"], size=q.shape[-2:], mode="bilinear", align_corners=True)
        assert torch.allclose(out.features["1/4"], q + tutor.refine4(up), atol=1e-5)
        head = tutor.predictor.head(out.features["1/4"])
        ref = nn.functional.interpolate(head, size=(64, 64), mode="bilinear", align_corners=True)
        assert torch.allclose(out.pred4, ref, atol=1e-5)


def test_from_student_copies_every_student_weight() -> None:
    student = build_model("student")
    with torch.no_grad():
        for p in student.parameters():
            p.normal_(0, 0.05)
    tutor = Tutor.from_student(student)
    s_sd, t_sd = student.state_dict(), tutor.state_dict()
    assert set(t_sd) - set(s_sd) == {k for k in t_sd if k.startswith(("quarter.", "refine4."))}
    for k, v in s_sd.items():
        assert torch.equal(t_sd[k], v), k
    student.eval(), tutor.eval()
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        so, to = student(x), tutor(x)
    for key in ("1/8", "1/16", "1/32"):  # the student's taps sit at the same tensors in the tutor
        assert torch.equal(so.features[key], to.features[key]), key
    with pytest.raises(ValueError, match=r"predictor\.ffm\.conv_1x1\.conv\.weight"):
        Tutor.from_student(build_model("student", head="pixel_shuffle")).load_student_weights(student.state_dict())
    with pytest.raises(ValueError, match="needs a FasterSegStudent"):
        Tutor.from_student(tutor)


def test_cost_against_table_1() -> None:
    """Table 1: tutor 3.9 M / 100 G. The default measures 3,865,267 parameters used at inference and
    100.49 G conv MACs at 1024x2048 (meta device: counted, not computed)."""
    with torch.device("meta"):
        model = build_model("tutor").eval()
        student = build_model("student").eval()
    params, macs = inference_parameters(model, (1024, 2048)), count_macs(model, (1024, 2048))
    assert params == 3_865_267 and macs == 100_487_135_232
    assert round(params / 1e6, 1) == 3.9 and round(macs / 1e9) == 100
    # on top of the student's 3,421,875 / 27.77 G: the 1/4 path, its refine, and the Head at 1/4
    assert params - inference_parameters(student, (1024, 2048)) == 443_392
    assert macs - count_macs(student, (1024, 2048)) == 72_716_648_448


def test_each_option_changes_what_it_should() -> None:
    with torch.device("meta"):
        base = build_model("tutor")
        size = (256, 512)  # MACs scale with pixels: 1/16 of the 1024x2048 numbers
        base_params, base_macs = inference_parameters(base, size), count_macs(base, size)
        assert base_macs * 16 == 100_487_135_232
        # refine 1x1: 8 of the 9 taps of a 128 -> 128 conv fewer, at 1/4 (64x128 at this size)
        k1 = build_model("tutor", refine_kernel=1)
        assert k1.refine4.conv.weight.shape == (128, 128, 1, 1)
        assert base_params - inference_parameters(k1, size) == 8 * 128 * 128
        assert base_macs - count_macs(k1, size) == 8 * 128 * 128 * 64 * 128
        # uniform 96-wide path: a 1x1 projection back to the Head's 128 appears
        w96 = build_model("tutor", quarter_widths=(96, 96))
        assert w96.quarter_proj is not None and w96.quarter_proj.conv.weight.shape == (128, 96, 1, 1)
        assert w96.refine4.conv.weight.shape == (96, 128, 3, 3)
        # Head at 1/8: same parameters, the Head's 3x3 + 1x1 cost at 1/8 instead of 1/4
        h8 = build_model("tutor", head_resolution="1/8")
        head = 9 * 128 * 128 + 19 * 128
        assert inference_parameters(h8, size) == base_params
        assert base_macs - count_macs(h8, size) == head * (64 * 128 - 32 * 64)
        # quarter_depth: one more 64 -> 64 layer before the widening one
        d3 = build_model("tutor", quarter_depth=3)
        assert [m.conv2.out_channels for m in d3.quarter] == [64, 64, 128]
        assert count_macs(d3, size) - base_macs == 2 * 9 * 64 * 64 * 64 * 128
    # the Head at 1/8 still predicts at the input size, and its 1/4 tap is unchanged in shape
    model = build_model("tutor", head_resolution="1/8").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out.pred4.shape == (1, 19, 64, 96) and out.features["1/4"].shape == (1, 128, 16, 24)


def test_design_table_against_table_1() -> None:
    rows = {r["design"]: r for r in tutor_design_table()}
    default = rows["64-128, 3x3 refine (default)"]
    assert (default["params"], default["macs"]) == (3_865_267, 100_487_135_232) and default["fits_table_1"]
    assert (default["quarter_params"], default["quarter_macs"]) == (443_392, 72_716_648_448)
    earlier = rows["128-128, 1x1 refine"]
    assert (earlier["params"], earlier["macs"]) == (3_955_635, 112_298_295_296) and not earlier["fits_table_1"]
    # every design within 0.05 M / 3 G of Table 1 but the default needs a layer the text lacks
    fits = sorted(name for name, r in rows.items() if r["fits_table_1"])
    assert fits == ["112-112 + 1x1 projection, 1x1 refine", "64-128, 3x3 refine (default)",
                    "96-96 + 1x1 projection, 3x3 refine"]
    assert all("projection" in rows[n]["text"] for n in fits if n != default["design"])
    # the default is the nearest to (3.9 M, 100 G) in relative distance
    def dist(r):
        return abs(r["params"] / 3.9e6 - 1) + abs(r["macs"] / 100e9 - 1)
    assert min(rows.values(), key=dist) is default


def test_pixel_shuffle_tutor_and_options() -> None:
    model = build_model("tutor", head="pixel_shuffle").train()
    out = model(torch.randn(2, 3, 64, 96))
    # the pixel-shuffle module fuses to C/2 = 64 = the stem's 1/4 width: a 64-64 path, no projection
    assert out.pred4.shape == (2, 19, 64, 96) and out.features["1/4"].shape == (2, 64, 16, 24)
    assert [m.conv2.out_channels for m in model.quarter] == [64, 64] and model.quarter_proj is None
    model = build_model("tutor", quarter_widths=(96, 96), refine_kernel=3).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.features["1/4"].shape == (2, 128, 16, 24) and model.quarter_proj is not None
    for bad, match in ((dict(quarter_depth=0), "quarter_depth"), (dict(refine_kernel=2), "refine_kernel"),
                       (dict(quarter_widths=(64,)), r"quarter_widths must be 2 positive ints"),
                       (dict(quarter_widths=(64, 0)), "quarter_widths"),
                       (dict(head_resolution="1/2"), "head_resolution must be one of")):
        with pytest.raises(ValueError, match=match):
            Tutor(TutorConfig(official_arch(), **bad))
    with pytest.raises(ValueError, match="options are"):
        build_model("tutor", quarter_channels=96)
    assert isinstance(model, FasterSegStudent)
