"""Where a benchmark ran: the machine record every benchmark JSON carries.

:func:`machine_record` gives the CPU model (``/proc/cpuinfo``), the cores the OS has and the
ones this process may use, torch's thread count, the load average, torch's version and the
GPU's name, and, measured in the same process, the fp32 ``torch.mm`` rate (:func:`mm_gflops`).
A benchmark divides its own FLOP rates by that rate, so a number from a loaded or a faster machine
still says how close to the hardware's matrix-multiply speed the code ran.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

MM_SIZE = 2048  # square fp32 product: 17.2 GFLOP, a fraction of a second on one core


def cpu_model() -> str:
    """The ``model name`` of /proc/cpuinfo (else what ``platform`` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector-unit flags that decide fp32 matmul speed (AVX2/FMA/AVX-512, bf16, AMX)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def mm_gflops(device: torch.device | str = "cpu", size: int = MM_SIZE, repeats: int = 3) -> float:
    """fp32 ``torch.mm`` of two size x size matrices, GFLOP/s (2 FLOPs per multiply-add), best of
    ``repeats`` after one warm-up, with the process's current torch thread count."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(size, size, generator=g).to(device)
    y = torch.randn(size, size, generator=g).to(device)
    out = torch.empty(size, size, device=device)
    if device.type == "cuda":  # no TF32: the same IEEE fp32 arithmetic as the kernels measured
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    try:
        best = float("inf")
        for k in range(repeats + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            torch.mm(x, y, out=out)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if k:  # the first run is the warm-up
                best = min(best, time.perf_counter() - t0)
    finally:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = prev
    return 2.0 * size**3 / best / 1e9


def machine_record(device: torch.device | str = "cpu", measure_mm: bool = True) -> dict:
    """The set-up of this process as a JSON-ready dict (see the module docstring)."""
    device = torch.device(device)
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    rec = {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    if measure_mm:
        rec["mm_fp32_gflops"] = mm_gflops(device)
        rec["mm_shape"] = [MM_SIZE, MM_SIZE, MM_SIZE]
    return rec
