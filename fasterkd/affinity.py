"""Feature-affinity kernels behind ``fasterkd.losses.fa_loss`` (paper Eq. 4-5).

Every kernel takes *pixel rows*: per image, ``A`` (N x C_t) holds the unit teacher vectors and
``B`` (N x C_s) the unit student vectors already interpolated to the teacher's N = H*W pixels
(see :func:`prepare_rows`). With D = A A^T - B B^T the loss of one image is

    L = (1/N^2) * sum_ij |D_ij|^q          (q = 1: Eq. 5 with p = 2; q = 2: squared error)

and the batch loss is the mean over images. Four implementations give the same function:

``"reference"``
    Materialises the (B, N, N) affinity matrices and lets autograd differentiate them. Clear and
    obviously right, but it peaks at about five N x N matrices per image (13.4 GB at the 1/4 path
    of a 256x512 crop with batch 10, 215 GB at 512x1024); for tests and tiny maps.
``"tiled"``
    Exact, in plain PyTorch: a custom ``torch.autograd.Function`` that streams T x T blocks of D
    and visits only the upper block triangle (D is symmetric: off-diagonal blocks count twice).
    With X = [A, B] and Y = [A, -B] (concatenated channels) one block is a single matmul,
    D_IJ = X_I Y_J^T. Gradient (phi = sign(D) for q = 1, 2D for q = 2; phi is symmetric):
    dL/dB = -(2/N^2) phi B and, only when asked for (ConvNorm ablation), dL/dA = +(2/N^2) phi A.
    For q = 1 the forward keeps sign(D) as bits (N^2/16 bytes per image) and the backward only
    multiplies; q = 2 recomputes the blocks. The element-wise passes (abs, sum, sign bits) run
    on each block right after its product, while it is still in cache; the default T = 768
    (2.25 MiB in fp32) was the fastest tile at N >= 4096 on the development CPU, 2-11 % ahead of
    T = 512 and 1024 (``affinity_calibration``), and smaller tiles (T = 256 fits its 512 KiB L2)
    lose to per-block overhead. ``torch.sign(0) = 0``, the convention of autograd's ``abs``,
    is kept by a second bit plane for blocks with exact zeros (zero pixels on both sides).
``"gram"``
    q = 2 only, exact and O(B N C^2): sum_ij D_ij^2 = |A^T A|^2 - 2 |A^T B|^2 + |B^T B|^2.
``"triton"``
    The tiled algorithm fused in Triton kernels (:mod:`fasterkd.affinity_triton`): CUDA, or CPU
    under Triton's interpreter (``TRITON_INTERPRET=1``) for tests.

``"auto"`` picks the fastest exact path for the device, q and shape from measured timings
(:func:`auto_choice`, :mod:`fasterkd.affinity_calibration`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fasterkd import affinity_calibration as calibration
from fasterkd.affinity_triton import INTERPRETER, TRITON_AVAILABLE, triton_device_error, triton_fa  # noqa: F401 (re-exported)

IMPLS = ("reference", "tiled", "gram", "triton", "auto")
INTERPS = ("affinity", "features")
# Without measurements for a device, the reference below this many pixels (4 MiB per image in
# fp32: its few large matmuls beat the Python loop of the tiled kernel).
AUTO_REFERENCE_MAX_PIXELS = 1024
# ``auto`` never picks the reference when its planning estimate exceeds this.
AUTO_REFERENCE_MAX_BYTES = 1 << 30
DEFAULT_TILE = 768
# ``auto`` keeps DEFAULT_TILE unless another tile was measured faster by more than this fraction.
AUTO_TILE_TIE = 0.05


# --------------------------------------------------------------------------------------------
# Inputs: unit pixel vectors, interpolation of the student, pixel rows
# --------------------------------------------------------------------------------------------


def normalize_pixels(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit-normalise each pixel's C-vector of a (B, C, H, W) map (Eq. 4, p = 2).

    A zero vector (possible after a ReLU) stays 0, so its affinity with every pixel, itself
    included, is 0 (``F.normalize`` divides by max(norm, eps)).
    """
    return F.normalize(x, p=2.0, dim=1, eps=eps)


def pixel_rows(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H*W, C) rows, pixel index i = h*W + w.

    A transposed *view*, not a copy: at the 1/4 path every copy of a batch of maps costs as much
    as the tiled kernel's whole working set, so the kernels copy one image at a time instead.
    """
    return x.flatten(2).transpose(1, 2)


def prepare_rows(
    student: Tensor, teacher: Tensor, interp: str = "affinity", teacher_grad: bool = False
) -> tuple[Tensor, Tensor]:
    """Unit teacher rows A and (interpolated) unit student rows B, both (B, N_teacher, C).

    ``interp="affinity"`` (the paper's reading of Eq. 5): the student affinity matrix is
    interpolated bilinearly (``align_corners=False``) along both of its pixel indices. Because the
    interpolation W is linear, W (n n^T) W^T = (W n)(W n)^T, so it is computed as the Gram matrix
    of the bilinearly upsampled *normalised* student vectors (which may then be shorter than 1).
    ``interp="features"``: upsample the raw student features, then normalise (a different loss,
    not invariant to per-pixel rescaling of the student). The teacher is detached unless
    ``teacher_grad`` (only the ConvNorm ablation trains layers on the teacher side).
    """
    if interp not in INTERPS:
        raise ValueError(f"interp must be one of {INTERPS}, got {interp!r}")
    size = teacher.shape[-2:]
    if interp == "affinity":
        s = normalize_pixels(student)
        if s.shape[-2:] != size:
            s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
    else:
        s = student
        if s.shape[-2:] != size:
            s = F.interpolate(s, size=size, mode="bilinear", align_corners=False)
        s = normalize_pixels(s)
    t = teacher if teacher_grad else teacher.detach()
    t = normalize_pixels(t)
    return pixel_rows(t), pixel_rows(s.to(t.dtype))


def affinity_matrix(x: Tensor) -> Tensor:
    """The (B, N, N) affinity S_ij of a (B, C, H, W) map (Eq. 4). Materialises N^2 values."""
    r = pixel_rows(normalize_pixels(x))
    return r @ r.transpose(1, 2)


def _check_rows(a: Tensor, b: Tensor, q: int) -> None:
    if a.dim() != 3 or b.dim() != 3:
        raise ValueError(f"pixel rows must be (B, N, C) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"teacher rows {tuple(a.shape)} and student rows {tuple(b.shape)} differ in (B, N)")
    if a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"rows must share dtype and device, got {a.dtype}/{a.device} and {b.dtype}/{b.device}")
    if q not in (1, 2):
        raise ValueError(f"q must be 1 or 2, got {q!r}")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sums of N^2 entries: float64 stays float64, everything else accumulates in fp32 (the loss
    # is a mean over N^2 values, so fp32 accumulation of fp16/bf16 blocks keeps it accurate).
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------
# Reference: materialised matrices, autograd does the rest
# --------------------------------------------------------------------------------------------


def fa_reference(a: Tensor, b: Tensor, q: int = 1) -> Tensor:
    """Eq. 5 on pixel rows with the (B, N, N) matrices materialised; batch mean of image means."""
    _check_rows(a, b, q)
    d = a @ a.transpose(1, 2) - b @ b.transpose(1, 2)
    e = d.abs() if q == 1 else d.square()
    return e.mean(dim=(1, 2), dtype=_acc_dtype(d.dtype)).mean().to(a.dtype)


# --------------------------------------------------------------------------------------------
# Tiled: exact, streaming; q = 1 keeps the signs of D as bits for the backward
# --------------------------------------------------------------------------------------------


def _blocks(n: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


def _upper_blocks(n: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(i0, i1, j0, j1) of every block of the upper block triangle, row block by row block."""
    blocks = _blocks(n, tile)
    return [(i0, i1, j0, j1) for k, (i0, i1) in enumerate(blocks) for j0, j1 in blocks[k:]]


# Bits <-> bytes, eight entries per int64 operation (PyTorch has no bit tensors). A bool tensor
# viewed as int64 holds 8 entries as bytes 0/1 (entry k in byte k, little-endian); multiplying by
# _PACK moves byte k to bit 56 + k without carries (every product bit lands at a distinct place).
# Unpacking copies the byte to all 8 bytes (_SPREAD), keeps bit k in byte k (_PICK), turns a
# non-zero byte into 0x80 and down to 0x01 (+0x7F, & 0x80.., >> 7), then maps 1 -> 0xFF (-1 as
# int8) and 0 -> 0x01 (+1) with a per-byte multiply by 0xFE (no carries) and | 0x01.
_PACK = 0x0102040810204080
_SPREAD = 0x0101010101010101
_PICK = 0x8040201008040201 - (1 << 64)  # as a signed int64
_HIGH = 0x8080808080808080 - (1 << 64)


def _pack_bits(mask: Tensor) -> Tensor:
    """Flat bool tensor whose length is a multiple of 8 -> uint8, entry 8m + k in bit k of byte m."""
    v = mask.view(torch.uint8).view(torch.int64)
    return v.mul(_PACK).bitwise_right_shift_(56).bitwise_and_(255).to(torch.uint8)


def _unpack_bits(packed: Tensor, signed: bool) -> Tensor:
    """uint8 bits -> int8 entries (8 per byte): a set bit gives -1 (``signed``) or 1, else 1 or 0."""
    v = packed.to(torch.int64).mul_(_SPREAD).bitwise_and_(_PICK)
    v = v.add_(0x7F7F7F7F7F7F7F7F).bitwise_and_(_HIGH).bitwise_right_shift_(7).bitwise_and_(_SPREAD)
    if signed:
        v = v.mul_(0xFE).bitwise_or_(_SPREAD)
    return v.view(torch.int8)


# On the CPU the comparison and the bit (un)packing go through NumPy on the same memory: torch's
# bool-output comparison and the int64 arithmetic above took 0.35 ms per 512 x 512 block against
# 0.06 ms for ``np.less_equal`` + ``np.packbits`` (and 0.21 against 0.07 ms to unpack), a sixth of
# the block's product time (one thread, the machine of benchmarks/README.md).


def _pack_le0_np(d: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Bits of ``d <= 0`` (flat float array), entry 8m + k in bit k of byte m; ``mask`` a bool scratch."""
    return np.packbits(np.less_equal(d, 0, out=mask[: d.size]), bitorder="little")


def _pack_eq0_np(d: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.packbits(np.equal(d, 0, out=mask[: d.size]), bitorder="little")


def _unpack_np(packed: Tensor, size: int) -> Tensor:
    """The first ``size`` bits of ``packed`` (uint8, CPU) as uint8 0/1 entries."""
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=size, bitorder="little"))


def _padded(count: int) -> int:
    return (count + 7) // 8 * 8


def _xy(a: Tensor, b: Tensor, need_y: bool = True) -> tuple[Tensor, Tensor | None]:
    """X = [A, B] and Y = [A, -B] of one image, (N, C_t + C_s), as transposed views.

    The rows are usually transposed views of (C, N) maps (:func:`pixel_rows`): concatenating the
    (C, N) transposes is a plain copy, where concatenating the (N, C) views gathers strided rows.
    """
    xt = torch.cat([a.t(), b.t()], dim=0)
    yt = torch.cat([a.t(), b.t().neg()], dim=0) if need_y else None
    return xt.t(), (yt.t() if yt is not None else None)


class _TiledFA(torch.autograd.Function):
    """Exact Eq. 5 over T x T blocks of D (upper block triangle).

    q = 1: the forward stores sign(D) of every visited block as bits (bit = D <= 0, plus a bit
    plane of exact zeros for the rare blocks that have any), so the backward only multiplies.
    q = 2 (or ``keep_signs=False``): the backward recomputes each block.
    """

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, q: int, tile: int, keep_signs: bool) -> Tensor:  # type: ignore[override]
        nb, n, _ = a.shape
        acc = _acc_dtype(a.dtype)
        blocks = _upper_blocks(n, tile)
        keep = keep_signs and q == 1
        t = min(tile, n)
        # One flat buffer for every block product: no allocation (and no page faults) per block.
        buf = torch.empty(_padded(t * t), dtype=a.dtype, device=a.device)
        on_cpu = a.device.type == "cpu"
        mask = torch.zeros(_padded(t * t), dtype=torch.bool, device=a.device)
        mask_np = mask.numpy() if on_cpu else None
        ebuf = torch.empty_like(buf) if q == 1 else None
        offsets = [0]
        for i0, i1, j0, j1 in blocks:
            offsets.append(offsets[-1] + _padded((i1 - i0) * (j1 - j0)) // 8)
        signs = torch.empty(nb, offsets[-1], dtype=torch.uint8, device=a.device) if keep else None
        zeros: dict[tuple[int, int], Tensor] = {}
        sums = torch.empty(nb, len(blocks), dtype=acc, device=a.device)
        for img in range(nb):
            x, y = _xy(a[img], b[img])  # X_I Y_J^T = A_I A_J^T - B_I B_J^T
            for k, (i0, i1, j0, j1) in enumerate(blocks):
                size = (i1 - i0) * (j1 - j0)
                d = buf[:size].view(i1 - i0, j1 - j0)
                torch.mm(x[i0:i1], y[j0:j1].t(), out=d)
                # Every pass below reads the block right after its product, while it is in cache.
                if q == 2:
                    sums[img, k] = torch.linalg.vector_norm(d, ord=2, dtype=acc)
                    continue
                e = torch.abs(d, out=ebuf[:size].view(i1 - i0, j1 - j0))
                sums[img, k] = e.sum(dtype=acc)
                if keep and on_cpu:
                    flat = buf[:size].numpy()
                    signs[img, offsets[k]:offsets[k + 1]] = torch.from_numpy(_pack_le0_np(flat, mask_np))
                    if float(e.min()) == 0.0:  # exact zeros (zero pixels on both sides): sign 0
                        zeros[(img, k)] = torch.from_numpy(_pack_eq0_np(flat, mask_np))
                elif keep:
                    m = mask[:size].view(i1 - i0, j1 - j0)
                    torch.le(d, 0, out=m)  # bit set: sign -1 (or 0, see below)
                    signs[img, offsets[k]:offsets[k + 1]] = _pack_bits(mask[: _padded(size)])
                    if float(e.min()) == 0.0:  # exact zeros (zero pixels on both sides): sign 0
                        torch.eq(d, 0, out=m)
                        zeros[(img, k)] = _pack_bits(mask[: _padded(size)])
        if q == 2:
            sums.square_()
        weights = torch.tensor([1.0 if i0 == j0 else 2.0 for i0, _, j0, _ in blocks], dtype=torch.float64, device=a.device)
        per_image = (sums.double() * weights).sum(dim=1) / (n * n)
        saved = (a, b, signs) if keep else (a, b)
        ctx.save_for_backward(*saved)
        ctx.q, ctx.tile, ctx.keep, ctx.zeros, ctx.offsets = q, tile, keep, zeros, offsets
        return per_image.mean().to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        a, b = saved[0], saved[1]
        signs = saved[2] if ctx.keep else None
        q, tile = ctx.q, ctx.tile
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_a or need_b):
            return None, None, None, None, None
        nb, n, ct = a.shape
        acc = _acc_dtype(a.dtype)
        blocks = _upper_blocks(n, tile)
        t = min(tile, n)
        buf = torch.empty(_padded(t * t), dtype=a.dtype, device=a.device)
        if signs is not None:
            fix = torch.empty_like(buf)
        # phi = sign(D) (q=1) or 2D (q=2); dL/dA = +(2/N^2) phi A, dL/dB = -(2/N^2) phi B, each
        # divided by the batch size (batch mean). phi V is accumulated for V = [A, B] or B only.
        scale = grad_out.to(torch.float64) * (2.0 * (2.0 if q == 2 else 1.0) / (n * n * nb))
        # Gradients are allocated (B, C, N) and returned as (B, N, C) views: the rows are views of
        # (B, C, H, W) maps (pixel_rows), so autograd hands them back with no transposing copy.
        grad_a = a.new_empty(nb, ct, n, dtype=acc).transpose(1, 2) if need_a else None
        grad_b = b.new_empty(nb, b.shape[2], n, dtype=acc).transpose(1, 2) if need_b else None
        for img in range(nb):
            if signs is None:
                x, y = _xy(a[img], b[img])
                v = x if need_a else b[img]  # rows multiplied by phi
            else:  # no products to recompute: only the rows phi multiplies
                v = _xy(a[img], b[img], need_y=False)[0] if need_a else b[img]
            g = torch.zeros(n, v.shape[1], dtype=acc, device=a.device)
            bits_only = signs is not None and a.device.type == "cpu" and acc == a.dtype
            if bits_only:  # sign(D) = 1 - 2P (P: the D <= 0 bits): sign(D) V_J = sum_j V_j - 2 P V_J
                vsum = {j0: v[j0:j1].sum(dim=0, dtype=acc) for j0, j1 in _blocks(n, tile)}
            for k, (i0, i1, j0, j1) in enumerate(blocks):
                size = (i1 - i0) * (j1 - j0)
                d = buf[:size].view(i1 - i0, j1 - j0)
                if bits_only:
                    buf[:size].copy_(_unpack_np(signs[img, ctx.offsets[k]:ctx.offsets[k + 1]], size))
                    if (img, k) in ctx.zeros:
                        # the sign matrix itself, 1 - 2P + Z: a zero pixel's row must come out exactly 0
                        # (the sum form leaves round-off there, which its normalisation scales by 1/eps)
                        buf[:size].mul_(-2.0).add_(1.0).add_(_unpack_np(ctx.zeros[(img, k)], size))
                        g[i0:i1].addmm_(d, v[j0:j1])
                        if j0 != i0:
                            g[j0:j1].addmm_(d.t(), v[i0:i1])
                        continue
                    g[i0:i1].addmm_(d, v[j0:j1], alpha=-2.0).add_(vsum[j0])
                    if j0 != i0:  # the mirrored block D_JI = D_IJ^T
                        g[j0:j1].addmm_(d.t(), v[i0:i1], alpha=-2.0).add_(vsum[i0])
                    continue
                if signs is None:
                    torch.mm(x[i0:i1], y[j0:j1].t(), out=d)
                    if q == 1:
                        d.sign_()
                else:
                    buf[: _padded(size)].copy_(_unpack_bits(signs[img, ctx.offsets[k]:ctx.offsets[k + 1]], signed=True))
                    if (img, k) in ctx.zeros:  # -1 there so far: add 1 back where D == 0
                        fix[: _padded(size)].copy_(_unpack_bits(ctx.zeros[(img, k)], signed=False))
                        buf[:size] += fix[:size]
                if acc == d.dtype:
                    g[i0:i1].addmm_(d, v[j0:j1])
                    if j0 != i0:  # the mirrored block D_JI = D_IJ^T
                        g[j0:j1].addmm_(d.t(), v[i0:i1])
                else:
                    g[i0:i1] += (d @ v[j0:j1]).to(acc)
                    if j0 != i0:
                        g[j0:j1] += (d.t() @ v[i0:i1]).to(acc)
            if need_a:
                grad_a[img] = g[:, :ct]
                if need_b:
                    grad_b[img] = -g[:, ct:]
            else:
                grad_b[img] = -g
        s = scale.to(acc)
        # in place: a scaled copy of the gradients would be one more batch of maps at the peak
        ga = grad_a.mul_(s).to(a.dtype) if need_a else None
        gb = grad_b.mul_(s).to(b.dtype) if need_b else None
        return ga, gb, None, None, None


def fa_tiled(a: Tensor, b: Tensor, q: int = 1, tile: int = DEFAULT_TILE, keep_signs: bool = True) -> Tensor:
    """Eq. 5 on pixel rows, exact, never holding more than one tile x tile block of D.

    ``keep_signs`` (q = 1 only): store sign(D) as bits in the forward, N^2/16 bytes per image
    (upper triangle, one bit per entry; a second bit plane only for blocks with exact zeros),
    instead of recomputing every block in the backward. ``False`` is the recomputing variant.
    """
    _check_rows(a, b, q)
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    return _TiledFA.apply(a, b, q, int(tile), bool(keep_signs))


# --------------------------------------------------------------------------------------------
# Gram: q = 2 in O(N C^2), no N x N matrix at all
# --------------------------------------------------------------------------------------------


def fa_gram(a: Tensor, b: Tensor, q: int = 2) -> Tensor:
    """Eq. 5 with q = 2 exactly: sum_ij D_ij^2 = |A^T A|_F^2 - 2 |A^T B|_F^2 + |B^T B|_F^2.

    The identity holds for any rows (the student's may be shorter than 1 after interpolation);
    the diagonal counts, as in the reference. Autograd differentiates the three C x C Gram
    matrices. fp16/bf16 rows are multiplied in fp32. The three terms are of the order of
    N^2/C and cancel to the loss: in fp32 the absolute error is about 1e-7 of them.
    """
    _check_rows(a, b, q)
    if q != 2:
        raise ValueError(f"impl='gram' computes the squared loss only (q=2), got q={q!r}")
    n, dtype = a.shape[1], a.dtype
    acc = _acc_dtype(dtype)
    a, b = a.to(acc), b.to(acc)
    at = a.transpose(1, 2)
    total = (at @ a).square().sum(dim=(1, 2)) - 2.0 * (at @ b).square().sum(dim=(1, 2))
    total = total + (b.transpose(1, 2) @ b).square().sum(dim=(1, 2))
    return (total / (n * n)).mean().to(dtype)


def fa_gram_interpolated(student: Tensor, teacher: Tensor) -> Tensor:
    """q = 2 exactly, for a unit student map (B, C_s, h, w) upsampled to the unit teacher map's
    (B, C_t, H, W) as ``interp="affinity"`` does (B = U S, U the bilinear upsampling):
    A^T B = (U^T A)^T S and B^T B = S^T (U^T U S), products over the n = h w coarse rows.

    U^T is the adjoint of ``F.interpolate`` (``upsample_bilinear2d_backward``, which autograd
    differentiates), so only the tutor's A^T A runs over all N = H W rows: at the 1/8 -> 1/4 path
    the Gram products need about 40 % of :func:`fa_gram`'s FLOPs, and the upsampled student rows
    are never formed as rows. Equal to :func:`fa_gram` on :func:`prepare_rows` (float64 tests).
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"maps must be (B, C, H, W) with one batch size, got {tuple(student.shape)} and "
                         f"{tuple(teacher.shape)}")
    nb, cs, h, w = student.shape
    ct, hh, ww = teacher.shape[1:]
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    acc = _acc_dtype(dtype)
    s, t = student.to(acc), teacher.to(acc)
    up = F.interpolate(s, size=(hh, ww), mode="bilinear", align_corners=False)  # U S
    down = torch.ops.aten.upsample_bilinear2d_backward  # x -> U^T x
    ua = down(t, [hh, ww], [nb, ct, h, w], False)  # U^T A
    uus = down(up, [hh, ww], [nb, cs, h, w], False)  # U^T U S
    a, sr = t.flatten(2), s.flatten(2)  # (B, C, N) and (B, C_s, n)
    total = (a @ a.transpose(1, 2)).square().sum(dim=(1, 2))
    total = total - 2.0 * (ua.flatten(2) @ sr.transpose(1, 2)).square().sum(dim=(1, 2))
    total = total + (sr @ uus.flatten(2).transpose(1, 2)).square().sum(dim=(1, 2))
    n = hh * ww
    return (total / (n * n)).mean().to(dtype)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def _candidate(name: str) -> tuple[str, int | None]:
    impl, _, tile = name.partition(":")
    return impl, (int(tile) if tile else None)


def auto_choice(a: Tensor, b: Tensor | None = None, q: int = 1) -> tuple[str, int | None]:
    """What ``impl="auto"`` runs for these rows: (implementation, tile or None).

    From measurements where the device has them (:mod:`fasterkd.affinity_calibration`, written by
    ``benchmarks/fa_loss.py --calibrate``): the fastest exact path at the measured shape nearest
    in (log N, log(C_t + C_s)), among the paths that can run here (the reference only while its
    N x N matrices stay under :data:`AUTO_REFERENCE_MAX_BYTES`, Triton only where it runs).
    Devices without measurements (CUDA so far): Triton for q = 1 where it runs, else the tiled
    kernel; the Gram path for q = 2, whose O(N C^2) beats every O(N^2 C) path once N > C.
    """
    nb, n, ct = a.shape
    k = ct + (b.shape[2] if b is not None else ct)
    usable = {"reference": naive_fa_memory_bytes(nb, n, a.element_size()) <= AUTO_REFERENCE_MAX_BYTES,
              "triton": a.device.type != "cpu" and triton_device_error(a) is None,
              "gram": q == 2, "tiled": True}
    rows = calibration.TIMINGS.get(a.device.type, {}).get(q, [])
    if rows:
        def distance(row: tuple) -> float:
            return abs(math.log(row[0] / n)) + abs(math.log(row[1] / k))

        times = min(rows, key=distance)[2]
        ok = {c: t for c, t in times.items() if usable[_candidate(c)[0]]}
        if ok:
            best = min(ok, key=ok.get)
            default = f"tiled:{DEFAULT_TILE}"
            # Tiles within timing noise of each other: keep the default rather than flip-flop
            # between calibrations of a shared machine.
            if best.startswith("tiled:") and ok.get(default, math.inf) <= (1 + AUTO_TILE_TIE) * ok[best]:
                best = default
            return _candidate(best)
    if q == 2:
        return "gram", None
    if usable["triton"]:
        return "triton", None
    return ("reference", None) if n <= AUTO_REFERENCE_MAX_PIXELS else ("tiled", DEFAULT_TILE)


def resolve_impl(impl: str, a: Tensor, b: Tensor | None = None, q: int = 1) -> str:
    """The implementation ``impl`` names for these rows (``"auto"``: see :func:`auto_choice`)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return auto_choice(a, b, q)[0] if impl == "auto" else impl


def fa_triton(a: Tensor, b: Tensor, q: int = 1) -> Tensor:
    """Eq. 5 on pixel rows with fused Triton kernels (CUDA; CPU under TRITON_INTERPRET=1)."""
    _check_rows(a, b, q)
    return triton_fa(a, b, q)


def fa_rows(a: Tensor, b: Tensor, q: int = 1, impl: str = "auto", tile: int | None = None) -> Tensor:
    """Eq. 5 on prepared pixel rows with the chosen implementation.

    ``tile`` (tiled kernel only): None is the measured choice under ``auto``, else DEFAULT_TILE.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    name, auto_tile = auto_choice(a, b, q) if impl == "auto" else (impl, None)
    if name == "reference":
        return fa_reference(a, b, q)
    if name == "tiled":
        return fa_tiled(a, b, q, tile if tile is not None else (auto_tile or DEFAULT_TILE))
    if name == "gram":
        return fa_gram(a, b, q)
    return fa_triton(a, b, q)


# --------------------------------------------------------------------------------------------
# FLOPs per image of each path (2 per multiply-add; the benchmark's rates are these / time)
# --------------------------------------------------------------------------------------------


def fa_flops(impl: str, n: int, ct: int, cs: int, q: int = 1, tile: int = DEFAULT_TILE,
             keep_signs: bool = True, teacher_grad: bool = False) -> int:
    """Matrix-product FLOPs of one image's forward + backward (element-wise passes not counted)."""
    k = ct + cs
    cv = k if teacher_grad else cs  # columns multiplied by phi in the backward
    if impl == "reference":  # two Gram matrices; backward: dL/dB = (G + G^T) B, and A's if asked
        return 2 * n * n * k + 2 * 2 * n * n * cv
    if impl == "gram":  # A^T A, A^T B, B^T B; backward: one product per factor that needs a gradient
        fwd = 2 * n * (ct * ct + ct * cs + cs * cs)
        bwd = 2 * n * ct * cs + 4 * n * cs * cs + (4 * n * ct * ct + 2 * n * ct * cs if teacher_grad else 0)
        return fwd + bwd
    if impl in ("tiled", "triton"):
        blocks = _upper_blocks(n, tile if impl == "tiled" else 64)
        entries = sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1 in blocks)
        mirrored = sum((i1 - i0) * (j1 - j0) for i0, i1, j0, j1 in blocks if i0 != j0)
        fwd = 2 * entries * k
        recompute = impl == "triton" or q == 2 or not keep_signs
        if impl == "triton":  # its backward visits every block, not only the upper triangle
            return fwd + 2 * n * n * k + 2 * n * n * cv
        return fwd + (fwd if recompute else 0) + 2 * (entries + mirrored) * cv
    raise ValueError(f"fa_flops: impl must be reference, gram, tiled or triton, got {impl!r}")


# --------------------------------------------------------------------------------------------
# Sampled affinity values (FA histograms, Fig. 4)
# --------------------------------------------------------------------------------------------


def affinity_values(
    feature: Tensor,
    *,
    max_pixels: int = 2048,
    generator: torch.Generator | None = None,
    include_diagonal: bool = False,
) -> Tensor:
    """S_ij values (Eq. 4) of a (C, H, W) or (B, C, H, W) map for a histogram, as a 1-D tensor.

    Per image, at most ``max_pixels`` pixels are drawn uniformly without replacement (all of
    them when N <= max_pixels, which makes the values exact), and the pairs i < j among them are
    returned (each unordered pair once; the diagonal, S_ii = 1 for non-zero vectors, only with
    ``include_diagonal``). Memory is O(max_pixels^2), never O(N^2). Values come back as float32
    on the CPU, detached, images concatenated.
    """
    if feature.dim() == 3:
        feature = feature.unsqueeze(0)
    if feature.dim() != 4:
        raise ValueError(f"feature must be (C, H, W) or (B, C, H, W), got shape {tuple(feature.shape)}")
    if int(max_pixels) != max_pixels or max_pixels < 2:
        raise ValueError(f"max_pixels must be an integer >= 2, got {max_pixels!r}")
    rows = pixel_rows(normalize_pixels(feature.detach().float()))
    n = rows.shape[1]
    out = []
    for r in rows:
        if n > max_pixels:
            idx = torch.randperm(n, generator=generator)[:max_pixels].to(r.device)
            r = r[idx]
        s = r @ r.t()
        iu = torch.triu_indices(s.shape[0], s.shape[0], offset=0 if include_diagonal else 1, device=s.device)
        out.append(s[iu[0], iu[1]].cpu())
    return torch.cat(out)


def naive_fa_memory_bytes(batch: int, pixels: int, element_size: int = 4) -> int:
    """Planning estimate of the reference's peak extra memory: about 5.06 N x N matrices per image.

    The factor was measured for forward+backward of the materialised loss (hrnet-fa-kd.md §3.3).
    """
    return int(math.ceil(5.06 * batch * pixels * pixels * element_size))
