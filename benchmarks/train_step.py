"""Benchmark of one training step of each stage (forward, loss, backward, SGD step), CPU.

Steps, built like ``fasterkd.engine.trainer.Trainer`` builds them (the stage's quick preset, its
``Objective``, frozen guides with fresh weights; random images and labels):
- ``baseline``: student (bilinear head), OHEM CE + aux + KL from the HRNet teacher.
- ``tutor``: the tutor, the same terms.
- ``head``: student with the pixel-shuffle head, the same terms.
- ``student_q1_auto`` / ``student_q1_tiled``: the student stage, Eq. 10 with the paper's FA loss
  (q = 1; ``impl="auto"``, the library default, and ``impl="tiled"``).
- ``student_q2_gram``: the student stage with the squared FA loss (q = 2, exact Gram path).
- ``student_no_fa``: the student stage without the FA term (c = 0; the tutor still runs for KL).
The FA term's share of a step is 1 - t(no_fa) / t(with FA), from paired rounds.

``--memory-format`` instead times the baseline and student steps at the quick crop (128x256,
batch 4) and at 256x512, batch 2, contiguous vs channels_last (model and image, as the trainer
converts them): the measurement behind ``TrainConfig.channels_last`` on CPU.

Each step gets one untimed warm-up, then ``--rounds`` rounds run every step once, interleaved;
ratios are medians of per-round ratios. Usage: ``python benchmarks/train_step.py [--size 256x512]
[--batch 2] [--rounds R] [--steps a,b,...] [--memory-format] [--out PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks._machine import machine_record  # noqa: E402
from fasterkd import losses  # noqa: E402
from fasterkd.config import preset  # noqa: E402
from fasterkd.engine.checkpoint import build_network  # noqa: E402
from fasterkd.engine.objective import Objective  # noqa: E402
from fasterkd.models import build_model  # noqa: E402
from fasterkd.utils import atomic_write_json, parse_size  # noqa: E402

# name -> (stage, overrides, FA implementation or None for the library default)
STEPS = {
    "baseline": ("baseline", {}, None),
    "tutor": ("tutor", {}, None),
    "head": ("head", {}, None),
    "student_q1_auto": ("student", {}, None),
    "student_q1_tiled": ("student", {}, "tiled"),
    "student_q2_gram": ("student", {"fa_q": 2}, "gram"),
    "student_no_fa": ("student", {"fa_weight": 0.0}, None),
}


@contextlib.contextmanager
def fa_impl(impl: str | None):
    """Run the objective's FA term with ``impl`` (it looks ``path_fa_loss`` up at call time)."""
    if impl is None:
        yield
        return
    original = losses.path_fa_loss
    losses.path_fa_loss = functools.partial(original, impl=impl)
    try:
        yield
    finally:
        losses.path_fa_loss = original


class Step:
    """One stage's training step on a fixed random batch."""

    def __init__(self, stage: str, overrides: dict, impl: str | None, size: tuple[int, int], batch: int,
                 channels_last: bool = False) -> None:
        torch.manual_seed(0)
        cfg = preset(stage, "quick", **overrides)
        self.model = build_network(cfg).train()
        teacher = tutor = None
        if stage == "student":
            tutor = build_model("tutor").eval().requires_grad_(False)
        else:
            teacher = build_model(cfg.guide.teacher_model).eval().requires_grad_(False)
        self.objective = Objective(cfg, teacher, tutor)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        g = torch.Generator().manual_seed(1)
        self.image = torch.randn(batch, 3, *size, generator=g)
        self.label = torch.randint(0, 19, (batch, *size), generator=g)
        self.label[:, : size[0] // 8] = 255  # an ignored band, as real labels have
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
            self.image = self.image.contiguous(memory_format=torch.channels_last)
        self.impl = impl

    def __call__(self) -> dict[str, float]:
        with fa_impl(self.impl):
            loss, terms = self.objective(self.model, self.image, self.label)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {k: float(v.detach()) for k, v in terms.items()}


def timed_rounds(steps: dict[str, Step], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        print(f"  warm-up {name:18s} {time.perf_counter() - t0:6.2f} s", flush=True)
    for r in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
        print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
    return times


def paired(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den))


def stage_steps(args: argparse.Namespace) -> dict:
    steps = {name: Step(*STEPS[name], args.size, args.batch) for name in args.steps}
    times = timed_rounds(steps, args.rounds)
    out = {name: {"times_s": t, "median_s": statistics.median(t),
                  "images_per_s": args.batch / statistics.median(t)} for name, t in times.items()}
    share = {}
    for name in ("student_q1_auto", "student_q1_tiled", "student_q2_gram"):
        if name not in times or "student_no_fa" not in times:
            continue
        share[name] = 1 - paired(times["student_no_fa"], times[name])
        out[name]["fa_share"] = share[name]
    for name, r in out.items():
        extra = f"  FA share {100 * r['fa_share']:.1f} %" if "fa_share" in r else ""
        print(f"{name:18s} {r['median_s']:7.2f} s/step  {r['images_per_s']:.3f} images/s{extra}")
    return {"steps": out}


def memory_format(args: argparse.Namespace) -> dict:
    cases = []
    for size, batch in (((128, 256), 4), ((256, 512), 2)):
        for stage in ("baseline", "student"):
            print(f"{stage} {size[0]}x{size[1]} batch {batch}", flush=True)
            steps = {fmt: Step(stage, {}, None, size, batch, channels_last=(fmt == "channels_last"))
                     for fmt in ("contiguous", "channels_last")}
            times = timed_rounds(steps, args.rounds)
            speedup = paired(times["contiguous"], times["channels_last"])
            cases.append({"stage": stage, "size": list(size), "batch": batch, "times_s": times,
                          "channels_last_speedup": speedup})
            print(f"  channels_last x{speedup:.2f} vs contiguous", flush=True)
    return {"memory_format": cases}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="256x512")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-format", dest="memory_format", action="store_true",
                    help="time contiguous vs channels_last steps instead of the stages")
    ap.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ", ".join(STEPS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    args.steps = args.steps.split(",")
    if set(args.steps) - set(STEPS):
        ap.error(f"--steps: unknown {sorted(set(args.steps) - set(STEPS))}; expected some of {', '.join(STEPS)}")
    if args.rounds < 1 or args.batch < 1:
        ap.error(f"--rounds and --batch must be >= 1, got {args.rounds} and {args.batch}")
    args.size = parse_size(args.size, "--size")
    record = {"benchmark": "train_step", "size": list(args.size), "batch": args.batch, "rounds": args.rounds,
              "steps_run": args.steps,
              "machine": machine_record("cpu")}
    record.update(memory_format(args) if args.memory_format else stage_steps(args))
    name = "train_step-memory_format" if args.memory_format else "train_step"
    out = args.out or ROOT / "benchmarks" / "results" / f"{name}.json"
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
