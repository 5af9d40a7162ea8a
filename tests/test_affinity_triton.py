"""The Triton FA kernels against the float64 reference: loss and gradients, q = 1 and 2.

They run on CUDA where there is one, and everywhere else on CPU tensors under Triton's
interpreter. The interpreter must be switched on (``TRITON_INTERPRET=1``) before triton is first
imported, which in a pytest session has long happened, so
:func:`test_triton_kernels_under_the_interpreter` runs this file again in a fresh interpreter
process with the variable set. ``make test`` installs the ``triton`` extra, so there a missing
triton package is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fasterkd import affinity_triton
from fasterkd.affinity import fa_reference, fa_triton
from fasterkd.losses import fa_loss

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS_HERE = affinity_triton.TRITON_AVAILABLE and (torch.cuda.is_available() or affinity_triton.INTERPRETER)
needs_kernels = pytest.mark.skipif(not RUNS_HERE, reason="needs CUDA, or CPU with TRITON_INTERPRET=1 (run by the test below)")

# (N, C_t, C_s): N = 143 and 130 do not fill the 64-row blocks; channels differ and do not fill
# the 32/64-wide channel blocks.
SHAPES = [(143, 40, 24), (130, 20, 8), (64, 16, 16)]
# (loss, gradient), relative; an fp16 loss is itself rounded to fp16 (2^-11 relative)
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 3e-3)}


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y).abs().max() / y.abs().max())


@needs_kernels
@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "n{}-ct{}-cs{}".format(*s))
@pytest.mark.parametrize("q", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_rows_equal_reference(shapes, q, dtype):
    # Rows made in float64 and rounded to ``dtype``; the reference sees the same rounded rows, so
    # only the kernels' arithmetic is compared. Teacher rows take gradients too (ConvNorm).
    # Student rows of length 0.5..1.5, as after interpolation: the diagonal 1 - |b_i|^2 is then
    # no round-off tie whose sign two exact kernels may legitimately disagree on.
    n, ct, cs = shapes
    g = torch.Generator().manual_seed(n * 10 + q)
    a = F.normalize(torch.randn(2, n, ct, dtype=F64, generator=g), dim=2)
    b = F.normalize(torch.randn(2, n, cs, dtype=F64, generator=g), dim=2) * (0.5 + torch.rand(2, n, 1, dtype=F64, generator=g))
    a, b = a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE)
    a64, b64 = (a.double().cpu().requires_grad_(), b.double().cpu().requires_grad_())
    ref = fa_reference(a64, b64, q=q)
    g_ref = torch.autograd.grad(ref, (a64, b64))
    a_t, b_t = a.clone().requires_grad_(), b.clone().requires_grad_()
    tri = fa_triton(a_t, b_t, q=q)
    g_tri = torch.autograd.grad(tri, (a_t, b_t))
    loss_tol, grad_tol = TOL[dtype]
    assert tri.dtype == dtype
    assert abs(tri.double().item() - ref.item()) / ref.item() < loss_tol
    for x, y in zip(g_tri, g_ref):
        assert x.dtype == dtype and x.shape == y.shape
        assert rel_err(x.cpu(), y) < grad_tol


@needs_kernels
@pytest.mark.parametrize("q", [1, 2])
def test_triton_fa_loss_interpolated_student(q):
    # Through fa_loss: the student map is coarser and narrower than the teacher's; gradients reach
    # the student map only.
    g = torch.Generator().manual_seed(40 + q)
    student = torch.randn(2, 12, 6, 5, generator=g).to(DEVICE).requires_grad_()
    teacher = torch.randn(2, 20, 11, 10, generator=g).to(DEVICE)
    ref = fa_loss(student.double().cpu(), teacher.double().cpu(), q=q, impl="reference")
    (g_ref,) = torch.autograd.grad(ref, student)
    tri = fa_loss(student, teacher, q=q, impl="triton")
    (g_tri,) = torch.autograd.grad(tri, student)
    assert abs(tri.item() - ref.item()) / ref.item() < 1e-5
    assert rel_err(g_tri.cpu(), g_ref.cpu()) < 1e-4


@needs_kernels
def test_triton_refuses_what_it_cannot_run():
    x = torch.randn(1, 70, 4, dtype=F64, device=DEVICE)
    with pytest.raises(ValueError, match="float64"):
        fa_triton(x, x)
    if DEVICE == "cpu":
        y = torch.randn(1, 70, 4, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="interpreter"):
            fa_triton(y, y)


def test_triton_kernels_under_the_interpreter():
    """This file in a fresh process with TRITON_INTERPRET=1: every test above must pass there."""
    if affinity_triton.INTERPRETER:
        pytest.skip("already running under the interpreter")
    if not affinity_triton.TRITON_AVAILABLE:
        if os.environ.get("FASTERKD_MAKE_TEST") == "1":
            pytest.fail("triton is not installed; `make test` installs the '.[triton]' extra")
        pytest.skip("triton is not installed (pip install -e '.[triton]')")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not under_the_interpreter"]
    start = time.perf_counter()
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    took = time.perf_counter() - start
    tail = run.stdout[-4000:] + run.stderr[-2000:]
    assert run.returncode == 0, tail
    assert "skipped" not in run.stdout and "passed" in run.stdout, tail
    print(f"interpreter run: {took:.1f} s: {run.stdout.strip().splitlines()[-1]}")
