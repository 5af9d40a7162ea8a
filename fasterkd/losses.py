"""The paper's objectives (Eq. 2-10): cross-entropy, OHEM, KL distillation, feature affinity.

Pure functions and small modules; the trainer composes them. Logits may come at any size
(students at the input size, HRNet at 1/4): every segmentation or KL term first resizes them to
the label size (bilinear, ``align_corners=False``). The FA kernels live in
:mod:`fasterkd.affinity`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from fasterkd.affinity import auto_choice, fa_gram_interpolated, fa_rows, normalize_pixels, prepare_rows

IGNORE_INDEX = 255
KL_REDUCTIONS = ("elementwise_mean", "pixel")
# Eq. 6 pairs: student path -> tutor path (the student's 1/8 path mimics the tutor's 1/4 path).
PATH_PAIRS = (("1/8", "1/4"), ("1/16", "1/16"), ("1/32", "1/32"))


# --------------------------------------------------------------------------------------------
# Segmentation terms
# --------------------------------------------------------------------------------------------


def _check_logits_target(logits: Tensor, target: Tensor) -> None:
    if logits.dim() != 4:
        raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if target.dim() != 3 or target.shape[0] != logits.shape[0]:
        raise ValueError(f"target must be (B, H, W) with B={logits.shape[0]}, got shape {tuple(target.shape)}")
    if target.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16):
        raise ValueError(f"target must hold integer class ids, got dtype {target.dtype}")


def resize_logits(logits: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """Bilinear (``align_corners=False``) resize to ``size``; a no-op when already that size."""
    size = tuple(int(s) for s in size)
    if tuple(logits.shape[-2:]) == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-pixel cross-entropy, mean over non-ignored pixels (the CE of Eq. 2, 3, 8-10).

    Logits are resized to the label size first. If every pixel is ignored the loss is 0 (with a
    gradient path), not NaN, so a crop of pure void never poisons a step.
    """
    _check_logits_target(logits, target)
    logits = resize_logits(logits, target.shape[-2:])
    target = target.long()
    if not bool((target != ignore_index).any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    thresh: float = 0.7,
    min_kept: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Online hard-example-mined CE, FasterSeg's ``ProbOhemCrossEntropy2d`` (CE of Eq. 2-3).

    fasterseg-spec §9.2: softmax probabilities at the label size; p = probability of the true
    class of each valid pixel (ignored pixels count as 1). If there are fewer valid pixels than
    ``min_kept`` nothing is mined; otherwise the threshold is ``thresh``, raised to the
    ``min_kept``-th smallest p when that is larger, and pixels with p above the threshold are
    ignored. Then plain CE over the kept pixels. ``min_kept=None`` means FasterSeg's
    batch*H*W // 16 of the label.
    """
    _check_logits_target(logits, target)
    if not 0.0 <= thresh <= 1.0:
        raise ValueError(f"thresh must be a probability in [0, 1], got {thresh!r}")
    logits = resize_logits(logits, target.shape[-2:])
    target = target.long()
    if min_kept is None:
        min_kept = target.numel() // 16
    if min_kept < 0:
        raise ValueError(f"min_kept must be >= 0, got {min_kept!r}")
    valid = target != ignore_index
    num_valid = int(valid.sum())
    if min_kept <= num_valid and num_valid > 0:
        with torch.no_grad():  # the mining decision is not differentiated (as in FasterSeg)
            prob = logits.float().softmax(dim=1)
            safe = target.masked_fill(~valid, 0)
            p = prob.gather(1, safe.unsqueeze(1)).squeeze(1).masked_fill(~valid, 1.0)
            threshold = torch.tensor(float(thresh), device=p.device)
            if min_kept > 0:
                kth = torch.kthvalue(p.flatten(), min(p.numel(), min_kept)).values
                threshold = torch.maximum(threshold, kth)
            kept = p <= threshold
        target = target.masked_fill(~(valid & kept), ignore_index)
    return cross_entropy(logits, target, ignore_index=ignore_index)


def multipath_ce(
    pred_main: Tensor,
    pred16: Tensor | None,
    pred32: Tensor | None,
    target: Tensor,
    aux_weight: float = 0.2,
    ohem: bool = False,
    ohem_thresh: float = 0.7,
    min_kept: int | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Eq. 2: CE(main) + lambda CE(pred16) + lambda CE(pred32); None auxiliary terms are skipped.

    ``pred_main`` is pred8 (teacher/student) or pred4 (tutor, Eq. 9); lambda = ``aux_weight``
    (0.2 in FasterSeg). ``ohem=True`` uses :func:`ohem_cross_entropy` for every term, as FasterSeg.
    """
    if ohem:
        def term(x: Tensor) -> Tensor:
            return ohem_cross_entropy(x, target, thresh=ohem_thresh, min_kept=min_kept, ignore_index=ignore_index)
    else:
        def term(x: Tensor) -> Tensor:
            return cross_entropy(x, target, ignore_index=ignore_index)
    loss = term(pred_main)
    for aux in (pred16, pred32):
        if aux is not None:
            loss = loss + aux_weight * term(aux)
    return loss


# --------------------------------------------------------------------------------------------
# Logit distillation
# --------------------------------------------------------------------------------------------


def kl_distill(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    reduction: str = "elementwise_mean",
    size: tuple[int, int] | None = None,
    target: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Eq. 3, 8, 9, 10: KL(p_teacher || p_student) of per-pixel class distributions.

    Both sides use ``log_softmax(logits / temperature)``; the teacher side is detached (frozen
    HRNet or tutor) and the result is multiplied by temperature^2 (Hinton's scaling; 1 at the
    paper's T = 1). Logits are resized (bilinear, ``align_corners=False``) to ``size``, else to
    the label size of ``target``, else to the student's size.

    ``reduction="elementwise_mean"``: the sum of KL terms divided by B*K*H*W, FasterSeg's
    ``nn.KLDivLoss()`` default that the paper's loss weights were tuned with (the ``paper``
    profile's default); every pixel counts, ``target`` only sets the size.
    ``reduction="pixel"``: the KL divergence per pixel (sum over classes), averaged over the
    valid pixels (label != ``ignore_index`` when ``target`` is given, else all).

    Eq. 10 as printed puts the tutor's pred16/pred32 in the student's CE terms; the tutor is
    frozen, so those terms could not train the student: fasterkd reads them as the student's own
    pred16/pred32 (use :func:`multipath_ce` on the student) and this KL term on pred8 vs pred4.
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if student_logits.dim() != 4 or teacher_logits.dim() != 4:
        raise ValueError(
            f"logits must be (B, K, H, W), got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[:2] != teacher_logits.shape[:2]:
        raise ValueError(
            f"student and teacher logits must agree in (B, K), got {tuple(student_logits.shape[:2])} "
            f"and {tuple(teacher_logits.shape[:2])}"
        )
    if target is not None:
        _check_logits_target(student_logits, target)
        if size is not None and tuple(size) != tuple(target.shape[-2:]):
            raise ValueError(f"size {tuple(size)} disagrees with the target's size {tuple(target.shape[-2:])}")
        size = tuple(target.shape[-2:])
    if size is None:
        size = tuple(student_logits.shape[-2:])
    s = resize_logits(student_logits, size)
    t = resize_logits(teacher_logits.detach(), size)
    log_ps = F.log_softmax(s / temperature, dim=1)
    log_pt = F.log_softmax(t / temperature, dim=1)
    kl = F.kl_div(log_ps, log_pt, reduction="none", log_target=True)  # p_t (log p_t - log p_s)
    scale = temperature * temperature
    if reduction == "elementwise_mean":
        return kl.mean() * scale
    per_pixel = kl.sum(dim=1)  # (B, H, W)
    if target is None:
        return per_pixel.mean() * scale
    valid = target != ignore_index
    if not bool(valid.any()):
        return per_pixel.sum() * 0.0
    return per_pixel[valid].mean() * scale


# --------------------------------------------------------------------------------------------
# Feature affinity
# --------------------------------------------------------------------------------------------


def fa_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    q: int = 1,
    interp: str = "affinity",
    impl: str = "auto",
    tile: int | None = None,
    teacher_grad: bool = False,
) -> Tensor:
    """Eq. 4-5: mean over all N^2 pixel pairs of |S^t_ij - S^s_ij|^q, per image, then batch mean.

    ``student`` (B, C_s, h, w) and ``teacher`` (B, C_t, H, W) may differ in channels and size;
    N = H*W is the teacher's pixel count. S_ij is the cosine similarity of pixels i and j (p = 2);
    zero vectors are normalised to 0. When the sizes differ the student affinity is interpolated
    to the teacher's size: ``interp="affinity"`` (default) interpolates the matrix bilinearly
    (``align_corners=False``) along both pixel indices, computed exactly as the Gram matrix of
    the upsampled unit student vectors; ``interp="features"`` upsamples the raw features, then
    normalises. ``q=2`` gives the mean squared difference.

    The teacher (frozen tutor) is detached: gradients reach only the student, unless
    ``teacher_grad=True`` (ConvNorm ablation, where layers on the tutor side are trained).
    ``impl``: ``"reference"`` | ``"tiled"`` | ``"gram"`` (q = 2 only) | ``"triton"`` | ``"auto"``
    (the fastest exact path measured for the device and shape; see :mod:`fasterkd.affinity`);
    ``tile`` is the block size of the tiled kernel (None: the measured or default choice).
    """
    if student.dim() != 4 or teacher.dim() != 4:
        raise ValueError(
            f"student and teacher must be (B, C, H, W) maps, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}")
    if q not in (1, 2):
        raise ValueError(f"q must be 1 or 2, got {q!r}")
    if student.device != teacher.device:
        raise ValueError(f"student ({student.device}) and teacher ({teacher.device}) must be on one device")
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    if _gram_of_interpolated(student, teacher, q, interp, impl, dtype):
        t = teacher if teacher_grad else teacher.detach()
        return fa_gram_interpolated(normalize_pixels(student.to(dtype)), normalize_pixels(t.to(dtype)))
    a, b = prepare_rows(student.to(dtype), teacher.to(dtype), interp=interp, teacher_grad=teacher_grad)
    return fa_rows(a, b, q=q, impl=impl, tile=tile)


def _gram_of_interpolated(student: Tensor, teacher: Tensor, q: int, interp: str, impl: str,
                          dtype: torch.dtype) -> bool:
    """The Gram path (q = 2) on an upsampled student: taken in its interpolation-aware form, which
    never forms the upsampled rows (the same value; fewer FLOPs)."""
    if q != 2 or interp != "affinity" or student.shape[-2:] == teacher.shape[-2:] or impl not in ("gram", "auto"):
        return False
    if impl == "gram":
        return True
    nb, n = teacher.shape[0], teacher.shape[-2] * teacher.shape[-1]
    probe = torch.zeros((), dtype=dtype, device=teacher.device)  # shapes for auto_choice, no memory
    return auto_choice(probe.expand(nb, n, teacher.shape[1]), probe.expand(nb, n, student.shape[1]), q)[0] == "gram"


class PathConvNorm(nn.Module):
    """Paper §4.3 / DSRL: a 1x1 conv + BatchNorm on each tapped map, student and tutor side.

    Applied before the affinity in :func:`path_fa_loss`. The paper found it harmful: with
    trainable layers on both sides the loss has a trivial minimiser (all pixels pushed to one
    direction, every S_ij close to 1, Fig. 4). Channels are kept (C -> C) per path.
    """

    def __init__(self, student_channels: Mapping[str, int], teacher_channels: Mapping[str, int]) -> None:
        super().__init__()

        def branch(channels: Mapping[str, int], side: str) -> nn.ModuleDict:
            layers = nn.ModuleDict()
            for key, c in channels.items():
                if int(c) != c or c < 1:
                    raise ValueError(f"{side}_channels[{key!r}] must be a positive integer, got {c!r}")
                layers[_module_key(key)] = nn.Sequential(
                    nn.Conv2d(int(c), int(c), kernel_size=1, bias=False), nn.BatchNorm2d(int(c))
                )
            return layers

        self.student = branch(student_channels, "student")
        self.teacher = branch(teacher_channels, "teacher")

    def forward(
        self, student_feats: Mapping[str, Tensor], teacher_feats: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        return _apply(self.student, student_feats, "student"), _apply(self.teacher, teacher_feats, "teacher")


def _module_key(path: str) -> str:
    return path.replace("/", "_")  # "1/8" -> "1_8": module names cannot hold every character


def _apply(layers: nn.ModuleDict, feats: Mapping[str, Tensor], side: str) -> dict[str, Tensor]:
    out = dict(feats)
    for key in feats:
        mk = _module_key(key)
        if mk in layers:
            out[key] = layers[mk](feats[key])
    return out


def path_fa_loss(
    student_feats: Mapping[str, Tensor],
    teacher_feats: Mapping[str, Tensor],
    lam: float = 0.8,
    convnorm: PathConvNorm | None = None,
    **fa_kwargs,
) -> Tensor:
    """Eq. 6: L_fa(S^1/8, T^1/4) + lam L_fa(S^1/16, T^1/16) + lam L_fa(S^1/32, T^1/32).

    ``student_feats`` / ``teacher_feats`` are ``SegOutput.features`` dicts of the student and of
    the frozen tutor. With ``convnorm`` (§4.3 ablation) both sides pass through its layers first
    and the tutor-side layers receive gradients (the tutor itself stays frozen because its
    features carry no graph). Other keyword arguments go to :func:`fa_loss`.
    """
    for s_key, t_key in PATH_PAIRS:
        if s_key not in student_feats:
            raise ValueError(f"student_feats lacks the {s_key!r} path (has {sorted(student_feats)})")
        if t_key not in teacher_feats:
            raise ValueError(f"teacher_feats lacks the {t_key!r} path (has {sorted(teacher_feats)})")
    if "teacher_grad" in fa_kwargs:
        raise ValueError("path_fa_loss sets teacher_grad itself (True only with convnorm)")
    teacher_grad = convnorm is not None
    if convnorm is not None:
        student_feats, teacher_feats = convnorm(student_feats, teacher_feats)
    total = None
    for k, (s_key, t_key) in enumerate(PATH_PAIRS):
        term = fa_loss(student_feats[s_key], teacher_feats[t_key], teacher_grad=teacher_grad, **fa_kwargs)
        total = term if k == 0 else total + lam * term
    return total
