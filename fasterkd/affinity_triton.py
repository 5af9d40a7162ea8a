"""The exact FA kernels (paper Eq. 4-5) fused in Triton: the tiled algorithm with blocks in SRAM.

Used through :func:`fasterkd.affinity.fa_triton` (``impl="triton"``), which checks the rows first.
The forward visits J >= I blocks of D = X Y^T (X = [A, B], Y = [A, -B]) and writes one partial
sum per (image, row block); the backward gives each row block its own program that sums
phi_IJ V_J over all J, so no atomics and a deterministic result. fp32 inputs use IEEE fp32 dot
products (no TF32) to match the other kernels; fp16/bf16 inputs accumulate in fp32. float64 is
not supported.

Devices: CUDA tensors; or CPU tensors when Triton's interpreter is on, i.e. the environment
variable ``TRITON_INTERPRET=1`` was set before ``triton`` was first imported (that is how the
tests run these kernels without a GPU; slow, for correctness only). Under the interpreter bf16
``tl.dot`` gives wrong results, so only fp32/fp16 are accepted there.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:  # Triton is optional: only CUDA builds of torch ship it, and only a GPU (or its interpreter) runs it.
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None
    TRITON_AVAILABLE = False

# Read once, like Triton itself, which decides at import time whether @triton.jit interprets.
INTERPRETER = TRITON_AVAILABLE and os.environ.get("TRITON_INTERPRET", "") == "1"
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INTERPRETER_DTYPES = (torch.float32, torch.float16)


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


def _triton_block_k(k: int) -> int:
    return 32 if k <= 32 else 64


class _TritonFA(torch.autograd.Function):
    """The tiled algorithm as fused Triton kernels; same function, same gradients."""

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


def triton_device_error(a: Tensor) -> str | None:
    """Why the Triton kernels cannot take rows like ``a`` here (None when they can)."""
    if not TRITON_AVAILABLE:
        return "impl='triton' needs the triton package (pip install -e '.[triton]'); use 'tiled'"
    if a.device.type == "cuda":
        return None if a.dtype in TRITON_DTYPES else (
            f"impl='triton' supports {TRITON_DTYPES}, got {a.dtype}; use 'tiled' for float64")
    if a.device.type == "cpu" and INTERPRETER:
        return None if a.dtype in INTERPRETER_DTYPES else (
            f"impl='triton' under the interpreter supports {INTERPRETER_DTYPES}, got {a.dtype}")
    return (f"impl='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"triton is imported), got device {a.device}; use 'tiled' on CPU")


def triton_fa(a: Tensor, b: Tensor, q: int) -> Tensor:
    """The batch loss of checked pixel rows; raises ValueError where the kernels cannot run."""
    why = triton_device_error(a)
    if why is not None:
        raise ValueError(why)
    return _TritonFA.apply(a, b, q)
