"""Benchmark: would the interpolation structure of the student rows make the q = 1 FA loss cheaper?

In Eq. 6 the student's 1/8 path is compared with the tutor's 1/4 path: the student rows are a
bilinear upsampling of n = N/4 unit vectors, B = U S with U = U_H (x) U_W (two taps per fine
index and dimension). So the student affinity is S^s = U (S S^T) U^T, and the q = 1 gradient
-(2/N^2) sign(D) B reaches S as U^T sign(D) U S. The exact tiled kernel ignores this and pays
C_s = 128 multiply-adds per entry of D for the student side: half of them in the forward (upper
triangle, fused with the tutor side as [A, B] [A, -B]^T), all of them in the backward. The factored
form needs only the n x n Gram matrix and a separable, banded interpolation of each row band of D.

This benchmark times, for one image at the goal's setting (student 1/8 map 32x64 into the 1/4
map 64x128, N = 8192, C_t = C_s = 128, fp32), only the work that differs between the two forms:
- forward: ``fused`` = the tiled kernel's block products X_I Y_J^T over the upper block triangle
  (tile 512); ``factored`` = the tutor's A_R A^T on the same triangle (row bands of ``--band``
  fine rows) plus S^s of each band from S S^T by banded matmuls (``--pieces`` pieces per
  dimension), subtracted from it; ``interpolate`` = the same with ``F.interpolate`` for the
  column side.
- backward: ``fused`` = the tiled kernel's phi_IJ B_J and phi_IJ^T B_I products (phi a fixed
  +-1 block; the bit unpacking, the same in both, is left out); ``factored`` = each band of phi
  (upper part, diagonal sub-block halved) mapped to n x n by the adjoint banded interpolation,
  then (Q + Q^T) S.
Before timing it checks in float64 that the factored forms equal the direct ones. Rounds are
interleaved; ratios are medians of per-round ratios. The fused products' FLOP rates are reported
as fractions of the fp32 ``torch.mm`` rate measured in the same process.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/fa_factored.py [--rounds R] [--band 4] [--pieces 4]
[--out PATH]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._machine import machine_record  # noqa: E402
from fasterkd.utils import atomic_write_json  # noqa: E402

TILE = 512


def interp_matrix(out_size: int, in_size: int, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) matrix of 1-D linear interpolation with align_corners=False (F.interpolate's)."""
    eye = torch.eye(in_size, dtype=dtype).unsqueeze(0)
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].t().contiguous()


def support(rows: torch.Tensor) -> tuple[int, int]:
    """[u0, u1): the input columns that some of these rows of an interpolation matrix read."""
    nz = rows.abs().sum(0).nonzero().flatten()
    return int(nz[0]), int(nz[-1]) + 1


def bands(u: torch.Tensor, pieces: int) -> list[tuple[int, int, int, int, torch.Tensor]]:
    """Split the rows of a banded (out, in) matrix into pieces, each with its input window."""
    out, res = u.shape[0], []
    for p in range(pieces):
        a, b = p * out // pieces, (p + 1) * out // pieces
        u0, u1 = support(u[a:b])
        res.append((a, b, u0, u1, u[a:b, u0:u1].contiguous()))
    return res


class Problem:
    """One image: tutor rows A (N, C), coarse student rows S (n, C), fine student rows B = U S."""

    def __init__(self, hw: tuple[int, int], scale: int, channels: int, band: int, pieces: int,
                 dtype: torch.dtype = torch.float32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.H, self.W = hw
        self.h, self.w = self.H // scale, self.W // scale
        self.N, self.n = self.H * self.W, self.h * self.w
        self.A = F.normalize(torch.randn(self.N, channels, generator=g, dtype=dtype), dim=1)
        self.S = F.normalize(torch.randn(self.n, channels, generator=g, dtype=dtype), dim=1)
        smap = self.S.t().reshape(1, channels, self.h, self.w)
        up = F.interpolate(smap, size=hw, mode="bilinear", align_corners=False)
        self.B = up.reshape(channels, self.N).t().contiguous()
        self.Uh, self.Uw = interp_matrix(self.H, self.h, dtype), interp_matrix(self.W, self.w, dtype)
        self.bh, self.bw = bands(self.Uh, pieces), bands(self.Uw, pieces)
        self.band = band
        self.X = torch.cat([self.A, self.B], 1)
        self.Y = torch.cat([self.A, -self.B], 1)
        self.phi = torch.randint(0, 2, (TILE, TILE), generator=g).to(dtype).mul_(2).sub_(1)
        self.phi_band = torch.randint(0, 2, (band * self.W, self.N), generator=g).to(dtype).mul_(2).sub_(1)

    # ---- forward ----------------------------------------------------------------------------

    def fused_forward(self) -> None:
        n, buf = self.N, torch.empty(TILE, TILE, dtype=self.A.dtype)
        for i0 in range(0, n, TILE):
            for j0 in range(i0, n, TILE):
                torch.mm(self.X[i0:i0 + TILE], self.Y[j0:j0 + TILE].t(), out=buf)

    def left(self, gram: torch.Tensor, a0: int, a1: int) -> torch.Tensor:
        """U_R (S S^T): the fine rows [a0, a1) of the row side, (rows * W, n)."""
        c0, c1 = support(self.Uh[a0:a1])
        rows = torch.matmul(self.Uh[a0:a1, c0:c1], gram.view(self.h, self.w * self.n)[c0:c1])
        rows = rows.view(a1 - a0, self.w, self.n)
        out = torch.empty(a1 - a0, self.W, self.n, dtype=gram.dtype)
        for a, b, u0, u1, m in self.bw:
            out[:, a:b] = torch.matmul(m, rows[:, u0:u1])
        return out.view((a1 - a0) * self.W, self.n)

    def columns(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, n) @ U^T -> (rows, N) by banded matmuls along w, then h."""
        r = rows.shape[0]
        x = rows.reshape(r * self.h, self.w)
        y = torch.empty(r * self.h, self.W, dtype=rows.dtype)
        for a, b, u0, u1, m in self.bw:
            y[:, a:b] = x[:, u0:u1] @ m.t()
        y = y.view(r, self.h, self.W)
        z = torch.empty(r, self.H, self.W, dtype=rows.dtype)
        for a, b, u0, u1, m in self.bh:
            z[:, a:b] = torch.matmul(m, y[:, u0:u1])
        return z.view(r, self.N)

    def factored_student(self, a0: int, a1: int, gram: torch.Tensor, interpolate: bool = False) -> torch.Tensor:
        rows = self.left(gram, a0, a1)
        if interpolate:
            up = F.interpolate(rows.view(-1, 1, self.h, self.w), size=(self.H, self.W), mode="bilinear",
                               align_corners=False)
            return up.view(rows.shape[0], self.N)
        return self.columns(rows)

    def factored_forward(self, interpolate: bool = False) -> None:
        gram = self.S @ self.S.t()
        for a0 in range(0, self.H, self.band):
            a1 = min(a0 + self.band, self.H)
            p0, p1 = a0 * self.W, a1 * self.W
            d = self.A[p0:p1] @ self.A[p0:].t()
            d.sub_(self.factored_student(a0, a1, gram, interpolate)[:, p0:])

    # ---- backward ---------------------------------------------------------------------------

    def fused_backward(self) -> None:
        n, c = self.N, self.B.shape[1]
        g = torch.zeros(n, c, dtype=self.B.dtype)
        for i0 in range(0, n, TILE):
            for j0 in range(i0, n, TILE):
                g[i0:i0 + TILE].addmm_(self.phi, self.B[j0:j0 + TILE])
                if j0 != i0:
                    g[j0:j0 + TILE].addmm_(self.phi.t(), self.B[i0:i0 + TILE])

    def adjoint_columns(self, band: torch.Tensor) -> torch.Tensor:
        """(rows, N) @ U -> (rows, n): the adjoint of :meth:`columns`."""
        r = band.shape[0]
        x = band.view(r, self.H, self.W)
        y = torch.zeros(r, self.h, self.W, dtype=band.dtype)
        for a, b, u0, u1, m in self.bh:
            y[:, u0:u1] += torch.matmul(m.t(), x[:, a:b])
        y = y.view(r * self.h, self.W)
        z = torch.zeros(r * self.h, self.w, dtype=band.dtype)
        for a, b, u0, u1, m in self.bw:
            z[:, u0:u1] += y[:, a:b] @ m
        return z.view(r, self.n)

    def adjoint_left(self, z: torch.Tensor, a0: int, a1: int, q: torch.Tensor) -> None:
        """q += U_R^T z (z: (rows * W, n))."""
        x = z.view(a1 - a0, self.W, self.n)
        y = torch.zeros(a1 - a0, self.w, self.n, dtype=z.dtype)
        for a, b, u0, u1, m in self.bw:
            y[:, u0:u1] += torch.matmul(m.t(), x[:, a:b])
        c0, c1 = support(self.Uh[a0:a1])
        qv = q.view(self.h, self.w * self.n)
        qv[c0:c1] += self.Uh[a0:a1, c0:c1].t() @ y.view(a1 - a0, self.w * self.n)

    def factored_backward(self, phi: torch.Tensor | None = None) -> torch.Tensor:
        """(Q + Q^T) S with Q = U^T phi~ U, phi~ the upper part of phi with halved diagonal blocks."""
        q = torch.zeros(self.n, self.n, dtype=self.S.dtype)
        for a0 in range(0, self.H, self.band):
            a1 = min(a0 + self.band, self.H)
            p0, p1 = a0 * self.W, a1 * self.W
            part = (phi[p0:p1] if phi is not None else self.phi_band[: p1 - p0]).clone()
            part[:, :p0] = 0
            part[:, p0:p1] *= 0.5
            self.adjoint_left(self.adjoint_columns(part), a0, a1, q)
        return (q + q.t()) @ self.S


def check_exact(band: int, pieces: int) -> dict[str, float]:
    """float64: the factored S^s and gradient equal the direct B B^T and U^T phi B."""
    p = Problem((16, 32), 2, 8, band, pieces, dtype=torch.float64, seed=1)
    gram = p.S @ p.S.t()
    direct = p.B @ p.B.t()
    worst_fwd = 0.0
    for a0 in range(0, p.H, band):
        a1 = min(a0 + band, p.H)
        got = p.factored_student(a0, a1, gram)
        worst_fwd = max(worst_fwd, float((got - direct[a0 * p.W:a1 * p.W]).abs().max()))
    g = torch.Generator().manual_seed(2)
    phi = torch.randint(-1, 2, (p.N, p.N), generator=g).to(torch.float64)
    phi = torch.triu(phi) + torch.triu(phi, 1).t()  # symmetric, entries -1/0/1
    up = torch.kron(p.Uh, p.Uw)  # (N, n): B = up S
    want = up.t() @ (phi @ p.B)
    worst_bwd = float((p.factored_backward(phi) - want).abs().max())
    if worst_fwd > 1e-12 or worst_bwd > 1e-10:
        raise SystemExit(f"factored forms disagree with the direct ones: forward {worst_fwd:.2e}, backward {worst_bwd:.2e}")
    return {"forward_max_abs_err": worst_fwd, "backward_max_abs_err": worst_bwd}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--band", type=int, default=4, help="fine image rows per row band of the factored form")
    ap.add_argument("--pieces", type=int, default=4, help="pieces of each banded interpolation matrix")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fa_factored.json"))
    args = ap.parse_args()
    exact = check_exact(args.band, args.pieces)
    channels = 128  # C_t = C_s at the tutor's 1/4 path and the student's 1/8 path
    p = Problem((64, 128), 2, channels, args.band, args.pieces)
    runs = {"forward_fused": p.fused_forward, "forward_factored": p.factored_forward,
            "forward_interpolate": lambda: p.factored_forward(interpolate=True),
            "backward_fused": p.fused_backward, "backward_factored": p.factored_backward}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()  # warm-up
    for r in range(args.rounds):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items()), flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    res = {
        "benchmark": "fa_factored", "machine": machine_record("cpu"),
        "command": "OMP_NUM_THREADS=" + str(torch.get_num_threads()) + " .venv/bin/python " + " ".join(sys.argv),
        "setting": {"teacher_hw": [p.H, p.W], "student_hw": [p.h, p.w], "N": p.N, "n": p.n, "channels": channels,
                    "tile": TILE, "band_rows": args.band, "pieces": args.pieces, "dtype": "float32"},
        "exactness_float64": exact,
        "times_s": times, "median_s": {k: statistics.median(v) for k, v in times.items()},
        "ratios": {"forward_factored/fused": ratio("forward_factored", "forward_fused"),
                   "forward_interpolate/fused": ratio("forward_interpolate", "forward_fused"),
                   "backward_factored/fused": ratio("backward_factored", "backward_fused")},
    }
    # the fused products' FLOP rates against the in-process mm: how much room the tiled kernel has
    n, c = p.N, channels
    flops = {"forward_fused": 2.0 * (n * n / 2 + n * TILE / 2) * 2 * c, "backward_fused": 2.0 * n * n * c}
    mm = res["machine"]["mm_fp32_gflops"]
    res["fused_gflops"] = {k: f / res["median_s"][k] / 1e9 for k, f in flops.items()}
    res["fused_fraction_of_mm"] = {k: v / mm for k, v in res["fused_gflops"].items()} if mm else None
    for k, v in res["fused_gflops"].items():
        print(f"{k:28s} {v:.1f} GFLOP/s ({v / mm:.2f} of the in-process mm)" if mm else f"{k} {v:.1f} GFLOP/s")
    for k, v in res["ratios"].items():
        print(f"{k:28s} {v:.2f}")
    atomic_write_json(Path(args.out), res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
