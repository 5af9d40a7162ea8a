"""The training objectives of the stages after the search (Eq. 8-10), the §4.3 ConvNorm layers, and
the guard that stops a run whose loss became NaN or infinite (shared with the search).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor, nn

from fasterkd.config import TrainConfig


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step, the terms and the checkpoint."""


def check_finite(loss: Tensor, terms: Mapping[str, Tensor], *, step: int, epoch: int, batch: int, last: Path,
                 what: str = "loss") -> tuple[float, dict[str, float]]:
    """``(loss, {term: value})`` as floats; a non-finite loss raises :class:`NonFiniteLossError`
    naming the step, the terms and the last good checkpoint (``epoch`` counts from 0)."""
    values = {k: float(v.detach()) for k, v in terms.items()}
    total = float(loss.detach())
    if not math.isfinite(total):
        good = str(last) if last.exists() else "none yet (it fails in the first epoch)"
        shown = {k: round(v, 6) if math.isfinite(v) else v for k, v in values.items()}
        raise NonFiniteLossError(f"non-finite {what} {total} at step {step} (epoch {epoch + 1}, batch {batch}); "
                                 f"terms {shown}; last good checkpoint: {good}")
    return total, values


def _seg(cfg: TrainConfig, main: Tensor, p16: Tensor | None, p32: Tensor | None, label: Tensor) -> Tensor:
    from fasterkd.losses import multipath_ce

    lc = cfg.loss
    return multipath_ce(main, p16, p32, label, aux_weight=lc.aux_weight, ohem=lc.ohem, ohem_thresh=lc.ohem_thresh,
                        min_kept=lc.ohem_min_kept)


def _kl(cfg: TrainConfig, student: Tensor, teacher: Tensor, label: Tensor) -> Tensor:
    from fasterkd.losses import kl_distill

    return kl_distill(student.float(), teacher.float(), temperature=cfg.loss.kd_temperature,
                      reduction=cfg.loss.kd_reduction, target=label)


class Objective(nn.Module):
    """The loss of a stage; holds the frozen guides and any trainable loss layers (ConvNorm)."""

    def __init__(self, cfg: TrainConfig, teacher: nn.Module | None = None, tutor: nn.Module | None = None,
                 convnorm: nn.Module | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        # guides are kept out of the module tree: they are never saved, trained or put in train mode
        self._guides = {"teacher": teacher, "tutor": tutor}
        self.convnorm = convnorm

    def forward(self, model: nn.Module, image: Tensor, label: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cfg, stage = self.cfg, self.cfg.stage
        out = model(image)
        terms: dict[str, Tensor] = {}
        teacher, tutor = self._guides["teacher"], self._guides["tutor"]
        if stage == "teacher":
            from fasterkd.losses import cross_entropy, ohem_cross_entropy

            ce = (lambda x: ohem_cross_entropy(x, label, cfg.loss.ohem_thresh, cfg.loss.ohem_min_kept)) \
                if cfg.loss.ohem else (lambda x: cross_entropy(x, label))
            terms["ce"] = ce(out.pred4)
            if out.aux is not None:
                terms["ocr_aux"] = cfg.loss.ocr_aux_weight * ce(out.aux)
        elif stage in ("baseline", "head", "tutor") or (stage == "student" and tutor is None):
            main = out.pred4 if cfg.model.name == "tutor" else out.pred8
            terms["ce"] = _seg(cfg, main, out.pred16, out.pred32, label)  # Eq. 8 / Eq. 9 CE terms
            if teacher is not None and cfg.loss.kd_weight > 0:
                with torch.no_grad():
                    t = teacher(image).main
                terms["kl"] = cfg.loss.kd_weight * _kl(cfg, main, t, label)
        elif stage == "student":
            from fasterkd.losses import path_fa_loss

            terms["ce"] = _seg(cfg, out.pred8, out.pred16, out.pred32, label)
            with torch.no_grad():
                t_out = tutor(image)
            if cfg.loss.kd_weight > 0:
                terms["kl"] = cfg.loss.kd_weight * _kl(cfg, out.pred8, t_out.pred4, label)
            if cfg.loss.fa_weight > 0:
                s_feats = {k: v.float() for k, v in out.features.items()}
                t_feats = {k: v.float() for k, v in t_out.features.items()}
                terms["fa"] = cfg.loss.fa_weight * path_fa_loss(s_feats, t_feats, lam=cfg.loss.fa_lambda,
                                                                convnorm=self.convnorm, q=cfg.loss.fa_q)
        else:
            raise ValueError(f"stage {stage!r} has no training objective here "
                             "(the search runs in fasterkd.engine.search)")
        total = sum(terms.values())
        return total, terms


def build_convnorm(model: nn.Module, tutor: nn.Module, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The §4.3 ConvNorm layers, sized from one small eval-mode forward of both networks."""
    from fasterkd.losses import PATH_PAIRS, PathConvNorm

    x = torch.zeros(1, 3, 64, 64, device=device)
    was = model.training
    model.eval()
    with torch.no_grad():
        s = model(x).features
        t = tutor(x).features
    model.train(was)
    s_ch = {sk: s[sk].shape[1] for sk, _ in PATH_PAIRS}
    t_ch = {tk: t[tk].shape[1] for _, tk in PATH_PAIRS}
    return PathConvNorm(s_ch, t_ch).to(device)
