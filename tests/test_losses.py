"""Segmentation and distillation terms (Eq. 2-3, 6, 8-10) against hand or brute-force computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasterkd.losses import (
    PathConvNorm,
    cross_entropy,
    fa_loss,
    kl_distill,
    multipath_ce,
    ohem_cross_entropy,
    path_fa_loss,
)

F64 = torch.float64


def brute_ce(logits: np.ndarray, target: np.ndarray, ignore: int = 255) -> float:
    """Mean over non-ignored pixels of -log softmax, by explicit loops."""
    total, count = 0.0, 0
    bsz, k, h, w = logits.shape
    for b in range(bsz):
        for y in range(h):
            for x in range(w):
                t = int(target[b, y, x])
                if t == ignore:
                    continue
                z = logits[b, :, y, x]
                total += math.log(sum(math.exp(v) for v in z)) - z[t]
                count += 1
    return total / count


def brute_ohem(logits: np.ndarray, target: np.ndarray, thresh: float, min_kept: int, ignore: int = 255) -> float:
    """FasterSeg's ProbOhemCrossEntropy2d, written the long way (sort all pixels, pick a threshold)."""
    target = target.copy()
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    flat_t = target.reshape(-1)
    probs = []
    for idx, t in enumerate(flat_t):
        b, rest = divmod(idx, target.shape[1] * target.shape[2])
        y, x = divmod(rest, target.shape[2])
        probs.append(1.0 if t == ignore else prob[b, t, y, x])
    probs = np.array(probs)
    num_valid = int((flat_t != ignore).sum())
    if min_kept <= num_valid and num_valid > 0:
        threshold = thresh
        if min_kept > 0:
            kth = np.sort(probs)[min(len(probs), min_kept) - 1]
            if kth > thresh:
                threshold = kth
        drop = probs > threshold
        flat_t[drop] = ignore
        target = flat_t.reshape(target.shape)
    return brute_ce(logits, target, ignore)


def random_case(seed: int, b=2, k=5, h=6, w=7, ignore_frac=0.2):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, h, w, dtype=F64, generator=g) * 2
    target = torch.randint(0, k, (b, h, w), generator=g)
    target[torch.rand(b, h, w, generator=g) < ignore_frac] = 255
    return logits, target


def test_cross_entropy_matches_brute_force_and_resizes():
    logits, target = random_case(0)
    assert cross_entropy(logits, target).item() == pytest.approx(brute_ce(logits.numpy(), target.numpy()), abs=1e-12)
    small = torch.randn(2, 5, 3, 4, dtype=F64)
    up = F.interpolate(small, size=(6, 7), mode="bilinear", align_corners=False)
    assert cross_entropy(small, target).item() == pytest.approx(cross_entropy(up, target).item(), abs=1e-14)


def test_all_ignored_gives_zero_with_gradient():
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), 255)
    for loss in (cross_entropy(logits, target), ohem_cross_entropy(logits, target, min_kept=0)):
        assert loss.item() == 0.0
        loss.backward()
        assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    "seed,thresh,min_kept",
    [
        (1, 0.7, 10),  # threshold 0.7 keeps more than min_kept
        (2, 0.01, 80),  # the min_kept-th probability raises the threshold
        (3, 0.7, 10_000),  # fewer valid pixels than min_kept: no mining
        (4, 0.3, 0),  # min_kept 0: the plain threshold
        (5, 0.7, None),  # FasterSeg's default B*H*W // 16
    ],
)
def test_ohem_matches_brute_force(seed, thresh, min_kept):
    logits, target = random_case(seed, h=8, w=9)
    got = ohem_cross_entropy(logits, target, thresh=thresh, min_kept=min_kept)
    mk = target.numel() // 16 if min_kept is None else min_kept
    assert got.item() == pytest.approx(brute_ohem(logits.numpy(), target.numpy(), thresh, mk), abs=1e-12)


def test_ohem_mines_the_hard_pixels():
    # Two pixels: an easy one (p ~ 1) and a hard one; with thresh 0.7 only the hard one counts.
    logits = torch.tensor([[10.0, 0.0], [0.0, 1.0]], dtype=F64).T.reshape(1, 2, 1, 2)
    target = torch.tensor([[[0, 0]]])
    hard_only = torch.tensor([[[255, 0]]])
    got = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=1)
    assert got.item() == pytest.approx(cross_entropy(logits, hard_only).item(), abs=1e-14)
    assert got.item() > cross_entropy(logits, target).item()


def test_multipath_weights():
    logits, target = random_case(6)
    p16, _ = random_case(7, h=3, w=4)
    p32, _ = random_case(8, h=2, w=2)
    ce = lambda x: cross_entropy(x, target).item()  # noqa: E731
    assert multipath_ce(logits, p16, p32, target).item() == pytest.approx(ce(logits) + 0.2 * ce(p16) + 0.2 * ce(p32), abs=1e-12)
    assert multipath_ce(logits, p16, p32, target, aux_weight=0.5).item() == pytest.approx(
        ce(logits) + 0.5 * ce(p16) + 0.5 * ce(p32), abs=1e-12
    )
    assert multipath_ce(logits, None, None, target).item() == pytest.approx(ce(logits), abs=1e-14)
    assert multipath_ce(logits, None, p32, target).item() == pytest.approx(ce(logits) + 0.2 * ce(p32), abs=1e-12)
    oh = lambda x: ohem_cross_entropy(x, target, thresh=0.6, min_kept=5).item()  # noqa: E731
    got = multipath_ce(logits, p16, p32, target, ohem=True, ohem_thresh=0.6, min_kept=5).item()
    assert got == pytest.approx(oh(logits) + 0.2 * oh(p16) + 0.2 * oh(p32), abs=1e-12)


def hand_kl(s: torch.Tensor, t: torch.Tensor, temp: float) -> torch.Tensor:
    """Per-pixel KL(p_t || p_s) by explicit softmax and log, shape (B, H, W)."""
    ps = torch.exp(s / temp) / torch.exp(s / temp).sum(1, keepdim=True)
    pt = torch.exp(t / temp) / torch.exp(t / temp).sum(1, keepdim=True)
    return (pt * (torch.log(pt) - torch.log(ps))).sum(1)


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_kl_reductions_against_hand_computation(temp):
    g = torch.Generator().manual_seed(9)
    s = torch.randn(2, 19, 4, 6, dtype=F64, generator=g)
    t = torch.randn(2, 19, 4, 6, dtype=F64, generator=g)
    per_pixel = hand_kl(s, t, temp)
    scale = temp**2
    assert kl_distill(s, t, temperature=temp).item() == pytest.approx(
        per_pixel.sum().item() / s.numel() * scale, abs=1e-13
    )
    assert kl_distill(s, t, temperature=temp, reduction="pixel").item() == pytest.approx(
        per_pixel.mean().item() * scale, abs=1e-13
    )
    target = torch.randint(0, 19, (2, 4, 6), generator=g)
    target[0, :2] = 255
    valid = target != 255
    assert kl_distill(s, t, temperature=temp, reduction="pixel", target=target).item() == pytest.approx(
        per_pixel[valid].mean().item() * scale, abs=1e-13
    )
    # FasterSeg's element-wise mean counts every pixel; the target only sets the size.
    assert kl_distill(s, t, temperature=temp, target=target).item() == pytest.approx(
        kl_distill(s, t, temperature=temp).item(), abs=1e-15
    )


def test_kl_resizes_detaches_and_vanishes_on_equal_inputs():
    g = torch.Generator().manual_seed(10)
    student = torch.randn(1, 19, 16, 32, dtype=F64, generator=g, requires_grad=True)
    teacher = torch.randn(1, 19, 4, 8, dtype=F64, generator=g, requires_grad=True)  # HRNet: 1/4
    up = F.interpolate(teacher.detach(), size=(16, 32), mode="bilinear", align_corners=False)
    loss = kl_distill(student, teacher)
    assert loss.item() == pytest.approx(hand_kl(student.detach(), up, 1.0).mean().item() / 19, abs=1e-13)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert kl_distill(student, student.detach() * 1.0).item() == pytest.approx(0.0, abs=1e-15)
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    sized = kl_distill(student.detach(), teacher.detach(), target=target)
    s8 = F.interpolate(student.detach(), size=(8, 8), mode="bilinear", align_corners=False)
    t8 = F.interpolate(teacher.detach(), size=(8, 8), mode="bilinear", align_corners=False)
    assert sized.item() == pytest.approx(hand_kl(s8, t8, 1.0).mean().item() / 19, abs=1e-13)


def test_bad_input_errors_name_the_parameter():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="reduction"):
        kl_distill(x, x, reduction="sum")
    with pytest.raises(ValueError, match="temperature"):
        kl_distill(x, x, temperature=0)
    with pytest.raises(ValueError, match=r"\(B, K\)"):
        kl_distill(x, torch.randn(1, 4, 4, 4))
    with pytest.raises(ValueError, match="target"):
        cross_entropy(x, torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="thresh"):
        ohem_cross_entropy(x, torch.zeros(1, 4, 4, dtype=torch.long), thresh=1.5)


def feats(seed: int, channels=(6, 5, 7, 9), base=(16, 24), requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for (key, div), c in zip((("1/4", 1), ("1/8", 2), ("1/16", 4), ("1/32", 8)), channels):
        out[key] = torch.randn(2, c, base[0] // div, base[1] // div, dtype=F64, generator=g, requires_grad=requires_grad)
    return out


def test_path_fa_loss_is_eq6():
    s, t = feats(11), feats(12)
    expected = (
        fa_loss(s["1/8"], t["1/4"]) + 0.8 * fa_loss(s["1/16"], t["1/16"]) + 0.8 * fa_loss(s["1/32"], t["1/32"])
    )
    assert path_fa_loss(s, t).item() == pytest.approx(expected.item(), abs=1e-14)
    tiled = path_fa_loss(s, t, lam=0.5, impl="tiled", tile=17, q=2)
    expected2 = (
        fa_loss(s["1/8"], t["1/4"], q=2)
        + 0.5 * fa_loss(s["1/16"], t["1/16"], q=2)
        + 0.5 * fa_loss(s["1/32"], t["1/32"], q=2)
    )
    assert tiled.item() == pytest.approx(expected2.item(), abs=1e-13)
    # The q = 2 fast path (Gram matrices, no N x N block) through Eq. 6, gradients included.
    s_grad = feats(11, requires_grad=True)
    gram = path_fa_loss(s_grad, t, lam=0.5, impl="gram", q=2)
    ref = path_fa_loss(s_grad, t, lam=0.5, impl="reference", q=2)
    assert gram.item() == pytest.approx(ref.item(), rel=1e-12)
    for x, y in zip(torch.autograd.grad(gram, list(s_grad.values()), allow_unused=True),
                    torch.autograd.grad(ref, list(s_grad.values()), allow_unused=True)):
        assert (x is None and y is None) or torch.allclose(x, y, rtol=1e-10, atol=1e-16)
    with pytest.raises(ValueError, match="1/4"):
        path_fa_loss(s, {k: v for k, v in t.items() if k != "1/4"})


def test_path_convnorm_shapes_params_and_gradients():
    s, t = feats(13, requires_grad=True), feats(14)
    cn = PathConvNorm({"1/8": 5, "1/16": 7, "1/32": 9}, {"1/4": 6, "1/16": 7, "1/32": 9}).double()
    # 1x1 conv C*C (no bias) + BN 2*C per map: student 25+10 + 49+14 + 81+18, teacher 36+12 + 63 + 99.
    assert sum(p.numel() for p in cn.student.parameters()) == 197
    assert sum(p.numel() for p in cn.teacher.parameters()) == 210
    loss = path_fa_loss(s, t, convnorm=cn, impl="tiled", tile=64)
    loss.backward()
    # The trainable tutor-side layers learn (that is how they collapse the affinities, §4.3) ...
    assert cn.teacher["1_4"][0].weight.grad.abs().sum() > 0
    assert cn.student["1_8"][0].weight.grad.abs().sum() > 0
    assert s["1/8"].grad.abs().sum() > 0
    # ... and the loss equals the FA of the transformed maps with the reference kernel.
    cs, ct = cn(s, t)
    ref = path_fa_loss({k: v.detach() for k, v in cs.items()}, {k: v.detach() for k, v in ct.items()}, impl="reference")
    assert loss.item() == pytest.approx(ref.item(), abs=1e-12)


def test_convnorm_collapse_drives_affinities_to_one():
    # §4.3 / Fig. 4: with layers on both sides, pushing every pixel to one direction makes both
    # affinity matrices all ones and the FA loss 0: the trivial minimiser the paper warns about.
    s, t = feats(15), feats(16)
    cn = PathConvNorm({"1/8": 5, "1/16": 7, "1/32": 9}, {"1/4": 6, "1/16": 7, "1/32": 9}).double().eval()
    with torch.no_grad():
        for layer in list(cn.student.values()) + list(cn.teacher.values()):
            conv, bn = layer
            conv.weight.zero_()
            bn.bias.fill_(1.0)  # every output pixel = beta: one shared direction
    assert path_fa_loss(s, t).item() > 0.05
    assert path_fa_loss(s, t, convnorm=cn).item() == pytest.approx(0.0, abs=1e-12)
