"""The FA loss (Eq. 4-5) and its kernels: identities, exactness of the tiled kernel, gradients.

Facts checked are those of hrnet-fa-kd.md §3 and §5 items 10-17. Inputs are small so the whole
file runs in a few seconds on two cores.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fasterkd import affinity
from fasterkd.affinity import (
    affinity_matrix,
    affinity_values,
    fa_reference,
    fa_tiled,
    naive_fa_memory_bytes,
    prepare_rows,
    resolve_impl,
)
from fasterkd.losses import fa_loss

F64 = torch.float64


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).abs().max() / y.abs().max().clamp_min(1e-300))


# (student shape, teacher shape, tile): same size, non-square, odd sizes, coarser student,
# channel mismatch, tiles that do not divide N and a tile larger than N.
SHAPES = [
    ((2, 4, 6, 6), (2, 4, 6, 6), 7),
    ((2, 5, 3, 7), (2, 3, 9, 13), 10),
    ((1, 6, 5, 4), (1, 8, 10, 8), 16),
    ((3, 3, 4, 8), (3, 7, 8, 16), 33),
    ((2, 4, 7, 5), (2, 4, 7, 5), 1000),
]


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0][1:]}->{s[1][1:]}-t{s[2]}")
@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("interp", ["affinity", "features"])
def test_tiled_equals_reference_value_and_gradient(shapes, q, interp):
    s_shape, t_shape, tile = shapes
    g = torch.Generator().manual_seed(zlib.crc32(repr((s_shape, t_shape, q, interp)).encode()))
    student = torch.randn(s_shape, dtype=F64, generator=g, requires_grad=True)
    teacher = torch.randn(t_shape, dtype=F64, generator=g)
    ref = fa_loss(student, teacher, q=q, interp=interp, impl="reference")
    (g_ref,) = torch.autograd.grad(ref, student)
    til = fa_loss(student, teacher, q=q, interp=interp, impl="tiled", tile=tile)
    (g_til,) = torch.autograd.grad(til, student)
    assert abs(til.item() - ref.item()) / ref.item() < 1e-5
    assert rel_err(g_til, g_ref) < 1e-5
    assert g_ref.abs().max() > 0


@pytest.mark.parametrize("q", [1, 2])
def test_tiled_teacher_gradient_equals_reference(q):
    # Only the ConvNorm ablation differentiates the teacher side; the tiled kernel must agree there too.
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 4, 6, dtype=F64, generator=g, requires_grad=True)
    teacher = torch.randn(2, 5, 8, 12, dtype=F64, generator=g, requires_grad=True)
    ref = fa_loss(student, teacher, q=q, impl="reference", teacher_grad=True)
    g_ref = torch.autograd.grad(ref, (student, teacher))
    til = fa_loss(student, teacher, q=q, impl="tiled", tile=20, teacher_grad=True)
    g_til = torch.autograd.grad(til, (student, teacher))
    for a, b in zip(g_til, g_ref):
        assert rel_err(a, b) < 1e-5


def test_tiled_gradient_is_the_closed_form():
    # §5 item 17: dL/dB = -(2/N^2) sign(D) B per image (batch of one).
    g = torch.Generator().manual_seed(4)
    a = F.normalize(torch.randn(1, 30, 3, dtype=F64, generator=g), dim=2)
    # Student rows of length 0.5..1.5 (as after interpolation): the diagonal 1 - |b_i|^2 is far
    # from 0, so its sign is not decided by round-off.
    lengths = 0.5 + torch.rand(1, 30, 1, dtype=F64, generator=g)
    b = (F.normalize(torch.randn(1, 30, 5, dtype=F64, generator=g), dim=2) * lengths).requires_grad_()
    (grad,) = torch.autograd.grad(fa_tiled(a, b, q=1, tile=7), b)
    d = a[0] @ a[0].T - b[0].detach() @ b[0].detach().T
    expected = -(2.0 / 30**2) * torch.sign(d) @ b[0].detach()
    assert rel_err(grad[0], expected) < 1e-12


def test_bilinear_affinity_interpolation_is_gram_of_upsampled_unit_vectors():
    # The 4-D student affinity interpolated bilinearly along both pixel indices equals the Gram
    # matrix of the bilinearly upsampled normalised student features (what fa_loss computes).
    g = torch.Generator().manual_seed(5)
    bsz, c, hs, ws, ht, wt = 2, 6, 3, 5, 7, 11
    student = torch.randn(bsz, c, hs, ws, dtype=F64, generator=g)
    teacher = torch.randn(bsz, 4, ht, wt, dtype=F64, generator=g)
    s4 = affinity_matrix(student).view(bsz * hs * ws, 1, hs, ws)  # S[(i), j-grid]
    up = F.interpolate(s4, size=(ht, wt), mode="bilinear", align_corners=False)  # along j
    up = up.view(bsz, hs * ws, ht * wt).transpose(1, 2).reshape(bsz * ht * wt, 1, hs, ws)
    up = F.interpolate(up, size=(ht, wt), mode="bilinear", align_corners=False)  # along i
    s_interp = up.view(bsz, ht * wt, ht * wt).transpose(1, 2)
    _, b = prepare_rows(student, teacher, interp="affinity")
    assert rel_err(b @ b.transpose(1, 2), s_interp) < 1e-13
    # ... and the loss is the mean |S^t - interpolated S^s| of those matrices.
    expected = (affinity_matrix(teacher) - s_interp).abs().mean()
    for impl in ("reference", "tiled"):
        got = fa_loss(student, teacher, impl=impl, tile=16)
        assert abs(got.item() - expected.item()) < 1e-13


def test_features_interp_is_a_different_loss():
    g = torch.Generator().manual_seed(6)
    student = torch.randn(1, 4, 3, 4, dtype=F64, generator=g)
    teacher = torch.randn(1, 4, 6, 8, dtype=F64, generator=g)
    up = F.interpolate(student, size=(6, 8), mode="bilinear", align_corners=False)
    expected = (affinity_matrix(teacher) - affinity_matrix(up)).abs().mean()
    got = fa_loss(student, teacher, interp="features", impl="tiled", tile=5)
    assert abs(got.item() - expected.item()) < 1e-13
    assert abs(got.item() - fa_loss(student, teacher, interp="affinity").item()) > 1e-3


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_identical_features_give_zero(impl):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 8, 5, 7, dtype=F64, generator=g)
    x[0, :, 1, 2] = 0.0  # a dead (all-zero) pixel on both sides
    # Zero up to round-off: the tiled kernel forms A_I A_J^T - B_I B_J^T in one fused product.
    assert abs(fa_loss(x.clone(), x, impl=impl, tile=6).item()) < 1e-15


@pytest.mark.parametrize("interp", ["affinity", "features"])
def test_positive_per_pixel_scaling_invariance(interp):
    g = torch.Generator().manual_seed(8)
    student = torch.randn(2, 5, 4, 6, dtype=F64, generator=g)
    teacher = torch.randn(2, 3, 8, 12, dtype=F64, generator=g)
    s_scale = torch.rand(2, 1, 4, 6, dtype=F64, generator=g) * 10 + 0.01
    t_scale = torch.rand(2, 1, 8, 12, dtype=F64, generator=g) * 10 + 0.01
    base = fa_loss(student, teacher, interp=interp, impl="tiled", tile=13)
    scaled_t = fa_loss(student, teacher * t_scale, interp=interp, impl="tiled", tile=13)
    scaled_s = fa_loss(student * s_scale, teacher, interp=interp, impl="tiled", tile=13)
    assert abs(scaled_t.item() - base.item()) < 1e-12
    if interp == "affinity":  # normalisation before interpolation: invariant (§5 item 11)
        assert abs(scaled_s.item() - base.item()) < 1e-12
    else:  # interpolating raw vectors mixes them by their lengths: not invariant
        assert abs(scaled_s.item() - base.item()) > 1e-4


def test_orthogonal_channel_transform_invariance():
    g = torch.Generator().manual_seed(9)
    student = torch.randn(1, 6, 4, 4, dtype=F64, generator=g)
    teacher = torch.randn(1, 6, 4, 4, dtype=F64, generator=g)
    qmat, _ = torch.linalg.qr(torch.randn(6, 6, dtype=F64, generator=g))
    rotated = torch.einsum("dc,bchw->bdhw", qmat, student)
    assert abs(fa_loss(rotated, teacher).item() - fa_loss(student, teacher).item()) < 1e-13


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_closed_form_half(impl):
    # §5 item 14: teacher pixels orthogonal (S^t = I_2), student pixels identical (S^s = 1) -> 2/4.
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64).view(1, 2, 1, 2)
    student = torch.tensor([[3.0, 3.0], [-1.0, -1.0]], dtype=F64).view(1, 2, 1, 2)
    assert fa_loss(student, teacher, impl=impl, tile=1).item() == pytest.approx(0.5, abs=1e-15)
    assert fa_loss(student, teacher, q=2, impl=impl, tile=1).item() == pytest.approx(0.5, abs=1e-15)


def test_zero_vectors_are_normalised_to_zero():
    # A zero pixel has affinity 0 with everything, itself included; its gradient stays finite.
    teacher = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=F64).view(1, 2, 1, 3)
    student = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0]], dtype=F64).view(1, 2, 1, 3)
    s_t = affinity_matrix(teacher)[0]
    assert torch.equal(s_t[1], torch.zeros(3, dtype=F64)) and torch.equal(s_t[:, 1], torch.zeros(3, dtype=F64))
    # S^t = diag(1, 0, 1), S^s = all ones except row/column 1 -> |D| sums to 2 (pairs (0,2),(2,0)).
    for impl in ("reference", "tiled"):
        s = student.clone().requires_grad_()
        loss = fa_loss(s, teacher, impl=impl, tile=2)
        assert loss.item() == pytest.approx(2 / 9, abs=1e-15)
        loss.backward()
        assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("impl", ["reference", "tiled"])
def test_gradients_reach_only_the_student(impl):
    g = torch.Generator().manual_seed(10)
    student = torch.randn(2, 4, 3, 5, generator=g, requires_grad=True)
    teacher = torch.randn(2, 4, 6, 10, generator=g, requires_grad=True)
    fa_loss(student, teacher, impl=impl, tile=16).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_random_gaussian_expectation_and_bounds():
    # §5 items 15-16: independent Gaussians -> about sqrt(2/pi) sqrt(2/C) (1 - 1/N); post-ReLU maps <= 1.
    g = torch.Generator().manual_seed(11)
    c, h, w = 64, 32, 32
    n = h * w
    student = torch.randn(2, c, h, w, generator=g)
    teacher = torch.randn(2, c, h, w, generator=g)
    loss = fa_loss(student, teacher, impl="tiled", tile=512).item()
    expected = math.sqrt(2 / math.pi) * math.sqrt(2 / c) * (1 - 1 / n)
    assert loss == pytest.approx(expected, rel=0.02)
    assert 0.0 <= fa_loss(student.relu(), teacher.relu(), impl="tiled").item() <= 1.0


def test_fp32_tiled_matches_fp64_reference():
    g = torch.Generator().manual_seed(12)
    student = torch.randn(2, 16, 12, 20, generator=g)
    teacher = torch.randn(2, 24, 24, 40, generator=g)
    ref = fa_loss(student.double(), teacher.double(), impl="reference")
    til = fa_loss(student, teacher, impl="tiled", tile=256)
    assert til.dtype == torch.float32
    assert abs(til.item() - ref.item()) / ref.item() < 1e-5


def test_affinity_values_exact_and_sampled():
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 5, 4, 6, generator=g)
    vals = affinity_values(x, max_pixels=100)
    s = affinity_matrix(x)
    iu = torch.triu_indices(24, 24, offset=1)
    expected = torch.cat([s[k][iu[0], iu[1]] for k in range(2)])
    assert torch.allclose(vals, expected)
    assert affinity_values(x[0], max_pixels=100, include_diagonal=True).numel() == 24 * 25 // 2
    sampled = affinity_values(x, max_pixels=10, generator=torch.Generator().manual_seed(0))
    again = affinity_values(x, max_pixels=10, generator=torch.Generator().manual_seed(0))
    assert sampled.numel() == 2 * 45 and torch.equal(sampled, again)
    assert sampled.abs().max() <= 1 + 1e-6
    # Every sampled value is an entry of the true affinity matrices.
    assert (sampled[:, None] - expected[None, :]).abs().min(dim=1).values.max() < 1e-6


def test_auto_dispatch_and_errors(monkeypatch):
    # Without measurements for the device: the reference for small maps, the tiled kernel above.
    monkeypatch.setattr(affinity.calibration, "TIMINGS", {})
    small = torch.zeros(1, affinity.AUTO_REFERENCE_MAX_PIXELS, 4)
    large = torch.zeros(1, affinity.AUTO_REFERENCE_MAX_PIXELS + 1, 4)
    assert resolve_impl("auto", small) == "reference"
    assert resolve_impl("auto", large) == "tiled"
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="impl"):
        fa_loss(x, x, impl="fast")
    with pytest.raises(ValueError, match="interp"):
        fa_loss(x, x, interp="nearest")
    with pytest.raises(ValueError, match="q must"):
        fa_loss(x, x, q=3)
    with pytest.raises(ValueError, match="batch"):
        fa_loss(x, torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        fa_loss(x[0], x)
    with pytest.raises(ValueError, match="tile"):
        fa_loss(x, x, impl="tiled", tile=0)
    if not torch.cuda.is_available() and not affinity.INTERPRETER:
        with pytest.raises(ValueError, match="triton"):
            fa_loss(x, x, impl="triton")
    with pytest.raises(ValueError, match="max_pixels"):
        affinity_values(x, max_pixels=1)


def test_naive_memory_estimate_matches_the_planning_table():
    # hrnet-fa-kd.md §3.3: 256x512 crop, 1/4 path (N = 8192), batch 10, fp32 -> about 13.4 GB.
    assert naive_fa_memory_bytes(10, 64 * 128) / 1e9 == pytest.approx(13.58, abs=0.01)


def test_reference_rows_api_matches_loss():
    g = torch.Generator().manual_seed(14)
    a = F.normalize(torch.randn(2, 9, 3, dtype=F64, generator=g), dim=2)
    b = F.normalize(torch.randn(2, 9, 4, dtype=F64, generator=g), dim=2)
    d = a @ a.transpose(1, 2) - b @ b.transpose(1, 2)
    assert fa_reference(a, b, q=1).item() == pytest.approx(d.abs().mean().item(), abs=1e-15)
    assert fa_reference(a, b, q=2).item() == pytest.approx(d.square().mean().item(), abs=1e-15)


@pytest.mark.skipif(
    not (affinity.TRITON_AVAILABLE and torch.cuda.is_available()), reason="needs CUDA and Triton"
)
@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_triton_equals_tiled_on_cuda(q, teacher_grad):
    g = torch.Generator().manual_seed(15)
    student = torch.randn(2, 48, 13, 21, generator=g).cuda().requires_grad_()
    teacher = torch.randn(2, 40, 26, 42, generator=g).cuda().requires_grad_(teacher_grad)
    inputs = (student, teacher) if teacher_grad else (student,)
    ref = fa_loss(student.double(), teacher.double(), q=q, impl="tiled", teacher_grad=teacher_grad)
    g_ref = torch.autograd.grad(ref, inputs)
    tri = fa_loss(student, teacher, q=q, impl="triton", teacher_grad=teacher_grad)
    g_tri = torch.autograd.grad(tri, inputs)
    assert abs(tri.item() - ref.item()) / ref.item() < 1e-5
    for x, y in zip(g_tri, g_ref):
        assert rel_err(x.double(), y) < 1e-4
    assert resolve_impl("auto", torch.zeros(1, 4, 4, device="cuda")) == "triton"


# --------------------------------------------------------------------------------------------
# Signs kept as bits (q = 1), the Gram path (q = 2), auto's measured choice, FLOP counts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 7, 8, 9, 63, 257])
def test_sign_bits_round_trip(size):
    g = torch.Generator().manual_seed(size)
    d = torch.randn(affinity._padded(size), generator=g)
    d[::5] = 0.0
    mask = torch.zeros(affinity._padded(size), dtype=torch.bool)
    torch.gt(d[:size], 0, out=mask[:size])
    packed = affinity._pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == affinity._padded(size) // 8
    phi = affinity._unpack_bits(packed, signed=True).float()[:size]
    assert torch.equal(phi, torch.where(d[:size] > 0, -1.0, 1.0))
    ones = affinity._unpack_bits(packed, signed=False)[:size]
    assert ones.dtype == torch.int8 and torch.equal(ones.bool(), mask[:size])
    # Every byte value, so each bit position is checked set and unset next to every neighbour.
    every = torch.arange(256, dtype=torch.uint8)
    expected = (every[:, None].long() >> torch.arange(8)) & 1
    assert torch.equal(affinity._unpack_bits(every, signed=False).view(256, 8).long(), expected)
    assert torch.equal(affinity._pack_bits(expected.bool().flatten()), every)
    # the CPU path's NumPy packing and unpacking: the same bit layout
    scratch = np.zeros(affinity._padded(size), dtype=bool)
    assert np.array_equal(affinity._pack_le0_np(d[:size].numpy(), scratch),
                          affinity._pack_bits(torch.le(d, 0) & (torch.arange(d.numel()) < size)).numpy())
    assert np.array_equal(affinity._pack_eq0_np(d[:size].numpy(), scratch),
                          affinity._pack_bits(torch.eq(d, 0) & (torch.arange(d.numel()) < size)).numpy())
    assert torch.equal(affinity._unpack_np(packed, size), mask[:size].to(torch.uint8))
    assert torch.equal(affinity._unpack_np(every, 256 * 8), expected.flatten().to(torch.uint8))


@pytest.mark.parametrize("n,tile", [(30, 7), (64, 8), (65, 16), (100, 33), (40, 1000)])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_kept_signs_equal_recomputation_and_reference(n, tile, teacher_grad):
    # Rows straight into the kernel, B > 1, tiles that do not divide N (or exceed it). Student
    # rows of length 0.5..1.5 (as after interpolation) keep the diagonal 1 - |b_i|^2 away from a
    # round-off tie, where the fused product and the reference could disagree on the sign.
    g = torch.Generator().manual_seed(n * 1000 + tile)
    a = F.normalize(torch.randn(3, n, 5, dtype=F64, generator=g), dim=2).requires_grad_(teacher_grad)
    lengths = 0.5 + torch.rand(3, n, 1, dtype=F64, generator=g)
    b = (F.normalize(torch.randn(3, n, 4, dtype=F64, generator=g), dim=2) * lengths).requires_grad_()
    inputs = (a, b) if teacher_grad else (b,)
    ref = fa_reference(a, b, q=1)
    g_ref = torch.autograd.grad(ref, inputs)
    kept = fa_tiled(a, b, q=1, tile=tile, keep_signs=True)
    g_kept = torch.autograd.grad(kept, inputs)
    again = fa_tiled(a, b, q=1, tile=tile, keep_signs=False)
    g_again = torch.autograd.grad(again, inputs)
    assert abs(kept.item() - ref.item()) < 1e-14 and kept.item() == again.item()
    for x, y, z in zip(g_kept, g_ref, g_again):
        assert rel_err(x, y) < 1e-12
        # the same products, so the same signs: one flipped sign would move a row's gradient by
        # about 1/N of its size; the kept path sums sign(D) V as sum(V) - 2 P V, so only rounding differs
        assert rel_err(x, z) < 1e-13


def test_kept_signs_gradcheck():
    g = torch.Generator().manual_seed(21)
    a = F.normalize(torch.randn(2, 11, 3, dtype=F64, generator=g), dim=2).requires_grad_()
    b = (F.normalize(torch.randn(2, 11, 4, dtype=F64, generator=g), dim=2) * 0.9).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: fa_tiled(x, y, q=1, tile=4), (a, b))


def test_kept_signs_exact_zeros_have_sign_zero():
    # A pixel that is zero in both maps has D_ij = 0 exactly in its row and column; sign(0) = 0
    # there (not -1) keeps its gradient 0, as the reference's, instead of -(2/N^2) sum_j b_j,
    # which the normalisation of a zero vector would then blow up by 1/eps.
    g = torch.Generator().manual_seed(22)
    student = torch.randn(2, 5, 6, 7, dtype=F64, generator=g)
    teacher = torch.randn(2, 4, 6, 7, dtype=F64, generator=g)
    student[:, :, 2, 3] = 0.0
    teacher[:, :, 2, 3] = 0.0
    grads = {}
    for impl in ("reference", "tiled"):
        s = student.clone().requires_grad_()
        fa_loss(s, teacher, impl=impl, tile=16).backward()
        grads[impl] = s.grad
    assert torch.equal(grads["tiled"][:, :, 2, 3], torch.zeros(2, 5, dtype=F64))
    assert rel_err(grads["tiled"], grads["reference"]) < 1e-12


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: f"{s[0][1:]}->{s[1][1:]}")
@pytest.mark.parametrize("interp", ["affinity", "features"])
def test_gram_equals_reference_value_and_gradients(shapes, interp):
    s_shape, t_shape, _ = shapes
    g = torch.Generator().manual_seed(zlib.crc32(repr((shapes, interp, "gram")).encode()))
    student = torch.randn(s_shape, dtype=F64, generator=g, requires_grad=True)
    teacher = torch.randn(t_shape, dtype=F64, generator=g, requires_grad=True)
    ref = fa_loss(student, teacher, q=2, interp=interp, impl="reference", teacher_grad=True)
    g_ref = torch.autograd.grad(ref, (student, teacher))
    gram = fa_loss(student, teacher, q=2, interp=interp, impl="gram", teacher_grad=True)
    g_gram = torch.autograd.grad(gram, (student, teacher))
    assert abs(gram.item() - ref.item()) / ref.item() < 1e-12
    for x, y in zip(g_gram, g_ref):
        assert rel_err(x, y) < 1e-10


def test_gram_gradcheck_and_errors():
    g = torch.Generator().manual_seed(23)
    a = F.normalize(torch.randn(2, 13, 3, dtype=F64, generator=g), dim=2).requires_grad_()
    b = (F.normalize(torch.randn(2, 13, 5, dtype=F64, generator=g), dim=2) * 0.8).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, y: affinity.fa_gram(x, y, q=2), (a, b))
    with pytest.raises(ValueError, match="q=2"):
        affinity.fa_gram(a, b, q=1)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="q=2"):
        fa_loss(x, x, q=1, impl="gram")


def test_gram_fp32_matches_fp64_reference():
    g = torch.Generator().manual_seed(24)
    student = torch.randn(2, 16, 12, 20, generator=g)
    teacher = torch.randn(2, 24, 24, 40, generator=g)
    ref = fa_loss(student.double(), teacher.double(), q=2, impl="reference")
    gram = fa_loss(student, teacher, q=2, impl="gram")
    assert gram.dtype == torch.float32
    assert abs(gram.item() - ref.item()) / ref.item() < 1e-5


def test_auto_picks_the_fastest_measured_path(monkeypatch):
    table = {"cpu": {
        1: [(256, 8, {"reference": 1.0, "tiled:64": 2.0}), (65536, 256, {"tiled:256": 3.0, "tiled:512": 4.0})],
        2: [(256, 8, {"reference": 2.0, "gram": 1.0, "tiled:64": 3.0})],
    }}
    monkeypatch.setattr(affinity.calibration, "TIMINGS", table)
    small = torch.zeros(1, 300, 4)
    assert affinity.auto_choice(small, small, q=1) == ("reference", None)
    assert affinity.auto_choice(small, small, q=2) == ("gram", None)
    # Nearest measured shape (log N, log C): the large one; the reference is never chosen where
    # its N x N matrices would not fit the limit, even when the nearest row measured it fastest.
    assert affinity.auto_choice(torch.zeros(1, 20000, 128), torch.zeros(1, 20000, 128), q=1) == ("tiled", 256)
    # ... unless the default tile is within the tie margin of the fastest.
    table["cpu"][1][1] = (65536, 256, {"tiled:256": 3.0, f"tiled:{affinity.DEFAULT_TILE}": 3.1})
    assert affinity.auto_choice(torch.zeros(1, 20000, 128), torch.zeros(1, 20000, 128), q=1) == ("tiled", affinity.DEFAULT_TILE)
    monkeypatch.setattr(affinity, "AUTO_REFERENCE_MAX_BYTES", 1000)
    assert affinity.auto_choice(small, small, q=1) == ("tiled", 64)
    # fa_loss follows the choice (and its result is the reference's either way).
    x = torch.randn(1, 3, 10, 30, dtype=F64)
    y = torch.randn(1, 3, 10, 30, dtype=F64)
    assert fa_loss(x, y, impl="auto").item() == pytest.approx(fa_loss(x, y, impl="reference").item(), rel=1e-12)
    # No measurements for a device: the documented rule.
    monkeypatch.setattr(affinity.calibration, "TIMINGS", {})
    assert affinity.auto_choice(small, small, q=2) == ("gram", None)
    assert resolve_impl("auto", torch.zeros(1, 5000, 4), q=1) == "tiled"


def test_committed_calibration_covers_cpu():
    # The table shipped with the package was measured on CPU for both q, and names real paths.
    for q in (1, 2):
        rows = affinity.calibration.TIMINGS["cpu"][q]
        assert rows
        for n, k, times in rows:
            assert n > 0 and k > 0 and times
            for name, seconds in times.items():
                assert affinity._candidate(name)[0] in affinity.IMPLS and seconds > 0


def test_flop_counts():
    n, c = 8192, 128
    # Full-size tile: one block, N^2 K forward (x2 FLOPs per multiply-add), 2 N^2 C_s backward.
    assert affinity.fa_flops("tiled", n, c, c, tile=n) == 2 * n * n * 2 * c + 2 * n * n * c
    assert affinity.fa_flops("tiled", n, c, c, tile=n, keep_signs=False) == 2 * (2 * n * n * 2 * c) + 2 * n * n * c
    old = affinity.fa_flops("tiled", n, c, c, tile=1024, keep_signs=False)
    assert old / 1e9 == pytest.approx(55.8, abs=0.05)  # issue's count for the recomputing kernel
    assert affinity.fa_flops("tiled", n, c, c, tile=256) <= 0.7 * old
    assert affinity.fa_flops("gram", n, c, c, q=2) < 0.05 * affinity.fa_flops("tiled", n, c, c, tile=256)
    with pytest.raises(ValueError, match="impl"):
        affinity.fa_flops("naive", n, c, c)


def test_factored_student_affinity_equals_direct_form():
    """The identity behind benchmarks/fa_factored.py: with B = U S (bilinear, align_corners=False),
    B B^T = U (S S^T) U^T band by band, and U^T phi B = (Q + Q^T) S for symmetric phi."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fa_factored.py"
    spec = importlib.util.spec_from_file_location("fa_factored_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for band, pieces in ((4, 4), (3, 2), (16, 1)):
        err = bench.check_exact(band, pieces)
        assert err["forward_max_abs_err"] < 1e-12
        assert err["backward_max_abs_err"] < 1e-10
    # the check can fail: a wrong interpolation matrix is caught
    p = bench.Problem((16, 32), 2, 8, 4, 4, dtype=torch.float64, seed=1)
    p.Uw = bench.interp_matrix(p.W, p.w, torch.float64).roll(1, dims=0)
    p.bw = bench.bands(p.Uw, 4)
    got = p.factored_student(0, 4, p.S @ p.S.t())
    assert (got - (p.B @ p.B.t())[: 4 * p.W]).abs().max() > 1e-3


def test_gram_of_an_upsampled_student_never_forms_its_rows(monkeypatch):
    """q = 2 on a student below the teacher's size takes fa_gram_interpolated (under "gram" and
    "auto"), equal to fa_gram on the upsampled rows; equal sizes and interp="features" do not."""
    from fasterkd import losses

    g = torch.Generator().manual_seed(31)
    student = torch.randn(2, 6, 5, 7, dtype=F64, generator=g)
    teacher = torch.randn(2, 4, 10, 14, dtype=F64, generator=g)
    a, b = affinity.prepare_rows(student, teacher)
    want = affinity.fa_gram(a, b, q=2)
    got = affinity.fa_gram_interpolated(affinity.normalize_pixels(student), affinity.normalize_pixels(teacher))
    assert abs(got.item() - want.item()) < 1e-14

    def no_rows(*args, **kwargs):
        raise AssertionError("the upsampled student rows were formed")

    monkeypatch.setattr(losses, "prepare_rows", no_rows)
    for impl in ("gram", "auto"):
        assert abs(fa_loss(student, teacher, q=2, impl=impl).item() - want.item()) < 1e-14
    with pytest.raises(AssertionError, match="rows were formed"):
        fa_loss(student, teacher, q=2, impl="gram", interp="features")
    with pytest.raises(AssertionError, match="rows were formed"):
        fa_loss(teacher, teacher, q=2, impl="gram")
    with pytest.raises(AssertionError, match="rows were formed"):
        fa_loss(student, teacher, q=1, impl="auto")
