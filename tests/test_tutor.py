"""The tutor (paper §3.1): student + 1/4 path; outputs, FA taps, initialisation from the student, cost."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fasterkd.cost import count_macs, inference_parameters
from fasterkd.models import build_model, official_arch
from fasterkd.models.student import FasterSegStudent
from fasterkd.models.tutor import Tutor, TutorConfig

torch.set_num_threads(1)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def tutor() -> Tutor:
    return build_model("tutor")


def test_structure(tutor: Tutor) -> None:
    # 1/4 path: two conv_2x (BasicResidual2x) layers on the stem's 64-channel 1/4 output, 128 wide
    assert len(tutor.quarter) == 2
    assert tutor.quarter[0].conv1.weight.shape == (128, 64, 3, 3) and tutor.quarter[0].conv1.stride == (1, 1)
    assert tutor.quarter[1].conv2.weight.shape == (128, 128, 3, 3)
    assert tutor.refine4.conv.weight.shape == (128, 128, 1, 1) and tutor.quarter_proj is None
    student = build_model("student")
    extra = n_params(tutor) - n_params(student)
    assert extra == n_params(tutor.quarter) + n_params(tutor.refine4) == 221_696 + 295_424 + 16_640
    assert n_params(build_model("tutor", quarter_depth=3)) - n_params(tutor) == 295_424  # one more conv_2x 128->128


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
    """Table 1: tutor 3.9 M / 100 G. Measured here: 3,955,635 parameters used at inference and
    112.30 G conv MACs at 1024x2048 (see tutor.py for the readings compared)."""
    with torch.device("meta"):
        model = build_model("tutor").eval()
        student = build_model("student").eval()
    assert inference_parameters(model, (1024, 2048)) == 3_955_635
    assert count_macs(model, (1024, 2048)) == 112_298_295_296
    assert round(inference_parameters(model, (1024, 2048)) / 1e6, 1) in (3.9, 4.0)
    # the 1/4 path costs 84.5 G on top of the student's 27.8 G, the Head now runs at 1/4
    assert count_macs(model, (1024, 2048)) - count_macs(student, (1024, 2048)) == 84_527_808_512


def test_pixel_shuffle_tutor_and_options() -> None:
    model = build_model("tutor", head="pixel_shuffle").train()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.pred4.shape == (2, 19, 64, 96) and out.features["1/4"].shape == (2, 64, 16, 24)
    model = build_model("tutor", quarter_channels=96, refine_kernel=3).train()
    out = model(torch.randn(2, 3, 64, 96))
    assert out.features["1/4"].shape == (2, 128, 16, 24) and model.quarter_proj is not None
    for bad, match in ((dict(quarter_depth=0), "quarter_depth"), (dict(refine_kernel=2), "refine_kernel"),
                       (dict(quarter_channels=0), "quarter_channels")):
        with pytest.raises(ValueError, match=match):
            Tutor(TutorConfig(official_arch(), **bad))
    with pytest.raises(ValueError, match="options are"):
        build_model("tutor", depth=2)
    assert isinstance(model, FasterSegStudent)
