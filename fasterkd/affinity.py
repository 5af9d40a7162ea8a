"""Feature-affinity kernels behind ``fasterkd.losses.fa_loss`` (paper Eq. 4-5).

Every kernel takes *pixel rows*: per image, ``A`` (N x C_t) holds the unit teacher vectors and
``B`` (N x C_s) the unit student vectors already interpolated to the teacher's N = H*W pixels
(see :func:`prepare_rows`). With D = A A^T - B B^T the loss of one image is

    L = (1/N^2) * sum_ij |D_ij|^q          (q = 1: Eq. 5 with p = 2; q = 2: squared error)

and the batch loss is the mean over images. Three implementations give the same function:

``"reference"``
    Materialises the (B, N, N) affinity matrices and lets autograd differentiate them. Clear and
    obviously right, but it peaks at about five N x N matrices per image (13.4 GB at the 1/4 path
    of a 256x512 crop with batch 10, 215 GB at 512x1024); for tests and tiny maps.
``"tiled"``
    Exact, in plain PyTorch: a custom ``torch.autograd.Function`` that streams T x T blocks of D,
    visits only the upper block triangle (D is symmetric: off-diagonal blocks count twice) and
    recomputes the blocks in the backward pass instead of storing them. With X = [A, B] and
    Y = [A, -B] (concatenated channels) one block is a single matmul, D_IJ = X_I Y_J^T. Memory:
    O(B*N*(C_t + C_s) + T^2). Gradient (phi = sign(D) for q = 1, 2D for q = 2; phi is symmetric):
    dL/dB = -(2/N^2) phi B and, only when asked for (ConvNorm ablation), dL/dA = +(2/N^2) phi A.
    ``torch.sign(0) = 0``, the convention of autograd's ``abs``, so tiled and reference agree
    exactly even on ties (the diagonal with unit vectors).
``"triton"``
    The same algorithm fused in Triton kernels on CUDA (blocks of D never leave the SM): the
    forward visits J >= I blocks and writes one partial sum per (image, row block); the backward
    gives each row block its own program that sums phi_IJ V_J over all J, so no atomics and a
    deterministic result. fp32 inputs use IEEE fp32 dot products (no TF32) to match the other
    kernels; fp16/bf16 inputs accumulate in fp32. float64 is not supported by the Triton path.

``"auto"`` picks triton on CUDA when Triton imports and the dtype is fp32/fp16/bf16, otherwise the
reference for tiny maps (N <= :data:`AUTO_REFERENCE_MAX_PIXELS`) and tiled for everything else.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # Triton is optional: only CUDA builds of torch ship it, and only a GPU can run it.
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    TRITON_AVAILABLE = False

IMPLS = ("reference", "tiled", "triton", "auto")
INTERPS = ("affinity", "features")
# Below this many pixels the materialised matrices are tiny (4 MiB per image in fp32) and the
# reference's few large matmuls beat the Python loop of the tiled kernel.
AUTO_REFERENCE_MAX_PIXELS = 1024
DEFAULT_TILE = 1024


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
# Tiled: exact, streaming, recompute in backward
# --------------------------------------------------------------------------------------------


def _blocks(n: int, tile: int) -> list[tuple[int, int]]:
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


class _TiledFA(torch.autograd.Function):
    """Exact Eq. 5 over T x T blocks of D (upper block triangle); blocks recomputed in backward."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, q: int, tile: int) -> Tensor:  # type: ignore[override]
        nb, n, _ = a.shape
        acc = _acc_dtype(a.dtype)
        blocks = _blocks(n, tile)
        # One flat buffer for every block product: no allocation (and no page faults) per block.
        t = min(tile, n)
        buf = torch.empty(t * t, dtype=a.dtype, device=a.device)
        total = torch.zeros((), dtype=torch.float64, device=a.device)
        for img in range(nb):
            x = torch.cat([a[img], b[img]], dim=1)  # (N, C_t + C_s)
            y = torch.cat([a[img], -b[img]], dim=1)  # X_I Y_J^T = A_I A_J^T - B_I B_J^T
            img_total = torch.zeros((), dtype=torch.float64, device=a.device)
            for bi, (i0, i1) in enumerate(blocks):
                for j0, j1 in blocks[bi:]:
                    d = buf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
                    torch.mm(x[i0:i1], y[j0:j1].t(), out=d)
                    if q == 1:
                        d.abs_()
                    else:
                        d.square_()
                    s = d.sum(dtype=acc).double()
                    img_total += s if j0 == i0 else 2.0 * s
            total += img_total / (n * n)
        ctx.save_for_backward(a, b)
        ctx.q, ctx.tile = q, tile
        return (total / nb).to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        q, tile = ctx.q, ctx.tile
        need_a = ctx.needs_input_grad[0]
        need_b = ctx.needs_input_grad[1]
        if not (need_a or need_b):
            return None, None, None, None
        nb, n, ct = a.shape
        acc = _acc_dtype(a.dtype)
        blocks = _blocks(n, tile)
        t = min(tile, n)
        buf = torch.empty(t * t, dtype=a.dtype, device=a.device)
        # phi = sign(D) (q=1) or 2D (q=2); dL/dA = +(2/N^2) phi A, dL/dB = -(2/N^2) phi B, each
        # divided by the batch size (batch mean). phi V is accumulated for V = [A, B] or B only.
        scale = grad_out.to(torch.float64) * (2.0 * (2.0 if q == 2 else 1.0) / (n * n * nb))
        # Gradients are allocated (B, C, N) and returned as (B, N, C) views: the rows are views of
        # (B, C, H, W) maps (pixel_rows), so autograd hands them back with no transposing copy.
        grad_a = a.new_empty(nb, ct, n, dtype=acc).transpose(1, 2) if need_a else None
        grad_b = b.new_empty(nb, b.shape[2], n, dtype=acc).transpose(1, 2) if need_b else None
        for img in range(nb):
            x = torch.cat([a[img], b[img]], dim=1)
            y = torch.cat([a[img], -b[img]], dim=1)
            v = x if need_a else b[img]  # rows multiplied by phi
            g = torch.zeros(n, v.shape[1], dtype=acc, device=a.device)
            for bi, (i0, i1) in enumerate(blocks):
                for j0, j1 in blocks[bi:]:
                    d = buf[: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
                    torch.mm(x[i0:i1], y[j0:j1].t(), out=d)
                    if q == 1:
                        d.sign_()
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
        return ga, gb, None, None


def fa_tiled(a: Tensor, b: Tensor, q: int = 1, tile: int = DEFAULT_TILE) -> Tensor:
    """Eq. 5 on pixel rows, exact, never holding more than one tile x tile block of D."""
    _check_rows(a, b, q)
    if int(tile) != tile or tile < 1:
        raise ValueError(f"tile must be a positive integer, got {tile!r}")
    return _TiledFA.apply(a, b, q, int(tile))


# --------------------------------------------------------------------------------------------
# Triton: the tiled algorithm fused on the GPU
# --------------------------------------------------------------------------------------------

if TRITON_AVAILABLE:

    @triton.jit
    def _fa_fwd_kernel(
        X, Y, OUT,
        N, K,
        sxb, sxn, sxk,
        syb, syn, syk,
        NUM_I,
        Q: tl.constexpr, IEEE: tl.constexpr,
        BLOCK: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # One program per (row block I, image): sum over J >= I of |D_IJ|^q, off-diagonal x2.
        pid_i = tl.program_id(0)
        img = tl.program_id(1)
        i0 = pid_i * BLOCK
        rows = i0 + tl.arange(0, BLOCK)
        offs_k = tl.arange(0, BLOCK_K)
        x_base = X + img * sxb
        y_base = Y + img * syb
        row_sum = tl.zeros([BLOCK], dtype=tl.float32)
        for j0 in range(i0, N, BLOCK):
            cols = j0 + tl.arange(0, BLOCK)
            d = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                xt = tl.load(
                    x_base + rows[:, None] * sxn + ks[None, :] * sxk,
                    mask=(rows[:, None] < N) & (ks[None, :] < K), other=0.0,
                )
                yt = tl.load(  # loaded transposed: (BLOCK_K, BLOCK)
                    y_base + cols[None, :] * syn + ks[:, None] * syk,
                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0,
                )
                if IEEE:
                    d += tl.dot(xt, yt, input_precision="ieee")
                else:
                    d += tl.dot(xt, yt)
            if Q == 1:
                e = tl.abs(d)
            else:
                e = d * d
            # Off-diagonal blocks stand for D_IJ and D_JI. Padded rows/cols are 0 -> contribute 0.
            w = 2.0 - (j0 == i0).to(tl.float32)
            row_sum += tl.sum(e, axis=1) * w
        tl.store(OUT + img * NUM_I + pid_i, tl.sum(row_sum, axis=0))

    @triton.jit
    def _fa_bwd_kernel(
        X, Y, V, G,
        N, K, CV,
        sxb, sxn, sxk,
        syb, syn, syk,
        svb, svn, svk,
        sgb, sgn, sgk,
        Q: tl.constexpr, IEEE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_CV: tl.constexpr,
    ):
        # One program per (row block I, image): G_I = sum over all J of phi(D_IJ) V_J, in fp32.
        pid_i = tl.program_id(0)
        img = tl.program_id(1)
        rows = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, BLOCK_K)
        offs_c = tl.arange(0, BLOCK_CV)
        x_base = X + img * sxb
        y_base = Y + img * syb
        v_base = V + img * svb
        acc = tl.zeros([BLOCK_M, BLOCK_CV], dtype=tl.float32)
        for j0 in range(0, N, BLOCK_N):
            cols = j0 + tl.arange(0, BLOCK_N)
            d = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + offs_k
                xt = tl.load(
                    x_base + rows[:, None] * sxn + ks[None, :] * sxk,
                    mask=(rows[:, None] < N) & (ks[None, :] < K), other=0.0,
                )
                yt = tl.load(
                    y_base + cols[None, :] * syn + ks[:, None] * syk,
                    mask=(cols[None, :] < N) & (ks[:, None] < K), other=0.0,
                )
                if IEEE:
                    d += tl.dot(xt, yt, input_precision="ieee")
                else:
                    d += tl.dot(xt, yt)
            if Q == 1:  # sign with sign(0) = 0, as autograd's abs
                phi = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
            else:
                phi = d
            vt = tl.load(
                v_base + cols[:, None] * svn + offs_c[None, :] * svk,
                mask=(cols[:, None] < N) & (offs_c[None, :] < CV), other=0.0,
            )
            if IEEE:
                acc += tl.dot(phi, vt, input_precision="ieee")
            else:
                acc += tl.dot(phi.to(vt.dtype), vt)
        tl.store(
            G + img * sgb + rows[:, None] * sgn + offs_c[None, :] * sgk,
            acc,
            mask=(rows[:, None] < N) & (offs_c[None, :] < CV),
        )


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_block_k(k: int) -> int:
    return 32 if k <= 32 else 64


class _TritonFA(torch.autograd.Function):
    """The tiled algorithm as fused Triton kernels (CUDA only); same function, same gradients."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, q: int) -> Tensor:  # type: ignore[override]
        nb, n, _ = a.shape
        x = torch.cat([a, b], dim=2).contiguous()
        y = torch.cat([a, -b], dim=2).contiguous()
        k = x.shape[2]
        block = 64
        num_i = triton.cdiv(n, block)
        out = torch.empty(nb, num_i, dtype=torch.float32, device=a.device)
        ieee = a.dtype == torch.float32
        _fa_fwd_kernel[(num_i, nb)](
            x, y, out, n, k,
            x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            num_i,
            Q=q, IEEE=ieee, BLOCK=block, BLOCK_K=_triton_block_k(k), num_warps=4,
        )
        ctx.save_for_backward(a, b)
        ctx.q = q
        loss = out.double().sum(dim=1) / (n * n)
        return loss.mean().to(a.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        a, b = ctx.saved_tensors
        q = ctx.q
        need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_a or need_b):
            return None, None, None
        nb, n, ct = a.shape
        x = torch.cat([a, b], dim=2).contiguous()
        y = torch.cat([a, -b], dim=2).contiguous()
        v = x if need_a else b.contiguous()
        k, cv = x.shape[2], v.shape[2]
        g = torch.empty(nb, n, cv, dtype=torch.float32, device=a.device)
        block_cv = max(16, triton.next_power_of_2(cv))
        block_m = 64 if block_cv <= 128 else 32  # keep the (BLOCK_M, BLOCK_CV) accumulator in registers
        ieee = a.dtype == torch.float32
        grid = (triton.cdiv(n, block_m), nb)
        _fa_bwd_kernel[grid](
            x, y, v, g, n, k, cv,
            x.stride(0), x.stride(1), x.stride(2),
            y.stride(0), y.stride(1), y.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            g.stride(0), g.stride(1), g.stride(2),
            Q=q, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=_triton_block_k(k), BLOCK_CV=block_cv,
            num_warps=4 if block_cv <= 64 else 8,
        )
        scale = grad_out.float() * (2.0 * (2.0 if q == 2 else 1.0) / (n * n * nb))
        if need_a:
            ga = (g[:, :, :ct] * scale).to(a.dtype)
            gb = (-g[:, :, ct:] * scale).to(b.dtype) if need_b else None
        else:
            ga, gb = None, (-g * scale).to(b.dtype)
        return ga, gb, None


def fa_triton(a: Tensor, b: Tensor, q: int = 1) -> Tensor:
    """Eq. 5 on pixel rows with fused Triton kernels (CUDA, fp32/fp16/bf16)."""
    _check_rows(a, b, q)
    if not TRITON_AVAILABLE:
        raise ValueError("impl='triton' needs the triton package (shipped with CUDA builds of torch); use 'tiled'")
    if a.device.type != "cuda":
        raise ValueError(f"impl='triton' needs CUDA tensors, got device {a.device}; use 'tiled' on CPU")
    if a.dtype not in _TRITON_DTYPES:
        raise ValueError(f"impl='triton' supports {_TRITON_DTYPES}, got {a.dtype}; use 'tiled' for float64")
    return _TritonFA.apply(a, b, q)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def resolve_impl(impl: str, rows: Tensor) -> str:
    """The implementation ``impl="auto"`` uses for pixel rows of this device, dtype and size."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl != "auto":
        return impl
    if TRITON_AVAILABLE and rows.device.type == "cuda" and rows.dtype in _TRITON_DTYPES:
        return "triton"
    return "reference" if rows.shape[1] <= AUTO_REFERENCE_MAX_PIXELS else "tiled"


def fa_rows(a: Tensor, b: Tensor, q: int = 1, impl: str = "auto", tile: int = DEFAULT_TILE) -> Tensor:
    """Eq. 5 on prepared pixel rows with the chosen implementation."""
    name = resolve_impl(impl, a)
    if name == "reference":
        return fa_reference(a, b, q)
    if name == "tiled":
        return fa_tiled(a, b, q, tile)
    return fa_triton(a, b, q)


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
