"""The q of Eq. 5 as a training knob: LossConfig.fa_q reaches the student objective's FA term."""

from __future__ import annotations

import pytest
import torch

from fasterkd.config import preset
from fasterkd.engine.objective import Objective
from fasterkd.losses import path_fa_loss
from fasterkd.models import build_model


def test_fa_q_defaults_to_the_paper_and_is_validated():
    assert preset("student", "smoke").loss.fa_q == 1
    assert preset("student", "smoke", fa_q=2).validate().loss.fa_q == 2
    with pytest.raises(ValueError, match="fa_q"):
        preset("student", "smoke", fa_q=3).validate()


@pytest.mark.parametrize("q", [1, 2])
def test_student_objective_uses_the_configured_q(q):
    torch.manual_seed(0)
    cfg = preset("student", "smoke", fa_q=q)
    student, tutor = build_model("student").eval(), build_model("tutor").eval()
    image = torch.randn(1, 3, 64, 128)
    label = torch.randint(0, 19, (1, 64, 128))
    _, terms = Objective(cfg, None, tutor)(student, image, label)
    with torch.no_grad():
        s, t = student(image).features, tutor(image).features
    expected = path_fa_loss(s, t, lam=cfg.loss.fa_lambda, q=q, impl="reference")
    other = path_fa_loss(s, t, lam=cfg.loss.fa_lambda, q=3 - q, impl="reference")
    assert float(terms["fa"].detach()) == pytest.approx(float(expected), rel=1e-4)
    assert float(terms["fa"].detach()) != pytest.approx(float(other), rel=1e-2)
