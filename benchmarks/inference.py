"""Benchmark of the inference paths: one forward of a network (batch 1, fp32, CPU) per path.

Paths (each checked against ``eager`` on the same input: max |diff| and argmax agreement):
- ``eager``: the network as trained, eval mode, contiguous (NCHW) tensors: the "before".
- ``channels_last``: the same network and input in channels_last memory format.
- ``bn_folded``: BatchNorm folded into the convolutions (``fasterkd.backends.fold_batchnorm``).
- ``torch``: the torch backend of ``predict``/``eval`` (BN-folded + channels_last).
- ``onnxruntime``: the onnxruntime backend (BN-folded network exported to ONNX); its export and
  session creation are timed apart (``setup_s``), once per input size.
- ``auto``: what ``predict`` and ``eval`` run by default (``--backend auto``).
- ``compile``: ``torch.compile`` of the network, only with ``--compile`` (its cold compile is
  ``setup_s``).

Each path gets one untimed warm-up per size, then ``--rounds`` rounds that run every path once,
interleaved, so a change of machine load hits all paths alike; a speed-up is the median over
rounds of the paired ratio eager time / path time.

Usage: ``python benchmarks/inference.py [--model student|pixel_shuffle|tutor] [--sizes 512x1024,1024x2048]
[--rounds R] [--compile] [--out PATH]``; writes JSON (atomically) to
``benchmarks/results/inference-<model>.json`` by default.
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
from torch import nn  # noqa: E402

from benchmarks._machine import machine_record  # noqa: E402
from fasterkd.backends import fold_batchnorm, inference_backend, resolve_backend  # noqa: E402
from fasterkd.models import build_model  # noqa: E402
from fasterkd.utils import atomic_write_json, parse_size  # noqa: E402

MODELS = {"student": ("student", {}), "pixel_shuffle": ("student", {"head": "pixel_shuffle"}),
          "tutor": ("tutor", {})}


def network(name: str, seed: int = 0) -> nn.Module:
    """The network with trained-like BatchNorm statistics (fresh ones are identities, which would
    make the fold look free of rounding)."""
    torch.manual_seed(seed)
    kind, kw = MODELS[name]
    model = build_model(kind, **kw).eval()
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(0.5 + 1.5 * torch.rand(m.num_features, generator=g))
    return model


def main_logits(out) -> torch.Tensor:
    return out.main if hasattr(out, "main") else out


def paths(model: nn.Module, with_compile: bool) -> dict:
    """name -> (setup function returning a callable image -> logits)."""
    def eager():
        return lambda x: main_logits(model(x))

    def channels_last():
        cl = network_copy(model)  # the unfolded network: only the memory layout changes.to(memory_format=torch.channels_last)
        return lambda x: main_logits(cl(x.contiguous(memory_format=torch.channels_last)))

    def bn_folded():
        folded = fold_batchnorm(model)
        return lambda x: main_logits(folded(x))

    def backend(name):
        def make():
            runner = inference_backend(model, name, "cpu")
            return lambda x: runner(x).main
        return make

    out = {"eager": eager, "channels_last": channels_last, "bn_folded": bn_folded,
           "torch": backend("torch"), "onnxruntime": backend("onnxruntime"), "auto": backend("auto")}
    if with_compile:
        def compiled():
            fn = torch.compile(model)
            return lambda x: main_logits(fn(x))
        out["compile"] = compiled
    return out


def network_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def run(args: argparse.Namespace) -> dict:
    torch.set_grad_enabled(False)
    model = network(args.model)
    makers = paths(model, args.compile)
    record: dict = {"benchmark": "inference", "model": args.model, "batch": 1, "dtype": "float32",
                    "rounds": args.rounds, "auto_picks": resolve_backend("auto", "cpu"),
                    "machine": machine_record("cpu"), "sizes": []}
    for size in args.sizes:
        x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
        entry: dict = {"size": list(size), "paths": {}}
        fns = {}
        ref = None
        for name, make in makers.items():
            t0 = time.perf_counter()
            fn = make()
            y = fn(x)  # warm-up (ONNX export + session, or the cold compile, happen here)
            setup = time.perf_counter() - t0
            if ref is None:
                ref = y
            fns[name] = fn
            entry["paths"][name] = {
                "setup_s": setup, "times_s": [],
                "max_abs_diff": float((y - ref).abs().max()), "logit_scale": float(ref.abs().max()),
                "argmax_agreement": float((y.argmax(1) == ref.argmax(1)).float().mean()),
            }
            print(f"{size[0]}x{size[1]} {name:14s} setup {setup:7.2f} s", flush=True)
        for r in range(args.rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn(x)
                entry["paths"][name]["times_s"].append(time.perf_counter() - t0)
        base = entry["paths"]["eager"]["times_s"]
        for name, p in entry["paths"].items():
            p["median_s"] = statistics.median(p["times_s"])
            p["speedup_vs_eager"] = statistics.median(b / t for b, t in zip(base, p["times_s"]))
            print(f"{size[0]}x{size[1]} {name:14s} median {p['median_s']:7.3f} s  x{p['speedup_vs_eager']:.2f} "
                  f"vs eager  max|diff| {p['max_abs_diff']:.2e}  argmax agree {p['argmax_agreement']:.5f}",
                  flush=True)
        record["sizes"].append(entry)
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="student")
    ap.add_argument("--sizes", default="512x1024,1024x2048", help="comma-separated HxW list")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (cold compile: minutes)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error(f"--rounds must be >= 1, got {args.rounds}")
    args.sizes = [parse_size(s, "--sizes") for s in args.sizes.split(",")]
    record = run(args)
    out = args.out or ROOT / "benchmarks" / "results" / f"inference-{args.model}.json"
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
