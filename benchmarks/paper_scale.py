"""A rehearsal of the ``paper`` profile at full size on this machine: a few optimiser steps of
every paper stage, at the paper's shapes and batch, through the package's own training loops.

Every stage is built with ``fasterkd.train.preset(stage, "paper", ...)`` and stepped by the real
engine: ``Trainer._train_epoch`` (teacher, baseline, tutor, student, head) and
``Searcher._epoch`` (the search's pretrain and search phases), one optimiser step per call
(``max_steps_per_epoch=1``). The frames are synthetic street scenes of Cityscapes size
(``fasterkd.data.scenes.render_scene`` at 1024x2048), augmented by the package's
``TrainTransform`` (scale, flip, crop) as in training; the search's frames are first downsampled
by 2 (image area-averaged, label nearest) as FasterSeg's search does. The frozen guides (HRNet-W48
teacher, tutor) are randomly initialised checkpoints in the package's format: the cost of a step
does not depend on the values of the weights.

Each stage runs in a fresh subprocess, so one stage's allocations cannot raise another's peak.
In it: a batch-1 step (warm-up), a batch-1 step and a batch-2 step, each with the resident set's
high-water mark (VmHWM, reset through /proc/self/clear_refs) measured around it; the difference
is the memory per image. When ``base + per_image x batch`` exceeds the memory limit the stage runs
the largest batch under it instead of the paper's (and says so). At the batch it runs: one
warm-up step (its peak is the stage's peak) and ``--timed`` timed steps (0: the warm-up step is
timed; it follows the batch-1 and batch-2 steps, so the kernels and the allocator are warm). Each
step records wall seconds and the process's CPU seconds (all threads): on a shared machine the
wall time grows with the load, CPU seconds / 2 threads estimate the wall time with the 2 cores
to itself.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/paper_scale.py [--only STAGE ...] [--timed K]
        [--limit-gb G] [--out benchmarks/results/paper_scale.json] [--update]
    .venv/bin/python benchmarks/paper_scale.py --table benchmarks/results/paper_scale.json

The JSON is rewritten after every stage, so an interrupted rehearsal keeps the stages it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine_record  # noqa: E402

from fasterkd.utils import atomic_torch_save, atomic_write_json  # noqa: E402

THREADS = 2
FRAME = (1024, 2048)  # Cityscapes
FRAMES = 4  # distinct rendered scenes, cycled to fill a batch
CITYSCAPES_TRAIN = 2975
LOW, HIGH = (256, 512), (512, 1024)
FASTERSEG_TRAIN_ITERS = 1000  # FasterSeg train/config_train.py: niters_per_epoch

# (row name, stage, crop, phase). The search's phases: FasterSeg pretrains on 256x512 crops and
# searches on 224x448 crops of the x2-downsampled frames (spec §6.2).
CASES = [
    ("baseline 256x512", "baseline", LOW, None),
    ("head 256x512", "head", LOW, None),
    ("tutor 256x512", "tutor", LOW, None),
    ("student 256x512", "student", LOW, None),
    ("search pretrain", "search", (256, 512), "pretrain"),
    ("search", "search", (224, 448), "search"),
    ("baseline 512x1024", "baseline", HIGH, None),
    ("head 512x1024", "head", HIGH, None),
    ("tutor 512x1024", "tutor", HIGH, None),
    ("student 512x1024", "student", HIGH, None),
    ("teacher 512x1024", "teacher", HIGH, None),
]

# the paper's epochs per stage and crop (§4.2); the teacher follows HRNet's Cityscapes recipe
PAPER_EPOCHS = {"teacher": {HIGH: 484}, "baseline": {LOW: 500, HIGH: 500}, "head": {LOW: 500, HIGH: 500},
                "tutor": {LOW: 350, HIGH: 400}, "student": {LOW: 400, HIGH: 400}}


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def reset_peak() -> None:
    """Reset VmHWM to the current resident set (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def peak_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def default_limit_bytes() -> int:
    """24 GiB, or 80 % of the memory available now if less (a shared machine without swap)."""
    avail = None
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    cap = 24 * 2**30
    return min(cap, int(0.8 * avail)) if avail else cap


# --------------------------------------------------------------------------------------------
# Inputs: rendered frames, random guide checkpoints
# --------------------------------------------------------------------------------------------


def prepare(work: Path) -> dict[str, str]:
    """Render the frames and write the random HRNet-W48 teacher and tutor checkpoints."""
    from fasterkd.data.scenes import render_scene
    from fasterkd.engine.checkpoint import build_network, checkpoint_header, model_identity
    from fasterkd.train import preset

    frames = work / "frames.pt"
    if not frames.exists():
        images, labels = [], []
        for i in range(FRAMES):
            rgb, lab = render_scene(0, i, FRAME)
            images.append(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
            labels.append(torch.from_numpy(lab.astype("int64")))
        atomic_torch_save({"images": torch.stack(images), "labels": torch.stack(labels)}, frames)
    paths = {"frames": str(frames)}
    for stage in ("teacher", "tutor"):
        path = work / f"{stage}.pt"
        if not path.exists():
            cfg = preset(stage, "paper", device="cpu")
            torch.manual_seed(0)
            model = build_network(cfg)
            atomic_torch_save(checkpoint_header(cfg, model_identity(model, cfg), model), path)
            del model
        paths[stage] = str(path)
    return paths


class Frames(torch.utils.data.Dataset):
    """``count`` items cycling over the rendered frames, as the package's datasets return them."""

    def __init__(self, path: str, count: int, downsample: int = 1) -> None:
        d = torch.load(path, weights_only=True)
        images, labels = d["images"], d["labels"]
        if downsample > 1:  # FasterSeg's search: image area-averaged, label nearest, before the crop
            h, w = images.shape[-2] // downsample, images.shape[-1] // downsample
            images = torch.nn.functional.interpolate(images.float(), size=(h, w),
                                                     mode="area").round().clamp(0, 255).to(torch.uint8)
            labels = torch.nn.functional.interpolate(labels[:, None].float(), size=(h, w), mode="nearest")[:, 0].long()
        self.images, self.labels, self.count = images, labels, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict:
        k = i % len(self.images)
        return {"image": self.images[k], "label": self.labels[k], "name": f"frame{k}"}


# --------------------------------------------------------------------------------------------
# Iterations per epoch and full-stage steps
# --------------------------------------------------------------------------------------------


def schedule(cfg, stage: str, crop: tuple[int, int], phase: str | None, batch: int) -> dict:
    """Epochs, iterations per epoch and optimiser steps of the full stage at the paper's batch:
    as the preset counts them (``iters_per_epoch`` when the config has it, else one pass over the
    2975 Cityscapes training images) and as FasterSeg's code counts them (1000 per training epoch;
    ``max(2975 // 2 // batch, 400)`` per search epoch; the teacher: HRNet's one pass)."""
    if stage == "search":
        epochs = cfg.search.pretrain_epochs if phase == "pretrain" else cfg.epochs
        one_pass = CITYSCAPES_TRAIN // 2 // batch  # each half of the split
        fasterseg = max(CITYSCAPES_TRAIN // 2 // batch, 400)
    else:
        epochs = cfg.epochs
        one_pass = CITYSCAPES_TRAIN // batch
        # the teacher follows HRNet's recipe, whose epoch is one pass (484 x 247 ~ 120k steps)
        fasterseg = one_pass if stage == "teacher" else FASTERSEG_TRAIN_ITERS
    ipe = getattr(cfg, "iters_per_epoch", None)
    if ipe == "fasterseg":
        preset_ipe, source = fasterseg, "iters_per_epoch='fasterseg': max(2975 // 2 // batch, 400)"
    elif ipe:
        preset_ipe, source = int(ipe), "TrainConfig.iters_per_epoch"
    else:
        preset_ipe = one_pass
        source = f"one pass over {CITYSCAPES_TRAIN} Cityscapes train images (iters_per_epoch None or absent)"
    return {"epochs": epochs, "paper_epochs": PAPER_EPOCHS.get(stage, {}).get(tuple(crop)),
            "iters_per_epoch_preset": preset_ipe, "iters_per_epoch_preset_source": source,
            "iters_per_epoch_fasterseg": fasterseg,
            "steps_preset": epochs * preset_ipe, "steps_fasterseg": epochs * fasterseg}


# --------------------------------------------------------------------------------------------
# The worker: one stage in a fresh process
# --------------------------------------------------------------------------------------------


class Stage:
    """A paper stage built from its preset, stepped through the engine's own epoch loop."""

    def __init__(self, stage: str, crop: tuple[int, int], phase: str | None, paths: dict, out: Path) -> None:
        from fasterkd.train import preset

        self.stage, self.phase, self.paths, self.out = stage, phase, paths, out
        guides = {"teacher": paths["teacher"]} if stage != "teacher" else {}
        if stage == "student":
            guides["tutor"] = paths["tutor"]
        self.base_cfg = preset(stage, "paper", out_dir=str(out), device="cpu", crop=tuple(crop), num_workers=0,
                               tensorboard=False, progress=False, max_steps_per_epoch=1, **guides)
        self.paper_batch = self.base_cfg.data.batch_size
        self.engine = None
        self.batch = None
        self.step = 0

    def build(self, batch: int) -> None:
        """(Re)build the engine at ``batch`` (the model, guides and optimisers of the stage)."""
        import copy

        from fasterkd.engine.trainer import MetricsLog

        self.engine = None
        cfg = copy.deepcopy(self.base_cfg)
        cfg.data.batch_size = batch
        cfg.validate()
        self.cfg, self.batch = cfg, batch
        down = 2 if self.stage == "search" else 1
        self.data = self._seeded(Frames(self.paths["frames"], max(batch, 2), down))
        if self.stage == "search":
            from fasterkd.engine.search import Searcher, load_latency_table

            from fasterkd.data.loaders import train_transform

            eng = Searcher(cfg)
            eng._build()
            eng.lut = load_latency_table(cfg, self.out, eng.device, True)
            self.data_a = self._seeded(Frames(self.paths["frames"], max(batch, 2), down))
            # what Searcher._fit sets up before its epochs: the pretrain and search crops, the
            # split's size (the epoch length; max_steps_per_epoch=1 caps it) and the log rows
            eng.transforms = {False: self.data.transform, True: train_transform(cfg, cfg.search.crop)}
            eng.split_images, eng._rows = CITYSCAPES_TRAIN, []
        else:
            from fasterkd.engine.trainer import Trainer

            eng = Trainer(cfg)
            eng._build()
            self.log = MetricsLog(self.out, False, False)
        self.engine = eng

    def _seeded(self, base):
        from fasterkd.data.loaders import SeededTrainSet
        from fasterkd.data.transforms import TrainTransform

        d = self.base_cfg.data
        tf = TrainTransform(crop=tuple(d.crop), scales=tuple(d.scales), flip=d.flip, label_downsample=d.label_downsample)
        return SeededTrainSet(base, tf, self.base_cfg.seed)

    def one_step(self) -> tuple[float, dict]:
        """One optimiser step through the engine's epoch loop; (wall seconds, CPU seconds of the
        process (all threads), the loop's row)."""
        last = self.out / "last.pt"
        t0, c0 = time.perf_counter(), time.process_time()
        if self.stage == "search":
            row, self.step = self.engine._epoch(self.data, self.data_a, self.step, self.step,
                                                self.phase == "search", last)
        else:
            row, self.step = self.engine._train_epoch(self.data, self.step, self.step, self.log, last)
        return time.perf_counter() - t0, time.process_time() - c0, row


def worker(spec: dict) -> dict:
    torch.set_num_threads(THREADS)
    crop = tuple(spec["crop"])
    out = Path(spec["work"]) / spec["name"].replace(" ", "_")
    st = Stage(spec["stage"], crop, spec["phase"], spec["paths"], out)
    res: dict = {"paper_batch": st.paper_batch, "threads": torch.get_num_threads()}
    res["schedule"] = schedule(st.base_cfg, spec["stage"], crop, spec["phase"], st.paper_batch)
    res["config"] = {"lr": st.base_cfg.optim.lr, "weight_decay": st.base_cfg.optim.weight_decay,
                     "lr_decay": st.base_cfg.optim.lr_decay, "model": st.base_cfg.model.name,
                     "head": st.base_cfg.model.head, "fa_weight": st.base_cfg.loss.fa_weight,
                     "kd_weight": st.base_cfg.loss.kd_weight, "label_downsample": st.base_cfg.data.label_downsample}
    if spec["stage"] == "search":
        res["config"]["pretrain_lr"] = st.base_cfg.search.pretrain_lr
        res["config"]["frames_downsampled_by"] = 2
    # memory per image: batch 1 (warm-up), batch 1, batch 2
    probe = {}
    st.build(1)
    st.one_step()
    for b in (1, 2):
        if st.batch != b:
            st.build(b)
        reset_peak()
        t, c, row = st.one_step()
        probe[b] = {"peak_bytes": peak_bytes(), "time_s": t, "cpu_s": c}
    per_image = max(0, probe[2]["peak_bytes"] - probe[1]["peak_bytes"])
    base = probe[1]["peak_bytes"] - per_image
    limit = spec["limit_bytes"]
    est = base + per_image * st.paper_batch
    fits = est <= limit
    batch = st.paper_batch if fits else max(1, min(st.paper_batch, int((limit - base) // max(1, per_image))))
    res["memory_probe"] = {"batch1": probe[1], "batch2": probe[2], "per_image_bytes": per_image,
                           "base_bytes": base, "estimated_paper_batch_bytes": est, "limit_bytes": limit,
                           "fits_at_paper_batch": fits}
    res["batch_run"] = batch
    if not fits:
        res["note"] = (f"estimated {est / 2**30:.1f} GiB at the paper's batch {st.paper_batch} exceeds the "
                       f"{limit / 2**30:.1f} GiB limit; ran batch {batch}")
    # the batch it runs at: warm-up (its peak is the stage's), then timed steps
    if st.batch != batch:
        st.build(batch)
    reset_peak()
    load0 = os.getloadavg()[0]
    warm, warm_cpu, row = st.one_step()
    res["peak_bytes"] = peak_bytes()
    times, cpus, rows = [], [], [row]
    for _ in range(spec["timed"]):
        t, c, row = st.one_step()
        times.append(t)
        cpus.append(c)
        rows.append(row)
    if not times:  # --timed 0: the first step at this batch (after the batch-1 and batch-2 steps) is timed
        times, cpus = [warm], [warm_cpu]
    wall, cpu = sum(times) / len(times), sum(cpus) / len(cpus)
    res.update(warmup_s=warm, warmup_cpu_s=warm_cpu, times_s=times, cpu_s=cpus, s_per_step=wall,
               cpu_s_per_step=cpu, images_per_s=batch / wall, images_per_cpu_s=batch / cpu,
               load_average_during=[load0, os.getloadavg()[0]],
               last_row={k: v for k, v in rows[-1].items() if isinstance(v, (int, float))}, status="ok")
    return res


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def run_case(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - t0}
    wall = time.perf_counter() - t0
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            return dict(json.loads(line[7:]), wall_s=wall)
    return {"status": "failed", "error": (p.stderr or p.stdout)[-2000:], "returncode": p.returncode, "wall_s": wall}


def extrapolate(r: dict) -> None:
    """CPU hours of the full stage at the batch that ran: steps x (paper batch / batch run) x s/step."""
    if r.get("status") != "ok":
        return
    scale = r["paper_batch"] / r["batch_run"]  # more steps when a smaller batch ran
    for key in ("steps_preset", "steps_fasterseg"):
        steps = r["schedule"][key] * scale
        r[f"hours_{key[6:]}"] = steps * r["s_per_step"] / 3600  # wall, at the load it ran under
        # CPU seconds / threads: the wall time on the same 2 cores with nothing else running
        r[f"hours_{key[6:]}_unloaded"] = steps * r["cpu_s_per_step"] / THREADS / 3600


def markdown_rows(record: dict) -> str:
    """The rehearsal's table (one row per stage that ran, or its failure) as Markdown."""
    lines = ["| stage | crop | batch run / paper | s / step (wall) | CPU s / step | peak RSS (GiB) | memory / image (GiB) "
             "| images / s (wall) | full-stage steps: preset / FasterSeg epochs | extrapolated hours (wall / unloaded) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["stages"]:
        crop = "x".join(str(c) for c in r["crop"])
        if r.get("status") != "ok":
            lines.append(f"| {r['name']} | {crop} | {r.get('status')}: {str(r.get('error', ''))[:80]} |||||||")
            continue
        sch, mp = r["schedule"], r["memory_probe"]
        lines.append(
            f"| {r['name']} | {crop} | {r['batch_run']} / {r['paper_batch']} | {r['s_per_step']:.1f} | "
            f"{r['cpu_s_per_step']:.1f} | {r['peak_bytes'] / 2**30:.2f} | {mp['per_image_bytes'] / 2**30:.2f} | "
            f"{r['images_per_s']:.3f} | {sch['steps_preset']:,} / {sch['steps_fasterseg']:,} | "
            f"{r['hours_fasterseg']:,.0f} / {r['hours_fasterseg_unloaded']:,.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="row names or stages to run (default: all)")
    ap.add_argument("--timed", type=int, default=2, help="timed steps per stage after the warm-up (0: time "
                    "the warm-up step itself, which follows the batch-1 and batch-2 steps)")
    ap.add_argument("--limit-gb", type=float, default=None, help="memory limit (default: 24 GiB or 80 %% of available)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per stage")
    ap.add_argument("--work", default=None, help="folder for frames and guide checkpoints (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "paper_scale.json"))
    ap.add_argument("--update", action="store_true", help="keep the rows of an existing --out JSON: the rows "
                    "run now replace their namesakes (the run is recorded under 'updates' with its machine record)")
    ap.add_argument("--table", metavar="JSON", help="print the Markdown table of a written JSON and exit")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.table:
        print(markdown_rows(json.loads(Path(args.table).read_text())))
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return 0
    if args.timed < 0:
        raise SystemExit(f"--timed must be >= 0, got {args.timed}")
    torch.set_num_threads(THREADS)
    cases = [c for c in CASES if not args.only or c[0] in args.only or c[1] in args.only]
    if not cases:
        raise SystemExit(f"--only {args.only}: no row or stage of {[c[0] for c in CASES]} matches")
    work = Path(args.work or tempfile.mkdtemp(prefix="paper_scale-"))
    work.mkdir(parents=True, exist_ok=True)
    limit = int(args.limit_gb * 2**30) if args.limit_gb else default_limit_bytes()
    out = Path(args.out)
    record = {
        "benchmark": "paper_scale",
        "what": "optimiser steps of every paper-profile stage (fasterkd.train.preset(stage, 'paper')) at full "
                "size on CPU, through Trainer._train_epoch / Searcher._epoch; frames: render_scene at 1024x2048 "
                "(4 scenes cycled), TrainTransform crops; guides: random HRNet-W48 teacher and tutor checkpoints; "
                "peak = VmHWM of a fresh process per stage",
        "machine": machine_record("cpu"),
        "command": "OMP_NUM_THREADS=2 " + " ".join(shlex.quote(a) for a in [".venv/bin/python", *sys.argv]),
        "threads": THREADS, "frame": list(FRAME), "data": "synthetic: fasterkd.data.scenes.render_scene(0, i, (1024, 2048))",
        "limit_bytes": limit, "timed_steps": args.timed,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "stages": [], "complete": False,
    }
    if args.update and out.is_file():  # earlier rows stay; this run is one more entry of 'updates'
        earlier = json.loads(out.read_text())
        update = {k: record[k] for k in ("machine", "command", "started", "limit_bytes", "timed_steps")}
        update["rows"] = [c[0] for c in cases]
        record = dict(earlier, updates=[*earlier.get("updates", []), update], complete=False)
        record["stages"] = [r for r in earlier["stages"] if r["name"] not in update["rows"]]
    m = record["machine"]
    print(f"machine: {m['cpu_model']}, {m['cpus_usable']}/{m['cpu_count']} CPUs, load {m['load_average']}, "
          f"torch {m['torch']}, limit {limit / 2**30:.1f} GiB", flush=True)
    paths = prepare(work)
    for name, stage, crop, phase in cases:
        spec = {"name": name, "stage": stage, "crop": list(crop), "phase": phase, "paths": paths,
                "work": str(work), "limit_bytes": limit, "timed": args.timed}
        r = dict(name=name, stage=stage, crop=list(crop), phase=phase, **run_case(spec, args.timeout))
        extrapolate(r)
        record["stages"].append(r)
        order = [c[0] for c in CASES]
        record["stages"].sort(key=lambda row: order.index(row["name"]) if row["name"] in order else len(order))
        atomic_write_json(out, record)  # an interrupted rehearsal keeps what it ran
        if r["status"] == "ok":
            print(f"{name:<20} batch {r['batch_run']:>2}/{r['paper_batch']:<2} {r['s_per_step']:8.1f} s/step  "
                  f"peak {r['peak_bytes'] / 2**30:5.1f} GiB  {r['images_per_s']:6.3f} img/s  "
                  f"steps {r['schedule']['steps_preset']}/{r['schedule']['steps_fasterseg']}  "
                  f"{r['hours_fasterseg']:9.0f} h ({r['hours_fasterseg_unloaded']:.0f} h unloaded)", flush=True)
        else:
            print(f"{name:<20} {r['status']}: {r.get('error', '')[-400:]}", flush=True)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    record["complete"] = all(r.get("status") == "ok" for r in record["stages"]) and len(record["stages"]) == len(CASES)
    atomic_write_json(out, record)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
